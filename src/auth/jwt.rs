//! JWT RS256 verification (with a bounded cache of verified tokens).

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use jsonwebtoken::DecodingKey;

use super::{AuthError, Identity};
use crate::settings::{JwtSettings, Secret};

/// Parses one `JWT_PUBLIC_KEYS` entry; the error says what is wrong, never the key.
pub fn decoding_key_from_pem(pem: &str) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| "not an RSA public key PEM".to_owned())
}

pub struct JwtVerifier {}

impl JwtVerifier {
    pub fn new(_settings: &JwtSettings, _products: &HashMap<Arc<str>, Secret<HeaderValue>>) -> Self {
        Self {}
    }

    pub fn verify(&self, _headers: &HeaderMap) -> Result<Identity, AuthError> {
        Err(AuthError::InvalidToken)
    }
}
