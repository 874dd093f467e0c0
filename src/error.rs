//! [`ApiError`]: the contract's table of statuses, types and codes, in one place.
//!
//! Every error response the proxy writes goes through [`ApiError::into_response`], so
//! each one has OpenAI's envelope and the right `x-should-retry`;
//! [`crate::request::Outcome`] records its code for the request's log line. Messages are for clients: useful, never
//! internal detail, never a secret.

use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode, header};

use crate::auth::AuthError;
use crate::budget::admission::Refusal;
use crate::limit::LimitError;
use crate::upstream::UpstreamError;
use crate::validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 `not_found`: no such route.
    #[error("not found")]
    NotFound,
    /// 404 `model_not_found`: `GET /v1/models/{model}` for a model that is not allowed.
    #[error("model not found")]
    ModelNotFound,
    /// 404 `response_not_found`: a stored response the caller does not own (whether or
    /// not it exists upstream).
    #[error("response not found")]
    ResponseNotFound,
    /// 503 `ownership_unavailable`: Redis is unavailable and memory does not know the
    /// stored response; retrying soon may find it.
    #[error("ownership unavailable")]
    OwnershipUnavailable,
    /// 405 `method_not_allowed`, with `Allow`.
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    /// 408 `request_timeout`: the body came slower than `CLIENT_TIMEOUT_SECONDS`.
    #[error("request timeout")]
    RequestTimeout,
    /// 413 `body_too_large`.
    #[error("body too large")]
    BodyTooLarge,
    /// 400 (a client error while reading the body, e.g. a broken chunked encoding).
    #[error("unreadable body")]
    UnreadableBody,
    /// 401 `authentication_error`, 403 `permission_error` `product_not_allowed`, 503
    /// `server_error` `nonce_store_full`: see [`AuthError`].
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 400 `invalid_request_error`: see [`ValidationError`].
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// 429: see [`LimitError`].
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// 429 `insufficient_quota` `budget_exceeded`: a budget cannot pay for the request's
    /// worst case today.
    #[error("budget exceeded")]
    BudgetExceeded(Refusal),
    /// 502: see [`UpstreamError`].
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// 500 `internal_error`: a defect. The message holds no detail.
    #[error("internal error")]
    Internal,
}

/// Everything the envelope and headers need, looked up once per error.
struct Described {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: &'static str,
    param: Option<&'static str>,
    retry: bool,
}

const INVALID: &str = "invalid_request_error";
const AUTHENTICATION: &str = "authentication_error";

/// A constant, so that the name is validated once, at compile time.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

impl ApiError {
    // One arm per row of the contract's table reads better than helpers split apart.
    #[allow(clippy::too_many_lines)]
    fn describe(&self) -> Described {
        use StatusCode as S;
        let d = |status, kind, code, message| Described {
            status,
            kind,
            code,
            message,
            param: None,
            retry: false,
        };
        match self {
            Self::NotFound => d(S::NOT_FOUND, INVALID, "not_found", "No such route."),
            Self::ModelNotFound => d(
                S::NOT_FOUND,
                INVALID,
                "model_not_found",
                "The model does not exist or is not allowed.",
            ),
            Self::ResponseNotFound => d(
                S::NOT_FOUND,
                INVALID,
                "response_not_found",
                "No stored response with that id belongs to this caller.",
            ),
            Self::OwnershipUnavailable => d(
                S::SERVICE_UNAVAILABLE,
                "server_error",
                "ownership_unavailable",
                "The owner of this stored response cannot be checked right now; retry shortly.",
            )
            .retry_if(true),
            Self::MethodNotAllowed { .. } => d(
                S::METHOD_NOT_ALLOWED,
                INVALID,
                "method_not_allowed",
                "Method not allowed on this route.",
            ),
            Self::RequestTimeout => d(
                S::REQUEST_TIMEOUT,
                INVALID,
                "request_timeout",
                "The request body was not received in time.",
            ),
            Self::BodyTooLarge => d(
                S::PAYLOAD_TOO_LARGE,
                INVALID,
                "body_too_large",
                "The request body is too large.",
            ),
            Self::UnreadableBody => d(
                S::BAD_REQUEST,
                INVALID,
                "invalid_body",
                "The request body could not be read.",
            ),
            Self::Auth(e) => {
                let (status, kind, code, message) = match e {
                    AuthError::MissingCredentials => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "missing_credentials",
                        "No credentials: send a JWT as Authorization: Bearer, or HMAC signature headers.",
                    ),
                    AuthError::AmbiguousCredentials => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "ambiguous_credentials",
                        "Send either a JWT (Authorization) or an HMAC signature (X-Signature), not both.",
                    ),
                    AuthError::InvalidToken => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "invalid_token",
                        "The token is invalid.",
                    ),
                    AuthError::TokenExpired => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "token_expired",
                        "The token has expired.",
                    ),
                    AuthError::InvalidSignature => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "invalid_signature",
                        "The request signature is invalid.",
                    ),
                    AuthError::TimestampOutOfRange => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "timestamp_out_of_range",
                        "X-Timestamp is outside the allowed clock skew.",
                    ),
                    AuthError::ReplayedNonce => (
                        S::UNAUTHORIZED,
                        AUTHENTICATION,
                        "replayed_nonce",
                        "X-Nonce was already used.",
                    ),
                    AuthError::ProductNotAllowed => (
                        S::FORBIDDEN,
                        "permission_error",
                        "product_not_allowed",
                        "This credential may not use that product.",
                    ),
                    AuthError::NonceStoreFull => {
                        return d(
                            S::SERVICE_UNAVAILABLE,
                            "server_error",
                            "nonce_store_full",
                            "The replay-protection store is full; retry shortly.",
                        )
                        .retry_if(true);
                    }
                };
                d(status, kind, code, message)
            }
            Self::Validation(e) => {
                use ValidationError as V;
                let (code, message, param) = match *e {
                    V::InvalidJson => (
                        "invalid_json",
                        "The request body must be a JSON object with unique top-level keys.",
                        None,
                    ),
                    V::Missing(p) => (
                        "missing_required_field",
                        match p {
                            "model" => "The request must name a model.",
                            "input" => "The request must have an input.",
                            _ => "The request must have a non-empty messages array.",
                        },
                        Some(p),
                    ),
                    V::InvalidType(p) => (
                        "invalid_type",
                        match p {
                            "model" => "model must be a string.",
                            "messages" => "messages must be an array.",
                            "temperature" => "temperature must be a number.",
                            "input" => "input must be a string or an array.",
                            "tools" => "tools must be an array.",
                            "previous_response_id" => "previous_response_id must be a string.",
                            "n" => "n must be an integer.",
                            "stream_options" => "stream_options must be an object whose include_usage is a boolean.",
                            _ => "The token limit must be an integer.",
                        },
                        Some(p),
                    ),
                    V::ModelNotAllowed => (
                        "model_not_allowed",
                        "This model is not allowed on this gateway.",
                        Some("model"),
                    ),
                    V::EmptyMessages => ("invalid_messages", "messages must not be empty.", Some("messages")),
                    V::TooSmall(p) => (
                        "invalid_value",
                        if p == "max_output_tokens" {
                            "max_output_tokens must be at least 16."
                        } else {
                            "The token limit must be at least 1."
                        },
                        Some(p),
                    ),
                    V::InvalidValue(p, message) => ("invalid_value", message, Some(p)),
                    V::ToolNotAllowed => (
                        "tool_not_allowed",
                        "A tool type in tools is not allowed on this gateway.",
                        Some("tools"),
                    ),
                    V::Unsupported(p) => (
                        "unsupported_parameter",
                        match p {
                            // Refused only while a budget applies (contract, validation).
                            "background" | "service_tier" | "modalities" | "audio" => {
                                "This parameter's cost cannot be reserved or metered; it is not supported while a budget applies."
                            }
                            _ => {
                                "This parameter names state the upstream keeps for every user of this product; it is not supported."
                            }
                        },
                        Some(p),
                    ),
                    V::TooLarge(p) => (
                        "max_tokens_too_large",
                        "The token limit is above this gateway's maximum.",
                        Some(p),
                    ),
                    V::TemperatureOutOfRange => (
                        "temperature_out_of_range",
                        "temperature is outside the allowed range.",
                        Some("temperature"),
                    ),
                };
                Described {
                    param,
                    ..d(S::BAD_REQUEST, INVALID, code, message)
                }
            }
            Self::Limit(e) => match e {
                LimitError::RateLimited { .. } => Described {
                    status: S::TOO_MANY_REQUESTS,
                    kind: "rate_limit_error",
                    code: "rate_limit_exceeded",
                    message: "Rate limit exceeded: too many requests. Retry after the time in Retry-After.",
                    param: None,
                    retry: true,
                },
                LimitError::DailyQuotaExceeded { .. } => Described {
                    status: S::TOO_MANY_REQUESTS,
                    kind: "rate_limit_error",
                    code: "daily_quota_exceeded",
                    message: "Daily request quota exceeded. It resets when the next day starts (see Retry-After).",
                    param: None,
                    retry: false,
                },
            },
            Self::BudgetExceeded(refusal) => d(
                S::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "budget_exceeded",
                match refusal.scope {
                    "user" => {
                        "This user's daily spend budget cannot cover this request. It resets when the next day starts (see Retry-After)."
                    }
                    "product" => {
                        "This product's daily spend budget cannot cover this request. It resets when the next day starts (see Retry-After)."
                    }
                    _ => {
                        "This client's daily spend budget cannot cover this request. It resets when the next day starts (see Retry-After)."
                    }
                },
            ),
            Self::Upstream(e) => {
                let (code, message, retry) = match e {
                    UpstreamError::Unreachable => {
                        ("upstream_unreachable", "The upstream API could not be reached.", true)
                    }
                    UpstreamError::Timeout => ("upstream_timeout", "The upstream API did not answer in time.", false),
                    UpstreamError::AuthFailed { .. } => (
                        "upstream_auth_failed",
                        "The upstream API refused the gateway's credentials.",
                        false,
                    ),
                    UpstreamError::CredentialsUnavailable => (
                        "upstream_credentials_unavailable",
                        "The gateway could not get its credentials for the upstream API; retry shortly.",
                        true,
                    ),
                };
                d(S::BAD_GATEWAY, "upstream_error", code, message).retry_if(retry)
            }
            Self::Internal => d(
                S::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "Internal error.",
            ),
        }
    }

    /// The contract's `code` of this error.
    pub fn code(&self) -> &'static str {
        self.describe().code
    }

    /// The field a 400 names, if any.
    pub fn param(&self) -> Option<&'static str> {
        self.describe().param
    }
}

impl Described {
    fn retry_if(mut self, retry: bool) -> Self {
        self.retry = retry;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let d = self.describe();
        let body = envelope(d.message, d.kind, d.code, d.param);
        let mut response = (d.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            X_SHOULD_RETRY,
            HeaderValue::from_static(if d.retry { "true" } else { "false" }),
        );
        match &self {
            Self::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::Limit(e) => e.write_headers(headers),
            Self::BudgetExceeded(refusal) => {
                let seconds = refusal.retry_after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                if let Some(budget) = &refusal.headers {
                    budget.write(headers);
                }
            }
            _ => {}
        }
        response
    }
}

/// `{"error":{"message":…,"type":…,"code":…,"param":…}}`, written without a JSON tree.
fn envelope(message: &str, kind: &str, code: &str, param: Option<&str>) -> bytes::Bytes {
    let mut out = BytesMut::with_capacity(128 + message.len());
    out.put_slice(b"{\"error\":{\"message\":");
    // The pieces are our own static strings; serde_json still escapes them properly.
    let _ = serde_json::to_writer((&mut out).writer(), message);
    out.put_slice(b",\"type\":");
    let _ = serde_json::to_writer((&mut out).writer(), kind);
    out.put_slice(b",\"code\":");
    let _ = serde_json::to_writer((&mut out).writer(), code);
    out.put_slice(b",\"param\":");
    let _ = serde_json::to_writer((&mut out).writer(), &param);
    out.put_slice(b"}}");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_name_their_field() {
        let param = |e| ApiError::Validation(e).param();
        assert_eq!(param(ValidationError::ModelNotAllowed), Some("model"));
        assert_eq!(param(ValidationError::TooLarge("max_tokens")), Some("max_tokens"));
        assert_eq!(param(ValidationError::TemperatureOutOfRange), Some("temperature"));
        assert_eq!(param(ValidationError::InvalidJson), None);
    }

    #[test]
    fn auth_errors_have_the_contracts_statuses() {
        let status = |e| ApiError::Auth(e).describe().status.as_u16();
        assert_eq!(status(AuthError::InvalidToken), 401);
        assert_eq!(status(AuthError::ProductNotAllowed), 403);
        assert_eq!(status(AuthError::NonceStoreFull), 503);
        assert!(ApiError::Auth(AuthError::NonceStoreFull).describe().retry);
        assert!(!ApiError::Auth(AuthError::ReplayedNonce).describe().retry);
    }

    #[test]
    fn envelope_is_openai_shaped_json() {
        let body = envelope("Bad \"thing\".", "invalid_request_error", "invalid_json", Some("model"));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["message"], "Bad \"thing\".");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(v["error"]["param"], "model");
        let body = envelope("m", "t", "c", None);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["error"]["param"].is_null());
    }
}
