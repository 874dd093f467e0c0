//! Faults in the dependencies, against the real binary: Redis killed and restarted
//! repeatedly under load, and an upstream that refuses, resets, stalls (before the
//! headers and mid-stream) and answers garbage.
//!
//! Asserted: no 5xx other than the contract's 502s, no panic in the logs, the process
//! alive and serving, its open file descriptors and memory back near their baseline, and
//! the limit overshoot during Redis outages bounded (and printed).
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // scenario tests read best in one piece

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{CHAT, MockUpstream, ServerProcess, base_env, jwt, rss_kib, set};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Waits (bounded) until the process's fds are back within `slack` of `baseline`.
async fn fds_settle(pid: u32, baseline: usize, slack: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = open_fds(pid);
        if now <= baseline + slack || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_no_panic(process: &ServerProcess) {
    let output = process.output();
    assert!(!output.contains("panicked"), "a panic was logged");
    assert!(!output.contains("internal_error"), "a defect (500) was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fails_no_request_and_bounds_the_overshoot() {
    const CAPACITY: u32 = 20;
    const REFILL: f64 = 2.0;
    const OUTAGES: usize = 5;
    let upstream = MockUpstream::openai().await;
    let mut redis = RedisServer::start();
    let mut env = base_env(&upstream.url());
    set(&mut env, "REDIS_URL", &redis.url());
    set(
        &mut env,
        "PRODUCT_LIMITS",
        &format!(r#"{{"other": {{"capacity": {CAPACITY}, "refill_per_second": {REFILL}}}}}"#),
    );
    let process = ServerProcess::start(&env).await;
    let pid = process.child.id().unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // Warm up: pooled connections to Redis and the upstream exist before the baseline.
    for _ in 0..20 {
        let r = client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(jwt("demo", "warm"))
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    // Load: four clients, two on unlimited users and two hammering one limited identity
    // (other, alice). The Redis outages happen meanwhile.
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default()); // ok, 429, 5xx, errors
    let admitted_limited = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut load = Vec::new();
    for worker in 0..4 {
        let (client, url, counts, admitted, stop) = (
            client.clone(),
            process.url("/v1/chat/completions"),
            counts.clone(),
            admitted_limited.clone(),
            stop.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (product, user) = if worker < 2 {
                    ("demo", format!("user-{worker}-{n}"))
                } else {
                    ("other", "alice".to_owned())
                };
                let response = client
                    .post(&url)
                    .bearer_auth(jwt(product, &user))
                    .body(CHAT)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let slot = match response.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        if worker >= 2 {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        0
                    }
                    Ok(429) => 1,
                    Ok(s) if s >= 500 => 2,
                    _ => 3,
                };
                counts[slot].fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for _ in 0..OUTAGES {
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis.restart();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The load's keep-alive connections to the proxy go away with its client.
    drop(client);
    let [ok, limited, server_errors, errors] = counts.each_ref().map(|c| c.load(Ordering::SeqCst));
    let admitted = admitted_limited.load(Ordering::SeqCst);
    #[allow(clippy::cast_precision_loss)]
    let allowed = f64::from(CAPACITY) + REFILL * elapsed;
    #[allow(clippy::cast_precision_loss)]
    let overshoot = (admitted as f64 - allowed).max(0.0) / allowed * 100.0;
    let fds_after = fds_settle(pid, fds_before, 2).await;
    let rss_after = rss_kib(pid);
    eprintln!(
        "redis faults: {OUTAGES} kills+restarts in {elapsed:.1}s; {} requests: {ok} ok, {limited} 429, \
         {server_errors} 5xx, {errors} transport errors; limited identity admitted {admitted} where the \
         bucket allows {allowed:.0} (overshoot {overshoot:.0}%); fds {fds_before} -> {fds_after}; \
         RSS {rss_before} KiB -> {rss_after} KiB",
        ok + limited + server_errors + errors
    );
    assert_eq!(server_errors + errors, 0, "no request failed");
    assert!(ok > 100, "load ran ({ok} ok)");
    // Each outage can start a fresh memory bucket, and each restart a fresh (empty) Redis
    // one: at most one capacity per switch on top of what the bucket allows.
    #[allow(clippy::cast_precision_loss)]
    let bound = allowed + f64::from(CAPACITY) * (2.0 * OUTAGES as f64 + 1.0);
    #[allow(clippy::cast_precision_loss)]
    let within = admitted as f64 <= bound;
    assert!(within, "admitted {admitted}, bound {bound:.0}");
    assert!(fds_after <= fds_before + 2, "fds {fds_before} -> {fds_after}");
    assert!(
        rss_after <= rss_before * 3 / 2 + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    assert_no_panic(&process);
}

/// A raw upstream whose behaviour the request body picks (`CASE-...`).
async fn faulty_upstream() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                // Read until the whole (small) body is in: it ends with `}`.
                while !request.ends_with(b"}") {
                    match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if text.contains("CASE-RST") {
                    // RST instead of FIN.
                    let _ = socket.set_zero_linger();
                } else if text.contains("CASE-GARBAGE") {
                    let _ = socket.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n\x7f").await;
                } else if text.contains("CASE-STALL-HEADERS") {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } else if text.contains("CASE-STALL-BODY") {
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(b"6\r\ndata: \r\n").await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } else if text.contains("CASE-RESET-BODY") {
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(b"6\r\ndata: \r\n").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = socket.set_zero_linger();
                } else if text.contains("CASE-BAD-CHUNK") {
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(b"zz\r\nnot a chunk\r\n").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(socket);
            });
        }
    });
    addr
}

fn case_body(case: &str) -> String {
    format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{case}"}}],"max_tokens":5}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_gets_the_contract_502s_and_leaks_nothing() {
    const ROUNDS: usize = 10;
    let faulty = faulty_upstream().await;
    let refusing = common::closed_port().await;
    let mut env = base_env(&format!("http://{faulty}/v1/chat/completions"));
    set(&mut env, "UPSTREAM_TIMEOUT_SECONDS", "1");
    set(&mut env, "UPSTREAM_IDLE_TIMEOUT_SECONDS", "1");
    let process = ServerProcess::start(&env).await;
    let mut refusing_env: HashMap<String, String> = env.clone();
    set(
        &mut refusing_env,
        "OPENAI_BASE_URL",
        &format!("http://127.0.0.1:{refusing}/v1/chat/completions"),
    );
    let refusing_process = ServerProcess::start(&refusing_env).await;
    let pid = process.child.id().unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let health = client.get(process.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    // (case, status, code or "cut" for a 200 whose body must end without a clean end)
    let cases: [(&str, u16, &str); 6] = [
        ("CASE-RST", 502, "upstream_unreachable"),
        ("CASE-GARBAGE", 502, "upstream_unreachable"),
        ("CASE-STALL-HEADERS", 502, "upstream_timeout"),
        ("CASE-STALL-BODY", 200, "cut"),
        ("CASE-RESET-BODY", 200, "cut"),
        ("CASE-BAD-CHUNK", 200, "cut"),
    ];
    let mut tasks = Vec::new();
    for round in 0..ROUNDS {
        for (case, status, code) in cases {
            let (client, url) = (client.clone(), process.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                let response = client
                    .post(url)
                    .bearer_auth(jwt("demo", &format!("u{round}")))
                    .body(case_body(case))
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await;
                let response = match response {
                    Ok(response) => response,
                    // Failed before the proxy's own headers went out: the client sees the
                    // response cut before its head, which is still no clean end.
                    Err(error) if code == "cut" && !error.is_timeout() => return,
                    Err(error) => panic!("{case}: {error}"),
                };
                assert_eq!(response.status().as_u16(), status, "{case}");
                if code == "cut" {
                    let mut response = response;
                    let mut outcome = Ok(());
                    loop {
                        match response.chunk().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    assert!(outcome.is_err(), "{case}: the body is cut, not ended cleanly");
                } else {
                    let (_, got, _) = common::error_of(response).await;
                    assert_eq!(got, code, "{case}");
                }
            }));
        }
    }
    for _ in 0..ROUNDS {
        let (client, url) = (client.clone(), refusing_process.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(jwt("demo", "r"))
                .body(CHAT)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 502, "refused");
            let (_, code, _) = common::error_of(response).await;
            assert_eq!(code, "upstream_unreachable");
        }));
    }
    let injected = tasks.len();
    for task in tasks {
        task.await.unwrap();
    }
    // The test's keep-alive connections to the proxy go away with its client.
    drop(client);
    let fds_after = fds_settle(pid, fds_before, 2).await;
    let rss_after = rss_kib(pid);
    eprintln!(
        "upstream faults: {injected} injected (refuse, reset, garbage, stall before headers, stall/reset/bad \
         chunk mid-stream), all answered as the contract says; fds {fds_before} -> {fds_after}; RSS \
         {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(fds_after <= fds_before + 2, "fds {fds_before} -> {fds_after}");
    assert!(
        rss_after <= rss_before * 3 / 2 + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    let health = reqwest::get(process.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200, "still serving");
    assert_no_panic(&process);
    assert_no_panic(&refusing_process);
    let output = process.output();
    assert!(
        output.contains("upstream_aborted"),
        "mid-stream failures are logged as upstream_aborted"
    );
}

/// Sends one HMAC chat request signed now with `nonce`; returns the status and error code.
async fn signed_chat(client: &reqwest::Client, process: &ServerProcess, nonce: &str) -> (u16, String) {
    let signed = common::hmac_sign(
        common::HMAC_SECRET,
        "POST",
        "/v1/chat/completions",
        common::CLIENT,
        common::PRODUCT,
        common::USER,
        Some(nonce),
        common::now(),
        CHAT.as_bytes(),
    );
    let request = client.post(process.url("/v1/chat/completions")).body(CHAT);
    let response = signed.apply(request).send().await.unwrap();
    let status = response.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    let (_, code, _) = common::error_of(response).await;
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_accepted_from_memory_during_an_outage_stays_refused_once_redis_is_back() {
    let upstream = MockUpstream::openai().await;
    let mut redis = RedisServer::start();
    let mut env = base_env(&upstream.url());
    set(&mut env, "REDIS_URL", &redis.url());
    set(&mut env, "REDIS_TIMEOUT_MS", "50");
    let process = ServerProcess::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // Through Redis first: the nonce is a key there.
    assert_eq!(signed_chat(&client, &process, &common::nonce()).await.0, 200);
    assert!(redis.keys().iter().any(|k| k.contains(":nonce:")), "nonces go to Redis");

    redis.kill();
    let during = common::nonce();
    assert_eq!(signed_chat(&client, &process, &during).await.0, 200);
    assert_eq!(
        signed_chat(&client, &process, &during).await,
        (401, "replayed_nonce".to_owned()),
        "memory refuses the replay during the outage"
    );

    // Back, and empty. Fresh nonces until one lands in Redis: then Redis decides again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis.keys().iter().any(|k| k.contains(":nonce:")) {
        assert!(Instant::now() < deadline, "the proxy uses Redis again within 20 s");
        assert_eq!(signed_chat(&client, &process, &common::nonce()).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        signed_chat(&client, &process, &during).await,
        (401, "replayed_nonce".to_owned()),
        "the nonce accepted from memory is still refused with Redis back"
    );
    // Redis recorded that attempt too, so it stays refused however it is asked.
    assert_eq!(signed_chat(&client, &process, &during).await.0, 401);
    assert_no_panic(&process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_accepted_from_memory_during_an_outage_is_written_to_redis_for_the_other_instances() {
    let upstream = MockUpstream::openai().await;
    let mut redis = RedisServer::start();
    let mut env = base_env(&upstream.url());
    set(&mut env, "REDIS_URL", &redis.url());
    set(&mut env, "REDIS_TIMEOUT_MS", "50");
    let first = ServerProcess::start(&env).await;
    let second = ServerProcess::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    redis.kill();
    let during = common::nonce();
    assert_eq!(signed_chat(&client, &first, &during).await.0, 200);
    redis.restart();
    // The first instance writes what it accepted from memory once Redis answers it again.
    let key_part = hex::encode(&during);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis.keys().iter().any(|k| k.contains(&key_part)) {
        assert!(Instant::now() < deadline, "the nonce reaches Redis within 20 s");
        assert_eq!(signed_chat(&client, &first, &common::nonce()).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Until the second instance's own claims reach Redis again (its breaker may be open).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = common::nonce();
        assert_eq!(signed_chat(&client, &second, &probe).await.0, 200);
        if redis.keys().iter().any(|k| k.contains(&hex::encode(&probe))) {
            break;
        }
        assert!(Instant::now() < deadline, "the second instance uses Redis within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The second instance never saw the nonce: Redis refuses it.
    assert_eq!(
        signed_chat(&client, &second, &during).await,
        (401, "replayed_nonce".to_owned())
    );
    assert_no_panic(&first);
    assert_no_panic(&second);
}
