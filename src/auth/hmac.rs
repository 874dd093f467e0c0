//! HMAC-SHA256 request signatures with timestamp and nonce -> [`Identity`].
//!
//! Checks run in the contract's order: headers, client, timestamp, signature, nonce.
//! The nonce is claimed only after the signature verified, so a forged request cannot
//! burn a real client's nonce. The signature is compared in constant time; the secret
//! never leaves this module.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use super::nonce::{Claim, NonceStore};
use super::{AuthError, Identity};
use crate::clock::Clock;
use crate::settings::{HmacSettings, Secret};
use crate::store::Store;

type HmacSha256 = hmac::Hmac<Sha256>;

pub struct HmacVerifier {
    secrets: HashMap<String, Secret<Vec<u8>>>,
    /// Interned client ids, so an identity shares the `Arc` instead of allocating.
    clients: HashMap<String, Arc<str>>,
    client_products: Option<HashMap<String, HashSet<String>>>,
    products: HashSet<Arc<str>>,
    tolerance: u64,
    require_nonce: bool,
    nonces: NonceStore,
    clock: Clock,
}

/// The signed headers of one request, borrowed from the request.
struct Signed<'a> {
    client: &'a str,
    timestamp: &'a str,
    nonce: &'a str,
    product: &'a str,
    user: &'a str,
    signature: &'a str,
}

impl HmacVerifier {
    pub fn new(settings: &HmacSettings, products: &HashSet<Arc<str>>, store: Option<Arc<Store>>) -> Self {
        Self::with_clock(settings, products, store, Clock::system())
    }

    /// As [`HmacVerifier::new`], timestamps and nonce windows read from `clock`.
    pub fn with_clock(
        settings: &HmacSettings,
        products: &HashSet<Arc<str>>,
        store: Option<Arc<Store>>,
        clock: Clock,
    ) -> Self {
        Self {
            secrets: settings.secrets.clone(),
            clients: settings
                .secrets
                .keys()
                .map(|c| (c.clone(), Arc::from(c.as_str())))
                .collect(),
            client_products: settings.client_products.clone(),
            products: products.clone(),
            tolerance: settings.clock_tolerance.as_secs(),
            require_nonce: settings.require_nonce,
            nonces: NonceStore::new(settings.nonce_capacity, store, clock.clone()),
            clock,
        }
    }

    pub async fn verify(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Identity, AuthError> {
        let signed = self.read_headers(headers)?;
        let (client, secret) = self
            .secrets
            .get_key_value(signed.client)
            .ok_or(AuthError::InvalidSignature)?;
        let timestamp = self.check_timestamp(signed.timestamp)?;
        let signature = decode_signature(signed.signature).ok_or(AuthError::InvalidSignature)?;
        let parts = [
            signed.timestamp,
            method.as_str(),
            path,
            signed.client,
            signed.product,
            signed.user,
            signed.nonce,
        ];
        let mac = mac_of(secret.expose(), parts, body);
        // `verify_slice` compares in constant time.
        mac.verify_slice(&signature).map_err(|_| AuthError::InvalidSignature)?;

        if !signed.nonce.is_empty() {
            // Remember the nonce until its timestamp leaves the window: after that the
            // timestamp check refuses the replay by itself.
            let ttl = Duration::from_secs(
                (timestamp + self.tolerance + 1)
                    .saturating_sub(self.clock.wall().as_secs())
                    .max(1),
            );
            match self.nonces.claim(client, signed.nonce, ttl).await {
                Claim::Fresh => {}
                Claim::Replayed => return Err(AuthError::ReplayedNonce),
                Claim::Full => return Err(AuthError::NonceStoreFull),
            }
        }

        let product = self
            .products
            .get(signed.product)
            .ok_or(AuthError::ProductNotAllowed)?
            .clone();
        if let Some(allowed) = &self.client_products
            && !allowed.get(client).is_some_and(|list| list.contains(signed.product))
        {
            return Err(AuthError::ProductNotAllowed);
        }
        Ok(Identity {
            product,
            user: signed.user.into(),
            client: self.clients.get(client).cloned(),
        })
    }

    fn read_headers<'a>(&self, headers: &'a HeaderMap) -> Result<Signed<'a>, AuthError> {
        let one = |name: &str| -> Result<Option<&'a str>, AuthError> {
            let mut values = headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => Ok(None),
                (Some(v), None) => v.to_str().map(Some).map_err(|_| AuthError::InvalidSignature),
                (Some(_), Some(_)) => Err(AuthError::InvalidSignature),
            }
        };
        let required = |name: &str| one(name)?.filter(|v| !v.is_empty()).ok_or(AuthError::InvalidSignature);
        let nonce = match one("x-nonce")? {
            Some(nonce) if is_valid_nonce(nonce) => nonce,
            Some(_) => return Err(AuthError::InvalidSignature),
            None if self.require_nonce => return Err(AuthError::InvalidSignature),
            None => "",
        };
        // Ids longer than the contract's bound are malformed headers, refused before any
        // work: they would otherwise grow the limiter's memory and every log line.
        let id = |name: &str| {
            required(name).and_then(|v| {
                if super::is_valid_id(v) {
                    Ok(v)
                } else {
                    Err(AuthError::InvalidSignature)
                }
            })
        };
        Ok(Signed {
            client: id("x-client-id")?,
            timestamp: required("x-timestamp")?,
            nonce,
            product: id("x-product-id")?,
            user: id("x-user-id")?,
            signature: required("x-signature")?,
        })
    }

    /// The timestamp as unix seconds, if it is an integer within the tolerance.
    fn check_timestamp(&self, timestamp: &str) -> Result<u64, AuthError> {
        let timestamp: u64 = if timestamp.bytes().all(|b| b.is_ascii_digit()) {
            timestamp.parse().map_err(|_| AuthError::TimestampOutOfRange)?
        } else {
            return Err(AuthError::InvalidSignature);
        };
        if timestamp.abs_diff(self.clock.wall().as_secs()) > self.tolerance {
            return Err(AuthError::TimestampOutOfRange);
        }
        Ok(timestamp)
    }
}

/// HMAC-SHA256 over the contract's string to sign: `parts` (timestamp, method, path,
/// client, product, user, nonce) each followed by a newline, then hex(sha256(body)).
/// Fed piece by piece, so the string is never built.
fn mac_of(secret: &[u8], parts: [&str; 7], body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    let mut body_hash = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(body), &mut body_hash).expect("64 hex digits for 32 bytes");
    mac.update(&body_hash);
    mac
}

/// 16 to 128 characters of `[A-Za-z0-9_-]`.
fn is_valid_nonce(nonce: &str) -> bool {
    (16..=128).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The 32 bytes of a hex signature of either case.
fn decode_signature(hex_signature: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_signature, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_worked_example_signs_as_documented() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}"#;
        let parts = [
            "1764067200",
            "POST",
            "/v1/chat/completions",
            "desktop-app",
            "notes",
            "user-42",
            "Zx8kq2LwP0aVb7Nc4Rt9Ys1M",
        ];
        let mac = mac_of(b"an-example-secret-of-at-least-32-bytes!", parts, body);
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "7366d46a7a9a3fa02a2ee73d6a3e049158f75a69f50ce5a1b0105a0f434a0687"
        );
    }

    #[test]
    fn nonce_format() {
        assert!(is_valid_nonce("abcdefghijklmnop"));
        assert!(is_valid_nonce(&"a-_9".repeat(32)));
        assert!(!is_valid_nonce("short"));
        assert!(!is_valid_nonce(&"a".repeat(129)));
        assert!(!is_valid_nonce("abcdefghijklmno!"));
    }

    #[test]
    fn signatures_decode_in_either_case() {
        let lower = "ab".repeat(32);
        assert_eq!(decode_signature(&lower), Some([0xab; 32]));
        assert_eq!(decode_signature(&lower.to_uppercase()), Some([0xab; 32]));
        assert_eq!(decode_signature("abc"), None);
        assert_eq!(decode_signature(&"zz".repeat(32)), None);
    }
}
