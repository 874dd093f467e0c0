//! The pooled upstream client: one request out with exactly the allowed headers, the
//! response back with exactly the allowed headers, its body streamed frame by frame.
//!
//! The connections are HTTP/1.1, pooled by `upstream/pool.rs`. Nothing here follows redirects or
//! reads proxy variables, which is what the contract wants. Timing is ours: a deadline for
//! the response headers (connecting included), then an idle timer between body frames, so
//! that long streams live as long as they keep talking.

mod pool;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use tokio::time::{Instant, Sleep};

use self::pool::Pool;
use crate::settings::UpstreamSettings;

/// Why the upstream gave no usable response (502 `upstream_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// `upstream_unreachable`: connection refused or reset, or no valid HTTP response.
    #[error("upstream unreachable")]
    Unreachable,
    /// `upstream_timeout`: no response headers within `UPSTREAM_TIMEOUT_SECONDS`.
    #[error("upstream timeout")]
    Timeout,
    /// `upstream_auth_failed`: the upstream answered 401 or 403 to the product key, after
    /// `latency`.
    #[error("upstream auth failed")]
    AuthFailed { status: u16, latency: Duration },
}

/// The upstream's answer, on its way to the client, and what the log line needs of it.
pub struct Forwarded {
    /// The client's response: the allowed headers, the body streamed.
    pub response: Response,
    pub status: u16,
    /// The upstream's `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// From sending the request to the upstream's response headers.
    pub latency: Duration,
}

/// The only client headers that travel upstream (besides `X-Stainless-*`).
const FORWARDED_REQUEST_HEADERS: [HeaderName; 3] = [
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("openai-beta"),
];

/// The only upstream headers that travel back (`Location` too, on 3xx).
const FORWARDED_RESPONSE_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-version"),
    HeaderName::from_static("x-should-retry"),
    header::RETRY_AFTER,
    HeaderName::from_static("retry-after-ms"),
];

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// One request to the upstream.
pub struct Call<'a> {
    pub method: Method,
    /// The client's path after `/v1`, with its query: `/chat/completions`, `/responses/resp_1/input_items?limit=2`.
    pub path: &'a str,
    pub body: Option<Bytes>,
    pub request_id: &'a HeaderValue,
    pub client_headers: &'a HeaderMap,
}

/// The suffix of `OPENAI_BASE_URL` that is not part of the upstream's API base.
const CHAT_SUFFIX: &str = "/chat/completions";

pub struct Upstream {
    pool: Arc<Pool>,
    /// The path of the upstream's API base (`/v1`): a call's target is this + its path.
    /// With a connection of our own, HTTP/1 wants the origin-form (path and query), not
    /// the absolute URL.
    base: String,
    /// The query of `OPENAI_BASE_URL` (Azure's `api-version`), added to every call.
    base_query: Option<String>,
    /// The `Host` header, which HTTP/1.1 requires and `conn::http1` does not add.
    host: HeaderValue,
    timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let url = &settings.url;
        let path = url.path();
        let base = path.strip_suffix(CHAT_SUFFIX).unwrap_or(path).trim_end_matches('/');
        Self {
            pool: Pool::new(url.clone()),
            base: base.to_owned(),
            base_query: url.query().map(str::to_owned),
            host: host_header(url),
            timeout: settings.timeout,
            idle_timeout: settings.idle_timeout,
        }
    }

    /// Sends `call` with the product's `authorization` and returns the client's response.
    ///
    /// Dropping the returned future or the response body cancels the upstream request.
    pub async fn forward(&self, call: Call<'_>, authorization: &HeaderValue) -> Result<Forwarded, UpstreamError> {
        let Call {
            method,
            path,
            body,
            request_id,
            client_headers,
        } = call;
        // The path comes from a parsed request URI, so base + path is a valid target.
        let target = match &self.base_query {
            None => format!("{}{path}", self.base),
            Some(query) => {
                let joint = if path.contains('?') { '&' } else { '?' };
                format!("{}{path}{joint}{query}", self.base)
            }
        };
        let target = Uri::try_from(target).map_err(|_| UpstreamError::Unreachable)?;
        let length = body.as_ref().map(Bytes::len);
        let mut request = Request::new(Full::new(body.unwrap_or_default()));
        // Sized once for what is written below (growing a map rehashes it).
        *request.headers_mut() = HeaderMap::with_capacity(12);
        *request.method_mut() = method;
        *request.uri_mut() = target;
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::AUTHORIZATION, authorization.clone());
        if let Some(length) = length {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        headers.insert(X_REQUEST_ID, request_id.clone());
        for name in &FORWARDED_REQUEST_HEADERS {
            for value in client_headers.get_all(name) {
                headers.append(name, value.clone());
            }
        }
        for (name, value) in client_headers {
            if name.as_str().starts_with("x-stainless-") {
                headers.append(name, value.clone());
            }
        }

        let sent = Instant::now();
        let response = match tokio::time::timeout(self.timeout, self.pool.send(request)).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(result) => result?,
        };
        let latency = sent.elapsed();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::AuthFailed {
                status: status.as_u16(),
                latency,
            });
        }

        let (parts, incoming) = response.into_parts();
        let request_id = parts.headers.get(X_REQUEST_ID).cloned();
        let mut out = Response::new(Body::new(IdleTimeout::new(incoming, self.idle_timeout)));
        // Room for the forwarded headers, the rate-limit headers and the request id.
        *out.headers_mut() = HeaderMap::with_capacity(16);
        *out.status_mut() = status;
        let out_headers = out.headers_mut();
        for name in &FORWARDED_RESPONSE_HEADERS {
            if let Some(value) = parts.headers.get(name) {
                out_headers.insert(name, value.clone());
            }
        }
        if status.is_redirection()
            && let Some(location) = parts.headers.get(header::LOCATION)
        {
            out_headers.insert(header::LOCATION, location.clone());
        }
        if let Some(id) = &request_id {
            out_headers.insert(X_UPSTREAM_REQUEST_ID, id.clone());
        }
        Ok(Forwarded {
            response: out,
            status: status.as_u16(),
            request_id,
            latency,
        })
    }
}

/// `Host` as hyper-util's client wrote it: the host, and the port unless it is the
/// scheme's default.
fn host_header(url: &Uri) -> HeaderValue {
    let host = url.host().expect("the settings only accept URLs with a host");
    let default_port = if url.scheme_str() == Some("https") { 443 } else { 80 };
    let value = match url.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::try_from(value).expect("a URI's host and port are a valid header value")
}

/// The upstream gave no body frame for longer than `UPSTREAM_IDLE_TIMEOUT_SECONDS`.
#[derive(Debug, thiserror::Error)]
#[error("upstream idle timeout")]
pub struct IdleTimeoutError;

/// A body that fails when its inner body stays silent too long. A failing body makes
/// hyper cut the client's response without a clean end, which is what a client must see
/// when the upstream's answer is incomplete.
///
/// The timer is armed only when the inner body has nothing to give: a gap is timed from
/// the poll that finds the upstream silent (hyper polls again right after each frame it
/// writes). A body that is ready whenever polled, as most non-streamed answers are, never
/// touches the runtime's timer wheel.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer's deadline belongs to the current gap (no frame came since it was set).
    armed: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.armed {
            let deadline = Instant::now() + this.idle;
            match &mut this.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.armed = true;
        }
        let timer = this.timer.as_mut().expect("armed above");
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(IdleTimeoutError))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
