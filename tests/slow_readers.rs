//! Many streams whose clients read slowly or not at all, against the real binary: the
//! proxy must pass the client's pace back to the upstream (it stops reading the upstream
//! while the client takes nothing) instead of buffering what the upstream sends, so that
//! neither what the upstream manages to write per stream nor the proxy's resident memory
//! grows with time. When `UPSTREAM_IDLE_TIMEOUT_SECONDS` is short, the stalled streams are
//! cut (`src/server/stall.rs`), their upstream calls end and the memory goes back.
//!
//! The upstream here is a raw socket writing 64 KiB Server-Sent Events as fast as its
//! socket takes them, counting the bytes each write moved; the clients are raw HTTP/1.1
//! sockets with a receive buffer as small as the system allows, or HTTP/2 connections that
//! never read their streams (flow control, not the socket, holds those back).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ServerProcess, base_env, jwt, rss_kib, set};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Concurrent streams.
const STREAMS: usize = 200;
/// One Server-Sent Event of the upstream.
const EVENT_BYTES: usize = 64 * 1024;
/// The proxy's own buffers for one stream, at most: hyper's read buffer on the upstream
/// connection (64 KiB) and its write queue on the client's (128 KiB), and a few events on
/// their way between the two.
const PROXY_BUFFERS: u64 = 1024 * 1024;
/// The proxy's resident memory with every stream open and stalled: the process itself,
/// and per stream its buffers (see above) and the allocations they keep alive: a frame
/// waiting in the write queue is a slice of the read buffer it was read into, which it
/// keeps whole. Measured: about 0.3 MiB per stream, against 1 MiB with hyper's default
/// buffer sizes (400 KiB each), which this bound refuses. A proxy that buffered what its
/// clients do not take would pass it within a second: loopback moves gigabytes a second.
const RSS_BOUND_KIB: u64 = 64 * 1024 + STREAMS as u64 * 512;
/// Every wait below ends by this time, whatever the machine's load.
const PATIENCE: Duration = Duration::from_secs(60);

const STREAM_CHAT: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"stream":true}"#;

/// One upstream response: the bytes written to the proxy so far, and whether it ended
/// (a write failed: the proxy closed the connection).
#[derive(Default)]
struct Written {
    bytes: AtomicU64,
    ended: AtomicBool,
}

/// An upstream on 127.0.0.1 that answers every request with an endless chunked stream of
/// 64 KiB events, written as fast as the socket takes them.
struct Firehose {
    addr: SocketAddr,
    streams: Arc<Mutex<Vec<Arc<Written>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Firehose {
    async fn start() -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams: Arc<Mutex<Vec<Arc<Written>>>> = Arc::default();
        let registry = streams.clone();
        let event = format!("data: {}\n\n", "x".repeat(EVENT_BYTES - 8));
        let frame = bytes::Bytes::from(format!("{:x}\r\n{event}\r\n", event.len()));
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (registry, frame) = (registry.clone(), frame.clone());
                tokio::spawn(async move {
                    if !read_request(&mut socket).await {
                        return;
                    }
                    let written = Arc::new(Written::default());
                    registry.lock().unwrap().push(written.clone());
                    let head =
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                    if socket.write_all(head).await.is_ok() {
                        // Bounded: 64 GiB at most, far past any bound below; ends as soon
                        // as the proxy closes the connection.
                        for _ in 0..(1u32 << 20) {
                            if socket.write_all(&frame).await.is_err() {
                                break;
                            }
                            written.bytes.fetch_add(frame.len() as u64, Ordering::SeqCst);
                        }
                    }
                    written.ended.store(true, Ordering::SeqCst);
                });
            }
        });
        Self { addr, streams, task }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }

    fn streams(&self) -> Vec<Arc<Written>> {
        self.streams.lock().unwrap().clone()
    }

    /// The most bytes written into one stream, and the total.
    fn written(&self) -> (u64, u64) {
        let streams = self.streams();
        let each = streams.iter().map(|s| s.bytes.load(Ordering::SeqCst));
        (each.clone().max().unwrap_or(0), each.sum())
    }

    fn ended(&self) -> usize {
        self.streams().iter().filter(|s| s.ended.load(Ordering::SeqCst)).count()
    }
}

impl Drop for Firehose {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head, then as many body bytes as it declares); false when the
/// connection ends first.
async fn read_request(socket: &mut TcpStream) -> bool {
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
                return true;
            }
        }
        let mut buf = [0u8; 4096];
        match socket.read(&mut buf).await {
            Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
}

/// What an upstream may have written into one stream whose client takes nothing: what the
/// kernel may hold on the way (the proxy's receive buffer from the upstream, which grows up
/// to `tcp_rmem`'s maximum while the proxy reads; the upstream's and the proxy's send
/// buffers, up to `tcp_wmem`'s; the client's receive buffer, small), and the proxy's own
/// buffers. The kernel's share depends on the machine (32 MiB of receive buffer on some),
/// so it is read from it rather than assumed.
fn written_bound() -> u64 {
    let max = |name: &str| -> u64 {
        let path = format!("/proc/sys/net/ipv4/{name}");
        let text = std::fs::read_to_string(&path).unwrap();
        text.split_whitespace().last().unwrap().parse().unwrap()
    };
    max("tcp_rmem") + 2 * max("tcp_wmem") + PROXY_BUFFERS
}

async fn start(upstream: &Firehose, idle_timeout: &str) -> ServerProcess {
    let mut env = base_env(&upstream.url());
    set(&mut env, "UPSTREAM_IDLE_TIMEOUT_SECONDS", idle_timeout);
    ServerProcess::start(&env).await
}

/// A client that sends one streamed chat request on a socket whose receive buffer is as
/// small as the system allows, and then reads nothing.
async fn silent_client(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{STREAM_CHAT}",
        jwt(common::PRODUCT, common::USER),
        STREAM_CHAT.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A client that reads 1 KiB every 100 ms until `stop` (at most 600 reads); returns the
/// first bytes it read.
fn slow_reader(mut stream: TcpStream, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut first = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..600 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) if first.len() < 64 => first.extend_from_slice(&buf[..n]),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first
    })
}

/// Waits, at most [`PATIENCE`], until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < PATIENCE, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_whose_clients_read_slowly_or_not_at_all_hold_the_upstream_back() {
    let upstream = Firehose::start().await;
    // Longer than the test: the stall cut must not be what bounds these streams.
    let process = start(&upstream, "600").await;
    let pid = process.child.id().unwrap();
    let idle = rss_kib(pid);

    // Half the clients never read, half read 1 KiB every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let mut silent = Vec::new();
    let mut slow = Vec::new();
    for i in 0..STREAMS {
        let stream = silent_client(process.addr).await;
        if i % 2 == 0 {
            silent.push(stream);
        } else {
            slow.push(slow_reader(stream, stop.clone()));
        }
    }
    wait_until("every stream has started", || {
        let streams = upstream.streams();
        streams.len() == STREAMS && streams.iter().all(|s| s.bytes.load(Ordering::SeqCst) > 0)
    })
    .await;

    // Twice, some time apart: neither sample may pass the bounds, however long the
    // streams have been stalled.
    let bound = written_bound();
    let mut samples = Vec::new();
    for pause in [Duration::from_secs(2), Duration::from_secs(3)] {
        tokio::time::sleep(pause).await;
        let (most, total) = upstream.written();
        samples.push((most, total, rss_kib(pid)));
    }
    eprintln!(
        "{STREAMS} stalled streams: idle RSS {idle} KiB; (most written into one stream, total written, \
         RSS KiB) 2 s and 5 s after they started: {samples:?}; bound per stream {bound} bytes"
    );
    assert_eq!(upstream.ended(), 0, "no stream was cut");
    for (most, total, rss) in samples {
        assert!(
            most <= bound,
            "the upstream wrote {most} bytes into one stream (total {total}, bound {bound}): the proxy buffers"
        );
        assert!(rss <= RSS_BOUND_KIB, "the proxy's RSS is {rss} KiB");
    }

    stop.store(true, Ordering::SeqCst);
    for reader in slow {
        let first = reader.await.unwrap();
        assert!(
            first.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&first)
        );
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_are_cut_at_the_idle_timeout_and_their_memory_goes_back() {
    let upstream = Firehose::start().await;
    let process = start(&upstream, "2").await;
    let pid = process.child.id().unwrap();
    let idle = rss_kib(pid);
    let bound = written_bound();

    // Three rounds: what the first round's streams took must serve the later ones, not add
    // to it (the allocator keeps some freed memory, but nothing stays held).
    let mut peaks = Vec::new();
    for round in 1..=3 {
        let mut clients = Vec::new();
        for _ in 0..STREAMS {
            clients.push(silent_client(process.addr).await);
        }
        wait_until("every stream has started", || {
            upstream.streams().len() == round * STREAMS
        })
        .await;
        // The stall cut drops each response, which closes its upstream connection.
        // Meanwhile, the highest RSS seen and the most written into one stream.
        let (mut peak, mut most, mut total) = (0, 0, 0);
        wait_until("every upstream call has ended", || {
            peak = peak.max(rss_kib(pid));
            (most, total) = upstream.written();
            upstream.ended() == round * STREAMS
        })
        .await;
        let after = rss_kib(pid);
        eprintln!(
            "round {round}: {STREAMS} streams cut: RSS idle {idle} KiB, at most {peak} KiB, after the cut \
             {after} KiB; most written into one stream {most} (bound {bound}), total {total}"
        );
        assert!(most <= bound, "the upstream wrote {most} bytes into one stream");
        assert!(peak <= RSS_BOUND_KIB, "the proxy's RSS reached {peak} KiB");
        // What RSS shows right after the cut is up to glibc (freed memory is kept in the
        // arenas, more or less of it with more threads and load): the bound that holds is
        // the next round's peak, which must reuse that memory instead of adding to it.
        peaks.push(peak);

        // Each client sees its response cut: no last chunk before the connection closes.
        for mut client in clients {
            let mut received = Vec::new();
            let read = tokio::time::timeout(PATIENCE, client.read_to_end(&mut received)).await;
            assert!(read.is_ok(), "the connection is still open");
            assert!(received.starts_with(b"HTTP/1.1 200"));
            assert!(!received.ends_with(b"0\r\n\r\n"), "the stream ended cleanly");
        }
    }
    // Kept memory would add the first round's growth again each round: the third round's
    // peak would be at least idle + 3 x growth. How much freed memory glibc keeps between
    // rounds varies with threads and load (half a round's growth has been seen), so the
    // bound leaves a whole round's growth for it, and a leak still cannot pass it.
    let growth = peaks[0].saturating_sub(idle);
    assert!(
        peaks[1..].iter().all(|&peak| peak <= idle + 2 * growth),
        "peak RSS of each round: {peaks:?} KiB, idle {idle} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_whose_client_reads_nothing_hold_the_upstream_back() {
    const CONNECTIONS: usize = 20;
    let upstream = Firehose::start().await;
    let process = start(&upstream, "600").await;
    let pid = process.child.id().unwrap();
    let idle = rss_kib(pid);

    // 20 connections of 10 streams each; the client grants each stream HTTP/2's initial
    // window (64 KiB) and never reads, so no window is ever given back.
    let (mut held, mut bodies) = (Vec::new(), Vec::new());
    for _ in 0..CONNECTIONS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let io = hyper_util::rt::TokioIo::new(socket.connect(process.addr).await.unwrap());
        let (mut sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(1 << 20)
            .handshake::<_, String>(io)
            .await
            .unwrap();
        held.push(tokio::spawn(connection));
        for _ in 0..STREAMS / CONNECTIONS {
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{}/v1/chat/completions", process.addr))
                .header(
                    "authorization",
                    format!("Bearer {}", jwt(common::PRODUCT, common::USER)),
                )
                .body(STREAM_CHAT.to_owned())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            bodies.push(response.into_body());
        }
    }
    wait_until("every stream has started", || {
        let streams = upstream.streams();
        streams.len() == STREAMS && streams.iter().all(|s| s.bytes.load(Ordering::SeqCst) > 0)
    })
    .await;
    let bound = written_bound();
    let mut samples = Vec::new();
    for pause in [Duration::from_secs(2), Duration::from_secs(3)] {
        tokio::time::sleep(pause).await;
        let (most, total) = upstream.written();
        samples.push((most, total, rss_kib(pid)));
    }
    eprintln!(
        "{STREAMS} stalled HTTP/2 streams: idle RSS {idle} KiB; (most written into one stream, total written, \
         RSS KiB) 2 s and 5 s after they started: {samples:?}; bound per stream {bound} bytes"
    );
    assert_eq!(upstream.ended(), 0, "no stream was cut");
    for (most, total, rss) in samples {
        assert!(
            most <= bound,
            "the upstream wrote {most} bytes into one stream (total {total})"
        );
        assert!(rss <= RSS_BOUND_KIB, "the proxy's RSS is {rss} KiB");
    }
    drop((bodies, held));
}
