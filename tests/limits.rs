//! Rate limits and daily quotas over HTTP, decided in memory (no Redis configured).
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap
mod common;

use std::time::Duration;

use api_key_server::clock::ManualClock;
use common::{
    CHAT, CLIENT, HMAC_SECRET, MockUpstream, PRODUCT, TestApp, error_of, hmac_sign, jwt, jwt_claims, nonce, now,
};

const PATH: &str = "/v1/chat/completions";

async fn chat_as(app: &TestApp, product: &str, user: &str) -> reqwest::Response {
    app.client
        .post(app.url(PATH))
        .bearer_auth(jwt(product, user))
        .body(CHAT)
        .send()
        .await
        .unwrap()
}

/// A request signed by HMAC client `desk` on behalf of `user` of product `demo`.
async fn chat_signed(app: &TestApp, user: &str) -> reqwest::Response {
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        user,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    signed
        .apply(app.client.post(app.url(PATH)))
        .body(CHAT)
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_burst_past_capacity_gets_429_with_retry_after_and_the_bucket_headers() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("RATE_LIMIT_CAPACITY", "3"), ("RATE_LIMIT_REFILL_PER_SECOND", "0.5")],
    )
    .await;
    for (remaining, reset) in [("2", "2s"), ("1", "4s"), ("0", "6s")] {
        let response = chat_as(&app, PRODUCT, "alice").await;
        assert_eq!(response.status(), 200);
        // Ours, not the upstream's organisation limits (the mock sends 99999).
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&response, "x-ratelimit-remaining-requests"), remaining);
        assert_eq!(header(&response, "x-ratelimit-reset-requests"), reset);
    }
    let response = chat_as(&app, PRODUCT, "alice").await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "2");
    assert_eq!(header(&response, "x-should-retry"), "true");
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&response, "x-ratelimit-reset-requests"), "6s");
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("rate_limit_error", "rate_limit_exceeded")
    );
    assert_eq!(
        upstream.requests().len(),
        3,
        "a refused request never reaches the upstream"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_bucket_refills_at_its_rate() {
    let upstream = MockUpstream::openai().await;
    let clock = ManualClock::new();
    let app = TestApp::spawn_with_clock(
        &upstream.url(),
        &[("RATE_LIMIT_CAPACITY", "2"), ("RATE_LIMIT_REFILL_PER_SECOND", "20")],
        clock.clock(),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 200);
    }
    let refused = chat_as(&app, PRODUCT, "alice").await;
    assert_eq!(refused.status(), 429);
    // 50 ms until a token: whole seconds, at least 1.
    assert_eq!(header(&refused, "retry-after"), "1");
    clock.advance(Duration::from_millis(40));
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 429, "0.8 token");
    clock.advance(Duration::from_millis(20));
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 200);
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 429);
    app.shutdown().await;
}

#[tokio::test]
async fn the_daily_quota_refuses_until_utc_midnight() {
    let upstream = MockUpstream::openai().await;
    let clock = ManualClock::new();
    let app = TestApp::spawn_with_clock(&upstream.url(), &[("DAILY_QUOTA", "2")], clock.clock()).await;
    // Tokens issued at the clock's time, which the test moves across midnight.
    let chat_now = || {
        let now = clock.clock().wall().as_secs();
        let token = jwt_claims(&serde_json::json!({"sub": "alice", "product": PRODUCT, "iat": now, "exp": now + 300}));
        app.client.post(app.url(PATH)).bearer_auth(token).body(CHAT).send()
    };
    for _ in 0..2 {
        assert_eq!(chat_now().await.unwrap().status(), 200);
    }
    let response = chat_now().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-should-retry"), "false");
    let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
    let to_midnight = 86_400 - clock.clock().wall().as_secs() % 86_400;
    assert_eq!(retry_after, to_midnight, "Retry-After {retry_after}");
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("rate_limit_error", "daily_quota_exceeded")
    );
    // One second before midnight: still refused; at midnight the quota starts again.
    clock.advance(Duration::from_secs(to_midnight - 1));
    assert_eq!(chat_now().await.unwrap().status(), 429);
    clock.advance(Duration::from_secs(1));
    assert_eq!(chat_now().await.unwrap().status(), 200);
    app.shutdown().await;
}

/// 2026-12-07T14:00:00Z: 23:00 in Tokyo, an hour before its midnight (15:00 UTC).
const TOKYO_23H: u64 = 1_796_652_000;

#[tokio::test]
async fn with_day_timezone_tokyo_the_daily_quota_starts_again_at_15_00_utc() {
    let upstream = MockUpstream::openai().await;
    let clock = ManualClock::at(Duration::from_secs(TOKYO_23H));
    let app = TestApp::spawn_with_clock(
        &upstream.url(),
        &[("DAILY_QUOTA", "1"), ("DAY_TIMEZONE", "Asia/Tokyo")],
        clock.clock(),
    )
    .await;
    let chat_now = |user: &'static str| {
        let now = clock.clock().wall().as_secs();
        let token = jwt_claims(&serde_json::json!({"sub": user, "product": PRODUCT, "iat": now, "exp": now + 300}));
        app.client.post(app.url(PATH)).bearer_auth(token).body(CHAT).send()
    };
    assert_eq!(chat_now("alice").await.unwrap().status(), 200);
    let refused = chat_now("alice").await.unwrap();
    assert_eq!(refused.status(), 429);
    // To Tokyo's midnight, not UTC's (ten hours away).
    assert_eq!(header(&refused, "retry-after"), "3600");
    assert_eq!(error_of(refused).await.1, "daily_quota_exceeded");
    // bob uses his quota up at 14:59:59 UTC.
    clock.advance(Duration::from_secs(3599));
    assert_eq!(chat_now("bob").await.unwrap().status(), 200);
    let refused = chat_now("bob").await.unwrap();
    assert_eq!(header(&refused, "retry-after"), "1");
    // 15:00:00 UTC: a new day in Tokyo for both.
    clock.advance(Duration::from_secs(1));
    assert_eq!(chat_now("bob").await.unwrap().status(), 200);
    assert_eq!(chat_now("alice").await.unwrap().status(), 200);
    // That day lasts until 15:00 UTC tomorrow, through UTC's midnight.
    clock.advance(Duration::from_secs(9 * 3600 + 1));
    let refused = chat_now("alice").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), (15 * 3600 - 1).to_string());
    app.shutdown().await;
}

#[tokio::test]
async fn when_bucket_and_quota_both_refuse_the_quota_answers() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[
            ("RATE_LIMIT_CAPACITY", "1"),
            ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
            ("DAILY_QUOTA", "1"),
        ],
    )
    .await;
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 200);
    let (_, code, _) = error_of(chat_as(&app, PRODUCT, "alice").await).await;
    assert_eq!(code, "daily_quota_exceeded");
    app.shutdown().await;
}

#[tokio::test]
async fn identities_have_their_own_limits() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("RATE_LIMIT_CAPACITY", "1"), ("RATE_LIMIT_REFILL_PER_SECOND", "0.001")],
    )
    .await;
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 200);
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 429);
    assert_eq!(chat_as(&app, PRODUCT, "bob").await.status(), 200);
    assert_eq!(chat_as(&app, "other", "alice").await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn product_limits_override_the_defaults_for_that_product() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[
            ("RATE_LIMIT_CAPACITY", "3"),
            ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
            ("PRODUCT_LIMITS", r#"{"other":{"capacity":1}}"#),
        ],
    )
    .await;
    assert_eq!(chat_as(&app, "other", "alice").await.status(), 200);
    let refused = chat_as(&app, "other", "alice").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "1");
    for _ in 0..3 {
        assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 200);
    }
    assert_eq!(chat_as(&app, PRODUCT, "alice").await.status(), 429);
    app.shutdown().await;
}

#[tokio::test]
async fn client_limits_bound_all_users_of_an_hmac_client_and_count_requests_the_user_refuses() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[
            ("RATE_LIMIT_CAPACITY", "1"),
            ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
            ("CLIENT_LIMITS", r#"{"desk":{"capacity":4,"refill_per_second":0.001}}"#),
        ],
    )
    .await;
    let first = chat_signed(&app, "alice").await;
    assert_eq!(first.status(), 200);
    // The (product, user) bucket's headers on success.
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), "1");
    // alice's own bucket refuses; the client's unit is spent all the same.
    let refused = chat_signed(&app, "alice").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "1");
    assert_eq!(chat_signed(&app, "bob").await.status(), 200);
    assert_eq!(chat_signed(&app, "carol").await.status(), 200);
    // Four units spent: the client's bucket refuses dave, with its own figures.
    let refused = chat_signed(&app, "dave").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-limit-requests"), "4");
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(error_of(refused).await.1, "rate_limit_exceeded");
    // dave's own bucket was not consulted: with a JWT (no client) dave is admitted.
    assert_eq!(chat_as(&app, PRODUCT, "dave").await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_admit_exactly_the_capacity() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("RATE_LIMIT_CAPACITY", "10"), ("RATE_LIMIT_REFILL_PER_SECOND", "0.001")],
    )
    .await;
    let statuses = burst(&app, 50).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 40, "{statuses:?}");
    app.shutdown().await;
}

/// `n` simultaneous requests of (demo, alice); their statuses.
async fn burst(app: &TestApp, n: usize) -> Vec<u16> {
    let token = jwt(PRODUCT, "alice");
    let requests = (0..n).map(|_| app.client.post(app.url(PATH)).bearer_auth(&token).body(CHAT).send());
    futures_join_all(requests).await
}

async fn futures_join_all<F>(requests: impl Iterator<Item = F>) -> Vec<u16>
where
    F: Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
{
    let tasks: Vec<_> = requests.map(tokio::spawn).collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().unwrap().status().as_u16());
    }
    statuses
}
