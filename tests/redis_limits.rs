//! Limits shared through a real `redis-server` over HTTP: one combined limit for every
//! instance, exact under concurrency, keys with the prefix, a hash tag and a TTL, and
//! memory decisions while Redis is absent, down, then back.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api_key_server::day::DayZone;
use common::redis::{RedisCluster, RedisServer, free_port};
use common::{
    CHAT, CLIENT, HMAC_SECRET, MockUpstream, PRODUCT, ServerProcess, TestApp, base_env, error_of, hmac_sign, jwt,
    nonce, now, set,
};

const PATH: &str = "/v1/chat/completions";
/// Generous, so a loaded test machine does not turn a slow answer into a memory decision.
const TIMEOUT_MS: &str = "1000";

async fn chat_as(app: &TestApp, user: &str) -> reqwest::Response {
    app.client
        .post(app.url(PATH))
        .bearer_auth(jwt(PRODUCT, user))
        .body(CHAT)
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

async fn spawn(upstream: &MockUpstream, url: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![
        ("REDIS_URL", url),
        ("REDIS_TIMEOUT_MS", TIMEOUT_MS),
        ("RATE_LIMIT_CAPACITY", "3"),
        ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
    ];
    overrides.extend_from_slice(extra);
    TestApp::spawn(&upstream.url(), &overrides).await
}

/// Three admitted through `a`, then `b` refuses: one bucket for both instances.
async fn assert_one_combined_limit(a: &TestApp, b: &TestApp, user: &str) {
    for remaining in ["2", "1"] {
        let response = chat_as(a, user).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-remaining-requests"), remaining);
    }
    let third = chat_as(b, user).await;
    assert_eq!(third.status(), 200, "b sees a's two requests");
    assert_eq!(header(&third, "x-ratelimit-remaining-requests"), "0");
    for app in [a, b] {
        let refused = chat_as(app, user).await;
        assert_eq!(refused.status(), 429);
        assert_eq!(error_of(refused).await.1, "rate_limit_exceeded");
    }
}

/// Sends requests of fresh users until `done` holds (bounded: 10 s).
async fn until(app: &TestApp, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        let status = chat_as(app, &format!("probe-{n}")).await.status();
        assert!(!status.is_server_error(), "{status} while waiting for {what}");
        if done() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_instances_on_one_redis_enforce_one_combined_limit() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let a = spawn(&upstream, &redis.url(), &[]).await;
    let b = spawn(&upstream, &redis.url(), &[]).await;
    assert_one_combined_limit(&a, &b, "alice").await;
    // Other identities are untouched.
    assert_eq!(chat_as(&b, "bob").await.status(), 200);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_on_two_instances_admit_exactly_the_capacity() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let extra = [("RATE_LIMIT_CAPACITY", "10")];
    let a = spawn(&upstream, &redis.url(), &extra).await;
    let b = spawn(&upstream, &redis.url(), &extra).await;
    let token = jwt(PRODUCT, "alice");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            tokio::spawn(app.client.post(app.url(PATH)).bearer_auth(&token).body(CHAT).send())
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().unwrap().status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 40, "{statuses:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn keys_use_the_prefix_one_hash_tag_per_identity_and_expire() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let app = spawn(
        &upstream,
        &redis.url(),
        &[
            ("REDIS_PREFIX", "akstest"),
            ("RATE_LIMIT_REFILL_PER_SECOND", "0.5"),
            ("CLIENT_LIMITS", r#"{"desk":{"capacity":5}}"#),
        ],
    )
    .await;
    assert_eq!(chat_as(&app, "alice").await.status(), 200);
    let nonce = nonce();
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        "bob",
        Some(&nonce),
        now(),
        CHAT.as_bytes(),
    );
    let response = signed
        .apply(app.client.post(app.url(PATH)))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Ids are hex-encoded: "demo" 64656d6f, "alice" 616c696365, "bob" 626f62, "desk" 6465736b.
    // Day counters carry the UTC date (the default DAY_TIMEZONE) Redis's clock was in.
    let mut keys = redis.keys();
    keys.sort();
    let date = keys
        .iter()
        .find_map(|k| k.strip_prefix("akstest:{c:x6465736b}:day:"))
        .unwrap_or_else(|| panic!("no day key in {keys:?}"))
        .to_owned();
    assert!(utc_dates_around_now().contains(&date), "day key of {date}");
    let nonce_key = format!("akstest:{{c:x6465736b}}:nonce:x{}", hex::encode(&nonce));
    let mut expected = vec![
        "akstest:{c:x6465736b}:bucket".to_owned(),
        format!("akstest:{{c:x6465736b}}:day:{date}"),
        nonce_key.clone(),
        "akstest:{p:x64656d6f:u:x616c696365}:bucket".to_owned(),
        format!("akstest:{{p:x64656d6f:u:x616c696365}}:day:{date}"),
        "akstest:{p:x64656d6f:u:x626f62}:bucket".to_owned(),
        format!("akstest:{{p:x64656d6f:u:x626f62}}:day:{date}"),
    ];
    expected.sort();
    assert_eq!(keys, expected);

    let ttl = |key: &str| -> i64 { redis.cli(&["TTL", key]).parse().unwrap() };
    // The bucket lives until it would be full again: one token at 0.5/s is 2 s (+1 s margin).
    let bucket = ttl("akstest:{p:x64656d6f:u:x616c696365}:bucket");
    assert!((1..=3).contains(&bucket), "bucket TTL {bucket}");
    // The day counter lives until the next UTC midnight plus a margin.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let midnight = i64::try_from(86_400 - now % 86_400).unwrap();
    let day = ttl(&format!("akstest:{{p:x64656d6f:u:x616c696365}}:day:{date}"));
    assert!(
        day > midnight && day <= midnight + 3_600 + 2,
        "day TTL {day}, midnight in {midnight}"
    );
    // The nonce lives at least twice the clock tolerance.
    let nonce_ttl = ttl(&nonce_key);
    assert!(nonce_ttl > 0, "nonce TTL {nonce_ttl}");
    app.shutdown().await;
}

#[tokio::test]
async fn the_daily_quota_is_shared_and_refuses_until_utc_midnight() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let extra = [("RATE_LIMIT_CAPACITY", "100"), ("DAILY_QUOTA", "2")];
    let a = spawn(&upstream, &redis.url(), &extra).await;
    let b = spawn(&upstream, &redis.url(), &extra).await;
    assert_eq!(chat_as(&a, "alice").await.status(), 200);
    assert_eq!(chat_as(&b, "alice").await.status(), 200);
    let refused = chat_as(&a, "alice").await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(
        retry_after.abs_diff(86_400 - now % 86_400) <= 2,
        "Retry-After {retry_after}"
    );
    assert_eq!(error_of(refused).await.1, "daily_quota_exceeded");
    a.shutdown().await;
    b.shutdown().await;
}

/// The UTC dates of the moments a few seconds either side of now: a decision made at a
/// midnight may count on either day.
fn utc_dates_around_now() -> Vec<String> {
    dates_around_now(0)
}

/// As [`utc_dates_around_now`], in a zone `offset` seconds east of UTC with no DST.
fn dates_around_now(offset: i64) -> Vec<String> {
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap();
    [-5, 5]
        .iter()
        .map(|skew| DayZone::utc().day_at(now + offset + skew).key())
        .collect()
}

#[tokio::test]
async fn with_day_timezone_tokyo_the_redis_day_key_and_retry_after_follow_tokyo() {
    const TOKYO: i64 = 9 * 3600; // Asia/Tokyo: UTC+9, no DST.
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let extra = [
        ("REDIS_PREFIX", "akstest"),
        ("RATE_LIMIT_CAPACITY", "100"),
        ("DAILY_QUOTA", "1"),
        ("DAY_TIMEZONE", "Asia/Tokyo"),
    ];
    let app = spawn(&upstream, &redis.url(), &extra).await;
    assert_eq!(chat_as(&app, "alice").await.status(), 200);
    let refused = chat_as(&app, "alice").await;
    assert_eq!(refused.status(), 429);
    let retry_after: i64 = header(&refused, "retry-after").parse().unwrap();
    assert_eq!(error_of(refused).await.1, "daily_quota_exceeded");

    // The counter's key carries the date in Tokyo (UTC+9 with no DST, computed here
    // independently of the server's zone arithmetic).
    let prefix = "akstest:{p:x64656d6f:u:x616c696365}:day:";
    let keys = redis.keys();
    let date = keys
        .iter()
        .find_map(|k| k.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no day key in {keys:?}"));
    assert!(dates_around_now(TOKYO).iter().any(|d| d == date), "day key of {date}");
    assert_eq!(redis.cli(&["GET", &format!("{prefix}{date}")]), "1");

    // Retry-After counts to Tokyo's midnight (15:00 UTC), not UTC's: they are 9 or 15
    // hours apart, far beyond the tolerance for the test's and Redis's clocks.
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap();
    let to_midnight = 86_400 - (now + TOKYO) % 86_400;
    // Distance on the day's circle: a decision at midnight may see either side of it.
    let apart = |a: i64, b: i64| {
        let d = (a - b).rem_euclid(86_400);
        d.min(86_400 - d)
    };
    assert!(
        apart(retry_after, to_midnight) <= 5,
        "Retry-After {retry_after}, Tokyo's midnight in {to_midnight}"
    );
    // The key lives until that midnight plus the margin.
    let ttl: i64 = redis.cli(&["TTL", &format!("{prefix}{date}")]).parse().unwrap();
    assert!(
        apart(ttl - 3_600, to_midnight) <= 5,
        "TTL {ttl}, Tokyo's midnight in {to_midnight}"
    );
    app.shutdown().await;
}

/// Midnight seen from instances whose clocks differ from Redis's: the instance sends two
/// consecutive days and their boundary from its own clock, and the script counts on the
/// one Redis's `TIME` is in, with `Retry-After` to that day's end on Redis's clock.
#[test]
fn at_midnight_the_day_that_counts_is_the_one_on_redis_clock() {
    let redis = RedisServer::start();
    let script = include_str!("../src/limit/bucket.lua");
    let redis_now = || -> i64 { redis.cli(&["TIME"]).lines().next().unwrap().parse().unwrap() };
    // capacity 100, refill 100/s, quota 1; a call returns outcome, remaining, reset, retry.
    let decide = |user: &str, boundary: i64, late_end: i64| -> Vec<i64> {
        let (bucket, early, late) = (
            format!("{{{user}}}:b"),
            format!("{{{user}}}:early"),
            format!("{{{user}}}:late"),
        );
        let (boundary, late_end) = (boundary.to_string(), late_end.to_string());
        let args = [
            "EVAL", script, "3", &bucket, &early, &late, "100", "100", "1", &boundary, &late_end,
        ];
        redis.cli(&args).lines().map(|l| l.parse().unwrap()).collect()
    };
    let count = |user: &str, day: &str| redis.cli(&["GET", &format!("{{{user}}}:{day}")]);

    // An instance 30 s fast, already past its midnight: Redis's day has not ended, so the
    // request counts on the earlier day, whose end is 30 s away on Redis's clock.
    let t = redis_now();
    assert_eq!(decide("fast", t + 30, t + 30 + 86_400)[0], 0);
    assert_eq!(
        (count("fast", "early").as_str(), count("fast", "late").as_str()),
        ("1", "")
    );
    let refused = decide("fast", t + 30, t + 30 + 86_400);
    assert_eq!(refused[0], 2, "quota exceeded");
    assert!((25_000..=30_000).contains(&refused[3]), "retry {} ms", refused[3]);

    // An instance 30 s slow, still before its midnight: Redis's next day has started, so
    // the request counts on the later day, to the later day's end.
    let t = redis_now();
    assert_eq!(decide("slow", t - 30, t + 3_600)[0], 0);
    assert_eq!(
        (count("slow", "early").as_str(), count("slow", "late").as_str()),
        ("", "1")
    );
    let refused = decide("slow", t - 30, t + 3_600);
    assert_eq!(refused[0], 2, "quota exceeded");
    assert!((3_595_000..=3_600_000).contains(&refused[3]), "retry {} ms", refused[3]);
    // The counter expires an hour after its day ends, on Redis's clock.
    let ttl: i64 = redis.cli(&["TTL", "{slow}:late"]).parse().unwrap();
    assert!((7_190..=7_200).contains(&ttl), "TTL {ttl}");
}

#[tokio::test]
async fn redis_killed_mid_traffic_falls_back_to_memory_and_is_used_again_once_back() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let app = spawn(&upstream, &redis.url(), &[]).await;
    assert_eq!(chat_as(&app, "alice").await.status(), 200);
    assert!(!redis.keys().is_empty(), "Redis decides while it is up");

    redis.kill();
    // Memory decides: never a 5xx, and the limit still holds (a fresh bucket of 3).
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(chat_as(&app, "carol").await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);

    redis.restart();
    assert!(redis.keys().is_empty(), "a restarted Redis starts empty");
    until(&app, "limits back in Redis", || !redis.keys().is_empty()).await;
    app.shutdown().await;
}

#[tokio::test]
async fn redis_absent_at_startup_neither_delays_it_nor_fails_requests() {
    let upstream = MockUpstream::openai().await;
    let url = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let app = spawn(&upstream, &url, &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "startup took {:?}",
        started.elapsed()
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat_as(&app, "alice").await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429], "memory limits apply");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "requests waited: {:?}",
        started.elapsed()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_redis_cluster_shares_limits_between_two_instances() {
    let cluster = RedisCluster::start();
    let upstream = MockUpstream::openai().await;
    let extra = [("REDIS_CLUSTER", "true")];
    let a = spawn(&upstream, &cluster.url(), &extra).await;
    let b = spawn(&upstream, &cluster.url(), &extra).await;
    assert_one_combined_limit(&a, &b, "alice").await;
    // Identities spread over the nodes, each decision within one slot.
    for n in 0..20 {
        assert_eq!(chat_as(&a, &format!("user-{n}")).await.status(), 200);
        assert_eq!(chat_as(&b, &format!("user-{n}")).await.status(), 200);
    }
    let keys = cluster.keys();
    assert_eq!(keys.len(), 2 * 21, "{keys:?}");
    assert!(cluster.nodes.iter().filter(|n| !n.keys().is_empty()).count() >= 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn tls_redis_with_a_private_ca_is_used() {
    let redis = RedisServer::start_tls();
    let ca = redis.tls.as_ref().unwrap().ca_pem();
    let upstream = MockUpstream::openai().await;
    let extra = [("REDIS_CA_CERT", ca.as_str())];
    let a = spawn(&upstream, &redis.url(), &extra).await;
    let b = spawn(&upstream, &redis.url(), &extra).await;
    assert!(redis.url().starts_with("rediss://"));
    // Shared only if both verified the server with the CA and decided in Redis.
    assert_one_combined_limit(&a, &b, "alice").await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_password_url_works_and_outages_are_logged_once_without_the_password() {
    const PASSWORD: &str = "hunter2-redis-password";
    let mut redis = RedisServer::start_with_password(PASSWORD);
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    for (name, value) in [
        ("REDIS_URL", redis.url().as_str()),
        ("REDIS_TIMEOUT_MS", TIMEOUT_MS),
        ("RATE_LIMIT_CAPACITY", "3"),
        ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
    ] {
        set(&mut env, name, value);
    }
    let server = ServerProcess::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let chat = |user: String| {
        client
            .post(server.url(PATH))
            .bearer_auth(jwt(PRODUCT, &user))
            .body(CHAT)
            .send()
    };
    assert_eq!(chat("alice".to_owned()).await.unwrap().status(), 200);
    assert_eq!(
        redis.keys().len(),
        2,
        "decided in Redis, authenticated with the password"
    );

    redis.kill();
    for n in 0..5 {
        let status = chat(format!("down-{n}")).await.unwrap().status();
        assert_eq!(status, 200, "memory decides while Redis is down");
    }
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        assert_eq!(chat(format!("back-{n}")).await.unwrap().status(), 200);
        if !redis.keys().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Redis not used again within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The log lines are written before the responses that follow them.
    let output = server.output();
    assert!(!output.contains(PASSWORD), "the Redis password was logged:\n{output}");
    let count = |needle: &str| output.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("Redis unavailable"), 1, "one warning on fallback:\n{output}");
    assert_eq!(count("Redis answers again"), 1, "one line when back:\n{output}");
    assert_eq!(
        count("Redis still unavailable"),
        0,
        "at most one error line a minute:\n{output}"
    );
}
