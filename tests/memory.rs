//! Memory bounds, against the real binary: a flood of distinct users (limiter entries)
//! and of distinct nonces (replay memory) keeps the process's resident memory under a
//! stated bound, and a full nonce store refuses (503) instead of growing or accepting
//! unchecked.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{CHAT, CLIENT, HMAC_SECRET, MockUpstream, ServerProcess, base_env, hmac_sign, now, rss_kib, set};

/// Resident memory growth allowed for each flood below. The limiter's hard cap is about
/// 30 MB and the nonce store's is set small here; allocator slack comes on top.
const BOUND_KIB: u64 = 64 * 1024;
const CONCURRENCY: usize = 16;

/// Sends `total` HMAC-signed chat requests, each for a new user and a new nonce
/// (`with_nonce`), `CONCURRENCY` at a time; returns how many got each status.
async fn flood(process: &ServerProcess, total: usize, with_nonce: bool) -> Vec<(u16, usize)> {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, next, url) = (client.clone(), next.clone(), process.url("/v1/chat/completions"));
        workers.push(tokio::spawn(async move {
            let mut statuses = std::collections::HashMap::<u16, usize>::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return statuses;
                }
                let user = format!("flood-user-{i:08}");
                let nonce = with_nonce.then(|| format!("flood-nonce-{i:012}"));
                let signed = hmac_sign(
                    HMAC_SECRET,
                    "POST",
                    "/v1/chat/completions",
                    CLIENT,
                    "demo",
                    &user,
                    nonce.as_deref(),
                    now(),
                    CHAT.as_bytes(),
                );
                let response = signed.apply(client.post(&url).body(CHAT)).send().await.unwrap();
                *statuses.entry(response.status().as_u16()).or_default() += 1;
            }
        }));
    }
    let mut total_statuses = std::collections::BTreeMap::<u16, usize>::new();
    for worker in workers {
        for (status, n) in worker.await.unwrap() {
            *total_statuses.entry(status).or_default() += n;
        }
    }
    total_statuses.into_iter().collect()
}

async fn start(overrides: &[(&str, &str)]) -> (ServerProcess, MockUpstream) {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    for (k, v) in overrides {
        set(&mut env, k, v);
    }
    (ServerProcess::start(&env).await, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_users_stays_under_the_memory_bound() {
    const USERS: usize = 10_000;
    let (process, _upstream) = start(&[("HMAC_REQUIRE_NONCE", "false")]).await;
    let pid = process.child.id().unwrap();
    flood(&process, 200, false).await;
    let before = rss_kib(pid);
    let started = Instant::now();
    let statuses = flood(&process, USERS, false).await;
    let after = rss_kib(pid);
    eprintln!(
        "user flood: {USERS} distinct users in {:?}: {statuses:?}; RSS {before} KiB -> {after} KiB \
         ({} bytes per user)",
        started.elapsed(),
        (after.saturating_sub(before) * 1024) / USERS as u64
    );
    assert_eq!(statuses, vec![(200, USERS)]);
    assert!(after - before.min(after) < BOUND_KIB, "RSS grew {} KiB", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_nonces_fills_the_store_then_gets_503_without_growing() {
    const CAPACITY: usize = 5_000;
    const NONCES: usize = 12_000;
    let (process, _upstream) = start(&[("HMAC_NONCE_CAPACITY", &CAPACITY.to_string())]).await;
    let pid = process.child.id().unwrap();
    let before = rss_kib(pid);
    let statuses = flood(&process, NONCES, true).await;
    let after = rss_kib(pid);
    eprintln!(
        "nonce flood: {NONCES} distinct nonces, capacity {CAPACITY}: {statuses:?}; RSS {before} KiB -> {after} KiB"
    );
    let count = |s: u16| statuses.iter().find(|(status, _)| *status == s).map_or(0, |(_, n)| *n);
    assert_eq!(count(200), CAPACITY, "exactly the capacity is remembered and admitted");
    assert_eq!(
        count(503),
        NONCES - CAPACITY,
        "the rest is refused, never accepted unchecked"
    );
    assert!(after - before.min(after) < BOUND_KIB, "RSS grew {} KiB", after - before);
}
