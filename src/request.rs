//! What every route shares: reading the request body, and the [`Outcome`] a route hands
//! back (the response, and what the request's log line needs).
//!
//! A route returns one [`Outcome`], whatever happened: an [`ApiError`] becomes one with
//! its code recorded, an answer forwarded from the upstream becomes one with the
//! upstream's status, id and latency. The log line reads nothing else. What belongs to
//! HTTP rather than to a route (the answer to `HEAD`, `Connection: close` after a body
//! that was not read to its end) is done here too.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::auth::Identity;
use crate::error::ApiError;
use crate::telemetry::RequestLog;
use crate::upstream::{Forwarded, UpstreamError, UpstreamFailure};

/// A route's answer and what its log line needs.
pub struct Outcome {
    pub response: Response,
    pub log: RequestLog,
}

impl Outcome {
    /// A `200` with a JSON body.
    pub fn json(body: Bytes) -> Self {
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = StatusCode::OK;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Self {
            response,
            log: RequestLog::default(),
        }
    }

    /// The outcome of the steps after authentication, logged as `identity`'s.
    pub fn of(identity: &Identity, result: Result<Self, ApiError>) -> Self {
        let mut outcome = result.unwrap_or_else(Self::from);
        outcome.log.product = Some(Arc::clone(&identity.product));
        outcome.log.user = Some(Arc::clone(&identity.user));
        outcome
    }

    /// The answer to a `HEAD`: the GET's headers (its length included) and no body.
    /// hyper never polls an empty body, so the log line sees it complete.
    #[must_use]
    pub fn without_body(mut self) -> Self {
        if let Some(length) = self.response.body().size_hint().exact() {
            self.response
                .headers_mut()
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(length));
        }
        *self.response.body_mut() = Body::empty();
        self
    }
}

impl From<ApiError> for Outcome {
    fn from(error: ApiError) -> Self {
        let mut log = RequestLog {
            error: Some(error.code()),
            ..RequestLog::default()
        };
        if let ApiError::Upstream(UpstreamError::AuthFailed { status, latency }) = &error {
            log.upstream_status = Some(*status);
            log.upstream_latency = Some(*latency);
        }
        Self {
            response: error.into_response(),
            log,
        }
    }
}

impl From<UpstreamFailure> for Outcome {
    fn from(failure: UpstreamFailure) -> Self {
        let mut outcome = Self::from(ApiError::from(failure.error));
        outcome.log.upstream_error_cause = failure.cause;
        outcome
    }
}

impl From<Forwarded> for Outcome {
    fn from(forwarded: Forwarded) -> Self {
        Self {
            response: forwarded.response,
            log: RequestLog {
                upstream_status: Some(forwarded.status),
                upstream_request_id: forwarded.request_id,
                upstream_latency: Some(forwarded.latency),
                ..RequestLog::default()
            },
        }
    }
}

/// The client's path after `/v1`, with its query: what goes after the upstream's API base.
pub fn upstream_path(uri: &http::Uri) -> &str {
    let path = uri.path_and_query().map_or(uri.path(), http::uri::PathAndQuery::as_str);
    path.strip_prefix("/v1").unwrap_or(path)
}

/// The whole body, refused with 413 as soon as its declared or actual size is over
/// `limit` (a `Content-Length` is checked before reading a byte, chunk sizes as they come
/// in), and with 408 when it takes longer than `timeout`.
///
/// A refusal comes before the body was read to its end: the rest of it may still be on
/// its way, so the connection cannot carry another request. The answer says
/// `Connection: close`, so that a keep-alive client opens a new one instead of reusing
/// one that hyper then closes.
pub async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Bytes, Outcome> {
    read(body, headers, limit, timeout).await.map_err(|error| {
        let mut outcome = Outcome::from(error);
        outcome
            .response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        outcome
    })
}

async fn read(body: Incoming, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge);
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge),
        // The listener saw chunk sizes that declare more than the limit (hyper hands the
        // declared size to nobody): the rest is not waited for.
        Ok(Err(error)) if crate::server::DeclaredTooLarge::caused(&*error) => Err(ApiError::BodyTooLarge),
        Ok(Err(_)) => Err(ApiError::UnreadableBody),
    }
}
