//! The upstreams: every product's request goes out to its upstream with exactly the
//! allowed headers and its credential, and the response comes back with exactly the
//! allowed headers, its body streamed frame by frame.
//!
//! [`Upstreams`] is the table built at startup: product -> [`Upstream`] (the pool of its
//! origin, its base path, its [`Credential`]). Products on one origin share one pool. The
//! connections are HTTP/1.1, pooled by `upstream/pool.rs`; credentials (stored keys and
//! the Google token) come from `upstream/credentials.rs`. Nothing here follows redirects
//! or reads proxy variables, which is what the contract wants. Timing is ours: a deadline
//! for the response headers (connecting included), then an idle timer between body
//! frames, so that long streams live as long as they keep talking. A failure carries its
//! [`Cause`] beside the client's answer, for the log line and the metrics.

mod cause;
mod credentials;
mod pool;

use std::collections::HashMap;
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

pub use self::cause::Cause;
use self::credentials::{Credential, GoogleTokens};
use self::pool::Pool;
use crate::settings::{Secret, Settings, UpstreamAuth};

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
    /// `upstream_credentials_unavailable`: no Google access token within 5 s (the
    /// metadata server is down, slow or refusing). Nothing was sent upstream.
    #[error("upstream credentials unavailable")]
    CredentialsUnavailable,
}

/// One call to a product's upstream.
pub struct Call<'a> {
    pub method: Method,
    /// The client's path after `/v1`, with its query: `/chat/completions`, `/responses/resp_1/input_items?limit=2`.
    pub path: &'a str,
    pub body: Option<Bytes>,
    pub request_id: &'a HeaderValue,
    pub client_headers: &'a HeaderMap,
}

/// A request that got no usable response: the client's answer, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct UpstreamFailure {
    pub error: UpstreamError,
    /// For the log line and the metrics; `None` when the upstream did answer
    /// ([`UpstreamError::AuthFailed`]).
    pub cause: Option<Cause>,
}

/// A failure before anything was sent upstream (no credential, no valid target): the
/// upstream played no part, so there is no cause to report.
impl From<UpstreamError> for UpstreamFailure {
    fn from(error: UpstreamError) -> Self {
        Self { error, cause: None }
    }
}

impl From<Cause> for UpstreamFailure {
    fn from(cause: Cause) -> Self {
        Self {
            error: cause.error(),
            cause: Some(cause),
        }
    }
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
const CHAT_COMPLETIONS: &str = "/chat/completions";

/// Every product's upstream, built once at startup.
pub struct Upstreams {
    products: HashMap<Arc<str>, Upstream>,
}

impl Upstreams {
    /// The default upstream (`OPENAI_BASE_URL`'s base, bearer) for products without an
    /// entry in `PRODUCT_UPSTREAMS`, and each entry's own; one pool per origin.
    pub fn new(settings: &Settings) -> Self {
        let mut pools: HashMap<String, Arc<Pool>> = HashMap::new();
        let mut pool_for = |url: &Uri| {
            let origin = format!(
                "{}://{}",
                url.scheme_str().unwrap_or("https"),
                url.authority().map_or("", |a| a.as_str())
            )
            .to_ascii_lowercase();
            Arc::clone(pools.entry(origin).or_insert_with_key(|origin| {
                Pool::new(format!("{origin}/").parse().expect("an origin of a valid URI"))
            }))
        };
        // One cache for every `google` product: they all act as the instance's account.
        let google = settings
            .product_upstreams
            .values()
            .any(|u| u.auth == UpstreamAuth::Google)
            .then(|| GoogleTokens::new(&settings.metadata_host));
        let timing = &settings.upstream;
        let default_url = &timing.url;
        let default_base = default_url
            .path()
            .strip_suffix(CHAT_COMPLETIONS)
            .unwrap_or(default_url.path())
            .trim_end_matches('/');
        let mut products = HashMap::with_capacity(settings.products.len());
        for product in &settings.products {
            let key = settings.product_keys.get(product).map(Secret::expose);
            let upstream = match settings.product_upstreams.get(product) {
                Some(own) => {
                    let credential = match (own.auth, key, &google) {
                        (UpstreamAuth::Google, _, Some(tokens)) => Credential::Google(Arc::clone(tokens)),
                        (UpstreamAuth::ApiKey, Some(key), _) => Credential::api_key(key),
                        (UpstreamAuth::Bearer, Some(key), _) => Credential::bearer(key),
                        _ => unreachable!("the settings give every non-google upstream a key"),
                    };
                    Upstream {
                        pool: pool_for(&own.base_url),
                        base: own.base_url.path().trim_end_matches('/').into(),
                        query: None,
                        host: host_header(&own.base_url),
                        credential,
                        timeout: timing.timeout,
                        idle_timeout: timing.idle_timeout,
                    }
                }
                None => Upstream {
                    pool: pool_for(default_url),
                    base: default_base.into(),
                    // A query on `OPENAI_BASE_URL` (`?api-version=` of Azure's older API)
                    // goes with every call to the default upstream.
                    query: default_url.query().map(Into::into),
                    host: host_header(default_url),
                    credential: Credential::bearer(key.expect("a product without its own upstream has a key")),
                    timeout: timing.timeout,
                    idle_timeout: timing.idle_timeout,
                },
            };
            products.insert(Arc::clone(product), upstream);
        }
        Self { products }
    }

    /// `product`'s upstream; `None` only for an id that is not a product.
    pub fn of(&self, product: &str) -> Option<&Upstream> {
        self.products.get(product)
    }
}

/// One product's upstream.
pub struct Upstream {
    pool: Arc<Pool>,
    /// The path of `base_url`, without a trailing `/` (may be empty).
    base: Box<str>,
    /// The default upstream's query string, if `OPENAI_BASE_URL` has one.
    query: Option<Box<str>>,
    /// The `Host` header, which HTTP/1.1 requires and `conn::http1` does not add.
    host: HeaderValue,
    credential: Credential,
    timeout: Duration,
    idle_timeout: Duration,
}

impl Upstream {
    /// Sends `call` with the product's credential and returns the client's response.
    ///
    /// Dropping the returned future or the response body cancels the upstream request.
    pub async fn forward(&self, call: Call<'_>) -> Result<Forwarded, UpstreamFailure> {
        // The credential first: waiting for a Google token is not the upstream's time.
        let (credential_name, credential) = self.credential.header().await?;
        let mut request = Request::new(Full::new(call.body.clone().unwrap_or_default()));
        // Sized once for what is written below (growing a map rehashes it).
        *request.headers_mut() = HeaderMap::with_capacity(12);
        *request.method_mut() = call.method;
        *request.uri_mut() = self.target(call.path)?;
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(credential_name, credential.clone());
        if let Some(body) = &call.body {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        headers.insert(X_REQUEST_ID, call.request_id.clone());
        let client_headers = call.client_headers;
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
        let response = self.pool.send(request, self.timeout).await?;
        let latency = sent.elapsed();
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.credential.refused(&credential);
            return Err(UpstreamFailure {
                error: UpstreamError::AuthFailed {
                    status: status.as_u16(),
                    latency,
                },
                cause: None,
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

    /// The origin-form request target: the base path, then the client's path after `/v1`
    /// (with the default upstream's query, if any, before the client's own).
    fn target(&self, path: &str) -> Result<Uri, UpstreamError> {
        let mut target =
            String::with_capacity(self.base.len() + path.len() + self.query.as_ref().map_or(0, |q| q.len() + 2));
        target.push_str(&self.base);
        match &self.query {
            None => target.push_str(path),
            Some(query) => {
                let (path, client_query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
                target.push_str(path);
                target.push('?');
                target.push_str(query);
                if let Some(client_query) = client_query {
                    target.push('&');
                    target.push_str(client_query);
                }
            }
        }
        // Both halves come from valid URIs, so this cannot fail; were it to, nothing was sent.
        Uri::try_from(target).map_err(|_| UpstreamError::Unreachable)
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
