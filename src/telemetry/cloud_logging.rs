//! The JSON log format for Cloud Logging: one object per line, written into a reused
//! line buffer (no `serde_json::Value` per line).
//!
//! Cloud Logging reads these keys of a line on stdout into the log entry itself:
//! `severity`, `message`, `time`, `httpRequest`, `logging.googleapis.com/trace`,
//! `logging.googleapis.com/spanId` and `logging.googleapis.com/trace_sampled`; every
//! other key lands in `jsonPayload`.
//!
//! The per-request line (target `request`) does not go through tracing's dispatch and
//! field visiting: [`RequestLines::write`] writes it straight from its fields, with an
//! `httpRequest` object built from them and, when a project id is configured, the trace
//! of the request's `traceparent` / `X-Cloud-Trace-Context` header, so that the line shows
//! up under its trace. Every other event goes through [`CloudLogging`]. Both write the
//! same head (`severity`, `time`, `target`), keys and escaping, with the same functions.
//! This module never adds anything that was not a field (so never a body or a secret).

use std::cell::Cell;
use std::fmt::{self, Write};
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::MeterFields;
use super::RequestFields;

/// The target of the per-request line (see [`super::LogLine`]).
pub(crate) const REQUEST_TARGET: &str = "request";

/// The request line's `message`.
pub(crate) const REQUEST_MESSAGE: &str = "request";

/// Formats events as Cloud Logging JSON lines (all but the request line, see
/// [`RequestLines`]).
pub(crate) struct CloudLogging;

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        write_head(&mut writer, *meta.level(), meta.target(), SystemTime::now())?;
        let mut visitor = Visitor {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        writer.write_str("}\n")
    }
}

/// How request lines are written once the JSON subscriber is in place: set at most once.
static REQUEST_LINES: OnceLock<RequestLines> = OnceLock::new();

thread_local! {
    /// The request line being written; reused so that a line allocates nothing once warm.
    static LINE: Cell<String> = const { Cell::new(String::new()) };
}

/// Writes the request lines in Cloud Logging's format, without tracing.
pub(crate) struct RequestLines {
    /// `projects/<id>/traces/`, or `None` when no project id is configured (a trace field
    /// without the project would not be linked by Cloud Logging).
    trace_prefix: Option<Box<str>>,
}

impl RequestLines {
    pub(crate) fn new(gcp_project_id: Option<&str>) -> Self {
        Self {
            trace_prefix: gcp_project_id.map(|id| format!("projects/{id}/traces/").into_boxed_str()),
        }
    }

    /// From now on request lines are written by [`Self::write`]. Only for the process's
    /// JSON subscriber: the line goes to stdout, beside that subscriber's lines.
    pub(crate) fn install(self) {
        let _ = REQUEST_LINES.set(self);
    }

    /// The installed writer: `None` unless the process logs JSON.
    pub(crate) fn installed() -> Option<&'static Self> {
        REQUEST_LINES.get()
    }

    /// Writes the request's line on stdout with one `write_all` under stdout's lock, as
    /// tracing-subscriber writes a line, so that lines never interleave; unbuffered, so
    /// that no line waits in memory for a crash to lose it. The caller checked the filter.
    pub(crate) fn write(&self, fields: &RequestFields<'_>) {
        // Taken out of the thread's slot (and put back) rather than borrowed: nothing can
        // fail, even while the thread's locals are destroyed.
        let mut line = LINE.try_with(Cell::take).unwrap_or_default();
        line.clear();
        if self.format(&mut line, fields, SystemTime::now()).is_ok() {
            // A failed write (stdout closed) has nowhere to be reported: the line is lost,
            // as tracing-subscriber's would be.
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
        }
        let _ = LINE.try_with(|slot| slot.set(line));
    }

    /// The line of `fields` at `now`, with its newline: the members in the order of the
    /// event's fields that the formatter once wrote (the tests keep it), then
    /// `httpRequest`, then the trace.
    fn format(&self, out: &mut impl Write, fields: &RequestFields<'_>, now: SystemTime) -> fmt::Result {
        write_head(out, Level::INFO, REQUEST_TARGET, now)?;
        str_member(out, "message", REQUEST_MESSAGE)?;
        str_member(out, "method", fields.method)?;
        str_member(out, "path", fields.path)?;
        write_key(out, "status")?;
        write!(out, "{}", fields.status)?;
        write_key(out, "latency_ms")?;
        write_f64(out, fields.latency_ms)?;
        str_member(out, "request_id", fields.request_id)?;
        for (name, value) in [
            ("product", fields.product),
            ("user", fields.user),
            ("error", fields.error),
            ("upstream_error_cause", fields.upstream_error_cause),
        ] {
            if let Some(value) = value {
                str_member(out, name, value)?;
            }
        }
        if let Some(status) = fields.upstream_status {
            write_key(out, "upstream_status")?;
            write!(out, "{status}")?;
        }
        if let Some(id) = fields.upstream_request_id {
            str_member(out, "upstream_request_id", id)?;
        }
        if let Some(id) = fields.response_id {
            str_member(out, "response_id", id)?;
        }
        if let Some(meter) = &fields.meter {
            write_meter(out, meter)?;
        }

        // The user agent and the trace header are client-controlled text: only ever the
        // value of their own member, and the trace only as the ids parsed from it.
        out.write_str(",\"httpRequest\":{\"requestMethod\":")?;
        write_json_str(out, fields.method)?;
        str_member(out, "requestUrl", fields.path)?;
        // Cloud Logging's Duration format: seconds with up to nine decimals and an `s`.
        write!(
            out,
            ",\"status\":{},\"latency\":\"{:.6}s\"",
            fields.status,
            fields.latency_ms / 1000.0
        )?;
        if let Some(user_agent) = fields.user_agent {
            str_member(out, "userAgent", user_agent)?;
        }
        out.write_char('}')?;
        if let (Some(prefix), Some(trace)) = (&self.trace_prefix, fields.trace.and_then(Trace::parse)) {
            trace.write(out, prefix)?;
        }
        out.write_str("}\n")
    }
}

/// A metered request's members: the model, its tokens and cost (amounts are exact
/// decimal JSON numbers), and with budgets the reservation and the store.
fn write_meter(out: &mut impl Write, meter: &MeterFields<'_>) -> fmt::Result {
    str_member(out, "model", meter.model)?;
    if let Some(figures) = &meter.figures {
        for (name, tokens) in [
            ("input_tokens", figures.input_tokens),
            ("cached_tokens", figures.cached_tokens),
            ("output_tokens", figures.output_tokens),
        ] {
            write_key(out, name)?;
            write!(out, "{tokens}")?;
        }
        if let Some(cost) = figures.cost {
            write_key(out, "cost_usd")?;
            write!(out, "{cost}")?;
        }
        if figures.estimated {
            write_key(out, "usage_estimated")?;
            out.write_str("true")?;
        }
    }
    if let Some(reservation) = meter.reservation {
        write_key(out, "reservation_usd")?;
        write!(out, "{reservation}")?;
    }
    if let Some(scope) = meter.budget_scope {
        str_member(out, "budget_scope", scope)?;
    }
    if let Some(store) = meter.budget_store {
        str_member(out, "budget_store", store)?;
    }
    Ok(())
}

/// The start of every line: `{"severity":"…","time":"…","target":"…"`.
fn write_head(out: &mut impl Write, level: Level, target: &str, now: SystemTime) -> fmt::Result {
    out.write_str("{\"severity\":\"")?;
    out.write_str(severity(level))?;
    out.write_str("\",\"time\":\"")?;
    // RFC 3339 in UTC with microseconds (`2024-05-01T12:34:56.789012Z`), as
    // tracing-subscriber writes it for the other lines.
    let now = jiff::Timestamp::try_from(now).map_err(|_| fmt::Error)?;
    write!(out, "{now:.6}")?;
    out.write_str("\",\"target\":")?;
    write_json_str(out, target)
}

fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// `,"name":` (the head is always written first, so every member follows another).
fn write_key(out: &mut impl Write, name: &str) -> fmt::Result {
    out.write_str(",\"")?;
    write_escaped(out, name)?;
    out.write_str("\":")
}

/// `,"name":"value"`, escaped.
fn str_member(out: &mut impl Write, name: &str, value: &str) -> fmt::Result {
    write_key(out, name)?;
    write_json_str(out, value)
}

/// A number as Rust prints it; JSON has no NaN or infinity, so those are `null`.
fn write_f64(out: &mut impl Write, value: f64) -> fmt::Result {
    if value.is_finite() {
        write!(out, "{value}")
    } else {
        out.write_str("null")
    }
}

/// Writes each field of an event as `,"name":value`.
struct Visitor<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Visitor<'_, '_> {
    /// Records `,"name":` and the value `write` writes, unless a write failed already.
    fn member(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = write_key(self.out, field.name()).and_then(|()| write(self.out));
        }
    }
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%display` and `?debug` fields and the message arrive here.
        self.member(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaper(&mut *out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, |out| write_f64(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| out.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(JsonEscaper(&mut *out), "{value}")?;
            out.write_char('"')
        });
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

    fn write(&self, out: &mut impl Write, prefix: &str) -> fmt::Result {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_json_str(&mut out, s).expect("write to a String");
        out
    }

    #[test]
    fn strings_are_escaped_as_json() {
        for s in [
            "plain",
            "quote \" and \\ back",
            "line\nbreak\ttab\r",
            "\u{1}\u{7f}",
            "日本語 ✓",
            "",
        ] {
            let parsed: String = serde_json::from_str(&escaped(s)).expect("valid JSON string");
            assert_eq!(parsed, s);
        }
    }

    #[test]
    fn traceparent_is_parsed() {
        let t = Trace::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(&t.id, b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span.as_ref(), Some(b"00f067aa0ba902b7"));
        assert!(t.sampled);
        let unsampled = Trace::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00").expect("valid");
        assert_eq!(&unsampled.id, b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!unsampled.sampled);
    }

    #[test]
    fn cloud_trace_context_is_parsed_with_a_hex_span() {
        let t = Trace::parse("105445aa7843bc8bf206b12000100000/1;o=1").expect("valid");
        assert_eq!(&t.id, b"105445aa7843bc8bf206b12000100000");
        assert_eq!(t.span.as_ref(), Some(b"0000000000000001"));
        assert!(t.sampled);
        let bare = Trace::parse("105445aa7843bc8bf206b12000100000").expect("valid");
        assert_eq!(bare.span, None);
        assert!(!bare.sampled);
    }

    #[test]
    fn malformed_trace_headers_are_ignored() {
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "not-a-trace",
            "105445aa7843bc8bf206b1200010000\"/1;o=1",
            "105445aa7843bc8bf206b12000100000\",\"x\":\"/1",
        ] {
            assert_eq!(Trace::parse(bad), None, "{bad}");
        }
    }

    /// The lines below were written by this module before the request line stopped going
    /// through tracing (its formatter then built `httpRequest` and the trace from the
    /// event's fields); the direct line must stay the same, byte for byte.
    const REQUEST_LINES_BEFORE: [&str; 6] = [
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"POST","path":"/v1/chat/completions","status":200,"latency_ms":12.3456789,"request_id":"req-logs-1","product":"demo","user":"alice","error":"upstream_aborted","upstream_status":200,"upstream_request_id":"upstream-req-42","httpRequest":{"requestMethod":"POST","requestUrl":"/v1/chat/completions","status":200,"latency":"0.012346s","userAgent":"ua \"q\" \\ \u0001\t日本"},"logging.googleapis.com/trace":"projects/my-project/traces/105445aa7843bc8bf206b12000100000","logging.googleapis.com/spanId":"0000000000000001","logging.googleapis.com/trace_sampled":true}"#,
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"GET","path":"/no/such/path","status":404,"latency_ms":0,"request_id":"req_0123456789abcdef000000000001","error":"not_found","httpRequest":{"requestMethod":"GET","requestUrl":"/no/such/path","status":404,"latency":"0.000000s"}}"#,
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"POST","path":"/v1/chat/completions","status":401,"latency_ms":0.0000001,"request_id":"r","product":"demo","error":"invalid_signature","httpRequest":{"requestMethod":"POST","requestUrl":"/v1/chat/completions","status":401,"latency":"0.000000s"},"logging.googleapis.com/trace":"projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736","logging.googleapis.com/spanId":"00f067aa0ba902b7","logging.googleapis.com/trace_sampled":false}"#,
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"PATCH","path":"/a\"b\\c\n\u007fé","status":502,"latency_ms":123456.789,"request_id":"","product":"p\"x","user":"u\nv","upstream_status":503,"upstream_request_id":"x\"y","httpRequest":{"requestMethod":"PATCH","requestUrl":"/a\"b\\c\n\u007fé","status":502,"latency":"123.456789s","userAgent":""}}"#,
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"GET","path":"/health","status":200,"latency_ms":1.5,"request_id":"id","httpRequest":{"requestMethod":"GET","requestUrl":"/health","status":200,"latency":"0.001500s","userAgent":"curl/8"},"logging.googleapis.com/trace":"projects/my-project/traces/105445aa7843bc8bf206b12000100000","logging.googleapis.com/trace_sampled":false}"#,
        r#"{"severity":"INFO","time":"TIME","target":"request","message":"request","method":"GET","path":"/health","status":200,"latency_ms":1000000000000000000000,"request_id":"id","httpRequest":{"requestMethod":"GET","requestUrl":"/health","status":200,"latency":"1000000000000000000.000000s"},"logging.googleapis.com/trace":"projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736","logging.googleapis.com/trace_sampled":true}"#,
    ];

    /// The fields of each line of [`REQUEST_LINES_BEFORE`].
    fn request_fields() -> [RequestFields<'static>; 6] {
        let health = RequestFields {
            method: "GET",
            path: "/health",
            status: 200,
            latency_ms: 1.5,
            request_id: "id",
            product: None,
            user: None,
            error: None,
            upstream_error_cause: None,
            upstream_status: None,
            upstream_request_id: None,
            response_id: None,
            meter: None,
            user_agent: Some("curl/8"),
            trace: Some("105445aa7843bc8bf206b12000100000"),
        };
        [
            RequestFields {
                method: "POST",
                path: "/v1/chat/completions",
                status: 200,
                latency_ms: 12.345_678_9,
                request_id: "req-logs-1",
                product: Some("demo"),
                user: Some("alice"),
                error: Some("upstream_aborted"),
                upstream_error_cause: None,
                upstream_status: Some(200),
                upstream_request_id: Some("upstream-req-42"),
                response_id: None,
                meter: None,
                user_agent: Some("ua \"q\" \\ \u{1}\t日本"),
                trace: Some("105445aa7843bc8bf206b12000100000/1;o=1"),
            },
            RequestFields {
                path: "/no/such/path",
                status: 404,
                latency_ms: 0.0,
                request_id: "req_0123456789abcdef000000000001",
                error: Some("not_found"),
                user_agent: None,
                trace: None,
                ..health
            },
            RequestFields {
                method: "POST",
                path: "/v1/chat/completions",
                status: 401,
                latency_ms: 0.000_000_1,
                request_id: "r",
                product: Some("demo"),
                error: Some("invalid_signature"),
                user_agent: None,
                trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
                ..health
            },
            RequestFields {
                method: "PATCH",
                path: "/a\"b\\c\n\u{7f}é",
                status: 502,
                latency_ms: 123_456.789,
                request_id: "",
                product: Some("p\"x"),
                user: Some("u\nv"),
                upstream_status: Some(503),
                upstream_request_id: Some("x\"y"),
                response_id: None,
                user_agent: Some(""),
                trace: Some("not-a-trace"),
                ..health
            },
            RequestFields { ..health },
            RequestFields {
                latency_ms: 1e21,
                user_agent: None,
                trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
                ..health
            },
        ]
    }

    const NOW: (u64, u32, &str) = (1_764_078_775, 537_874_000, "2025-11-25T13:52:55.537874Z");

    fn request_line(lines: &RequestLines, fields: &RequestFields<'_>) -> String {
        let now = std::time::UNIX_EPOCH + std::time::Duration::new(NOW.0, NOW.1);
        let mut out = String::new();
        lines.format(&mut out, fields, now).expect("write to a String");
        out
    }

    #[test]
    fn request_lines_are_the_lines_the_formatter_wrote_before() {
        let linked = RequestLines::new(Some("my-project"));
        let unlinked = RequestLines::new(None);
        for (fields, before) in request_fields().iter().zip(REQUEST_LINES_BEFORE) {
            let expected = format!("{}\n", before.replace("TIME", NOW.2));
            assert_eq!(request_line(&linked, fields), expected);
            serde_json::from_str::<serde_json::Value>(&expected).expect("JSON");
            // Without a project id the trace members are left out, nothing else changes.
            let untraced = match expected.split_once(",\"logging.googleapis.com/trace\"") {
                Some((line, _)) => format!("{line}}}\n"),
                None => expected,
            };
            assert_eq!(request_line(&unlinked, fields), untraced);
        }
    }

    #[test]
    fn the_upstream_error_cause_follows_the_error_code() {
        let fields = RequestFields {
            status: 502,
            error: Some("upstream_unreachable"),
            upstream_error_cause: Some("tls"),
            user_agent: None,
            trace: None,
            ..request_fields()[4]
        };
        let line = request_line(&RequestLines::new(None), &fields);
        assert!(
            line.contains(r#","error":"upstream_unreachable","upstream_error_cause":"tls","httpRequest":"#),
            "{line}"
        );
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn other_events_are_formatted_as_before_with_the_same_head() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(move || writer.clone())
            .event_format(CloudLogging)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "some::module", a = 1, b = "q\"\n", c = true, d = ?vec!["x\"y"],
                e = %"disp\\", f = 1.5, g = -3, h = 1u64 << 40, i = f64::NAN, "msg {} \"quoted\"", 5);
            tracing::error!(answer = 42i128, "plain");
            tracing::debug!("only a message");
            // Not the request line (that is written by `RequestLines`): an event like any other.
            tracing::info!(target: "request", status = 200, "not the request line");
        });
        let output = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
        let this = "api_key_server::telemetry::cloud_logging::tests";
        let expected = [
            r#"{"severity":"WARNING","time":"TIME","target":"some::module","message":"msg 5 \"quoted\"","a":1,"b":"q\"\n","c":true,"d":"[\"x\\\"y\"]","e":"disp\\","f":1.5,"g":-3,"h":1099511627776,"i":null}"#.to_owned(),
            format!(r#"{{"severity":"ERROR","time":"TIME","target":"{this}","message":"plain","answer":42}}"#),
            format!(r#"{{"severity":"DEBUG","time":"TIME","target":"{this}","message":"only a message"}}"#),
            r#"{"severity":"INFO","time":"TIME","target":"request","message":"not the request line","status":200}"#.to_owned(),
        ];
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), expected.len(), "{output}");
        for (line, expected) in lines.iter().zip(&expected) {
            // The time is the clock's: check its shape, then compare the rest.
            let (head, rest) = line.split_once(r#""time":""#).expect("a time");
            let (time, tail) = rest.split_once('"').expect("a closed time");
            let b = time.as_bytes();
            assert!(
                b.len() == 27 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && time.ends_with('Z'),
                "{time}"
            );
            assert_eq!(format!(r#"{head}"time":"TIME"{tail}"#), *expected);
        }
        // The request line's head is this head.
        let request = request_line(&RequestLines::new(None), &request_fields()[4]);
        assert!(request.starts_with(&format!(
            r#"{{"severity":"INFO","time":"{}","target":"request","#,
            NOW.2
        )));
    }
}
