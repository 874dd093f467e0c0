//! The request path: read body -> authenticate -> validate -> limit -> forward -> respond.
//!
//! Each step is a plain call that returns the contract's error; the order of the calls
//! is the contract's order of checks. Handlers return what the log line needs as a
//! [`RequestLog`] beside the response.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::app::{App, MODEL_PREFIX};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::telemetry::{RequestId, RequestLog};
use crate::validate;

/// `POST /v1/chat/completions`.
pub async fn chat_completions(app: &App, request: Request<Incoming>, id: &RequestId) -> (Response, RequestLog) {
    let (parts, body) = request.into_parts();
    let mut log = RequestLog::default();
    let response = match chat(app, id, parts.uri.path(), &parts.headers, body, &mut log).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    (response, log)
}

async fn chat(
    app: &App,
    id: &RequestId,
    path: &str,
    headers: &HeaderMap,
    body: Incoming,
    log: &mut RequestLog,
) -> Result<Response, ApiError> {
    let settings = &app.settings;
    let body = read_body(body, headers, settings.max_body_bytes, settings.client_timeout).await?;
    let identity = app.auth.verify(&Method::POST, path, headers, &body).await?;
    record_identity(log, &identity);
    let request = validate::chat(&body, &settings.policy)?;
    drop(body);
    let grant = app.limiter.admit(&identity).await?;
    // Authentication only yields products that have a key; a miss here is a defect.
    let key = settings.product_keys.get(&identity.product).ok_or(ApiError::Internal)?;
    let sent = tokio::time::Instant::now();
    let mut response = match app.upstream.forward(request.body, key.expose(), &id.0, headers).await {
        Ok((response, outcome)) => {
            log.upstream_latency = Some(sent.elapsed());
            log.upstream_status = Some(outcome.status);
            log.upstream_request_id = outcome.request_id;
            response
        }
        Err(error) => {
            if let crate::upstream::UpstreamError::AuthFailed { status } = error {
                log.upstream_latency = Some(sent.elapsed());
                log.upstream_status = Some(status);
            }
            ApiError::from(error).into_response()
        }
    };
    grant.headers.write(response.headers_mut());
    Ok(response)
}

/// `GET /v1/models`: the allowed models in OpenAI's list format.
pub async fn list_models(app: &App, request: Request<Incoming>) -> (Response, RequestLog) {
    let (request, _) = request.into_parts();
    let mut log = RequestLog::default();
    let result = authenticate_get(app, &request, &mut log)
        .await
        .map(|()| json(app.models.list.clone()));
    (result.unwrap_or_else(IntoResponse::into_response), log)
}

/// `GET /v1/models/{model}`: one allowed model, or 404 `model_not_found`.
pub async fn get_model(app: &App, request: Request<Incoming>) -> (Response, RequestLog) {
    let (request, _) = request.into_parts();
    let mut log = RequestLog::default();
    let result = authenticate_get(app, &request, &mut log).await.and_then(|()| {
        let name = request.uri.path().get(MODEL_PREFIX.len()..).unwrap_or_default();
        let name = percent_decode(name);
        app.models.one(&name).map(json).ok_or(ApiError::ModelNotFound)
    });
    (result.unwrap_or_else(IntoResponse::into_response), log)
}

async fn authenticate_get(app: &App, request: &http::request::Parts, log: &mut RequestLog) -> Result<(), ApiError> {
    let identity = app
        .auth
        .verify(&request.method, request.uri.path(), &request.headers, &[])
        .await?;
    record_identity(log, &identity);
    Ok(())
}

fn record_identity(log: &mut RequestLog, identity: &Identity) {
    log.product = Some(Arc::clone(&identity.product));
    log.user = Some(Arc::clone(&identity.user));
}

/// `GET /healthz`, `GET /health`.
pub fn health() -> Response {
    json(Bytes::from_static(b"{\"status\":\"ok\"}"))
}

fn json(body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The whole body, refused with 413 as soon as its declared or actual size is over
/// `limit` (a `Content-Length` is checked before reading a byte, chunk sizes as they come
/// in), and with 408 when it takes longer than `timeout`.
async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
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

/// Model ids in a path may be percent-encoded (`ft%3Agpt-4o`); decode the few bytes
/// that matter without allocating for the common case.
fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_digit(bytes[i + 1]), hex_digit(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_model_ids() {
        assert_eq!(percent_decode("gpt-4o"), "gpt-4o");
        assert_eq!(percent_decode("ft%3Agpt-4o"), "ft:gpt-4o");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%é"), "%é");
    }
}
