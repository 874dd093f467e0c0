//! Logs: the subscriber set-up, request ids, and the one log line per request.
//!
//! The line is written when the response body ends (or is dropped), not when the
//! headers leave, so that a stream cut by the upstream is logged as `upstream_aborted`
//! and its latency covers the whole stream. Handlers return what they know (identity,
//! error code, upstream status) as the [`RequestLog`] of their
//! [`crate::request::Outcome`]. No body, key, token or signature is ever a field.
//!
//! The same line counts the request in [`crate::metrics`] (by route template, status and
//! error code), records the upstream latency and counts an upstream failure by its cause
//! (`upstream_error_cause`: from the handler before the headers, from the body's error
//! after them). The JSON format for Cloud Logging lives in [`cloud_logging`], which
//! writes the request line itself, without tracing's event machinery; the text format
//! gets it as a tracing event. Either way `RUST_LOG` decides.

mod cloud_logging;

use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;
use tracing::Level;
use tracing_subscriber::EnvFilter;

use crate::meter::{Figures, MeterLog};
use crate::metrics;
use crate::request::Outcome;
use crate::settings::LogFormat;
use crate::upstream;

/// Sets the global subscriber: `RUST_LOG` filter (default `info`), lines on stdout,
/// without trace links (see [`init_with_project`]).
pub fn init(format: LogFormat) {
    init_with_project(format, None);
}

/// Sets the global subscriber: `RUST_LOG` filter (default `info`), lines on stdout.
///
/// `Json` writes Cloud Logging's structured lines; with `gcp_project_id` the request line
/// links to the request's trace. `Text` is for humans (colours only on a terminal).
pub fn init_with_project(format: LogFormat, gcp_project_id: Option<&str>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Json => {
            if builder.event_format(cloud_logging::CloudLogging).try_init().is_ok() {
                // Request lines are written without tracing from now on (see `LogLine::emit`).
                cloud_logging::RequestLines::new(gcp_project_id).install();
            }
        }
        LogFormat::Text => {
            let _ = builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .try_init();
        }
    }
}

/// The request's id: the client's when valid, else a new one. Sent upstream and back.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const X_CLOUD_TRACE_CONTEXT: HeaderName = HeaderName::from_static("x-cloud-trace-context");

impl RequestId {
    /// The client's id when it is 1 to 128 characters of `[A-Za-z0-9._-]`, else a new one.
    pub fn from_client(value: Option<&HeaderValue>) -> Self {
        match value {
            Some(v) if is_valid_request_id(v.as_bytes()) => Self(v.clone()),
            _ => Self::generate(),
        }
    }

    /// A fresh id: a per-process random prefix and a counter, so unique without a lock or
    /// a random draw per request.
    pub fn generate() -> Self {
        static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // std's `RandomState` is keyed from the OS's random source: enough for an id that
        // must be unique, not secret. Not aws-lc's generator: its first use spends ~25 ms
        // seeding, which would land on the first request (a cold start's health check)
        // rather than on the first TLS handshake, which needs it anyway.
        let prefix = PREFIX.get_or_init(|| RandomState::new().hash_one(std::process::id()));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // `req_`, 16 hex digits of prefix, 12 of counter; written in place, no formatter.
        let mut id = *b"req_0000000000000000000000000000";
        let digits = u128::from(*prefix) << 48 | u128::from(n & 0xffff_ffff_ffff);
        for (i, byte) in id[4..].iter_mut().rev().enumerate() {
            *byte = b"0123456789abcdef"[usize::try_from((digits >> (4 * i)) & 0xf).unwrap_or(0)];
        }
        Self(HeaderValue::from_bytes(&id).expect("hex digits are a valid header value"))
    }
}

fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a handler learned about a request, for its log line (carried by
/// [`crate::request::Outcome`]).
#[derive(Debug, Clone, Default)]
pub struct RequestLog {
    pub product: Option<Arc<str>>,
    pub user: Option<Arc<str>>,
    /// The contract's `code` of the error the proxy answered, if any.
    pub error: Option<&'static str>,
    pub upstream_status: Option<u16>,
    pub upstream_request_id: Option<HeaderValue>,
    /// Time from sending the request upstream to the upstream's response headers.
    pub upstream_latency: Option<std::time::Duration>,
    /// Why the upstream gave no usable response, or cut it (`upstream_aborted`).
    pub upstream_error_cause: Option<upstream::Cause>,
    /// On responses routes: the stored response created or named.
    pub response_id: Option<Box<str>>,
    /// Metered requests (chat, responses, embeddings once their model is known): the
    /// model, usage, cost and budget figures.
    pub meter: Option<MeterLog>,
}

/// The request's log line, begun when the request arrives ([`LogLine::begin`]) and
/// written when the response body ends ([`LogLine::finish`] hands it to the body).
pub struct LogLine {
    start: Instant,
    method: Method,
    uri: http::Uri,
    route: &'static str,
    status: u16,
    id: RequestId,
    log: RequestLog,
    user_agent: Option<HeaderValue>,
    trace: Option<HeaderValue>,
}

impl LogLine {
    /// Takes what the line reports from the request (cheap clones) and settles its id.
    /// `route` is the route's template ([`crate::app::Route::template`]).
    pub fn begin<B>(request: &http::Request<B>, route: &'static str) -> Self {
        let headers = request.headers();
        Self {
            start: Instant::now(),
            method: request.method().clone(),
            // A reference-counted clone: the path stays in the request's bytes.
            uri: request.uri().clone(),
            route,
            status: 0,
            id: RequestId::from_client(headers.get(X_REQUEST_ID)),
            log: RequestLog::default(),
            user_agent: headers.get(header::USER_AGENT).cloned(),
            // Cloud Run sets both trace headers, W3C first.
            trace: headers
                .get(TRACEPARENT)
                .or_else(|| headers.get(X_CLOUD_TRACE_CONTEXT))
                .cloned(),
        }
    }

    /// The request's id, sent upstream and back.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// Replaces what the line keeps of the request (path, user agent, trace, a client's
    /// request id) with copies. hyper parses a request head into slices of the
    /// connection's read buffer, and a slice kept alive keeps that whole buffer (8 KiB)
    /// alive while the connection reads into a second one. A response of unknown length
    /// (a stream) keeps the line for seconds to minutes: the copies, a few dozen bytes,
    /// save 8 KiB per open stream (docs/benchmarks.md). Other responses end at once.
    fn own_request_bytes(&mut self) {
        let copy = |value: &HeaderValue| HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        if let Ok(uri) = http::Uri::from_maybe_shared(Bytes::from(self.uri.to_string())) {
            self.uri = uri;
        }
        self.id.0 = copy(&self.id.0);
        self.user_agent = self.user_agent.as_ref().map(copy);
        self.trace = self.trace.as_ref().map(copy);
    }

    /// Stamps the request id on the response and hands the line to its body, which writes
    /// it when it ends.
    pub fn finish(mut self, outcome: Outcome) -> http::Response<LoggedBody> {
        let Outcome { mut response, log } = outcome;
        response.headers_mut().insert(X_REQUEST_ID, self.id.0.clone());
        self.status = response.status().as_u16();
        self.log = log;
        if response.body().size_hint().exact().is_none() {
            self.own_request_bytes();
        }
        response.map(|body| LoggedBody {
            inner: body,
            line: Some(self),
        })
    }
}

/// How the response body ended.
#[derive(Clone, Copy)]
enum End {
    Complete,
    /// The upstream failed or went silent after the headers: the client's response was cut.
    UpstreamAborted,
    /// The client went away before the end.
    ClientClosed,
}

impl LogLine {
    fn emit(self, end: End) {
        let latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let error = match end {
            End::UpstreamAborted => Some("upstream_aborted"),
            End::ClientClosed if self.log.error.is_none() => Some("client_closed"),
            _ => self.log.error,
        };
        metrics::request(self.route, self.status, error);
        if let Some(latency) = self.log.upstream_latency {
            metrics::upstream_latency(latency.as_secs_f64());
        }
        let cause = self.log.upstream_error_cause.map(upstream::Cause::as_str);
        if let Some(cause) = cause {
            metrics::upstream_failure(self.route, cause);
        }
        // A disabled line costs nothing more (`RUST_LOG=warn`, or `request=off`).
        if !tracing::enabled!(target: cloud_logging::REQUEST_TARGET, Level::INFO) {
            return;
        }
        let fields = RequestFields {
            method: self.method.as_str(),
            path: self.uri.path(),
            status: self.status,
            latency_ms,
            request_id: self.id.0.to_str().unwrap_or(""),
            product: self.log.product.as_deref(),
            user: self.log.user.as_deref(),
            error,
            upstream_error_cause: cause,
            upstream_status: self.log.upstream_status,
            upstream_request_id: self.log.upstream_request_id.as_ref().and_then(|v| v.to_str().ok()),
            response_id: self.log.response_id.as_deref(),
            meter: self.log.meter.as_ref().map(|meter| MeterFields {
                model: &meter.model,
                figures: meter.figures(),
                reservation: meter.reservation,
                budget_scope: meter.budget_scope,
                budget_store: meter.budget_store,
            }),
            user_agent: self.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            trace: self.trace.as_ref().and_then(|v| v.to_str().ok()),
        };
        // The JSON line is written directly: tracing's dispatch, field visiting and
        // timestamp cost more than the line's `write(2)`. Other formats take the event.
        match cloud_logging::RequestLines::installed() {
            Some(lines) => lines.write(&fields),
            None => fields.event(),
        }
    }
}

/// The request line's fields, in the line's order. No body, key, token or signature.
struct RequestFields<'a> {
    method: &'a str,
    path: &'a str,
    status: u16,
    latency_ms: f64,
    request_id: &'a str,
    product: Option<&'a str>,
    user: Option<&'a str>,
    error: Option<&'a str>,
    /// One of [`upstream::Cause`]'s words, never an error's text.
    upstream_error_cause: Option<&'static str>,
    upstream_status: Option<u16>,
    upstream_request_id: Option<&'a str>,
    response_id: Option<&'a str>,
    meter: Option<MeterFields<'a>>,
    /// Client-controlled text, like `trace`: only ever the value of its own field (escaped
    /// by the formatter); neither can hold a credential. In JSON it fills `httpRequest`.
    user_agent: Option<&'a str>,
    /// The `traceparent` or `X-Cloud-Trace-Context` header; in JSON only the ids parsed
    /// from it are written, under Cloud Logging's own keys.
    trace: Option<&'a str>,
}

/// A metered request's fields ([`MeterLog`] with its figures read).
#[derive(Clone, Copy)]
struct MeterFields<'a> {
    model: &'a str,
    figures: Option<Figures>,
    reservation: Option<crate::budget::Nanos>,
    budget_scope: Option<&'static str>,
    budget_store: Option<&'static str>,
}

impl RequestFields<'_> {
    /// The line as a tracing event, for the text format (and any other subscriber).
    fn event(&self) {
        let meter = self.meter.as_ref();
        let figures = meter.and_then(|m| m.figures);
        tracing::info!(
            target: cloud_logging::REQUEST_TARGET,
            method = self.method,
            path = self.path,
            status = self.status,
            latency_ms = self.latency_ms,
            request_id = self.request_id,
            product = self.product,
            user = self.user,
            error = self.error,
            upstream_error_cause = self.upstream_error_cause,
            upstream_status = self.upstream_status,
            upstream_request_id = self.upstream_request_id,
            response_id = self.response_id,
            model = meter.map(|m| m.model),
            input_tokens = figures.map(|f| f.input_tokens),
            cached_tokens = figures.map(|f| f.cached_tokens),
            output_tokens = figures.map(|f| f.output_tokens),
            cost_usd = figures.and_then(|f| f.cost).map(tracing::field::display),
            usage_estimated = figures.and_then(|f| f.estimated.then_some(true)),
            reservation_usd = meter.and_then(|m| m.reservation).map(tracing::field::display),
            budget_scope = meter.and_then(|m| m.budget_scope),
            budget_store = meter.and_then(|m| m.budget_store),
            user_agent = self.user_agent,
            trace = self.trace,
            "{}",
            cloud_logging::REQUEST_MESSAGE
        );
    }
}

/// The response body, which writes the request's log line when it ends.
pub struct LoggedBody {
    inner: Body,
    line: Option<LogLine>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => {
                if let Some(line) = self.line.take() {
                    line.emit(End::Complete);
                }
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(mut line) = self.line.take() {
                    // Only upstream bodies fail: the cause is the upstream's (or our idle
                    // timer's), read from the error's types, never its text.
                    line.log.upstream_error_cause = Some(upstream::Cause::of(error));
                    line.emit(End::UpstreamAborted);
                }
            }
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // hyper never polls an empty body (HEAD, or a known length of 0) to its end.
            let end = if self.inner.is_end_stream() {
                End::Complete
            } else {
                End::ClientClosed
            };
            // The body first: a metered body leaves its figures for the line as it goes.
            drop(std::mem::take(&mut self.inner));
            line.emit(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids_are_kept_only_when_valid() {
        let ok = HeaderValue::from_static("abc-DEF_1.2");
        assert_eq!(RequestId::from_client(Some(&ok)).0, ok);
        let long = HeaderValue::from_str(&"a".repeat(129)).expect("header");
        assert_ne!(RequestId::from_client(Some(&long)).0, long);
        let bad = HeaderValue::from_static("a b");
        assert_ne!(RequestId::from_client(Some(&bad)).0, bad);
        let max = HeaderValue::from_str(&"a".repeat(128)).expect("header");
        assert_eq!(RequestId::from_client(Some(&max)).0, max);
    }

    #[test]
    fn generated_ids_are_unique_and_valid() {
        let a = RequestId::generate().0;
        let b = RequestId::generate().0;
        assert_ne!(a, b);
        assert!(is_valid_request_id(a.as_bytes()));
    }
}
