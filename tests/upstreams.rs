//! Per-product upstreams (`PRODUCT_UPSTREAMS`), against the binary: each `auth` kind
//! reaches its own mock upstream, which checks the credential header it receives; the
//! Google token comes from a mock metadata server on loopback; invalid entries stop
//! startup with exit 2.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use common::{COMPLETION, HMAC_SECRET, MockUpstream, PRODUCT, PRODUCT_KEY, base_env, binary, error_of, jwt, set};
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::sync::Semaphore;

const AZURE_KEY: &str = "azure-key-SECRET-5e1f0a";
const COMPAT_KEY: &str = "compat-key-SECRET-77c2d9";
const TOKEN_PREFIX: &str = "ya29.SECRET-token-";
const GEMINI: &str = "google/gemini-2.5-flash";
const VERTEX_PATH: &str = "/v1/projects/p1/locations/us-central1/endpoints/openapi";

fn chat_body(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":16}}"#)
}

/// The binary, stdout and stderr collected to the end of both pipes.
struct Process {
    child: Child,
    addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    client: reqwest::Client,
}

impl Process {
    async fn start(env: &HashMap<String, String>) -> Self {
        let mut child = binary()
            .envs(env)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let readers = [
            collect(child.stdout.take().unwrap(), output.clone(), tx.clone()),
            collect(child.stderr.take().unwrap(), output.clone(), tx),
        ]
        .into();
        let port = tokio::time::timeout(Duration::from_secs(20), first_port(rx))
            .await
            .expect("the binary logs its address");
        Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            output,
            readers,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// `POST /v1/chat/completions` with a JWT for (`product`, alice).
    async fn chat(&self, product: &str, model: &str) -> reqwest::Response {
        self.client
            .post(format!("http://{}/v1/chat/completions", self.addr))
            .bearer_auth(jwt(product, "alice"))
            .body(chat_body(model))
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, product: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("http://{}{path}", self.addr))
            .bearer_auth(jwt(product, "alice"))
            .send()
            .await
            .unwrap()
    }

    /// Every line written, after SIGTERM and exit.
    async fn stop(mut self) -> String {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "clean exit: {status}");
        for reader in self.readers.drain(..) {
            tokio::time::timeout(Duration::from_secs(15), reader)
                .await
                .expect("the log pipes end after exit")
                .unwrap();
        }
        self.output.lock().unwrap().join("\n")
    }
}

fn collect(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    output: Arc<Mutex<Vec<String>>>,
    lines_tx: tokio::sync::mpsc::UnboundedSender<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = lines_tx.send(line.clone());
            output.lock().unwrap().push(line);
        }
    })
}

async fn first_port(mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) -> u16 {
    while let Some(line) = rx.recv().await {
        if !line.contains("listening") {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        return value["address"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
    }
    panic!("the binary ended before it logged its address")
}

/// A mock upstream that answers a chat completion at `path` only when `check` accepts the
/// request's headers, else 401 (as a provider does for a wrong key).
async fn checking_upstream(path: &str, check: fn(&HeaderMap) -> bool) -> MockUpstream {
    let router = Router::new().route(
        path,
        post(move |headers: HeaderMap| async move {
            if check(&headers) {
                ([("content-type", "application/json")], COMPLETION).into_response()
            } else {
                StatusCode::UNAUTHORIZED.into_response()
            }
        }),
    );
    MockUpstream::start(router).await
}

/// A mock metadata server: the n-th token fetch (from 1) answers `ya29.SECRET-token-n`
/// with the n-th of `lifetimes` (the last repeats) as `expires_in`. A fetch waits for a
/// permit of `gate` first (tests hold one back to keep a fetch in flight), and then
/// answers after `delay` (a slow metadata server).
struct Metadata {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Metadata {
    async fn start(lifetimes: &'static [u64], permits: usize) -> Self {
        Self::slow(lifetimes, permits, Duration::ZERO).await
    }

    async fn slow(lifetimes: &'static [u64], permits: usize, delay: Duration) -> Self {
        let fetches: Arc<AtomicUsize> = Arc::default();
        let gate = Arc::new(Semaphore::new(permits));
        let (counted, gated) = (fetches.clone(), gate.clone());
        let router = Router::new().route(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            get(move |headers: HeaderMap| {
                let (counted, gated) = (counted.clone(), gated.clone());
                async move {
                    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
                        return StatusCode::FORBIDDEN.into_response();
                    }
                    let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                    gated.acquire().await.unwrap().forget();
                    tokio::time::sleep(delay).await;
                    let lifetime = lifetimes[(n - 1).min(lifetimes.len() - 1)];
                    let body = serde_json::json!({
                        "access_token": format!("{TOKEN_PREFIX}{n}"),
                        "expires_in": lifetime,
                        "token_type": "Bearer",
                    });
                    ([("content-type", "application/json")], body.to_string()).into_response()
                }
            }),
        );
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            fetches,
            gate,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Metadata {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bearer_of(received: &common::Received) -> String {
    received.headers["authorization"].to_str().unwrap().to_owned()
}

/// The base env with one `google` product `gemini` on `vertex` and its token from
/// `metadata` (`host:port`); no key for it anywhere.
fn google_env(default_upstream: &str, vertex: SocketAddr, metadata: &str) -> HashMap<String, String> {
    let mut env = base_env(default_upstream);
    let upstreams = serde_json::json!({
        "gemini": {"base_url": format!("http://{vertex}{VERTEX_PATH}"), "auth": "google", "models": [GEMINI]},
    });
    set(&mut env, "PRODUCT_UPSTREAMS", &upstreams.to_string());
    env.insert("GCE_METADATA_HOST".into(), metadata.to_owned());
    env
}

async fn vertex() -> MockUpstream {
    checking_upstream(&format!("{VERTEX_PATH}/chat/completions"), |h| {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&format!("Bearer {TOKEN_PREFIX}")))
            && !h.contains_key("api-key")
    })
    .await
}

#[tokio::test]
async fn each_product_reaches_its_own_upstream_with_its_own_credential_and_models() {
    let default = MockUpstream::openai().await;
    let azure = checking_upstream("/openai/v1/chat/completions", |h| {
        h.get("api-key").is_some_and(|v| v == AZURE_KEY) && !h.contains_key("authorization")
    })
    .await;
    let compat = checking_upstream("/api/v1/chat/completions", |h| {
        h.get("authorization")
            .is_some_and(|v| *v == HeaderValue::from_str(&format!("Bearer {COMPAT_KEY}")).unwrap())
    })
    .await;
    let mut env = base_env(&default.url());
    let keys = serde_json::json!({PRODUCT: PRODUCT_KEY, "azure": AZURE_KEY, "compat": COMPAT_KEY});
    set(&mut env, "PRODUCT_KEYS", &keys.to_string());
    let upstreams = serde_json::json!({
        "azure": {"base_url": format!("http://{}/openai/v1", azure.addr), "auth": "api-key"},
        // A trailing slash is ignored; `localhost` is loopback too.
        "compat": {
            "base_url": format!("http://localhost:{}/api/v1/", compat.addr.port()),
            "models": ["llama-3.1-8b"],
            "embedding_models": ["bge-m3"],
            "stream_usage": false,
        },
    });
    set(&mut env, "PRODUCT_UPSTREAMS", &upstreams.to_string());
    let process = Process::start(&env).await;

    assert_eq!(process.chat(PRODUCT, "gpt-4o").await.status(), 200);
    let seen = default.last();
    assert_eq!(seen.path, "/v1/chat/completions", "the default upstream is unchanged");
    assert_eq!(bearer_of(&seen), format!("Bearer {PRODUCT_KEY}"));
    assert!(!seen.headers.contains_key("api-key"));

    assert_eq!(process.chat("azure", "gpt-4o").await.status(), 200);
    let seen = azure.last();
    assert_eq!(seen.target, "/openai/v1/chat/completions");
    assert_eq!(seen.headers["api-key"], AZURE_KEY);
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.headers["host"], azure.addr.to_string());

    // `compat` has its own models: the default ones are not allowed there.
    let refused = process.chat("compat", "gpt-4o").await;
    assert_eq!(refused.status(), 400);
    assert_eq!(error_of(refused).await.1, "model_not_allowed");
    assert_eq!(process.chat("compat", "llama-3.1-8b").await.status(), 200);
    let seen = compat.last();
    assert_eq!(seen.target, "/api/v1/chat/completions");
    assert_eq!(bearer_of(&seen), format!("Bearer {COMPAT_KEY}"));
    assert_eq!(compat.requests().len(), 1);

    // `/v1/models`: the caller's product's models.
    let ids = |v: serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let listed = process.get("compat", "/v1/models").await.json().await.unwrap();
    assert_eq!(ids(listed), ["llama-3.1-8b", "bge-m3"]);
    // The defaults: ALLOWED_MODELS, then ALLOWED_EMBEDDING_MODELS.
    let defaults = [
        "gpt-4o",
        "gpt-4o-mini",
        "text-embedding-3-small",
        "text-embedding-3-large",
    ];
    let listed = process.get(PRODUCT, "/v1/models").await.json().await.unwrap();
    assert_eq!(ids(listed), defaults);
    let listed = process.get("azure", "/v1/models").await.json().await.unwrap();
    assert_eq!(ids(listed), defaults);
    assert_eq!(process.get("compat", "/v1/models/llama-3.1-8b").await.status(), 200);
    assert_eq!(process.get("compat", "/v1/models/bge-m3").await.status(), 200);
    assert_eq!(process.get("compat", "/v1/models/gpt-4o").await.status(), 404);
    assert_eq!(process.get(PRODUCT, "/v1/models/llama-3.1-8b").await.status(), 404);

    let logs = process.stop().await;
    for secret in [PRODUCT_KEY, AZURE_KEY, COMPAT_KEY] {
        assert!(!logs.contains(secret), "a key in the logs");
    }
}

#[tokio::test]
async fn a_google_product_sends_the_metadata_token_fetched_once_and_needs_no_key() {
    let default = MockUpstream::openai().await;
    let vertex = vertex().await;
    let metadata = Metadata::start(&[3600], usize::MAX >> 4).await;
    let mut env = google_env(&default.url(), vertex.addr, &metadata.addr.to_string());
    // Only Google products: no PRODUCT_KEYS at all.
    env.remove("API_KEY_SERVER_PRODUCT_KEYS");
    let process = Process::start(&env).await;
    for _ in 0..5 {
        assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    }
    assert_eq!(metadata.fetches(), 1, "cached");
    for seen in vertex.requests() {
        assert_eq!(seen.path, format!("{VERTEX_PATH}/chat/completions"));
        assert_eq!(bearer_of(&seen), format!("Bearer {TOKEN_PREFIX}1"));
    }
    // `demo` is no product here.
    assert_eq!(process.chat(PRODUCT, "gpt-4o").await.status(), 403);
    let logs = process.stop().await;
    assert!(!logs.contains(TOKEN_PREFIX), "a token in the logs");
}

#[tokio::test]
async fn an_expired_token_is_fetched_again_and_the_new_one_cached() {
    let default = MockUpstream::openai().await;
    let vertex = vertex().await;
    // The first token expires at once, the second lives an hour.
    let metadata = Metadata::start(&[0, 3600], usize::MAX >> 4).await;
    let env = google_env(&default.url(), vertex.addr, &metadata.addr.to_string());
    let process = Process::start(&env).await;
    for _ in 0..3 {
        assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    }
    let tokens: Vec<String> = vertex.requests().iter().map(bearer_of).collect();
    let expected = [1, 2, 2].map(|n| format!("Bearer {TOKEN_PREFIX}{n}"));
    assert_eq!(tokens, expected);
    assert_eq!(metadata.fetches(), 2);
    let logs = process.stop().await;
    assert!(!logs.contains(TOKEN_PREFIX), "a token in the logs");
}

#[tokio::test]
async fn concurrent_requests_without_a_token_share_exactly_one_fetch() {
    let default = MockUpstream::openai().await;
    let vertex = vertex().await;
    // A slow metadata server: the requests pile up behind its one fetch.
    let metadata = Metadata::slow(&[3600], usize::MAX >> 4, Duration::from_secs(2)).await;
    let env = google_env(&default.url(), vertex.addr, &metadata.addr.to_string());
    let process = Arc::new(Process::start(&env).await);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let process = process.clone();
            tokio::spawn(async move { process.chat("gemini", GEMINI).await.status() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(metadata.fetches(), 1, "one fetch for all");
    assert_eq!(vertex.requests().len(), 20);
    for seen in vertex.requests() {
        assert_eq!(bearer_of(&seen), format!("Bearer {TOKEN_PREFIX}1"));
    }
    let process = Arc::into_inner(process).unwrap();
    let logs = process.stop().await;
    assert!(!logs.contains(TOKEN_PREFIX), "a token in the logs");
}

#[tokio::test]
async fn a_token_due_for_refresh_is_used_while_one_fetch_replaces_it() {
    let default = MockUpstream::openai().await;
    let vertex = vertex().await;
    // An 8 s token is refreshed once less than 2 s (a quarter) is left; the refresh is
    // held until the test has seen requests go on with the old token meanwhile.
    let metadata = Metadata::start(&[8, 3600], 1).await;
    let env = google_env(&default.url(), vertex.addr, &metadata.addr.to_string());
    let process = Process::start(&env).await;
    assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metadata.fetches() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "a refresh starts");
        assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refresh is in flight: requests go on with the valid token.
    for _ in 0..3 {
        assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    }
    assert!(
        vertex
            .requests()
            .iter()
            .all(|r| bearer_of(r) == format!("Bearer {TOKEN_PREFIX}1"))
    );
    metadata.gate.add_permits(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
        if bearer_of(&vertex.last()) == format!("Bearer {TOKEN_PREFIX}2") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the new token is used");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metadata.fetches(), 2, "one fetch at a time");
    let logs = process.stop().await;
    assert!(!logs.contains(TOKEN_PREFIX), "a token in the logs");
}

#[tokio::test]
async fn no_token_is_a_retryable_502_and_nothing_goes_upstream() {
    let default = MockUpstream::openai().await;
    let vertex = vertex().await;
    let closed = common::closed_port().await;
    let env = google_env(&default.url(), vertex.addr, &format!("127.0.0.1:{closed}"));
    let process = Process::start(&env).await;
    for _ in 0..2 {
        let response = process.chat("gemini", GEMINI).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["x-should-retry"], "true");
        let (kind, code, _) = error_of(response).await;
        assert_eq!(
            (kind.as_str(), code.as_str()),
            ("upstream_error", "upstream_credentials_unavailable")
        );
    }
    // Earlier checks still come first: a model the product may not use is a 400.
    assert_eq!(process.chat("gemini", "gpt-4o").await.status(), 400);
    assert!(vertex.requests().is_empty());
    // The default upstream's products are not affected.
    assert_eq!(process.chat(PRODUCT, "gpt-4o").await.status(), 200);
    let logs = process.stop().await;
    assert!(logs.contains("upstream_credentials_unavailable"), "logged: {logs}");
}

#[tokio::test]
async fn a_token_the_upstream_refuses_is_dropped_and_a_new_one_fetched() {
    let default = MockUpstream::openai().await;
    // Refuses the first token only.
    let vertex = checking_upstream(&format!("{VERTEX_PATH}/chat/completions"), |h| {
        h.get("authorization")
            .is_some_and(|v| *v == HeaderValue::from_str(&format!("Bearer {TOKEN_PREFIX}2")).unwrap())
    })
    .await;
    let metadata = Metadata::start(&[3600], usize::MAX >> 4).await;
    let env = google_env(&default.url(), vertex.addr, &metadata.addr.to_string());
    let process = Process::start(&env).await;
    let refused = process.chat("gemini", GEMINI).await;
    assert_eq!(refused.status(), 502);
    assert_eq!(error_of(refused).await.1, "upstream_auth_failed");
    assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    assert_eq!(process.chat("gemini", GEMINI).await.status(), 200);
    assert_eq!(metadata.fetches(), 2);
    let logs = process.stop().await;
    assert!(!logs.contains(TOKEN_PREFIX), "a token in the logs");
}

/// Runs the binary with `env` and returns (exit code, stderr, stdout).
async fn run_to_exit(env: &HashMap<String, String>) -> (i32, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(20), binary().envs(env).output())
        .await
        .expect("exits in time")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn invalid_product_upstreams_exit_2_naming_the_variable_and_product_never_a_value() {
    let upstream = "http://127.0.0.1:9/v1/chat/completions";
    let entry = |json: &str| format!(r#"{{"vendorx": {json}}}"#);
    let cases: Vec<(String, &str)> = vec![
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","extra":1}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","models":[]}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","embedding_models":[]}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"http://SECRETVALUE.example.com/v1"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"http://10.0.0.1/SECRETVALUE"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"ftp://SECRETVALUE.example.com/v1"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://x.example.com/v1?api-key=SECRETVALUE"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","auth":"google"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.googleapis.com.evil.com/v1","auth":"google"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","auth":"SECRETVALUE"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        (entry(r#"{"auth":"bearer"}"#), "PRODUCT_UPSTREAMS"),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","stream_usage":"SECRETVALUE"}"#),
            "PRODUCT_UPSTREAMS",
        ),
        // No key for a product whose upstream needs one.
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1","auth":"api-key"}"#),
            "PRODUCT_KEYS",
        ),
        (
            entry(r#"{"base_url":"https://SECRETVALUE.example.com/v1"}"#),
            "PRODUCT_KEYS",
        ),
    ];
    for (upstreams, variable) in cases {
        let mut env = base_env(upstream);
        set(&mut env, "PRODUCT_UPSTREAMS", &upstreams);
        let (code, stderr, stdout) = run_to_exit(&env).await;
        assert_eq!(code, 2, "{upstreams}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {upstreams}: {stderr}");
        assert!(
            lines[0].contains(&format!("API_KEY_SERVER_{variable}")),
            "{variable} in {stderr}"
        );
        assert!(lines[0].contains("vendorx"), "the product in {stderr}");
        for secret in ["SECRETVALUE", PRODUCT_KEY, HMAC_SECRET] {
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{secret} printed for {upstreams}"
            );
        }
    }

    // PRODUCT_KEYS may be absent only when every product is a Google one.
    let mut env = base_env(upstream);
    env.remove("API_KEY_SERVER_PRODUCT_KEYS");
    let (code, stderr, _) = run_to_exit(&env).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("API_KEY_SERVER_PRODUCT_KEYS"), "{stderr}");
    // An OPENAI_BASE_URL that is not a chat completions URL has no API base.
    let env = base_env("http://127.0.0.1:9/v1/SECRETVALUE");
    let (code, stderr, _) = run_to_exit(&env).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("API_KEY_SERVER_OPENAI_BASE_URL") && !stderr.contains("SECRETVALUE"),
        "{stderr}"
    );
}
