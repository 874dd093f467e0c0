//! The upstream client as it was before commit 9ff97aa: hyper-util's legacy `Client` over
//! the same hyper-rustls connector, with the settings and the request and response
//! handling of commit 9ff97aa^'s `src/upstream.rs` (only `enable_http2`, a hyper-rustls
//! feature the crate no longer enables, is left out: the mock is plain HTTP/1.1 anyway).
//! The header maps are sized once, as today's `forward` does since commit e010340, so
//! that the two differ only by the client: the legacy `Client` with an absolute URI (it
//! writes `Host` itself) against the pool with `Host` and an origin-form target.

use std::time::Duration;

use api_key_server::upstream::{Forwarded, IdleTimeout, UpstreamError};
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

const FORWARDED_REQUEST_HEADERS: [HeaderName; 3] = [
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("openai-beta"),
];

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

pub struct LegacyUpstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    idle_timeout: Duration,
}

impl LegacyUpstream {
    pub fn new(url: Uri, timeout: Duration, idle_timeout: Duration) -> Self {
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
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        Self {
            client,
            url,
            timeout,
            idle_timeout,
        }
    }

    /// `Upstream::forward` of commit 9ff97aa^.
    pub async fn forward(
        &self,
        body: Bytes,
        authorization: &HeaderValue,
        request_id: &HeaderValue,
        client_headers: &HeaderMap,
    ) -> Result<Forwarded, UpstreamError> {
        let length = body.len();
        let mut request = Request::new(Full::new(body));
        *request.headers_mut() = HeaderMap::with_capacity(12);
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

        let sent = tokio::time::Instant::now();
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(_)) => return Err(UpstreamError::Unreachable),
            Ok(Ok(response)) => response,
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
