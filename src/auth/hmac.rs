//! HMAC-SHA256 request signatures with timestamp and nonce.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};

use super::{AuthError, Identity};
use crate::settings::{HmacSettings, Secret};
use crate::store::Store;

pub struct HmacVerifier {}

impl HmacVerifier {
    pub fn new(
        _settings: &HmacSettings,
        _products: &HashMap<Arc<str>, Secret<HeaderValue>>,
        _store: Option<Arc<Store>>,
    ) -> Self {
        Self {}
    }

    #[allow(clippy::unused_async)] // stub until HMAC lands
    pub async fn verify(
        &self,
        _method: &Method,
        _path: &str,
        _headers: &HeaderMap,
        _body: &[u8],
    ) -> Result<Identity, AuthError> {
        Err(AuthError::InvalidSignature)
    }
}
