//! JWT RS256 verification: `Authorization: Bearer <jwt>` -> [`Identity`].
//!
//! Only RS256, only keys named by `kid` in `JWT_PUBLIC_KEYS`; nothing a token names
//! (`jku`, `jwk`, `x5u`) is ever fetched or used. jsonwebtoken checks the signature and
//! `iss`/`aud`; the time claims are checked here, as numbers that may be fractional,
//! because jsonwebtoken reads them as integers and never looks at `iat`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer, de};

use super::token_cache::{Cached, TokenCache};
use super::{AuthError, Identity};
use crate::clock::Clock;
use crate::settings::JwtSettings;

/// Tokens longer than this are refused before any parsing: a real client token is well
/// under 2 KiB, and RSA-verifying megabytes would be a cheap way to burn our CPU.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

const NOT_RSA: &str = "not an RSA public key of 2048 to 8192 bits";

/// Parses one `JWT_PUBLIC_KEYS` entry (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`).
/// jsonwebtoken only unwraps the PEM, so the key type and size are checked here: a
/// 1024-bit or EC key would otherwise pass startup and fail every token of its `kid`.
pub fn decoding_key_from_pem(pem: &str) -> Result<DecodingKey, String> {
    let pem = pem.trim();
    let block = ::pem::parse(pem).map_err(|_| "not a PEM public key".to_owned())?;
    let spki = match block.tag() {
        "PUBLIC KEY" => block.into_contents(),
        "RSA PUBLIC KEY" => spki_from_pkcs1(block.contents()),
        _ => return Err("expected \"BEGIN PUBLIC KEY\" or \"BEGIN RSA PUBLIC KEY\"".to_owned()),
    };
    // aws-lc-rs itself refuses RSA keys under 2048 bits.
    let key = aws_lc_rs::rsa::PublicEncryptingKey::from_der(&spki).map_err(|_| NOT_RSA.to_owned())?;
    if !(2048..=8192).contains(&key.key_size_bits()) {
        return Err(NOT_RSA.to_owned());
    }
    DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| "not an RSA public key PEM".to_owned())
}

/// Wraps a PKCS#1 `RSAPublicKey` in a `SubjectPublicKeyInfo` with the `rsaEncryption`
/// algorithm, the only form aws-lc-rs parses.
fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = Vec::with_capacity(pkcs1.len() + 1);
    bit_string.push(0); // no unused bits
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    der_push(&mut inner, 0x03, &bit_string);
    let mut spki = Vec::with_capacity(inner.len() + 8);
    der_push(&mut spki, 0x30, &inner);
    spki
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(u8::try_from(len).expect("checked < 0x80"));
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | u8::try_from(bytes.len() - skip).expect("a usize has at most 8 bytes"));
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

/// `T` read only from a JSON object. serde's derived `Deserialize` also accepts an array
/// of the fields in order, so `["alice","demo",...]` would pass as claims (contract:
/// claims that are not an object are 401).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(Visitor(PhantomData)).map(Object)
    }
}

/// The JOSE header fields this service reads. jsonwebtoken's `Header` reads `"crit": null`
/// as no `crit` at all; here any `crit` member counts.
#[derive(Deserialize)]
struct JoseHeader {
    alg: Option<String>,
    kid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// True for a member that is present, whatever its value (`null` included).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    de::IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// The header of `token`, if it is a JSON object.
fn jose_header(token: &str) -> Option<JoseHeader> {
    let (encoded, _) = token.split_once('.')?;
    let json = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    serde_json::from_slice::<Object<JoseHeader>>(&json).ok().map(|h| h.0)
}

/// The claims this service reads. Numbers are `f64`: a `NumericDate` may be fractional.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    product: Option<String>,
    exp: Option<f64>,
    iat: Option<f64>,
    nbf: Option<f64>,
}

pub struct JwtVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    products: HashSet<Arc<str>>,
    max_ttl: f64,
    leeway: f64,
    /// Tokens that verified, so a token sent again costs a hash, not an RSA verification.
    cache: TokenCache,
    clock: Clock,
}

impl JwtVerifier {
    pub fn new(settings: &JwtSettings, products: &HashSet<Arc<str>>) -> Self {
        Self::with_clock(settings, products, Clock::system())
    }

    /// As [`JwtVerifier::new`], time claims checked against `clock`.
    pub fn with_clock(settings: &JwtSettings, products: &HashSet<Arc<str>>, clock: Clock) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.algorithms = vec![Algorithm::RS256];
        // Time claims are ours (fractional, and `iat` too); jsonwebtoken would read them
        // as integers and refuse `1.7e9`.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.leeway = settings.leeway.as_secs();
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                // jsonwebtoken checks a claim's value only when the claim is present.
                validation.required_spec_claims.insert("aud".to_owned());
            }
            // Since jsonwebtoken 9 a token with `aud` is refused when no audience is set;
            // the contract ignores `aud` then.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        Self {
            keys: settings.keys.clone(),
            validation,
            products: products.clone(),
            max_ttl: settings.max_ttl.as_secs_f64(),
            leeway: settings.leeway.as_secs_f64(),
            cache: TokenCache::default(),
            clock,
        }
    }

    pub fn verify(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(AuthError::InvalidToken);
        };
        let token = bearer_token(value).ok_or(AuthError::InvalidToken)?;
        let now = self.clock.unix_seconds();
        // Only verified tokens are cached; `exp` and `nbf` are checked again on every hit.
        if let Some(hit) = self.cache.get(token, now, self.leeway) {
            return Ok(Identity {
                product: hit.product,
                user: hit.user,
                client: None,
            });
        }

        // jsonwebtoken checks `alg` again against the validation's list; `crit` it ignores:
        // no extension is understood here, so a header that names one is refused
        // (RFC 7515 4.1.11).
        let header = jose_header(token).ok_or(AuthError::InvalidToken)?;
        if header.alg.as_deref() != Some("RS256") || header.crit {
            return Err(AuthError::InvalidToken);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(AuthError::InvalidToken)?;
        let Object(claims) = jsonwebtoken::decode::<Object<Claims>>(token, key, &self.validation)
            .map_err(|_| AuthError::InvalidToken)?
            .claims;

        let (Some(user), Some(product), Some(exp), Some(iat)) = (claims.sub, claims.product, claims.exp, claims.iat)
        else {
            return Err(AuthError::InvalidToken);
        };
        if !super::is_valid_id(&user) || !super::is_valid_id(&product) {
            return Err(AuthError::InvalidToken);
        }
        self.check_times(now, exp, iat, claims.nbf)?;
        let product = self
            .products
            .get(product.as_str())
            .ok_or(AuthError::ProductNotAllowed)?
            .clone();
        let user: Arc<str> = Arc::from(user.as_str());
        self.cache.insert(
            token,
            Cached {
                product: product.clone(),
                user: Arc::clone(&user),
                exp,
                nbf: claims.nbf,
            },
            now,
        );
        Ok(Identity {
            product,
            user,
            client: None,
        })
    }

    fn check_times(&self, now: f64, exp: f64, iat: f64, nbf: Option<f64>) -> Result<(), AuthError> {
        if !exp.is_finite() || !iat.is_finite() || nbf.is_some_and(|n| !n.is_finite()) {
            return Err(AuthError::InvalidToken);
        }
        if exp - iat > self.max_ttl || iat > now + self.leeway || nbf.is_some_and(|nbf| nbf > now + self.leeway) {
            return Err(AuthError::InvalidToken);
        }
        if now > exp + self.leeway {
            return Err(AuthError::TokenExpired);
        }
        Ok(())
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive), if it is of a sane size.
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN_BYTES).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
    }

    #[test]
    fn accepts_both_pem_forms_of_a_2048_bit_key() {
        assert!(decoding_key_from_pem(&fixture("jwt-public.pem")).is_ok());
        assert!(decoding_key_from_pem(&fixture("jwt-public-pkcs1.pem")).is_ok());
    }

    #[test]
    fn refuses_weak_ec_and_private_keys() {
        let weak = decoding_key_from_pem(&fixture("weak-public.pem")).expect_err("1024 bits refused");
        assert_eq!(weak, NOT_RSA);
        assert!(decoding_key_from_pem(&fixture("ec-public.pem")).is_err());
        assert!(decoding_key_from_pem(&fixture("jwt-private.pem")).is_err());
        assert!(decoding_key_from_pem("not a pem").is_err());
    }

    #[test]
    fn bearer_scheme_is_required() {
        assert_eq!(bearer_token(&HeaderValue::from_static("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&HeaderValue::from_static("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&HeaderValue::from_static("Basic abc")), None);
        assert_eq!(bearer_token(&HeaderValue::from_static("Bearer ")), None);
        let long = HeaderValue::from_str(&format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1))).expect("header");
        assert_eq!(bearer_token(&long), None);
    }
}
