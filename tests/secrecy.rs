//! Secrecy: every route and every failure, run through the real binary at `RUST_LOG=trace`
//! with known secret values, and every response (status line, headers, body) and every
//! byte of stdout and stderr scanned for them.
//!
//! The secrets: both upstream product keys, the HMAC secret, the Redis password, every
//! client token and every HMAC signature sent, and the prompt and completion texts (no
//! request or response body may reach a log line). Run in JSON and in text log format, with
//! Redis up, killed (fallback warnings) and back (recovery), and with an upstream that
//! answers 401 with the key in its body, as OpenAI does.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::redis::RedisServer;
use common::{
    CLIENT, HMAC_SECRET, OTHER_PRODUCT_KEY, PRODUCT, PRODUCT_KEY, USER, base_env, binary, hmac_sign, jwt, jwt_claims,
    now, set,
};
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

const REDIS_PASSWORD: &str = "redis-pass-SECRET-4e1f9b2c";
const PROMPT: &str = "PROMPT-TEXT-never-logged-8c1d";
const COMPLETION_TEXT: &str = "COMPLETION-TEXT-never-logged-2a7e";
const UPSTREAM_ERROR_TEXT: &str = "UPSTREAM-ERROR-TEXT-never-logged-5b3f";

/// The binary with stdout and stderr both collected, line by line.
struct Process {
    child: Child,
    addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
    /// The stdout and stderr readers: each ends at its pipe's end of file.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Process {
    async fn start(env: &HashMap<String, String>) -> Self {
        let mut child = binary()
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let readers = vec![
            collect(child.stdout.take().unwrap(), output.clone()),
            collect(child.stderr.take().unwrap(), output.clone()),
        ];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let port = loop {
            let found = output.lock().unwrap().iter().find_map(|line| listening_port(line));
            if let Some(port) = found {
                break port;
            }
            assert!(tokio::time::Instant::now() < deadline, "the binary logs its address");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            output,
            readers,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn logged(&self, text: &str) -> bool {
        self.output.lock().unwrap().iter().any(|line| line.contains(text))
    }

    /// Everything written so far, after SIGTERM and exit.
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
        // Every line, to the end of both pipes: the readers finish at end of file, which
        // comes once the process has exited and its last line has been read.
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
    stream: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            into.lock().unwrap().push(line);
        }
    })
}

/// The port of the `listening` line, in either log format (`address=0.0.0.0:N` or JSON).
fn listening_port(line: &str) -> Option<u16> {
    if !line.contains("listening") {
        return None;
    }
    let at = line.find("0.0.0.0:")? + "0.0.0.0:".len();
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// An upstream whose behaviour the prompt picks: normal, streamed, 401 with the key in
/// its body (as OpenAI's "Incorrect API key provided" does), 500 with text, a body cut
/// mid-way.
async fn upstream() -> common::MockUpstream {
    async fn handle(body: Bytes) -> Response {
        let text = String::from_utf8_lossy(&body).into_owned();
        let (status, content) = if text.contains("CASE-401") {
            (
                StatusCode::UNAUTHORIZED,
                format!(r#"{{"error":{{"message":"Incorrect API key provided: {PRODUCT_KEY}"}}}}"#),
            )
        } else if text.contains("CASE-500") {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(r#"{{"error":{{"message":"{UPSTREAM_ERROR_TEXT}"}}}}"#),
            )
        } else if text.contains("CASE-CUT") {
            let (tx, body, _dropped) = common::channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from(format!("data: {COMPLETION_TEXT}\n\n")))).await;
                // Late enough that the headers and first chunk reached the client.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            });
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("text/event-stream"));
            return response;
        } else if text.contains("\"stream\":true") {
            (StatusCode::OK, format!("data: {COMPLETION_TEXT}\n\ndata: [DONE]\n\n"))
        } else {
            (
                StatusCode::OK,
                format!(r#"{{"choices":[{{"message":{{"content":"{COMPLETION_TEXT}"}}}}]}}"#),
            )
        };
        let mut response = Response::new(Body::from(content));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        response
    }
    common::MockUpstream::start(Router::new().route("/v1/chat/completions", post(handle))).await
}

fn body(case: &str) -> String {
    format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{PROMPT} {case}"}}],"max_tokens":16}}"#)
}

/// What a run sent that must never come back or be logged.
#[derive(Default)]
struct Sent {
    secrets: Vec<String>,
    /// Every response: status, headers and body, as text.
    responses: Vec<String>,
}

impl Sent {
    async fn record(&mut self, response: reqwest::Response) -> StatusCode {
        let status = response.status();
        let mut text = format!("{status}\n");
        for (name, value) in response.headers() {
            let _ = writeln!(text, "{name}: {}", String::from_utf8_lossy(value.as_bytes()));
        }
        // A cut stream is an error at the end of its body: keep what arrived.
        let mut response = response;
        while let Ok(Some(chunk)) = response.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        self.responses.push(text);
        status
    }

    fn token(&mut self, token: String) -> String {
        self.secrets.push(token.clone());
        token
    }
}

/// Runs every route and failure once against `process`; returns what was sent.
#[allow(clippy::too_many_lines)]
async fn exercise(process: &Process, redis: &mut RedisServer) -> Sent {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut sent = Sent::default();
    let chat = process.url("/v1/chat/completions");
    let expect = |got: StatusCode, want: u16, what: &str| assert_eq!(got.as_u16(), want, "{what}");

    for path in [
        "/health",
        "/healthz",
        "/nope",
        "/v1/models",
        "/v1/models/gpt-4o",
        "/v1/models/nope",
    ] {
        let token = sent.token(jwt(PRODUCT, USER));
        let status = sent
            .record(client.get(process.url(path)).bearer_auth(&token).send().await.unwrap())
            .await;
        assert!(status.as_u16() < 500, "{path}: {status}");
    }
    let status = sent.record(client.delete(&chat).send().await.unwrap()).await;
    expect(status, 405, "wrong method");

    // JWT: success, streamed, every upstream failure, and the token failures.
    for (case, want) in [("ok", 200), ("CASE-401", 502), ("CASE-500", 500), ("CASE-CUT", 200)] {
        let token = sent.token(jwt(PRODUCT, USER));
        let response = client
            .post(&chat)
            .bearer_auth(&token)
            .body(body(case))
            .send()
            .await
            .unwrap();
        expect(sent.record(response).await, want, case);
    }
    let streamed = body("stream").replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
    let token = sent.token(jwt(PRODUCT, USER));
    let response = client
        .post(&chat)
        .bearer_auth(&token)
        .body(streamed)
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 200, "stream");

    let token = sent.token(jwt(PRODUCT, USER));
    let tampered = format!("{}x", &token[..token.len() - 1]);
    sent.secrets.push(tampered.clone());
    let response = client
        .post(&chat)
        .bearer_auth(&tampered)
        .body(body("t"))
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 401, "tampered token");
    let expired = sent.token(jwt_claims(
        &serde_json::json!({"sub": USER, "product": PRODUCT, "iat": now() - 1000, "exp": now() - 900}),
    ));
    let response = client
        .post(&chat)
        .bearer_auth(&expired)
        .body(body("e"))
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 401, "expired token");
    let unknown = sent.token(jwt("no-such-product", USER));
    let response = client
        .post(&chat)
        .bearer_auth(&unknown)
        .body(body("p"))
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 403, "unknown product");
    let token = sent.token(jwt(PRODUCT, USER));
    let response = client
        .post(&chat)
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 400, "invalid json");
    let token = sent.token(jwt(PRODUCT, USER));
    let bad_model = body("m").replace("gpt-4o", "gpt-nope");
    let response = client
        .post(&chat)
        .bearer_auth(&token)
        .body(bad_model)
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 400, "model");
    let token = sent.token(jwt(PRODUCT, USER));
    let response = client
        .post(&chat)
        .bearer_auth(&token)
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await;
    if let Ok(response) = response {
        expect(sent.record(response).await, 413, "too large");
    }
    // The (other, alice) bucket holds one request: the second is 429.
    for want in [200, 429] {
        let token = sent.token(jwt("other", USER));
        let response = client
            .post(&chat)
            .bearer_auth(&token)
            .body(body("l"))
            .send()
            .await
            .unwrap();
        expect(sent.record(response).await, want, "limit");
    }
    let token = sent.token(jwt(PRODUCT, USER));
    let signed = sign(&body("both"), now());
    sent.secrets.push(signed.signature.clone());
    let response = signed
        .apply(client.post(&chat).bearer_auth(&token).body(body("both")))
        .send()
        .await
        .unwrap();
    expect(sent.record(response).await, 401, "ambiguous");
    let response = client.post(&chat).body(body("none")).send().await.unwrap();
    expect(sent.record(response).await, 401, "missing");

    // HMAC: success, replay, bad signature, stale timestamp, with Redis up, down and back.
    for phase in ["redis up", "redis down", "redis back"] {
        match phase {
            "redis down" => redis.kill(),
            "redis back" => {
                redis.restart();
                // Requests start the store's probe; wait until it says Redis is back.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                while !process.logged("answers again") {
                    assert!(tokio::time::Instant::now() < deadline, "Redis is used again");
                    let _ = client
                        .get(process.url("/v1/models"))
                        .bearer_auth(sent.token(jwt(PRODUCT, USER)))
                        .send()
                        .await;
                    let _ = client
                        .post(&chat)
                        .bearer_auth(sent.token(jwt(PRODUCT, USER)))
                        .body(body("probe"))
                        .send()
                        .await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            _ => {}
        }
        let text = body("hmac");
        let signed = sign(&text, now());
        sent.secrets.push(signed.signature.clone());
        let response = signed
            .apply(client.post(&chat).body(text.clone()))
            .send()
            .await
            .unwrap();
        expect(sent.record(response).await, 200, phase);
        // The replay: refused by Redis; with Redis down the memory store's answer is the
        // nonce tests' business, here only its response and logs are scanned.
        let response = signed
            .apply(client.post(&chat).body(text.clone()))
            .send()
            .await
            .unwrap();
        let status = sent.record(response).await;
        if phase == "redis down" {
            assert!(status.as_u16() < 500, "{phase}: replay answered {status}");
        } else {
            expect(status, 401, phase);
        }
        let forged = sign(&text, now());
        sent.secrets.push(forged.signature.clone());
        let response = forged
            .apply(client.post(&chat).body(body("other body")))
            .send()
            .await
            .unwrap();
        expect(sent.record(response).await, 401, "bad signature");
        let stale = sign(&text, now() - 10_000);
        sent.secrets.push(stale.signature.clone());
        let response = stale.apply(client.post(&chat).body(text.clone())).send().await.unwrap();
        expect(sent.record(response).await, 401, "stale timestamp");
        let models = hmac_sign(
            HMAC_SECRET,
            "GET",
            "/v1/models",
            CLIENT,
            PRODUCT,
            USER,
            Some(&common::nonce()),
            now(),
            b"",
        );
        sent.secrets.push(models.signature.clone());
        let response = models
            .apply(client.get(process.url("/v1/models")))
            .send()
            .await
            .unwrap();
        expect(sent.record(response).await, 200, "models over hmac");
    }
    sent
}

fn sign(body: &str, timestamp: u64) -> common::Signed {
    hmac_sign(
        HMAC_SECRET,
        "POST",
        "/v1/chat/completions",
        CLIENT,
        PRODUCT,
        USER,
        Some(&common::nonce()),
        timestamp,
        body.as_bytes(),
    )
}

fn env(upstream_url: &str, redis: &RedisServer, format: &str) -> HashMap<String, String> {
    let mut env = base_env(upstream_url);
    set(&mut env, "REDIS_URL", &redis.url());
    set(&mut env, "LOG_FORMAT", format);
    set(&mut env, "UPSTREAM_TIMEOUT_SECONDS", "2");
    set(
        &mut env,
        "PRODUCT_LIMITS",
        r#"{"other": {"capacity": 1, "refill_per_second": 0.001}}"#,
    );
    env.insert("RUST_LOG".to_owned(), "trace".to_owned());
    env
}

/// Fails naming the secret and where it appeared, with a little context.
fn assert_absent(haystack: &str, secrets: &[String], where_: &str) {
    for secret in secrets {
        if let Some(at) = haystack.find(secret.as_str()) {
            let start = haystack[..at].char_indices().rev().nth(80).map_or(0, |(i, _)| i);
            let end = (at + secret.len() + 80).min(haystack.len());
            panic!(
                "a secret ({}...) appears in {where_}: ...{}...",
                &secret[..secret.len().min(12)],
                haystack.get(start..end).unwrap_or("<not on a char boundary>")
            );
        }
    }
}

async fn run(format: &str) {
    let upstream = upstream().await;
    let mut redis = RedisServer::start_with_password(REDIS_PASSWORD);
    let process = Process::start(&env(&upstream.url(), &redis, format)).await;
    let sent = exercise(&process, &mut redis).await;
    let logs = process.stop().await;

    let mut secrets = sent.secrets.clone();
    secrets.extend(
        [PRODUCT_KEY, OTHER_PRODUCT_KEY, HMAC_SECRET, REDIS_PASSWORD]
            .into_iter()
            .map(str::to_owned),
    );
    let responses = sent.responses.join("\n");
    assert_absent(&responses, &secrets, "a response");
    // Bodies never reach the logs: prompts, completions, upstream error text.
    secrets.extend(
        [PROMPT, COMPLETION_TEXT, UPSTREAM_ERROR_TEXT]
            .into_iter()
            .map(str::to_owned),
    );
    assert_absent(&logs, &secrets, &format!("the {format} log output"));

    // The scan saw real traffic and real logs, not an empty run.
    assert!(sent.responses.len() >= 35, "{} responses", sent.responses.len());
    assert!(
        responses.contains(COMPLETION_TEXT),
        "the upstream answered through the proxy"
    );
    // A trace-level event (the upstream connector's `Http::connect`) reached the output,
    // next to a line per request. (A bare line count was tuned to the old upstream
    // client's pool, which traced every checkout.)
    assert!(logs.contains("Http::connect"), "trace-level output was captured");
    assert!(
        logs.lines().count() > sent.responses.len(),
        "{} log lines for {} responses",
        logs.lines().count(),
        sent.responses.len()
    );
    assert!(
        logs.contains("upstream_auth_failed") || logs.contains("502"),
        "failures were logged"
    );
    eprintln!(
        "secrecy ({format}): {} responses, {} log lines, {} secret values: none found",
        sent.responses.len(),
        logs.lines().count(),
        secrets.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_response_or_json_log_line_at_trace_level() {
    run("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_response_or_text_log_line_at_trace_level() {
    run("text").await;
}
