//! Fuzz harnesses: one function per parser of client input (or of configuration), each
//! taking arbitrary bytes, driving the real code and asserting what must hold whatever
//! the input. A panic is a finding.
//!
//! The same functions run in two places: the cargo-fuzz targets in `fuzz/fuzz_targets/`
//! (libFuzzer, nightly only, `scripts/fuzz`) and the stable test suite
//! (`tests/fuzz_corpus.rs`, which includes this file and replays every kept input under
//! `tests/corpus/<target>/` plus proptest-generated ones). So this file depends only on
//! crates the main package already has.
#![allow(clippy::missing_panics_doc, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use api_key_server::auth::{AuthError, Authenticator, Identity};
use api_key_server::settings::{Policy, Settings};
use api_key_server::validate;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// A harness: arbitrary bytes in, a panic on a finding.
pub type Harness = fn(&[u8]);

/// Every target, by the name of its corpus directory and fuzz target.
pub const TARGETS: [(&str, Harness); 6] = [
    ("validate_body", validate_body),
    ("jwt_token", jwt_token),
    ("jwt_header", jwt_header),
    ("jwt_claims", jwt_claims),
    ("hmac_headers", hmac_headers),
    ("settings", settings),
];

const KID: &str = "test-kid";
const CLIENT: &str = "desk";
const HMAC_SECRET: &str = "hmac-fuzz-secret-0123456789abcdef-XYZ";
const MAX_TOKENS: u32 = 2048;
const MAX_TTL: f64 = 3600.0;
const PUBLIC_KEY: &str = include_str!("../../tests/fixtures/jwt-public.pem");
const PRIVATE_KEY: &str = include_str!("../../tests/fixtures/jwt-private.pem");

struct Fixture {
    settings: Settings,
    auth: Authenticator,
    runtime: tokio::runtime::Runtime,
    signing_key: jsonwebtoken::EncodingKey,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let env: HashMap<String, String> = [
            (
                "PRODUCT_KEYS",
                r#"{"demo":"sk-fuzz-demo","other":"sk-fuzz-other"}"#.to_owned(),
            ),
            ("JWT_PUBLIC_KEYS", serde_json::json!({ KID: PUBLIC_KEY }).to_string()),
            (
                "CLIENT_HMAC_SECRETS",
                serde_json::json!({ CLIENT: HMAC_SECRET }).to_string(),
            ),
            // `desk` may use `demo` only: the 403 path is reachable.
            ("CLIENT_PRODUCTS", r#"{"desk":["demo"]}"#.to_owned()),
            // No replay memory across executions: each input is judged on its own.
            ("HMAC_REQUIRE_NONCE", "false".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("API_KEY_SERVER_{k}"), v))
        .collect();
        let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("fuzz settings are valid");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The store-less authenticator: nonces in memory, no Redis.
        let auth = runtime.block_on(async { Authenticator::new(&settings, None) });
        Fixture {
            auth,
            runtime,
            signing_key: jsonwebtoken::EncodingKey::from_rsa_pem(PRIVATE_KEY.as_bytes()).unwrap(),
            settings,
        }
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Replaces the placeholders `NOW`, `LATER` (+300 s) and `PAST` (-1000 s) with unix
/// times, so kept inputs stay meaningful as the clock moves.
fn with_times(data: &[u8]) -> Vec<u8> {
    let now = now();
    let text = String::from_utf8_lossy(data);
    if !text.contains("NOW") && !text.contains("LATER") && !text.contains("PAST") {
        return data.to_vec();
    }
    text.replace("LATER", &(now + 300).to_string())
        .replace("PAST", &(now - 1000).to_string())
        .replace("NOW", &now.to_string())
        .into_bytes()
}

fn policy() -> &'static Policy {
    &fixture().settings.policy
}

/// `POST /v1/chat/completions` bodies: whatever is accepted is a JSON object that
/// satisfies every rule, and is what the client sent or that plus the default limit.
pub fn validate_body(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let Ok(request) = validate::chat(&body, policy(), validate::Options::default()) else {
        return;
    };
    // Members as raw text: values the proxy skips may nest deeper than serde_json's
    // recursion limit allows a `Value` to.
    let object: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(&request.body).expect("an accepted body forwards as a JSON object");
    let field = |name: &str| object.get(name).map(|v| v.get()).filter(|v| *v != "null");
    let model: String = serde_json::from_str(field("model").expect("model present")).expect("model is a string");
    assert!(policy().allows_model(&model), "model {model:?} is allowed");
    let messages: Vec<Box<RawValue>> =
        serde_json::from_str(field("messages").expect("messages present")).expect("messages is an array");
    assert!(!messages.is_empty(), "messages is not empty");
    let mut limits = 0;
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(raw) = field(name) {
            let n: u64 = serde_json::from_str(raw).expect("a token limit is an integer");
            assert!((1..=u64::from(MAX_TOKENS)).contains(&n), "{name} = {n}");
            limits += 1;
        }
    }
    assert!(limits >= 1, "a token limit is always forwarded");
    if let Some(raw) = field("temperature") {
        let t: f64 = serde_json::from_str(raw).expect("temperature is a number");
        assert!(
            (policy().temperature_min..=policy().temperature_max).contains(&t),
            "temperature {t}"
        );
    }
    assert_eq!(request.stream, field("stream") == Some("true"));
    if request.body != body {
        // Changed only by adding the default: never larger than the input plus the member.
        assert!(
            request.body.len() <= body.len() + 40,
            "grew by more than the default limit"
        );
    }
}

/// What the authenticator said about `headers`, and the identity's invariants.
fn authenticate(method: &Method, path: &str, headers: &HeaderMap, body: &[u8]) -> Result<Identity, AuthError> {
    let f = fixture();
    let result = f.runtime.block_on(f.auth.verify(method, path, headers, body));
    if let Ok(identity) = &result {
        assert!(
            f.settings.product_keys.contains_key(&identity.product),
            "identities only name configured products"
        );
        assert!(!identity.user.is_empty(), "a user id is never empty");
    }
    result
}

/// `Authorization: Bearer <data>` (and the raw bytes as the whole header): a token that
/// is not signed by the test key is never accepted.
pub fn jwt_token(data: &[u8]) {
    let mut values = Vec::new();
    if let Ok(value) = HeaderValue::from_bytes(data) {
        values.push(value);
    }
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(data);
    if let Ok(value) = HeaderValue::from_bytes(&bearer) {
        values.push(value);
    }
    for value in values {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        if let Ok(identity) = authenticate(&Method::POST, "/v1/chat/completions", &headers, b"") {
            // Only a token signed with the test key verifies; the fuzzer cannot forge one,
            // so an acceptance must come from a kept, really signed input.
            let token = String::from_utf8_lossy(data);
            let token = token.trim_start_matches("Bearer ").trim();
            let header = jsonwebtoken::decode_header(token).expect("an accepted token has a header");
            assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
            assert_eq!(header.kid.as_deref(), Some(KID));
            assert!(identity.client.is_none());
        }
    }
}

/// base64url without padding, as JWTs use.
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A token of `header` and `claims` (raw bytes, base64url-encoded as they are), really
/// signed RS256 with the test key.
fn signed_token(header: &[u8], claims: &[u8]) -> String {
    let message = format!("{}.{}", b64url(header), b64url(claims));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &fixture().signing_key,
        jsonwebtoken::Algorithm::RS256,
    )
    .unwrap();
    format!("{message}.{signature}")
}

fn verify_token(token: &str) -> Result<Identity, AuthError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("base64url is a valid header value"),
    );
    authenticate(&Method::GET, "/v1/models", &headers, b"")
}

/// The JOSE header, with valid claims and a real RS256 signature over both: accepted only
/// when the header says `alg: RS256` and names the test `kid`.
pub fn jwt_header(data: &[u8]) {
    let now = now();
    let claims = format!(r#"{{"sub":"u","product":"demo","iat":{now},"exp":{}}}"#, now + 300);
    let header = with_times(data);
    let Ok(identity) = verify_token(&signed_token(&header, claims.as_bytes())) else {
        return;
    };
    let value: serde_json::Value = serde_json::from_slice(&header).expect("an accepted header is JSON");
    assert_eq!(value["alg"], "RS256", "accepted header {value}");
    assert_eq!(value["kid"], KID, "accepted header {value}");
    assert_eq!(&*identity.product, "demo");
}

/// The claims, under a valid header and a real signature: accepted only when `sub`,
/// `product`, `exp` and `iat` are present and within the time rules.
pub fn jwt_claims(data: &[u8]) {
    let claims = with_times(data);
    let header = format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{KID}"}}"#);
    let Ok(identity) = verify_token(&signed_token(header.as_bytes(), &claims)) else {
        return;
    };
    let value: serde_json::Value = serde_json::from_slice(&claims).expect("accepted claims are JSON");
    assert_eq!(value["sub"].as_str(), Some(&*identity.user), "claims {value}");
    assert_eq!(value["product"].as_str(), Some(&*identity.product), "claims {value}");
    let (exp, iat) = (value["exp"].as_f64().unwrap(), value["iat"].as_f64().unwrap());
    #[allow(clippy::cast_precision_loss, reason = "unix seconds are far below 2^52")]
    let now = now() as f64;
    assert!(exp - iat <= MAX_TTL, "ttl {}", exp - iat);
    assert!(iat <= now + 31.0, "iat in the future: {iat}");
    assert!(exp >= now - 31.0, "expired: {exp}");
    if let Some(nbf) = value.get("nbf").and_then(serde_json::Value::as_f64) {
        assert!(nbf <= now + 31.0, "nbf in the future: {nbf}");
    }
}

/// HMAC headers, one per line: client, timestamp, nonce, product, user, signature, then
/// the method, the path and the body (the rest). An absent or invalid header value is left
/// out. `NOW` becomes the current time and a signature of `SIGN` the correct one, so the
/// fuzzer reaches the checks after the signature.
pub fn hmac_headers(data: &[u8]) {
    let data = with_times(data);
    let mut fields = data.splitn(9, |b| *b == b'\n');
    let mut next = || fields.next().unwrap_or_default();
    let (client, timestamp, nonce, product, user, signature) = (next(), next(), next(), next(), next(), next());
    let method = Method::from_bytes(next()).unwrap_or(Method::POST);
    let path = String::from_utf8_lossy(next()).into_owned();
    let body = next();

    let mut computed = false;
    let signature = if signature == b"SIGN" {
        computed = true;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
        for part in [
            timestamp,
            method.as_str().as_bytes(),
            path.as_bytes(),
            client,
            product,
            user,
            nonce,
        ] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.update(hex::encode(Sha256::digest(body)).as_bytes());
        hex::encode(mac.finalize().into_bytes()).into_bytes()
    } else {
        signature.to_vec()
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-client-id", client),
        ("x-timestamp", timestamp),
        ("x-nonce", nonce),
        ("x-product-id", product),
        ("x-user-id", user),
        ("x-signature", &signature[..]),
    ] {
        if !value.is_empty()
            && let Ok(value) = HeaderValue::from_bytes(value)
        {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    if let Ok(identity) = authenticate(&method, &path, &headers, body) {
        assert!(computed, "a signature the fuzzer made up verified");
        assert_eq!(client, CLIENT.as_bytes());
        assert_eq!(&*identity.product, "demo", "desk may only use demo");
        assert_eq!(identity.user.as_bytes(), user);
        assert_eq!(identity.client.as_deref(), Some(CLIENT));
        let timestamp: u64 = std::str::from_utf8(timestamp).unwrap().parse().unwrap();
        assert!(timestamp.abs_diff(now()) <= 301, "timestamp {timestamp}");
    }
}

/// The settings parser, with `NAME=VALUE` lines (names without the prefix): never panics,
/// and an error never echoes a product key or an HMAC secret.
pub fn settings(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (format!("API_KEY_SERVER_{k}"), v.replace("\\n", "\n")))
        .collect();
    let lookup = |name: &str| {
        if name == "PORT" {
            env.get("API_KEY_SERVER_PORT").cloned()
        } else {
            env.get(name).cloned()
        }
    };
    let Err(error) = Settings::from_lookup(lookup) else {
        return;
    };
    let message = error.to_string();
    assert!(
        message.contains("API_KEY_SERVER_") || message.starts_with("PORT"),
        "the error names its variable: {message}"
    );
    // The secrets: values of the two secret maps. Ids (map keys) may be named, so a secret
    // that is also part of an id or of the message template is not a finding.
    let mut ids = Vec::new();
    let mut secrets = Vec::new();
    for name in ["PRODUCT_KEYS", "CLIENT_HMAC_SECRETS"] {
        let Some(raw) = env.get(&format!("API_KEY_SERVER_{name}")) else {
            continue;
        };
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(raw) {
            for (id, value) in map {
                ids.push(id);
                if let Some(secret) = value.as_str() {
                    secrets.push(secret.to_owned());
                }
            }
        }
    }
    // Short or spaced values, and all-caps names, could be words of the message itself.
    let distinctive =
        |s: &&String| s.len() >= 12 && !s.contains(' ') && !s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    for secret in secrets.iter().filter(distinctive) {
        if ids.iter().any(|id| id.contains(secret.as_str())) || env.keys().any(|k| k.contains(secret.as_str())) {
            continue;
        }
        assert!(
            !message.contains(secret.as_str()),
            "the error echoes a secret: {message}"
        );
    }
}
