//! The binary's log lines: Cloud Logging JSON (severity, message, time, httpRequest,
//! trace) by default, plain text with `LOG_FORMAT=text`, and never a secret.
mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::{HMAC_SECRET, MockUpstream, PRODUCT_KEY, ServerProcess, Signed, base_env, binary, jwt, set};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A prompt that must never reach a log line.
const PROMPT: &str = "PROMPT-TEXT-never-logged-5e1d";
const TRACE_ID: &str = "105445aa7843bc8bf206b12000100000";

fn chat_body() -> String {
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16})
        .to_string()
}

/// Waits (bounded) until the process has logged a request line for `path` with `status`,
/// and returns it parsed. The line is written when the response body ends, which can be
/// a moment after the client read it.
async fn request_line(server: &ServerProcess, path: &str, status: u64) -> Value {
    json_line(server, &format!("request line for {path} {status}"), |v| {
        v["target"] == "request" && v["path"] == path && v["status"] == status
    })
    .await
}

/// Waits (bounded) until the process has logged a JSON line that `matches` (`what` it is
/// names it in the failure), and returns it parsed.
async fn json_line(server: &ServerProcess, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let found = server
            .lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(&matches);
        if let Some(line) = found {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {what} in:\n{}", server.output());
}

fn assert_no_secret(output: &str, extra: &[&str]) {
    for secret in [PRODUCT_KEY, HMAC_SECRET, PROMPT, "Bearer"].iter().chain(extra) {
        assert!(!output.contains(secret), "{secret} in the logs:\n{output}");
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: RFC 3339 in UTC, with microseconds.
fn assert_rfc3339_utc(time: &Value) {
    let time = time.as_str().expect("time is a string");
    let bytes = time.as_bytes();
    assert!(
        bytes.len() == 27
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':'
            && bytes[16] == b':'
            && bytes[19] == b'.'
            && time.ends_with('Z')
            && bytes
                .iter()
                .enumerate()
                .all(|(i, b)| [4, 7, 10, 13, 16, 19, 26].contains(&i) || b.is_ascii_digit()),
        "time {time} is RFC 3339 in UTC with microseconds"
    );
}

#[tokio::test]
async fn a_request_line_is_cloud_logging_json_with_http_request_and_trace() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    set(&mut env, "GCP_PROJECT_ID", "my-project");
    let server = ServerProcess::start(&env).await;
    let token = jwt("demo", "alice");

    let response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .header("user-agent", "logs-test/1.0")
        .header("x-request-id", "req-logs-1")
        .header("x-cloud-trace-context", format!("{TRACE_ID}/1;o=1"))
        .body(chat_body())
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");

    let line = request_line(&server, "/v1/chat/completions", 200).await;
    assert_eq!(line["severity"], "INFO");
    assert_eq!(line["message"], "request");
    assert_rfc3339_utc(&line["time"]);
    let http = &line["httpRequest"];
    assert_eq!(http["requestMethod"], "POST");
    assert_eq!(http["requestUrl"], "/v1/chat/completions");
    assert_eq!(http["status"], 200);
    assert_eq!(http["userAgent"], "logs-test/1.0");
    let latency = http["latency"].as_str().expect("latency is a string");
    let seconds = latency.strip_suffix('s').expect("latency ends in s");
    assert!(seconds.parse::<f64>().is_ok_and(|s| s >= 0.0), "latency {latency}");
    assert_eq!(
        line["logging.googleapis.com/trace"],
        format!("projects/my-project/traces/{TRACE_ID}")
    );
    assert_eq!(line["logging.googleapis.com/spanId"], "0000000000000001");
    assert_eq!(line["logging.googleapis.com/trace_sampled"], true);
    // The contract's fields, flat.
    assert_eq!(line["method"], "POST");
    assert_eq!(line["request_id"], "req-logs-1");
    assert_eq!(line["product"], "demo");
    assert_eq!(line["user"], "alice");
    assert_eq!(line["upstream_status"], 200);
    assert_eq!(line["upstream_request_id"], "upstream-req-42");
    assert!(line["latency_ms"].is_number());
    assert!(line.get("error").is_none_or(Value::is_null), "no error code: {line}");

    // Every line is JSON with the fields Cloud Logging reads.
    let output = server.output();
    for raw in output.lines() {
        let value: Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
        assert!(
            ["DEBUG", "INFO", "WARNING", "ERROR"].contains(&value["severity"].as_str().unwrap_or_default()),
            "{raw}"
        );
        assert!(value["message"].is_string(), "{raw}");
        assert_rfc3339_utc(&value["time"]);
    }
    assert_no_secret(&output, &[&token]);
}

#[tokio::test]
async fn traceparent_and_an_error_code_reach_the_line_without_the_signature() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    set(&mut env, "GCP_PROJECT_ID", "my-project");
    let server = ServerProcess::start(&env).await;
    let body = chat_body();
    let mut signed = Signed::chat(body.as_bytes());
    let signature = signed.signature.clone();
    // One flipped digit: a bad signature, still well-formed.
    signed.signature = format!(
        "{}{}",
        if signature.starts_with('0') { '1' } else { '0' },
        &signature[1..]
    );

    let request = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-00"))
        .body(body);
    let response = signed.apply(request).send().await.expect("response");
    assert_eq!(response.status(), 401);
    response.bytes().await.expect("body");

    let line = request_line(&server, "/v1/chat/completions", 401).await;
    assert_eq!(line["error"], "invalid_signature");
    assert_eq!(line["httpRequest"]["status"], 401);
    assert_eq!(
        line["logging.googleapis.com/trace"],
        format!("projects/my-project/traces/{TRACE_ID}")
    );
    assert_eq!(line["logging.googleapis.com/spanId"], "00f067aa0ba902b7");
    assert_eq!(line["logging.googleapis.com/trace_sampled"], false);
    assert_no_secret(&server.output(), &[&signature, &signed.signature]);
}

#[tokio::test]
async fn without_a_project_id_there_is_no_trace_field_and_routes_are_not_raw_paths() {
    let upstream = MockUpstream::openai().await;
    let env = base_env(&upstream.url());
    let server = ServerProcess::start(&env).await;
    let response = reqwest::Client::new()
        .get(server.url("/no/such/path"))
        .header("x-cloud-trace-context", format!("{TRACE_ID}/1;o=1"))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 404);
    response.bytes().await.expect("body");

    let line = request_line(&server, "/no/such/path", 404).await;
    assert_eq!(line["error"], "not_found");
    assert_eq!(line["httpRequest"]["requestUrl"], "/no/such/path");
    assert!(line.get("logging.googleapis.com/trace").is_none(), "{line}");
    assert!(line.get("trace").is_none(), "the raw header is not a field: {line}");
}

#[tokio::test]
async fn a_head_request_is_logged_complete_with_the_get_headers() {
    let upstream = MockUpstream::openai().await;
    let server = ServerProcess::start(&base_env(&upstream.url())).await;
    let response = reqwest::Client::new()
        .head(server.url("/health"))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], "15", "the GET's length");
    assert_eq!(response.bytes().await.expect("body").len(), 0);
    let line = json_line(&server, "HEAD request line", |v| {
        v["target"] == "request" && v["method"] == "HEAD"
    })
    .await;
    assert_eq!(line["status"], 200);
    assert!(line.get("error").is_none(), "a HEAD answer is complete: {line}");
    server.terminate();
}

#[tokio::test]
async fn request_lines_follow_the_rust_log_filter() {
    let upstream = MockUpstream::openai().await;
    // `api_key_server=info` keeps the binary's own lines: its address and `stopped`.
    for (filter, logged) in [
        ("info", true),
        ("warn,api_key_server=info", false),
        ("info,request=off", false),
    ] {
        let mut env = base_env(&upstream.url());
        env.insert("RUST_LOG".to_owned(), filter.to_owned());
        let server = ServerProcess::start(&env).await;
        let response = reqwest::get(server.url("/health")).await.expect("response");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
        // The request's line, if any, is written before the drain ends and `stopped` follows.
        server.terminate();
        json_line(&server, &format!("stopped line with RUST_LOG={filter}"), |v| {
            v["message"] == "stopped"
        })
        .await;
        let output = server.output();
        assert_eq!(
            output.contains(r#""target":"request""#),
            logged,
            "RUST_LOG={filter}:\n{output}"
        );
    }
}

#[tokio::test]
async fn log_format_text_writes_lines_for_humans() {
    let upstream = MockUpstream::openai().await;
    let mut env: HashMap<String, String> = base_env(&upstream.url());
    set(&mut env, "LOG_FORMAT", "text");
    let mut child = binary()
        .envs(&env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let mut port = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await else {
            break;
        };
        seen.push(line.clone());
        if line.contains("listening") {
            port = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            break;
        }
    }
    let port = port.unwrap_or_else(|| panic!("a text listening line with address= in {seen:?}"));
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .header("x-request-id", "req-text-1")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");

    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("req-text-1") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("the request line in time");
    assert!(serde_json::from_str::<Value>(&line).is_err(), "not JSON: {line}");
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(
        line.contains("path=\"/health\"") || line.contains("path=/health"),
        "{line}"
    );
    assert!(!line.contains('\u{1b}'), "no colour codes off a terminal: {line}");
    let _ = child.kill().await;
}

/// A raw upstream whose behaviour the request's content picks (`CASE-...`): the ways an
/// upstream fails, before its headers and after them.
async fn failing_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                // The whole (small) request: its JSON body ends with `}`.
                let mut request = Vec::new();
                while !request.ends_with(b"}") {
                    let mut buf = [0u8; 8192];
                    match socket.read(&mut buf).await {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n";
                if text.contains("CASE-RESET-BODY") {
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.flush().await;
                    // Given time to reach the proxy before the RST, which would discard it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = socket.set_zero_linger();
                } else if text.contains("CASE-RESET") {
                    // RST instead of FIN.
                    let _ = socket.set_zero_linger();
                } else if text.contains("CASE-GARBAGE") {
                    let _ = socket.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n").await;
                } else if text.contains("CASE-STALL-HEADERS") || text.contains("CASE-STALL-BODY") {
                    if text.contains("CASE-STALL-BODY") {
                        let _ = socket.write_all(head.as_bytes()).await;
                    }
                    // Silent, the connection open, for longer than the proxy waits.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                // `CASE-CLOSE`, and the end of every other case: FIN without an answer.
                drop(socket);
            });
        }
    });
    format!("http://{addr}/v1/chat/completions")
}

/// The metrics address from the `metrics endpoint ready` line.
async fn metrics_url(server: &ServerProcess) -> String {
    let line = json_line(server, "metrics line", |v| v["message"] == "metrics endpoint ready").await;
    let port = line["address"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("a port in the metrics line");
    format!("http://127.0.0.1:{port}/metrics")
}

/// Sends one chat whose content is `case` with request id `case`; returns the status and
/// whether the body ended cleanly.
async fn chat_case(server: &ServerProcess, case: &str) -> (u16, bool) {
    let body =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": case}], "max_tokens": 16});
    let response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "alice"))
        .header("x-request-id", case)
        .body(body.to_string())
        .send()
        .await
        .expect("response");
    let status = response.status().as_u16();
    (status, response.bytes().await.is_ok())
}

#[tokio::test]
async fn each_upstream_failure_logs_its_cause_and_counts_it_by_cause() {
    let failing = failing_upstream().await;
    let refusing = format!("http://127.0.0.1:{}/v1/chat/completions", common::closed_port().await);
    // TLS towards a peer that speaks plain HTTP: the handshake fails.
    let plain = MockUpstream::openai().await;
    let not_tls = format!("https://{}/v1/chat/completions", plain.addr);

    // (upstream, case, status, error code, cause)
    let cases = [
        (
            &refusing,
            "CASE-REFUSED",
            502,
            "upstream_unreachable",
            "connect_refused",
        ),
        (&not_tls, "CASE-TLS", 502, "upstream_unreachable", "tls"),
        (&failing, "CASE-GARBAGE", 502, "upstream_unreachable", "protocol"),
        (&failing, "CASE-RESET", 502, "upstream_unreachable", "reset"),
        (&failing, "CASE-CLOSE", 502, "upstream_unreachable", "closed"),
        (&failing, "CASE-STALL-HEADERS", 502, "upstream_timeout", "timeout"),
        (&failing, "CASE-STALL-BODY", 200, "upstream_aborted", "idle_timeout"),
        (&failing, "CASE-RESET-BODY", 200, "upstream_aborted", "reset"),
    ];
    let mut servers: Vec<(&String, ServerProcess, String)> = Vec::new();
    for upstream in [&refusing, &not_tls, &failing] {
        let mut env = base_env(upstream);
        if upstream == &failing {
            // Short enough for the stalling cases, long enough for the others to fail
            // first on a busy machine (the rest keep the tests' 5 s).
            set(&mut env, "UPSTREAM_TIMEOUT_SECONDS", "1");
            set(&mut env, "UPSTREAM_IDLE_TIMEOUT_SECONDS", "1");
        }
        set(&mut env, "METRICS_PORT", "0");
        let server = ServerProcess::start(&env).await;
        let metrics = metrics_url(&server).await;
        servers.push((upstream, server, metrics));
    }

    for (i, &(upstream, case, status, code, cause)) in cases.iter().enumerate() {
        let (_, server, metrics) = servers.iter().find(|(u, ..)| *u == upstream).expect("a server");
        let (answered, clean) = chat_case(server, case).await;
        assert_eq!(answered, status, "{case}");
        // A 502 is a complete answer; a 200 whose upstream failed is cut.
        assert_eq!(clean, status == 502, "{case}");
        let line = json_line(server, &format!("request line of {case}"), |v| {
            v["target"] == "request" && v["request_id"] == case
        })
        .await;
        assert_eq!(line["error"], code, "{case}: {line}");
        assert_eq!(line["upstream_error_cause"], cause, "{case}: {line}");

        let text = reqwest::get(metrics.as_str())
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        let series =
            format!(r#"api_key_server_upstream_failures_total{{route="/v1/chat/completions",cause="{cause}"}} "#);
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("{case}: {series} in\n{text}"));
        // This case's and the earlier ones' of the same server and cause.
        let expected = cases[..=i]
            .iter()
            .filter(|(u, .., k)| *u == upstream && *k == cause)
            .count();
        assert_eq!(count.trim(), expected.to_string(), "{case}");
    }
    for (_, server, _) in &servers {
        assert_no_secret(&server.output(), &[]);
    }
}
