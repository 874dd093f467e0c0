//! Client authentication: turns a request's credentials into an [`Identity`].
//!
//! Exactly one method per request: JWT when `Authorization` is present, HMAC when
//! `X-Signature` is. This module decides which and checks the product permission; the
//! methods themselves live in [`jwt`] and [`hmac`], the replay memory in [`nonce`]. It
//! never logs or returns a credential.

pub mod hmac;
pub mod jwt;
pub mod nonce;
pub mod token_cache;

use std::sync::Arc;

use http::{HeaderMap, Method, header};

use crate::settings::Settings;
use crate::store::Store;

/// The longest user, product or client id, in bytes (contract: ids are 1 to 256 bytes).
/// Ids end up in limiter keys, Redis keys and every log line: a bound here bounds those.
pub const MAX_ID_BYTES: usize = 256;

/// True for an id of 1 to [`MAX_ID_BYTES`] bytes.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len())
}

/// Who a request acts for: the product whose key is used and the user it is limited as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub product: Arc<str>,
    pub user: Arc<str>,
    /// The HMAC client that signed the request (`None` for JWT).
    pub client: Option<Arc<str>>,
}

/// Why a request is not authenticated or not permitted. Statuses, codes and messages are
/// in [`crate::error`], the contract's table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401 `missing_credentials`: neither `Authorization` nor `X-Signature`.
    #[error("missing credentials")]
    MissingCredentials,
    /// 401 `ambiguous_credentials`: both methods' credentials.
    #[error("ambiguous credentials")]
    AmbiguousCredentials,
    /// 401 `invalid_token`: malformed, wrong algorithm, unknown `kid`, bad signature or
    /// claims.
    #[error("invalid token")]
    InvalidToken,
    /// 401 `token_expired`.
    #[error("token expired")]
    TokenExpired,
    /// 401 `invalid_signature`: missing or malformed HMAC headers, unknown client, or a
    /// signature that does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// 401 `timestamp_out_of_range`.
    #[error("timestamp out of range")]
    TimestampOutOfRange,
    /// 401 `replayed_nonce`.
    #[error("replayed nonce")]
    ReplayedNonce,
    /// 403 `product_not_allowed`.
    #[error("product not allowed")]
    ProductNotAllowed,
    /// 503 `nonce_store_full`.
    #[error("nonce store full")]
    NonceStoreFull,
}

const X_SIGNATURE: http::HeaderName = http::HeaderName::from_static("x-signature");

/// Verifies credentials with both methods' settings.
pub struct Authenticator {
    jwt: jwt::JwtVerifier,
    hmac: hmac::HmacVerifier,
}

impl Authenticator {
    pub fn new(settings: &Settings, store: Option<Arc<Store>>) -> Self {
        Self {
            jwt: jwt::JwtVerifier::with_clock(&settings.jwt, &settings.products, settings.clock.clone()),
            hmac: hmac::HmacVerifier::with_clock(&settings.hmac, &settings.products, store, settings.clock.clone()),
        }
    }

    /// The identity of a request, or why it has none. `path` is the request path without
    /// query; `body` the whole request body (empty for `GET`).
    pub async fn verify(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Identity, AuthError> {
        let jwt = headers.contains_key(header::AUTHORIZATION);
        let hmac = headers.contains_key(X_SIGNATURE);
        match (jwt, hmac) {
            (true, true) => Err(AuthError::AmbiguousCredentials),
            (false, false) => Err(AuthError::MissingCredentials),
            (true, false) => self.jwt.verify(headers),
            (false, true) => self.hmac.verify(method, path, headers, body).await,
        }
    }
}
