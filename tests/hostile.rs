//! Hostile clients over real sockets: slow headers, slow and lying bodies, silent and
//! idle connections, many connections at once, oversized headers, deeply nested JSON and
//! bytes that are not UTF-8.
//!
//! Each attack must be bounded by a timeout or a limit, answered with a clear 4xx where
//! HTTP allows, and must not hurt anyone else: a well-behaved client (the "bystander")
//! sends chat completions throughout and must succeed every time; its latency is printed.
//! `CLIENT_TIMEOUT_SECONDS` is 2 here so that the timeouts are seen quickly.
#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{CHAT, MockUpstream, TestApp, jwt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long past the timeout a connection may take to be closed (a loaded 2-core machine).
const SLACK: Duration = Duration::from_secs(3);

async fn app() -> (TestApp, MockUpstream) {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[("CLIENT_TIMEOUT_SECONDS", "2")]).await;
    (app, upstream)
}

/// A well-behaved client sending chat completions until stopped.
struct Bystander {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    task: JoinHandle<(usize, usize, Vec<Duration>)>,
}

impl Bystander {
    fn start(app: &TestApp) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = app.url("/v1/chat/completions");
        let client = app.client.clone();
        let flag = stop.clone();
        let done = Arc::new(AtomicUsize::new(0));
        let count = done.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(jwt(common::PRODUCT, common::USER))
                    .body(CHAT)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let fine = match response {
                    Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if fine {
                    ok += 1;
                } else {
                    failed += 1;
                }
                latencies.push(started.elapsed());
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, latencies)
        });
        Self { stop, done, task }
    }

    /// Stops it and asserts that every request of the bystander succeeded.
    async fn finish(self, attack: &str) {
        // A quick attack still sees a few of the bystander's requests.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.done.load(Ordering::SeqCst) < 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failed, mut latencies) = self.task.await.unwrap();
        latencies.sort();
        let pick = |q: f64| {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies.get(i).copied().unwrap_or_default()
        };
        eprintln!(
            "bystander during {attack}: {ok} ok, {failed} failed, latency p50 {:?} p99 {:?} max {:?}",
            pick(0.5),
            pick(0.99),
            latencies.last().copied().unwrap_or_default()
        );
        assert_eq!(failed, 0, "the bystander failed during {attack}");
        assert!(ok >= 3, "the bystander ran during {attack} ({ok} requests)");
    }
}

/// Reads until the server closes the connection (or resets it); returns what it sent and
/// how long that took. Fails if it is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Err(elapsed) => panic!(
                "{elapsed}: the connection is still open after {limit:?}; received {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0) | Err(_)) => return (received, started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn chat_head(content_length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: {content_length}\r\n\r\n",
        jwt(common::PRODUCT, common::USER)
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_at_the_client_timeout_while_others_are_served() {
    let (app, _upstream) = app().await;
    let bystander = Bystander::start(&app);
    let attackers: Vec<_> = (0..20)
        .map(|_| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut stream = connect(addr).await;
                stream
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
                    .await
                    .unwrap();
                let started = Instant::now();
                // One header byte every 300 ms: each read is fresh, the whole head never ends.
                let writer = async {
                    for byte in b"x-slow: ".iter().cycle().take(100) {
                        if stream.write_all(&[*byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                };
                let _ = tokio::time::timeout(CLIENT_TIMEOUT + SLACK, writer).await;
                let (response, _) = read_until_closed(&mut stream, SLACK).await;
                (started.elapsed(), status_of(&response))
            })
        })
        .collect();
    for attacker in attackers {
        let (elapsed, status) = attacker.await.unwrap();
        assert!(elapsed < CLIENT_TIMEOUT + SLACK, "closed after {elapsed:?}");
        // hyper answers a header timeout by closing (HTTP allows no reliable 408 mid-head).
        assert!(matches!(status, None | Some(408)), "{status:?}");
    }
    bystander.finish("20 slowloris connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_preface_connections_are_closed_at_the_client_timeout() {
    let (app, _upstream) = app().await;
    let bystander = Bystander::start(&app);
    // Nothing at all; the first bytes of an HTTP/2 preface (the server waits to tell the
    // versions apart); a full HTTP/2 preface and then nothing.
    let openings: [&[u8]; 3] = [b"", b"PRI * HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"];
    let attackers: Vec<_> = openings
        .iter()
        .flat_map(|opening| std::iter::repeat_n(*opening, 10))
        .map(|opening| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut stream = connect(addr).await;
                stream.write_all(opening).await.unwrap();
                let (_, elapsed) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
                elapsed
            })
        })
        .collect();
    for attacker in attackers {
        let elapsed = attacker.await.unwrap();
        assert!(elapsed < CLIENT_TIMEOUT + SLACK, "closed after {elapsed:?}");
    }
    bystander.finish("30 silent connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_client_timeout() {
    let (app, _upstream) = app().await;
    let mut stream = connect(app.addr).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&buf[..n]), Some(200));
    // Now idle on a keep-alive connection: the next head has the same time limit.
    let (rest, elapsed) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        elapsed >= CLIENT_TIMEOUT.checked_sub(Duration::from_millis(200)).unwrap(),
        "closed after {elapsed:?}"
    );
    eprintln!("idle keep-alive connection closed after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_short_bodies_get_408_at_the_client_timeout() {
    let (app, _upstream) = app().await;
    let bystander = Bystander::start(&app);
    let attackers: Vec<_> = (0..20)
        .map(|i| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut stream = connect(addr).await;
                let started = Instant::now();
                // Declares 200 bytes; half the attackers trickle, half send 10 and stop (a
                // body that lies about its length).
                stream.write_all(chat_head(200).as_bytes()).await.unwrap();
                stream.write_all(&CHAT.as_bytes()[..10]).await.unwrap();
                if i % 2 == 0 {
                    for byte in b"          ".iter().cycle().take(30) {
                        if stream.write_all(&[*byte]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                let (response, _) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
                (started.elapsed(), response)
            })
        })
        .collect();
    for attacker in attackers {
        let (elapsed, response) = attacker.await.unwrap();
        assert!(elapsed < CLIENT_TIMEOUT + SLACK, "answered after {elapsed:?}");
        assert_eq!(
            status_of(&response),
            Some(408),
            "{}",
            String::from_utf8_lossy(&response)
        );
        assert!(String::from_utf8_lossy(&response).contains("request_timeout"));
    }
    bystander.finish("20 slow or short bodies").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_huge_body_is_refused_at_once_and_extra_bytes_are_not_a_request() {
    let (app, upstream) = app().await;
    // Declared far over MAX_BODY_BYTES: 413 before a byte of it is read.
    let mut stream = connect(app.addr).await;
    stream.write_all(chat_head(1 << 40).as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .expect("413 without waiting for the body")
        .unwrap();
    assert_eq!(status_of(&buf[..n]), Some(413));

    // More bytes than declared: the extra bytes are read as the next request, which is
    // not HTTP: the server answers 400 (or closes) and forwards only the declared body.
    let mut stream = connect(app.addr).await;
    let mut request = chat_head(CHAT.len()).into_bytes();
    request.extend_from_slice(CHAT.as_bytes());
    request.extend_from_slice(b"\x00\xffGARBAGE {\"model\": 1}\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let (response, _) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
    let text = String::from_utf8_lossy(&response);
    assert_eq!(status_of(&response), Some(200), "{text}");
    assert!(text.matches("HTTP/1.1 ").count() <= 2, "{text}");
    if let Some(second) = text.match_indices("HTTP/1.1 ").nth(1) {
        assert!(text[second.0..].starts_with("HTTP/1.1 400"), "{text}");
    }
    assert_eq!(upstream.requests().len(), 1);
    assert_eq!(upstream.last().body, CHAT.as_bytes());

    // Two different lengths: 400. Content-Length beside Transfer-Encoding: the chunked
    // framing wins (RFC 9112 6.3) and the length is ignored: one request, one answer
    // (here 401, no credentials), nothing smuggled after it.
    for (head, want) in [
        (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
            400,
        ),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 40\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n",
            401,
        ),
    ] {
        let mut stream = connect(app.addr).await;
        stream.write_all(head.as_bytes()).await.unwrap();
        let (response, _) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
        let text = String::from_utf8_lossy(&response);
        assert_eq!(status_of(&response), Some(want), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_the_server_keeps_serving() {
    let (app, _upstream) = app().await;
    let bystander = Bystander::start(&app);
    let many = (0..200).fold(String::new(), |mut head, i| {
        let _ = write!(head, "x-h{i}: v\r\n");
        head
    });
    let huge = format!("x-big: {}\r\n", "a".repeat(1 << 20));
    for extra in [many, huge] {
        let mut stream = connect(app.addr).await;
        let head = format!("GET /health HTTP/1.1\r\nhost: x\r\n{extra}\r\n");
        // The server may close before reading everything: a failed write is fine.
        let _ = stream.write_all(head.as_bytes()).await;
        let (response, _) = read_until_closed(&mut stream, CLIENT_TIMEOUT + SLACK).await;
        assert_eq!(
            status_of(&response),
            Some(431),
            "{}",
            String::from_utf8_lossy(&response)
        );
    }
    bystander.finish("oversized headers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_and_non_utf8_bytes_get_clear_4xx() {
    let (app, upstream) = app().await;
    let token = jwt(common::PRODUCT, common::USER);
    let chat = app.url("/v1/chat/completions");
    let nested_value = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"x"}}],"max_tokens":9,"extra":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let nested_top = "[".repeat(500_000);
    // Nesting inside a member the proxy does not check is skipped without recursion and
    // forwarded unchanged (the upstream judges it); at the top level it is invalid JSON.
    let response = app
        .client
        .post(&chat)
        .bearer_auth(&token)
        .body(nested_value.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(upstream.last().body == nested_value.as_bytes(), "forwarded unchanged");
    let forwarded = upstream.requests().len();
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (nested_top.into_bytes(), "nested top level"),
        (
            b"{\"model\":\"gpt-4o\",\"messages\":[\xff\xfe]}".to_vec(),
            "non-UTF-8 in JSON",
        ),
        (
            b"{\"model\":\"gpt-\xc3\x28\",\"messages\":[{}]}".to_vec(),
            "invalid UTF-8 in a string",
        ),
        (vec![0xff; 1000], "binary"),
    ];
    for (body, what) in bodies {
        let response = app
            .client
            .post(&chat)
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{what}");
        let (_, code, _) = common::error_of(response).await;
        assert_eq!(code, "invalid_json", "{what}");
    }
    assert_eq!(upstream.requests().len(), forwarded);

    // Bytes that are not UTF-8 in credentials and ids, and in the path.
    let raw: [&[u8]; 4] = [
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \xff\xfe\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-signature: \xff\r\nx-client-id: \xfe\r\nx-timestamp: 1\r\nx-nonce: aaaaaaaaaaaaaaaa\r\nx-product-id: demo\r\nx-user-id: \xff\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-request-id: \xff\r\n\r\n",
        b"GET /v1/\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n",
    ];
    for request in raw {
        let mut stream = connect(app.addr).await;
        stream.write_all(request).await.unwrap();
        stream.write_all(b"").await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout(CLIENT_TIMEOUT + SLACK, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap_or(0);
        let status = status_of(&buf[..n]);
        assert!(
            matches!(status, Some(400 | 401 | 404)),
            "{:?} -> {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_are_all_served() {
    let (app, _upstream) = app().await;
    let bystander = Bystander::start(&app);
    // 150 idle connections held open, and 150 more each sending one request at once (both
    // ends live in this process: kept well under a 1024 file descriptor limit).
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(connect(app.addr).await);
    }
    let started = Instant::now();
    let requests: Vec<_> = (0..150)
        .map(|_| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut stream = connect(addr).await;
                stream
                    .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let (response, _) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
                status_of(&response)
            })
        })
        .collect();
    let mut ok = 0;
    for request in requests {
        if request.await.unwrap() == Some(200) {
            ok += 1;
        }
    }
    eprintln!(
        "150 simultaneous requests beside 150 idle connections: {ok} ok in {:?}",
        started.elapsed()
    );
    assert_eq!(ok, 150);
    // The idle ones are closed by the client timeout.
    for stream in &mut idle {
        read_until_closed(stream, CLIENT_TIMEOUT + SLACK).await;
    }
    bystander.finish("300 connections at once").await;
}

/// An HTTP/2 (prior knowledge, clear text) connection to the app: the request sender and
/// the connection's task, which ends when the server ends the connection.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    JoinHandle<Result<(), hyper::Error>>,
) {
    let io = hyper_util::rt::TokioIo::new(connect(addr).await);
    let (sender, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

fn h2_request(method: &str, path: &str, body: &str) -> http::Request<String> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://x{path}"))
        .header(
            "authorization",
            format!("Bearer {}", jwt(common::PRODUCT, common::USER)),
        )
        .body(body.to_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_the_client_timeout() {
    let (app, _upstream) = app().await;
    let mut connections = Vec::new();
    for _ in 0..10 {
        let (mut sender, connection) = h2_connect(app.addr).await;
        let response = sender.send_request(h2_request("GET", "/health", "")).await.unwrap();
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
        connections.push((sender, connection, Instant::now()));
    }
    // One request each and then nothing: the server ends every connection.
    for (_sender, connection, idle_from) in connections {
        tokio::time::timeout(CLIENT_TIMEOUT + SLACK, connection)
            .await
            .expect("the server closes an idle HTTP/2 connection")
            .unwrap()
            .unwrap();
        let elapsed = idle_from.elapsed();
        assert!(
            elapsed >= CLIENT_TIMEOUT.checked_sub(Duration::from_millis(200)).unwrap(),
            "closed after {elapsed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_keeps_its_connection_open_past_the_client_timeout() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(&upstream.url(), &[("CLIENT_TIMEOUT_SECONDS", "1")]).await;
    let stream_body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

    // HTTP/2: the stream's connection outlives several client timeouts while the stream
    // is silent, and closes one client timeout after the stream's end.
    let (mut sender, connection) = h2_connect(app.addr).await;
    let response = sender
        .send_request(h2_request("POST", "/v1/chat/completions", stream_body))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (feed, _dropped) = feed.await.unwrap();
    let mut body = response.into_body();
    let connection = {
        let mut connection = connection;
        // A bounded wait for something that must not happen: the connection ending.
        let ended = tokio::time::timeout(Duration::from_secs(3), &mut connection).await;
        assert!(
            ended.is_err(),
            "the connection ended with a stream in flight: {ended:?}"
        );
        connection
    };
    feed.send(Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")))
        .await
        .unwrap();
    let frame = tokio::time::timeout(SLACK, http_body_util::BodyExt::frame(&mut body))
        .await
        .expect("the chunk arrives")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: [DONE]\n\n");
    drop(feed);
    http_body_util::BodyExt::collect(body).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1) + SLACK, connection)
        .await
        .expect("closed once idle")
        .unwrap()
        .unwrap();
}

/// A socket to `addr` whose receive buffer is as small as the system allows.
async fn connect_small_buffer(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// An upstream that streams 16 KiB events for as long as someone takes them, and says
/// when the proxy dropped its response body.
async fn endless_upstream() -> (MockUpstream, tokio::sync::oneshot::Receiver<()>) {
    let (upstream, feed) = MockUpstream::driven().await;
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((feed, dropped)) = feed.await else { return };
        let event = bytes::Bytes::from(format!("data: {}\n\n", "x".repeat(16 * 1024)));
        // Bounded: at most 4 GiB, far more than any socket buffers (the send fails as soon
        // as the proxy drops the body).
        for _ in 0..(1 << 18) {
            if feed.send(Ok(event.clone())).await.is_err() {
                break;
            }
        }
        let _ = dropped.await;
        let _ = dropped_tx.send(());
    });
    (upstream, dropped_rx)
}

const STREAM_CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_upstream_idle_timeout() {
    let (upstream, dropped) = endless_upstream().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("CLIENT_TIMEOUT_SECONDS", "2"), ("UPSTREAM_IDLE_TIMEOUT_SECONDS", "1")],
    )
    .await;
    let mut stream = connect_small_buffer(app.addr).await;
    let mut request = chat_head(STREAM_CHAT.len()).into_bytes();
    request.extend_from_slice(STREAM_CHAT.as_bytes());
    stream.write_all(&request).await.unwrap();
    // The client reads nothing: once the socket buffers are full the proxy stops, and one
    // idle timeout later it drops the response, which ends the upstream call.
    tokio::time::timeout(Duration::from_secs(15), dropped)
        .await
        .expect("the upstream call is cancelled")
        .unwrap();
    let (response, _) = read_until_closed(&mut stream, Duration::from_secs(15)).await;
    let text = String::from_utf8_lossy(&response[..response.len().min(200)]).into_owned();
    assert_eq!(status_of(&response), Some(200), "{text}");
    // Cut without a clean end: no last chunk.
    assert!(!response.ends_with(b"0\r\n\r\n"), "the stream ended cleanly");
    assert!(upstream.connections() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_a_stream_is_cut_after_the_upstream_idle_timeout() {
    let (upstream, dropped) = endless_upstream().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("CLIENT_TIMEOUT_SECONDS", "2"), ("UPSTREAM_IDLE_TIMEOUT_SECONDS", "1")],
    )
    .await;
    let (mut sender, _connection) = h2_connect(app.addr).await;
    let response = sender
        .send_request(h2_request("POST", "/v1/chat/completions", STREAM_CHAT))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The body is never read: its flow-control window fills and the proxy stops sending.
    let body = response.into_body();
    tokio::time::timeout(Duration::from_secs(15), dropped)
        .await
        .expect("the upstream call is cancelled")
        .unwrap();
    // The stream was reset, not ended: reading what is left ends in an error.
    let end = tokio::time::timeout(SLACK, http_body_util::BodyExt::collect(body))
        .await
        .expect("the stream ends");
    assert!(end.is_err(), "the stream ended cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_over_the_body_limit_gets_413_without_waiting_for_the_chunk() {
    let upstream = MockUpstream::openai().await;
    // A client timeout far longer than the wait below: a 408 cannot be what answers.
    let app = TestApp::spawn(
        &upstream.url(),
        &[("CLIENT_TIMEOUT_SECONDS", "20"), ("MAX_BODY_BYTES", "1000")],
    )
    .await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        jwt(common::PRODUCT, common::USER)
    );
    // One chunk that alone declares 1001 bytes; several that add up to more; and the
    // size line sent after the head, on its own.
    let bodies = [
        format!("{:x}\r\n{{\"mo", 1001),
        format!("{:x}\r\n{}\r\n{:x}\r\nxy", 600, " ".repeat(600), 401),
    ];
    for body in &bodies {
        let mut stream = connect(app.addr).await;
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("413 without waiting for the declared bytes")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert_eq!(status_of(&buf[..n]), Some(413), "{body:?}: {text}");
        assert!(text.contains("body_too_large"), "{text}");
    }
    let mut stream = connect(app.addr).await;
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream.write_all(b"3e9\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("413 without waiting for the declared bytes")
        .unwrap();
    assert_eq!(
        status_of(&buf[..n]),
        Some(413),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // Chunked bodies within the limit, one request after another on one connection, pass.
    let mut stream = connect(app.addr).await;
    for _ in 0..2 {
        let (first, rest) = CHAT.split_at(10);
        let request = format!(
            "{head}{:x}\r\n{first}\r\n{:x};ext=1\r\n{rest}\r\n0\r\n\r\n",
            first.len(),
            rest.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&response).contains("chatcmpl-1") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            status_of(&response),
            Some(200),
            "{}",
            String::from_utf8_lossy(&response)
        );
    }
    assert_eq!(upstream.last().body, CHAT.as_bytes());
}
