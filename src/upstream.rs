//! The pooled upstream client: one request out with exactly the allowed headers, the
//! response back with exactly the allowed headers, its body streamed frame by frame.
//!
//! hyper's client follows no redirects and reads no proxy variables, which is what the
//! contract wants. Timing is ours: a deadline for the response headers, then an idle
//! timer between body frames, so that long streams live as long as they keep talking.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

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
    /// `upstream_auth_failed`: the upstream answered 401 or 403 to the product key.
    #[error("upstream auth failed")]
    AuthFailed { status: u16 },
}

/// What the upstream answered, for the log line.
#[derive(Debug, Clone)]
pub struct UpstreamOutcome {
    pub status: u16,
    pub request_id: Option<HeaderValue>,
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

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        Self {
            client,
            url: settings.url.clone(),
            timeout: settings.timeout,
            idle_timeout: settings.idle_timeout,
        }
    }

    /// Sends `body` with the product's `authorization` and returns the client's response.
    ///
    /// Dropping the returned future or the response body cancels the upstream request.
    pub async fn forward(
        &self,
        body: Bytes,
        authorization: &HeaderValue,
        request_id: &HeaderValue,
        client_headers: &HeaderMap,
    ) -> Result<(Response, UpstreamOutcome), UpstreamError> {
        let length = body.len();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        headers.insert(header::AUTHORIZATION, authorization.clone());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
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

        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(_)) => return Err(UpstreamError::Unreachable),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(UpstreamError::AuthFailed {
                status: status.as_u16(),
            });
        }

        let (parts, incoming) = response.into_parts();
        let outcome = UpstreamOutcome {
            status: status.as_u16(),
            request_id: parts.headers.get(X_REQUEST_ID).cloned(),
        };
        let mut out = Response::new(Body::new(IdleTimeout::new(incoming, self.idle_timeout)));
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
        if let Some(id) = &outcome.request_id {
            out_headers.insert(X_UPSTREAM_REQUEST_ID, id.clone());
        }
        Ok((out, outcome))
    }
}

/// The upstream gave no body frame for longer than `UPSTREAM_IDLE_TIMEOUT_SECONDS`.
#[derive(Debug, thiserror::Error)]
#[error("upstream idle timeout")]
pub struct IdleTimeoutError;

/// A body that fails when its inner body stays silent too long. A failing body makes
/// hyper cut the client's response without a clean end, which is what a client must see
/// when the upstream's answer is incomplete.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(IdleTimeoutError))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
