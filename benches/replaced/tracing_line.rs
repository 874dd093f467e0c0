//! The request line as it was written before commit 636b95e: a `tracing` event formatted
//! by the Cloud Logging `FormatEvent` of commit 636b95e^ (`src/telemetry/cloud_logging.rs`),
//! which built `httpRequest` and the trace while visiting the event's fields and took its
//! timestamp from tracing-subscriber's `SystemTime`. Copied unchanged but for
//! `write_escaped`, which is today's (scan and copy runs, commit e010340), so that the
//! comparison prices the event machinery and the timestamp, not an older escaping loop.
//! Its tests stayed with it in the history; `replaced`'s check compares its lines with
//! the direct line's.

use std::cell::RefCell;
use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as Cloud Logging JSON lines.
pub(crate) struct CloudLogging {
    /// `projects/<id>/traces/`, or `None` when no project id is configured (a trace field
    /// without the project would not be linked by Cloud Logging).
    trace_prefix: Option<Box<str>>,
}

impl CloudLogging {
    pub(crate) fn new(gcp_project_id: Option<&str>) -> Self {
        Self {
            trace_prefix: gcp_project_id.map(|id| format!("projects/{id}/traces/").into_boxed_str()),
        }
    }
}

thread_local! {
    /// The request line's `httpRequest` members, collected while its fields are visited
    /// and appended at the end; reused so that a line allocates nothing once warm.
    static HTTP_REQUEST: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"severity\":\"")?;
        writer.write_str(severity(*meta.level()))?;
        writer.write_str("\",\"time\":\"")?;
        SystemTime.format_time(&mut writer)?;
        writer.write_str("\",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;

        if meta.target() != "request" {
            let mut visitor = Visitor::new(&mut writer, None);
            event.record(&mut visitor);
            visitor.result?;
            return writer.write_str("}\n");
        }

        HTTP_REQUEST.with(|cell| {
            // A formatter that re-enters (a field's Debug logging) finds the buffer taken
            // and gets a fresh one instead of a panic.
            let mut http = cell
                .try_borrow_mut()
                .map(|mut b| std::mem::take(&mut *b))
                .unwrap_or_default();
            http.clear();
            let mut visitor = Visitor::new(&mut writer, Some(&mut http));
            event.record(&mut visitor);
            let Visitor { result, trace, .. } = visitor;
            let written = result
                .and_then(|()| {
                    if http.is_empty() {
                        Ok(())
                    } else {
                        writer.write_str(",\"httpRequest\":{")?;
                        writer.write_str(&http)?;
                        writer.write_char('}')
                    }
                })
                .and_then(|()| match (&self.trace_prefix, trace) {
                    (Some(prefix), Some(trace)) => trace.write(&mut writer, prefix),
                    _ => Ok(()),
                })
                .and_then(|()| writer.write_str("}\n"));
            if let Ok(mut buffer) = cell.try_borrow_mut() {
                *buffer = http;
            }
            written
        })
    }
}

fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// Writes each field as `,"name":value`; for the request line it also fills
/// `httpRequest` and picks up the trace header.
struct Visitor<'a, 'w> {
    out: &'a mut Writer<'w>,
    /// `Some` for the request line: its `httpRequest` members so far.
    http: Option<&'a mut String>,
    trace: Option<Trace>,
    result: fmt::Result,
}

impl<'a, 'w> Visitor<'a, 'w> {
    fn new(out: &'a mut Writer<'w>, http: Option<&'a mut String>) -> Self {
        Self {
            out,
            http,
            trace: None,
            result: Ok(()),
        }
    }

    fn key(&mut self, name: &str) -> fmt::Result {
        self.out.write_str(",\"")?;
        write_escaped(self.out, name)?;
        self.out.write_str("\":")
    }

    /// Adds `"name":` to `httpRequest` and returns the buffer to write the value into.
    fn http_key(&mut self, name: &str) -> Option<&mut String> {
        let http = self.http.as_deref_mut()?;
        if !http.is_empty() {
            http.push(',');
        }
        http.push('"');
        http.push_str(name);
        http.push_str("\":");
        Some(http)
    }

    fn str_field(&mut self, name: &str, value: &str) -> fmt::Result {
        if self.http.is_some() {
            match name {
                "trace" => {
                    // Only the parsed ids are written, under Cloud Logging's own keys.
                    self.trace = Trace::parse(value);
                    return Ok(());
                }
                "user_agent" => {
                    if let Some(http) = self.http_key("userAgent") {
                        write_json_str(http, value)?;
                    }
                    return Ok(());
                }
                "path" => {
                    if let Some(http) = self.http_key("requestUrl") {
                        write_json_str(http, value)?;
                    }
                }
                "method" => {
                    if let Some(http) = self.http_key("requestMethod") {
                        write_json_str(http, value)?;
                    }
                }
                _ => {}
            }
        }
        self.key(name)?;
        write_json_str(self.out, value)
    }
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.str_field(field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        // `%display` and `?debug` fields and the message arrive here.
        self.result = self
            .key(field.name())
            .and_then(|()| self.out.write_char('"'))
            .and_then(|()| write!(JsonEscaper(&mut *self.out), "{value:?}"))
            .and_then(|()| self.out.write_char('"'));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "latency_ms"
            && let Some(http) = self.http_key("latency")
        {
            // Cloud Logging's Duration format: seconds with up to nine decimals and an `s`.
            self.result = write!(http, "\"{:.6}s\"", value / 1000.0);
            if self.result.is_err() {
                return;
            }
        }
        self.result = self.key(field.name()).and_then(|()| {
            if value.is_finite() {
                write!(self.out, "{value}")
            } else {
                self.out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self.key(field.name()).and_then(|()| write!(self.out, "{value}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "status"
            && let Some(http) = self.http_key("status")
        {
            self.result = write!(http, "{value}");
            if self.result.is_err() {
                return;
            }
        }
        self.result = self.key(field.name()).and_then(|()| write!(self.out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        if self.result.is_ok() {
            self.result = self.key(field.name()).and_then(|()| write!(self.out, "{value}"));
        }
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        if self.result.is_ok() {
            self.result = self.key(field.name()).and_then(|()| write!(self.out, "{value}"));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self
                .key(field.name())
                .and_then(|()| self.out.write_str(if value { "true" } else { "false" }));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_ok() {
            self.result = self
                .key(field.name())
                .and_then(|()| self.out.write_char('"'))
                .and_then(|()| write!(JsonEscaper(&mut *self.out), "{value}"))
                .and_then(|()| self.out.write_char('"'));
        }
    }
}

/// A request's trace context: the 32 hex digits of the trace id, the span id as 16 hex
/// digits, and the sampling flag.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    id: [u8; 32],
    span: Option<[u8; 16]>,
    sampled: bool,
}

impl Trace {
    /// Parses W3C `traceparent` (`00-<trace>-<span>-<flags>`) or Google's
    /// `X-Cloud-Trace-Context` (`<trace>/<decimal span>;o=<0|1>`). Anything else, or an
    /// all-zero trace id, is `None`: a client cannot put arbitrary text into the field.
    fn parse(value: &str) -> Option<Self> {
        if let Some(rest) = value.strip_prefix("00-") {
            let mut parts = rest.split('-');
            let id = hex_array::<32>(parts.next()?)?;
            let span = hex_array::<16>(parts.next()?)?;
            let flags = u8::from_str_radix(parts.next()?.get(..2)?, 16).ok()?;
            return Self::checked(id, Some(span).filter(|s| s.iter().any(|b| *b != b'0')), flags & 1 == 1);
        }
        let (trace, rest) = value.split_once('/').unwrap_or((value, ""));
        let id = hex_array::<32>(trace)?;
        let (span, options) = rest.split_once(';').unwrap_or((rest, ""));
        let span = span.parse::<u64>().ok().filter(|s| *s != 0).map(|s| {
            // Cloud Logging wants the span id as 16 hex digits; the header has decimal.
            let mut hex = [0u8; 16];
            for (i, digit) in hex.iter_mut().enumerate() {
                *digit = b"0123456789abcdef"[usize::try_from((s >> (60 - 4 * i)) & 0xf).unwrap_or(0)];
            }
            hex
        });
        Self::checked(id, span, options == "o=1")
    }

    fn checked(id: [u8; 32], span: Option<[u8; 16]>, sampled: bool) -> Option<Self> {
        id.iter().any(|b| *b != b'0').then_some(Self { id, span, sampled })
    }

    fn write(&self, out: &mut Writer<'_>, prefix: &str) -> fmt::Result {
        // The ids are checked hex digits, the prefix a project id: nothing to escape but
        // the project id, which comes from configuration.
        out.write_str(",\"logging.googleapis.com/trace\":\"")?;
        write_escaped(out, prefix)?;
        out.write_str(std::str::from_utf8(&self.id).map_err(|_| fmt::Error)?)?;
        out.write_char('"')?;
        if let Some(span) = &self.span {
            out.write_str(",\"logging.googleapis.com/spanId\":\"")?;
            out.write_str(std::str::from_utf8(span).map_err(|_| fmt::Error)?)?;
            out.write_char('"')?;
        }
        out.write_str(",\"logging.googleapis.com/trace_sampled\":")?;
        out.write_str(if self.sampled { "true" } else { "false" })
    }
}

/// `s` as exactly `N` lowercase hex digits.
fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

fn write_json_str(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    write_escaped(out, s)?;
    out.write_char('"')
}

/// JSON string escaping: quotes, backslashes and control characters; runs of plain
/// characters are copied in one piece.
fn write_escaped(out: &mut impl Write, s: &str) -> fmt::Result {
    let bytes = s.as_bytes();
    let mut start = 0;
    // The common case (no byte to escape) is one cheap test per byte and one copy.
    while let Some(offset) = bytes[start..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
    {
        let i = start + offset;
        out.write_str(&s[start..i])?;
        match bytes[i] {
            b'"' => out.write_str("\\\"")?,
            b'\\' => out.write_str("\\\\")?,
            b'\n' => out.write_str("\\n")?,
            b'\r' => out.write_str("\\r")?,
            b'\t' => out.write_str("\\t")?,
            b => write!(out, "\\u{b:04x}")?,
        }
        start = i + 1;
    }
    out.write_str(&s[start..])
}

/// A `fmt::Write` that escapes what goes through it, for `Debug`/`Display` values.
struct JsonEscaper<'a, W: Write>(&'a mut W);

impl<W: Write> Write for JsonEscaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s)
    }
}
