//! Micro-benchmarks of each step on the request path (`cargo bench --bench hot_path`):
//! body validation, JWT verification (cold: an RSA verification; cached: a hash and a map
//! lookup), HMAC verification (signature and nonce claim), one limiter decision in memory,
//! and one in Redis (a round trip to a `redis-server` started here on a free port).
//!
//! Under `cargo test` divan runs each once, as a smoke test.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc, reason = "a benchmark harness")]

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api_key_server::auth::Identity;
use api_key_server::auth::hmac::HmacVerifier;
use api_key_server::auth::jwt::JwtVerifier;
use api_key_server::limit::Limiter;
use api_key_server::settings::Settings;
use api_key_server::store::Store;
use api_key_server::validate;
use bytes::Bytes;
use divan::Bencher;
use hmac::{KeyInit, Mac};
use http::{HeaderMap, HeaderValue, Method};
use sha2::{Digest, Sha256};

const SECRET: &str = "bench-hmac-secret-0123456789abcdef-0123456789";
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;
const CHAT_DEFAULTED: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"temperature":0.7}"#;

fn main() {
    divan::main();
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn settings(extra: &[(&str, String)]) -> Settings {
    let mut env: HashMap<String, String> = [
        ("PRODUCT_KEYS", r#"{"demo":"sk-bench"}"#.to_owned()),
        (
            "JWT_PUBLIC_KEYS",
            serde_json::json!({"bench": fixture("jwt-public.pem")}).to_string(),
        ),
        ("CLIENT_HMAC_SECRETS", serde_json::json!({"bench": SECRET}).to_string()),
        ("HMAC_NONCE_CAPACITY", "10000000".to_owned()),
        ("RATE_LIMIT_CAPACITY", "1000000000".to_owned()),
        ("RATE_LIMIT_REFILL_PER_SECOND", "1000000000".to_owned()),
        ("DAILY_QUOTA", "1000000000000".to_owned()),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .map(|(k, v)| (format!("API_KEY_SERVER_{k}"), v))
    .collect();
    env.insert("PORT".to_owned(), "0".to_owned());
    Settings::from_lookup(|k| env.get(k).cloned()).unwrap()
}

static SETTINGS: LazyLock<Settings> = LazyLock::new(|| settings(&[]));

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn bearer(user: &str) -> HeaderMap {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(fixture("jwt-private.pem").as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("bench".to_owned());
    let now = now();
    let claims = serde_json::json!({"sub": user, "product": "demo", "iat": now, "exp": now + 3000});
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

#[divan::bench]
fn validate_unchanged_body(bencher: Bencher) {
    let body = Bytes::from_static(CHAT.as_bytes());
    bencher.bench(|| validate::chat(divan::black_box(&body), &SETTINGS.policy, validate::Options::default()).unwrap());
}

#[divan::bench]
fn validate_body_with_default_tokens(bencher: Bencher) {
    let body = Bytes::from_static(CHAT_DEFAULTED.as_bytes());
    bencher.bench(|| validate::chat(divan::black_box(&body), &SETTINGS.policy, validate::Options::default()).unwrap());
}

/// A verifier with an empty cache each time: parsing, RSA-2048 verification, claims.
#[divan::bench]
fn jwt_verify_cold(bencher: Bencher) {
    let headers = bearer("alice");
    bencher
        .with_inputs(|| JwtVerifier::new(&SETTINGS.jwt, &SETTINGS.products))
        .bench_local_refs(|verifier| verifier.verify(&headers).unwrap());
}

/// A token seen before: SHA-256 of the token and a sharded map lookup.
#[divan::bench]
fn jwt_verify_cached(bencher: Bencher) {
    let headers = bearer("alice");
    let verifier = JwtVerifier::new(&SETTINGS.jwt, &SETTINGS.products);
    verifier.verify(&headers).unwrap();
    bencher.bench(|| verifier.verify(divan::black_box(&headers)).unwrap());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn hmac_headers(n: u64, body: &[u8]) -> HeaderMap {
    let timestamp = now().to_string();
    let nonce = format!("bench{n:016x}");
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    let body_hash = hex::encode(Sha256::digest(body));
    let text = format!("{timestamp}\nPOST\n/v1/chat/completions\nbench\ndemo\nalice\n{nonce}\n{body_hash}");
    mac.update(text.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-client-id", "bench".to_owned()),
        ("x-timestamp", timestamp),
        ("x-nonce", nonce),
        ("x-product-id", "demo".to_owned()),
        ("x-user-id", "alice".to_owned()),
        ("x-signature", signature),
    ] {
        headers.insert(name, HeaderValue::from_str(&value).unwrap());
    }
    headers
}

/// Headers, body hash, HMAC-SHA256, constant-time compare and a fresh nonce claimed in memory.
#[divan::bench]
fn hmac_verify(bencher: Bencher) {
    let rt = runtime();
    let verifier = HmacVerifier::new(&SETTINGS.hmac, &SETTINGS.products, None);
    let body = CHAT.as_bytes();
    let mut n = 0u64;
    bencher
        .with_inputs(|| {
            n += 1;
            hmac_headers(n, body)
        })
        .bench_local_refs(|headers| {
            rt.block_on(verifier.verify(&Method::POST, "/v1/chat/completions", headers, body))
                .unwrap()
        });
}

fn identities() -> Vec<Identity> {
    (0..1000)
        .map(|i| Identity {
            product: Arc::from("demo"),
            user: format!("user-{i}").into(),
            client: None,
        })
        .collect()
}

/// One bucket and daily-quota decision for one of 1000 users, in memory.
#[divan::bench]
fn limiter_memory(bencher: Bencher) {
    let rt = runtime();
    let limiter = Limiter::new(&SETTINGS.limits, None);
    let users = identities();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % users.len();
        rt.block_on(limiter.admit(&users[i])).unwrap()
    });
}

/// A `redis-server` on a free port, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<Self> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Self { child, port };
        let start = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if start.elapsed() > Duration::from_secs(5) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One decision in Redis: one `EVALSHA` round trip over loopback, on the multiplexed
/// connection the proxy uses.
#[divan::bench]
fn limiter_redis_round_trip(bencher: Bencher) {
    let Some(server) = RedisServer::start() else {
        eprintln!("limiter_redis_round_trip: skipped, redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let settings = settings(&[("REDIS_URL", format!("redis://127.0.0.1:{}", server.port))]);
    let rt = runtime();
    let store = rt.block_on(async { Arc::new(Store::start(settings.redis.as_ref().unwrap())) });
    rt.block_on(async {
        let start = Instant::now();
        while !store.is_using_redis() && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert!(store.is_using_redis(), "connected to redis-server");
    let limiter = Limiter::new(&settings.limits, Some(Arc::clone(&store)));
    let users = identities();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % users.len();
        rt.block_on(limiter.admit(&users[i])).unwrap()
    });
    assert_eq!(store.error_count(), 0, "every decision was taken in Redis");
}
