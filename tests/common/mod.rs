//! Test support: the real app on 127.0.0.1:0, a mock upstream over real HTTP, the
//! binary as a child process, and credentials built the way clients build them.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::too_many_arguments
)]

pub mod redis;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api_key_server::clock::Clock;
use api_key_server::server::{self, Running};
use api_key_server::settings::Settings;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// The upstream key of product `demo`: must never appear in a response or a log line.
pub const PRODUCT_KEY: &str = "sk-test-DEMO-upstream-key-7f3a9c";
pub const OTHER_PRODUCT_KEY: &str = "sk-test-OTHER-upstream-key-1b2d";
pub const CLIENT: &str = "desk";
/// The HMAC secret of client `desk`: must never appear in a response or a log line.
pub const HMAC_SECRET: &str = "hmac-test-secret-0123456789abcdef-XYZ";
pub const KID: &str = "test-kid";
pub const PRODUCT: &str = "demo";
pub const USER: &str = "alice";

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The variables every test app starts from (full names). Limits are high so that tests
/// about other things never meet a 429.
pub fn base_env(upstream_url: &str) -> HashMap<String, String> {
    let jwt_keys = serde_json::json!({ KID: fixture("jwt-public.pem") }).to_string();
    [
        (
            "PRODUCT_KEYS",
            serde_json::json!({PRODUCT: PRODUCT_KEY, "other": OTHER_PRODUCT_KEY}).to_string(),
        ),
        ("JWT_PUBLIC_KEYS", jwt_keys),
        (
            "CLIENT_HMAC_SECRETS",
            serde_json::json!({ CLIENT: HMAC_SECRET }).to_string(),
        ),
        ("OPENAI_BASE_URL", upstream_url.to_owned()),
        ("RATE_LIMIT_CAPACITY", "100000".to_owned()),
        ("RATE_LIMIT_REFILL_PER_SECOND", "100000".to_owned()),
        ("UPSTREAM_TIMEOUT_SECONDS", "5".to_owned()),
        ("SHUTDOWN_GRACE_SECONDS", "5".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("API_KEY_SERVER_{k}"), v))
    .chain([("PORT".to_owned(), "0".to_owned())])
    .collect()
}

/// Sets `name` (without prefix; `PORT` as is) in `env`.
pub fn set(env: &mut HashMap<String, String>, name: &str, value: &str) {
    let key = if name == "PORT" {
        name.to_owned()
    } else {
        format!("API_KEY_SERVER_{name}")
    };
    env.insert(key, value.to_owned());
}

/// The real app, in-process, on 127.0.0.1 and an ephemeral port.
pub struct TestApp {
    pub addr: SocketAddr,
    running: Option<Running>,
    pub client: reqwest::Client,
}

impl TestApp {
    /// Starts the app against `upstream_url` with `overrides` (names without prefix).
    pub async fn spawn(upstream_url: &str, overrides: &[(&str, &str)]) -> Self {
        let mut env = base_env(upstream_url);
        for (k, v) in overrides {
            set(&mut env, k, v);
        }
        Self::spawn_env(env).await
    }

    pub async fn spawn_env(env: HashMap<String, String>) -> Self {
        let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings are valid");
        Self::spawn_settings(settings).await
    }

    /// As [`TestApp::spawn`], with time read from `clock` (a `ManualClock` the test moves:
    /// tokens, timestamps and buckets see the time it says).
    pub async fn spawn_with_clock(upstream_url: &str, overrides: &[(&str, &str)], clock: Clock) -> Self {
        let mut env = base_env(upstream_url);
        for (k, v) in overrides {
            set(&mut env, k, v);
        }
        let mut settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings are valid");
        settings.clock = clock;
        Self::spawn_settings(settings).await
    }

    async fn spawn_settings(settings: Settings) -> Self {
        let running = server::start(settings, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .await
            .expect("bind");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            addr: running.addr,
            running: Some(running),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /v1/chat/completions` with a JWT for (demo, alice).
    pub async fn chat(&self, body: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(jwt(PRODUCT, USER))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// A minimal valid chat body.
pub const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path: String,
    /// The request target as sent: origin-form (`/path?query`) or absolute.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A mock upstream on 127.0.0.1 that records every request it receives and counts the
/// connections it accepts.
pub struct MockUpstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Serves `router`, recording requests first.
    pub async fn start(router: Router) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let record = received.clone();
        let router = router.layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let record = record.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(http_body_util::Collected::to_bytes)
                    .unwrap_or_default();
                record.lock().unwrap().push(Received {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_owned(),
                    target: parts.uri.to_string(),
                    headers: parts.headers.clone(),
                    body: body.clone(),
                });
                next.run(Request::from_parts(parts, Body::from(body))).await
            }
        }));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<AtomicUsize> = Arc::default();
        let accepted = connections.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            accepted.fetch_add(1, Ordering::SeqCst);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            received,
            connections,
            task,
        }
    }

    /// An upstream whose first streamed response the test drives chunk by chunk: it hands
    /// the test the chunk sender and a signal that fires when the proxy drops the body.
    pub async fn driven() -> (
        Self,
        tokio::sync::oneshot::Receiver<(Feed, tokio::sync::oneshot::Receiver<()>)>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let slot = Arc::new(Mutex::new(Some(tx)));
        let router = Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let slot = slot.clone();
                async move {
                    let (feed, body, dropped) = channel_body();
                    if let Some(tx) = slot.lock().unwrap().take() {
                        let _ = tx.send((feed, dropped));
                    }
                    let mut response = Response::new(body);
                    response
                        .headers_mut()
                        .insert("content-type", HeaderValue::from_static("text/event-stream"));
                    response
                }
            }),
        );
        (Self::start(router).await, rx)
    }

    /// An upstream that answers like OpenAI: JSON, or SSE when the body asks to stream;
    /// chat completions, responses (new ids from a counter, stored ones answered whatever
    /// their id), and embeddings.
    pub async fn openai() -> Self {
        use axum::routing::{get, post};
        let counter: Arc<AtomicUsize> = Arc::default();
        let router = Router::new()
            .route("/v1/chat/completions", post(openai_handler))
            .route(
                "/v1/responses",
                post(move |body: Bytes| std::future::ready(responses_handler(&counter, &body))),
            )
            .route(
                "/v1/responses/{id}",
                get(stored_response_handler).delete(deleted_response_handler),
            )
            .route("/v1/responses/{id}/input_items", get(input_items_handler))
            .route("/v1/responses/{id}/cancel", post(stored_response_handler))
            .route("/v1/embeddings", post(embeddings_handler));
        Self::start(router).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Received {
        self.requests().pop().expect("the upstream received a request")
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

async fn openai_handler(body: Bytes) -> Response {
    let stream = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["stream"].as_bool())
        == Some(true);
    let mut response = if stream {
        let chunks = ["Hel", "lo", "!"].map(|t| {
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        });
        let body = format!("{}data: [DONE]\n\n", chunks.concat());
        let mut r = Response::new(Body::from(body));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/event-stream"));
        r
    } else {
        let mut r = Response::new(Body::from(COMPLETION));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    };
    let h = response.headers_mut();
    h.insert("x-request-id", HeaderValue::from_static("upstream-req-42"));
    h.insert("openai-processing-ms", HeaderValue::from_static("7"));
    h.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    h.insert("openai-organization", HeaderValue::from_static("org-secret"));
    h.insert("x-ratelimit-limit-requests", HeaderValue::from_static("99999"));
    h.insert("set-cookie", HeaderValue::from_static("upstream=1"));
    h.insert("server", HeaderValue::from_static("mock-upstream"));
    response
}

/// A created response as the mock upstream answers it.
pub fn response_json(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"response","created_at":1,"status":"completed","model":"gpt-4o","output":[{{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"Hello!","annotations":[]}}]}}],"usage":{{"input_tokens":3,"output_tokens":2,"total_tokens":5,"input_tokens_details":{{"cached_tokens":0}},"output_tokens_details":{{"reasoning_tokens":0}}}}}}"#
    )
}

fn json_response(body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn responses_handler(counter: &AtomicUsize, body: &Bytes) -> Response {
    let stream = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["stream"].as_bool())
        == Some(true);
    let id = format!("resp_mock{}", counter.fetch_add(1, Ordering::SeqCst));
    if !stream {
        return json_response(response_json(&id));
    }
    let created = format!(
        r#"{{"type":"response.created","sequence_number":0,"response":{{"id":"{id}","object":"response","created_at":1,"status":"in_progress","model":"gpt-4o","output":[]}}}}"#
    );
    let events = [
        ("response.created", created),
        (
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hello!"}"#.to_owned(),
        ),
        (
            "response.completed",
            format!(r#"{{"type":"response.completed","sequence_number":2,"response":{}}}"#, response_json(&id)),
        ),
    ];
    let mut body = String::new();
    for (name, data) in events {
        let _ = std::fmt::Write::write_fmt(&mut body, format_args!("event: {name}\ndata: {data}\n\n"));
    }
    let mut r = Response::new(Body::from(body));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/event-stream"));
    r
}

async fn stored_response_handler(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    json_response(response_json(&id))
}

async fn deleted_response_handler(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    json_response(format!(r#"{{"id":"{id}","object":"response","deleted":true}}"#))
}

async fn input_items_handler() -> Response {
    json_response(r#"{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}"#.to_owned())
}

async fn embeddings_handler() -> Response {
    json_response(
        r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2,0.3]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":2,"total_tokens":2}}"#.to_owned(),
    )
}

/// An RS256 token with `kid` for (product, user), valid for five minutes.
pub fn jwt(product: &str, user: &str) -> String {
    let now = now();
    jwt_claims(&serde_json::json!({"sub": user, "product": product, "iat": now, "exp": now + 300}))
}

/// An RS256 token with `kid` and the given claims, signed with the test key.
pub fn jwt_claims(claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(KID.to_owned());
    sign_jwt(&header, claims, "jwt-private.pem")
}

pub fn sign_jwt(header: &jsonwebtoken::Header, claims: &serde_json::Value, private_key_fixture: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(fixture(private_key_fixture).as_bytes()).unwrap();
    jsonwebtoken::encode(header, claims, &key).unwrap()
}

/// A fresh nonce: 32 characters of `[A-Za-z0-9_-]`.
pub fn nonce() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("n{t:024x}{n:07x}")
}

/// The HMAC headers of one request, computed as the contract's string to sign says.
pub struct Signed {
    pub client: String,
    pub timestamp: String,
    pub nonce: Option<String>,
    pub product: String,
    pub user: String,
    pub signature: String,
}

pub fn hmac_sign(
    secret: &str,
    method: &str,
    path: &str,
    client: &str,
    product: &str,
    user: &str,
    nonce: Option<&str>,
    timestamp: u64,
    body: &[u8],
) -> Signed {
    let body_hash = hex::encode(Sha256::digest(body));
    let to_sign = format!(
        "{timestamp}\n{method}\n{path}\n{client}\n{product}\n{user}\n{}\n{body_hash}",
        nonce.unwrap_or("")
    );
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(to_sign.as_bytes());
    Signed {
        client: client.to_owned(),
        timestamp: timestamp.to_string(),
        nonce: nonce.map(str::to_owned),
        product: product.to_owned(),
        user: user.to_owned(),
        signature: hex::encode(mac.finalize().into_bytes()),
    }
}

impl Signed {
    /// Signed as client `desk` for (demo, alice), now, with a fresh nonce.
    pub fn chat(body: &[u8]) -> Self {
        hmac_sign(
            HMAC_SECRET,
            "POST",
            "/v1/chat/completions",
            CLIENT,
            PRODUCT,
            USER,
            Some(&nonce()),
            now(),
            body,
        )
    }

    pub fn apply(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request = request
            .header("x-client-id", &self.client)
            .header("x-timestamp", &self.timestamp)
            .header("x-product-id", &self.product)
            .header("x-user-id", &self.user)
            .header("x-signature", &self.signature);
        if let Some(nonce) = &self.nonce {
            request = request.header("x-nonce", nonce);
        }
        request
    }
}

/// Parses an error envelope and returns (type, code, param).
pub async fn error_of(response: reqwest::Response) -> (String, String, Option<String>) {
    let body: serde_json::Value = response.json().await.expect("error body is JSON");
    let e = &body["error"];
    assert!(e["message"].is_string(), "message in {body}");
    (
        e["type"].as_str().unwrap_or_default().to_owned(),
        e["code"].as_str().unwrap_or_default().to_owned(),
        e["param"].as_str().map(str::to_owned),
    )
}

/// The binary as a child process, its stdout lines collected.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub lines: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_api-key-server"));
    command.env_clear().kill_on_drop(true);
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command
}

impl ServerProcess {
    /// Starts `api-key-server` with exactly `env` and waits for its `listening` line.
    pub async fn start(env: &HashMap<String, String>) -> Self {
        let mut command = binary();
        command.envs(env).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let stdout = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let collected = lines.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(port) = listening_port(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(port);
                }
                collected.lock().unwrap().push(line);
            }
        });
        let port = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("the binary logs its address")
            .expect("stdout open");
        Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn listening_port(line: &str) -> Option<u16> {
    if !line.contains("listening") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let address = value["address"].as_str()?;
    address.rsplit(':').next()?.parse().ok()
}

/// The sending side of [`channel_body`].
pub type Feed = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A response body fed by the test: each `send` is one chunk; dropping the sender ends
/// the body cleanly, sending an `Err` aborts it. `dropped` fires when the proxy drops the
/// body (for example because its client went away).
pub fn channel_body() -> (Feed, Body, tokio::sync::oneshot::Receiver<()>) {
    struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
    let stream = futures_util::stream::unfold((rx, OnDrop(Some(dropped_tx))), |(mut rx, guard)| async move {
        rx.recv().await.map(|item| (item, (rx, guard)))
    });
    (tx, Body::from_stream(stream), dropped_rx)
}

/// A raw TCP "upstream" on 127.0.0.1 that answers every connection with `reply` bytes
/// (possibly empty) and then closes it.
pub async fn raw_upstream(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
                let _ = socket.write_all(reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// A raw HTTP/1.1 "upstream" on 127.0.0.1 that answers the first request of each
/// connection with a chat completion, without `connection: close` (so the connection
/// looks reusable), then closes the connection. Returns its address and the count of
/// connections it accepted.
pub async fn closing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted: Arc<AtomicUsize> = Arc::default();
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // The head, then as many body bytes as it declares.
                let mut request = Vec::new();
                loop {
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                    let mut buf = [0u8; 4096];
                    match socket.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{COMPLETION}",
                    COMPLETION.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// A loopback port that nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

/// A process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
