//! Budgets end to end (contract: "Budgets (spend control)"): the real app on loopback, a
//! mock upstream that reports usage over real HTTP, and a real `redis-server` where the
//! contract speaks of Redis. Amounts are integers of 1e-9 USD in the assertions, turned
//! into the headers' decimal text only at the edge.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use api_key_server::clock::ManualClock;
use axum::Router;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use common::redis::RedisServer;
use common::{CHAT, MockUpstream, TestApp, jwt, jwt_claims};
use http::HeaderValue;
use tokio::sync::watch;

/// Prices: 1 USD per 1M input tokens (1,000 nanos a token), 2 USD per 1M output tokens,
/// cached input 0.5.
const PRICES: &str = r#"{"gpt-4o":{"input":1,"output":2,"cached_input":0.5},"gpt-4o-mini":{"input":1,"output":2},"text-embedding-3-small":{"input":0.02},"text-embedding-3-large":{"input":0.13}}"#;
const INPUT_NANOS: u64 = 1_000;
const OUTPUT_NANOS: u64 = 2_000;
const CACHED_NANOS: u64 = 500;

/// What the mock upstream reports for every answer: 10 input tokens (4 cached), 5 output.
const USAGE: &str =
    r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4}}"#;
const USAGE_COST: u64 = 6 * INPUT_NANOS + 4 * CACHED_NANOS + 5 * OUTPUT_NANOS;

/// The reservation of a non-streamed chat body that sets `max_tokens`: its bytes as
/// input tokens, the limit as output tokens.
fn reservation(body: &str, max_tokens: u64) -> u64 {
    body.len() as u64 * INPUT_NANOS + max_tokens * OUTPUT_NANOS
}

fn usd(nanos: u64) -> String {
    let micros = nanos / 1_000;
    let (whole, frac) = (micros / 1_000_000, micros % 1_000_000);
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

/// A chat upstream that reports [`USAGE`]; streams carry a usage chunk when asked for
/// it; a body with `"user":"fail"` gets a 500; one with `"user":"hold"` waits until the
/// test opens the gate.
struct Upstream {
    mock: MockUpstream,
    gate: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Self {
        let (gate, opened) = watch::channel(false);
        let held: Arc<AtomicUsize> = Arc::default();
        let waiting = held.clone();
        let router = Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(move |body: Bytes| {
                    let mut opened = opened.clone();
                    let waiting = waiting.clone();
                    async move {
                        let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        match request["user"].as_str() {
                            Some("fail") => return json(500, r#"{"error":{"message":"boom","type":"server_error"}}"#),
                            Some("hold") => {
                                waiting.fetch_add(1, Ordering::SeqCst);
                                let _ = opened.wait_for(|open| *open).await;
                            }
                            _ => {}
                        }
                        if request["stream"] == true {
                            stream(request["stream_options"]["include_usage"] == true)
                        } else {
                            json(
                                200,
                                &format!(
                                    r#"{{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi"}},"finish_reason":"stop"}}],"usage":{USAGE}}}"#
                                ),
                            )
                        }
                    }
                }),
            )
            .route(
                "/v1/embeddings",
                axum::routing::post(|| async {
                    json(
                        200,
                        r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
                    )
                }),
            );
        Self {
            mock: MockUpstream::start(router).await,
            gate,
            held,
        }
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

fn json(status: u16, body: &str) -> Response {
    let mut response = Response::new(Body::from(body.to_owned()));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

const CHUNK: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;

fn stream(with_usage: bool) -> Response {
    let mut body = format!("{CHUNK}\n\n");
    if with_usage {
        body.push_str(r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":"#);
        body.push_str(USAGE);
        body.push_str("}\n\n");
    }
    body.push_str("data: [DONE]\n\n");
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/event-stream"));
    response
}

async fn app(upstream: &Upstream, overrides: &[(&str, &str)]) -> TestApp {
    let mut all = vec![("MODEL_PRICES", PRICES)];
    all.extend_from_slice(overrides);
    TestApp::spawn(&upstream.mock.url(), &all).await
}

async fn chat_as(app: &TestApp, user: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt(common::PRODUCT, user))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// A chat body for `user` (the mock upstream's switch) with `max_tokens`.
fn body_for(user: &str, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens},"user":"{user}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_settled_from_the_reported_usage_and_a_request_that_cannot_fit_is_refused() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[("DAILY_BUDGET_USD", "0.001")]).await;
    let budget = 1_000_000;

    let first = app.chat(CHAT).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-budget-limit-usd").as_deref(), Some("0.001"));
    assert_eq!(header(&first, "x-budget-remaining-usd").as_deref(), Some("0.001"));
    let _ = first.bytes().await.unwrap();

    // The first request cost its usage, not its reservation.
    let second = app.chat(CHAT).await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        header(&second, "x-budget-remaining-usd"),
        Some(usd(budget - USAGE_COST))
    );
    let _ = second.bytes().await.unwrap();

    // 2,048 output tokens cost 4.1e-3 USD at worst: more than is left.
    let big = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":2048}"#;
    assert!(reservation(big, 2048) > budget - 2 * USAGE_COST);
    let refused = app.chat(big).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-should-retry").as_deref(), Some("false"));
    let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=25 * 3600).contains(&retry_after), "{retry_after}");
    assert_eq!(
        header(&refused, "x-budget-remaining-usd"),
        Some(usd(budget - 2 * USAGE_COST))
    );
    assert_eq!(header(&refused, "x-budget-limit-usd").as_deref(), Some("0.001"));
    let (kind, code, _) = common::error_of(refused).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("insufficient_quota", "budget_exceeded")
    );
    assert_eq!(
        upstream.mock.requests().len(),
        2,
        "a refused request never goes upstream"
    );

    // Another user has a budget of their own.
    let other = chat_as(&app, "bob", CHAT).await;
    assert_eq!(other.status(), 200);
    assert_eq!(header(&other, "x-budget-remaining-usd").as_deref(), Some("0.001"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_admitted_only_while_their_reservations_fit() {
    let upstream = Upstream::start().await;
    let body = body_for("hold", 100);
    let each = reservation(&body, 100);
    // Room for three reservations, not four (amounts here are whole micro-USD).
    assert_eq!(each % 1_000, 0);
    let budget = 4 * each - 1_000;
    let budget_text = usd(budget);
    let app = Arc::new(app(&upstream, &[("DAILY_BUDGET_USD", &budget_text)]).await);

    let mut requests = Vec::new();
    for _ in 0..10 {
        let app = app.clone();
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            let response = chat_as(&app, common::USER, &body).await;
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }));
    }
    // The refused ones answer at once; the admitted ones wait at the upstream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.held.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "three requests reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upstream.open();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 7, "{statuses:?}");

    // Settled at their usage: the next one sees three usages spent.
    let after = chat_as(&app, common::USER, &body_for("x", 100)).await;
    assert_eq!(after.status(), 200);
    assert_eq!(
        header(&after, "x-budget-remaining-usd"),
        Some(usd(budget - 3 * USAGE_COST))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_costs_nothing() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[("DAILY_BUDGET_USD", "0.001")]).await;
    let failed = chat_as(&app, common::USER, &body_for("fail", 16)).await;
    assert_eq!(failed.status(), 500);
    assert_eq!(header(&failed, "x-budget-remaining-usd").as_deref(), Some("0.001"));
    let _ = failed.bytes().await.unwrap();
    let next = app.chat(CHAT).await;
    assert_eq!(header(&next, "x-budget-remaining-usd").as_deref(), Some("0.001"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_ask_for_usage_and_the_client_does_not_see_the_chunk_it_did_not_ask_for() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[("DAILY_BUDGET_USD", "0.001")]).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"stream":true}"#;
    let response = app.chat(body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.contains("\"Hi\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    let sent: serde_json::Value = serde_json::from_slice(&upstream.mock.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // Settled from the usage chunk.
    let next = app.chat(CHAT).await;
    assert_eq!(
        header(&next, "x-budget-remaining-usd"),
        Some(usd(1_000_000 - USAGE_COST))
    );
    let _ = next.bytes().await.unwrap();

    // A client that asked for usage gets it.
    let asked = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":16,"stream":true,"stream_options":{"include_usage":true}}"#;
    let text = app.chat(asked).await.text().await.unwrap();
    assert!(text.contains(r#""choices":[],"usage""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_product_and_client_budgets_refuse_with_their_own_scope() {
    let upstream = Upstream::start().await;
    let limits = r#"{"demo":{"product_daily_budget_usd":0.0001}}"#;
    let app = app(&upstream, &[("PRODUCT_LIMITS", limits), ("DAILY_BUDGET_USD", "1")]).await;
    let big = body_for("x", 2048);
    let refused = chat_as(&app, "carol", &big).await;
    assert_eq!(refused.status(), 429);
    // The caller's own (product, user) figures, not the product's.
    assert_eq!(header(&refused, "x-budget-limit-usd").as_deref(), Some("1"));
    assert_eq!(header(&refused, "x-budget-remaining-usd").as_deref(), Some("1"));
    let (_, code, _) = common::error_of(refused).await;
    assert_eq!(code, "budget_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_budget_usage_is_still_measured_and_nothing_is_refused() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[]).await;
    let response = chat_as(&app, common::USER, &body_for("x", 2048)).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "x-budget-limit-usd").is_none());
    let _ = response.bytes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_starts_again_at_midnight_in_the_day_time_zone() {
    let upstream = Upstream::start().await;
    // 14:59:50 UTC is 23:59:50 in Tokyo.
    let clock = ManualClock::at(Duration::from_secs(1_796_655_590));
    let mut overrides = vec![("MODEL_PRICES", PRICES), ("DAILY_BUDGET_USD", "0.001")];
    overrides.push(("DAY_TIMEZONE", "Asia/Tokyo"));
    let app = TestApp::spawn_with_clock(&upstream.mock.url(), &overrides, clock.clock()).await;
    // Tokens of the manual clock's time.
    let token = |at: u64| {
        jwt_claims(&serde_json::json!({"sub": "dave", "product": common::PRODUCT, "iat": at, "exp": at + 300}))
    };
    let send = |token: String, body: String| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = send(token(1_796_655_590), CHAT.to_owned()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-budget-remaining-usd").as_deref(), Some("0.001"));
    let _ = first.bytes().await.unwrap();
    let refused = send(token(1_796_655_590), body_for("x", 2048)).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after").as_deref(), Some("10"));
    assert_eq!(
        header(&refused, "x-budget-remaining-usd"),
        Some(usd(1_000_000 - USAGE_COST))
    );
    clock.advance(Duration::from_secs(10));
    let next = send(token(1_796_655_600), CHAT.to_owned()).await.unwrap();
    assert_eq!(header(&next, "x-budget-remaining-usd").as_deref(), Some("0.001"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_budget_in_redis_exactly() {
    let upstream = Upstream::start().await;
    let redis = RedisServer::start();
    let body = body_for("hold", 100);
    let each = reservation(&body, 100);
    let budget = 5 * each - 1_000;
    let budget_text = usd(budget);
    // A Redis slowed by the test machine's load must not count as an outage here.
    let overrides = [
        ("DAILY_BUDGET_USD", budget_text.as_str()),
        ("REDIS_URL", &redis.url()),
        ("REDIS_TIMEOUT_MS", "5000"),
    ];
    let a = Arc::new(app(&upstream, &overrides).await);
    let b = Arc::new(app(&upstream, &overrides).await);
    // Both instances reach Redis before the load starts.
    for instance in [&a, &b] {
        let warm = chat_as(instance, "warmup", &body_for("x", 16)).await;
        assert_eq!(header(&warm, "x-budget-limit-usd"), Some(budget_text.clone()));
        let _ = warm.bytes().await.unwrap();
    }

    let mut requests = Vec::new();
    for i in 0..16 {
        let instance = if i % 2 == 0 { a.clone() } else { b.clone() };
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            let response = chat_as(&instance, common::USER, &body).await;
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.held.load(Ordering::SeqCst) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "four requests reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upstream.open();
    let mut admitted = 0;
    for request in requests {
        if request.await.unwrap() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4, "room for four reservations in all, across both instances");
    assert!(!redis.keys().is_empty(), "the decisions were taken in Redis");
    let spend: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| k.contains("u:x616c696365"))
        .filter(|k| k.contains(":budget:") && !k.ends_with(":due"))
        .collect();
    assert_eq!(spend.len(), 1, "{spend:?}");
    assert_eq!(redis.cli(&["HGET", &spend[0], "spend"]), (4 * USAGE_COST).to_string());
    assert_eq!(redis.cli(&["HGET", &spend[0], "open"]), "0");
}

/// The (demo, `user`) budget hash in Redis.
/// Calls of `command` (`evalsha`, `eval`) Redis served since its statistics were reset.
fn redis_calls(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_budget_in_redis_is_reserved_in_the_limiters_round_trip() {
    let upstream = Upstream::start().await;
    let redis = RedisServer::start();
    let app = app(
        &upstream,
        &[
            ("DAILY_BUDGET_USD", "1"),
            ("REDIS_URL", &redis.url()),
            ("REDIS_TIMEOUT_MS", "5000"),
            ("RATE_LIMIT_CAPACITY", "6"),
            ("RATE_LIMIT_REFILL_PER_SECOND", "0.001"),
            ("DAY_TIMEZONE", zone_away_from_midnight()),
        ],
    )
    .await;
    // The scripts are loaded by the first request.
    let first = chat_as(&app, common::USER, CHAT).await;
    assert_eq!(first.status(), 200);
    let _ = first.bytes().await.unwrap();
    redis.cli(&["CONFIG", "RESETSTAT"]);

    // Each request: one call decides the limits and reserves the user's budget, one
    // settles it.
    for _ in 0..5 {
        let response = chat_as(&app, common::USER, CHAT).await;
        assert_eq!(response.status(), 200);
        let _ = response.bytes().await.unwrap();
    }
    assert_eq!(redis_calls(&redis, "evalsha"), 10);
    assert_eq!(redis_calls(&redis, "eval"), 0);
    let hash = user_hash(&redis, common::USER).expect("the budget lives in Redis");
    assert_eq!(redis.cli(&["HGET", &hash, "spend"]), (6 * USAGE_COST).to_string());
    assert_eq!(redis.cli(&["HGET", &hash, "open"]), "0");

    // The bucket is empty: the limits refuse, and the same call reserves nothing.
    let refused = chat_as(&app, common::USER, CHAT).await;
    assert_eq!(refused.status(), 429);
    let refused: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded");
    assert_eq!(redis_calls(&redis, "evalsha"), 11);
    assert_eq!(redis.cli(&["HGET", &hash, "open"]), "0");
    assert_eq!(redis.cli(&["HGET", &hash, "spend"]), (6 * USAGE_COST).to_string());
}

fn user_hash(redis: &RedisServer, user: &str) -> Option<String> {
    let tag = format!("u:x{}", hex(user));
    redis
        .keys()
        .into_iter()
        .find(|k| k.contains(&tag) && k.contains(":budget:") && !k.ends_with(":due"))
}

fn hex(text: &str) -> String {
    use std::fmt::Write as _;
    text.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Waits (at most 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A day zone whose midnight is more than an hour away: a test that moves the clock by
/// a minute stays on one day.
fn zone_away_from_midnight() -> &'static str {
    let seconds_of_day = common::now() % 86_400;
    if (3_600..86_400 - 3_600).contains(&seconds_of_day) {
        "UTC"
    } else {
        "Asia/Tokyo"
    }
}

/// How Redis goes away in an outage test, and comes back.
#[derive(Clone, Copy)]
enum Outage {
    /// Frozen (SIGSTOP): connections stay open and nothing answers.
    Frozen,
    /// Killed (SIGKILL) and started again from its append-only file.
    Killed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_during_a_redis_outage_is_bounded_by_the_share_and_added_to_redis_when_it_is_back() {
    outage_and_return(Outage::Frozen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_while_redis_is_killed_reaches_it_once_it_is_back_from_its_append_only_file() {
    outage_and_return(Outage::Killed).await;
}

async fn outage_and_return(outage: Outage) {
    let upstream = Upstream::start().await;
    let mut redis = match outage {
        Outage::Frozen => RedisServer::start(),
        Outage::Killed => RedisServer::start_persistent(),
    };
    let url = redis.url();
    let app = app(
        &upstream,
        &[
            ("DAILY_BUDGET_USD", "0.001"),
            ("BUDGET_OUTAGE_SHARE", "0.5"),
            ("REDIS_URL", &url),
            // Slow under load is not down; paused is (each call then waits this long).
            ("REDIS_TIMEOUT_MS", "1000"),
            ("DAY_TIMEZONE", zone_away_from_midnight()),
        ],
    )
    .await;
    let each = reservation(CHAT, 16);
    let first = app.chat(CHAT).await;
    assert_eq!(first.status(), 200);
    let _ = first.bytes().await.unwrap();
    let hash = user_hash(&redis, common::USER).expect("the budget lives in Redis");
    assert_eq!(redis.cli(&["HGET", &hash, "spend"]), USAGE_COST.to_string());

    match outage {
        Outage::Frozen => redis.pause(),
        Outage::Killed => redis.kill(),
    }
    // Left when Redis last answered: the budget less the first request's reservation;
    // this instance may admit half of it on its own. Each request below holds its
    // reservation open (the upstream waits), so the allowance fills by reservations.
    let left = 1_000_000 - each;
    let allowance = left / 2;
    let fit = allowance / each;
    let body = body_for("hold", 16);
    assert_eq!(reservation(&body, 16) % 1_000, 0);
    let held_body = body.clone();
    let held_each = reservation(&held_body, 16);
    let fit_held = usize::try_from(allowance / held_each).unwrap();
    assert!(fit >= 1 && fit_held >= 1);
    let app = Arc::new(app);
    let mut requests = Vec::new();
    for _ in 0..fit_held + 2 {
        let app = app.clone();
        let body = held_body.clone();
        requests.push(tokio::spawn(async move {
            let response = chat_as(&app, common::USER, &body).await;
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }));
    }
    eventually("the admitted requests reach the upstream", || {
        upstream.held.load(Ordering::SeqCst) >= fit_held
    })
    .await;
    upstream.open();
    let mut admitted = 0;
    for request in requests {
        if request.await.unwrap() == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, fit_held, "the outage share bounds what one instance admits");

    match outage {
        Outage::Frozen => redis.resume(),
        // Back with what it had written before the kill.
        Outage::Killed => redis.restart(),
    }
    // Once Redis answers again, what was spent meanwhile is added to the day's total.
    let expected = (1 + admitted as u64) * USAGE_COST;
    let mut probes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let total: u64 = redis.cli(&["HGET", &hash, "spend"]).parse().unwrap();
        if total == expected {
            break;
        }
        assert!(total < expected, "spend counted twice: {total} > {expected}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never got the outage spend: {total}"
        );
        // Another user's request makes the instance talk to Redis again.
        probes += 1;
        let probe = chat_as(&app, &format!("probe{probes}"), CHAT).await;
        let _ = probe.bytes().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.cli(&["HGET", &hash, "open"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservations_of_an_instance_that_dies_are_charged_when_they_expire() {
    let upstream = Upstream::start().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let zone = zone_away_from_midnight();
    let mut env = common::base_env(&upstream.mock.url());
    for (name, value) in [
        ("MODEL_PRICES", PRICES),
        ("DAILY_BUDGET_USD", "0.01"),
        ("BUDGET_RESERVATION_SECONDS", "60"),
        ("REDIS_URL", &url),
        ("REDIS_TIMEOUT_MS", "5000"),
        ("DAY_TIMEZONE", zone),
    ] {
        common::set(&mut env, name, value);
    }
    let process = common::ServerProcess::start(&env).await;
    let body = body_for("hold", 16);
    let each = reservation(&body, 16);
    let in_flight = {
        let client = reqwest::Client::new();
        let request = client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(jwt(common::PRODUCT, common::USER))
            .header("content-type", "application/json")
            .body(body.clone())
            .send();
        tokio::spawn(request)
    };
    eventually("the request reaches the upstream", || {
        upstream.held.load(Ordering::SeqCst) == 1
    })
    .await;
    let pid = process.child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(in_flight.await.unwrap().is_err() || upstream.held.load(Ordering::SeqCst) == 1);
    let hash = user_hash(&redis, common::USER).expect("the reservation is in Redis");
    assert_eq!(redis.cli(&["HGET", &hash, "open"]), each.to_string());

    // Another instance, 61 s later: the reservation has expired and is charged in full.
    let later = common::now() + 61;
    let clock = ManualClock::at(Duration::from_secs(later));
    let overrides = [
        ("MODEL_PRICES", PRICES),
        ("DAILY_BUDGET_USD", "0.01"),
        ("BUDGET_RESERVATION_SECONDS", "60"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_TIMEOUT_MS", "5000"),
        ("DAY_TIMEZONE", zone),
    ];
    let other = TestApp::spawn_with_clock(&upstream.mock.url(), &overrides, clock.clock()).await;
    let token = jwt_claims(
        &serde_json::json!({"sub": common::USER, "product": common::PRODUCT, "iat": later, "exp": later + 300}),
    );
    let response = other
        .client
        .post(other.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-budget-remaining-usd"),
        Some(usd(10_000_000 - each))
    );
    let _ = response.bytes().await.unwrap();
    assert_eq!(redis.cli(&["HGET", &hash, "open"]), "0");
    assert_eq!(redis.cli(&["HGET", &hash, "spend"]), (each + USAGE_COST).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_line_carries_usage_cost_reservation_and_the_refusing_scope() {
    let upstream = Upstream::start().await;
    let mut env = common::base_env(&upstream.mock.url());
    for (name, value) in [("MODEL_PRICES", PRICES), ("DAILY_BUDGET_USD", "0.001")] {
        common::set(&mut env, name, value);
    }
    let process = common::ServerProcess::start(&env).await;
    let client = reqwest::Client::new();
    let send = |body: String| {
        client
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(jwt(common::PRODUCT, common::USER))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok = send(CHAT.to_owned()).await.unwrap();
    assert_eq!(ok.status(), 200);
    let _ = ok.bytes().await.unwrap();
    let refused = send(body_for("x", 2048)).await.unwrap();
    assert_eq!(refused.status(), 429);
    let _ = refused.bytes().await.unwrap();

    let lines = |status: u64| {
        process
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["path"] == "/v1/chat/completions" && l["status"] == status)
            .collect::<Vec<_>>()
    };
    eventually("both lines are written", || {
        !lines(200).is_empty() && !lines(429).is_empty()
    })
    .await;
    let line = &lines(200)[0];
    assert_eq!(line["model"], "gpt-4o");
    assert_eq!(line["input_tokens"], 10);
    assert_eq!(line["cached_tokens"], 4);
    assert_eq!(line["output_tokens"], 5);
    assert_eq!(line["cost_usd"].to_string(), "0.000018");
    assert_eq!(line["reservation_usd"].to_string(), usd(reservation(CHAT, 16)));
    assert_eq!(line["budget_store"], "memory");
    assert!(line.get("usage_estimated").is_none());
    assert!(line.get("budget_scope").is_none());
    let line = &lines(429)[0];
    assert_eq!(line["error"], "budget_exceeded");
    assert_eq!(line["budget_scope"], "user");
    assert_eq!(line["model"], "gpt-4o");
    assert!(line.get("cost_usd").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_reserved_is_refused_while_a_budget_applies() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[("DAILY_BUDGET_USD", "1")]).await;
    let image = r#"{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]}]}"#;
    let refused = app.chat(image).await;
    assert_eq!(refused.status(), 400);
    let (_, code, param) = common::error_of(refused).await;
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("unsupported_parameter", Some("messages"))
    );

    // With the model's context window priced, the image is reserved as the whole window.
    let prices = r#"{"gpt-4o":{"input":1,"output":2,"context_tokens":1000},"gpt-4o-mini":{"input":1,"output":2},"text-embedding-3-small":{"input":0.02},"text-embedding-3-large":{"input":0.13}}"#;
    let app = TestApp::spawn(
        &upstream.mock.url(),
        &[("MODEL_PRICES", prices), ("DAILY_BUDGET_USD", "0.00104")],
    )
    .await;
    let first = app.chat(image).await;
    assert_eq!(first.status(), 200);
    let _ = first.bytes().await.unwrap();
    // 1,000 input tokens + 16 output reserve 1,032,000 nanos; once 18,000 are spent, less
    // than that is left.
    let second = app.chat(image).await;
    assert_eq!(second.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_metered_and_reserve_their_input_only() {
    let upstream = Upstream::start().await;
    let app = app(&upstream, &[("DAILY_BUDGET_USD", "0.00001")]).await;
    let send = |body: String| {
        app.client
            .post(app.url("/v1/embeddings"))
            .bearer_auth(jwt(common::PRODUCT, common::USER))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let small = r#"{"model":"text-embedding-3-small","input":"hello"}"#.to_owned();
    let ok = send(small.clone()).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(header(&ok, "x-budget-remaining-usd").as_deref(), Some("0.00001"));
    let _ = ok.bytes().await.unwrap();
    // 8 tokens at 0.02 USD per 1M: 160 nanos spent; what is left shows rounded down.
    let next = send(small).await.unwrap();
    assert_eq!(header(&next, "x-budget-remaining-usd").as_deref(), Some("0.000009"));
    let _ = next.bytes().await.unwrap();
    // 10,000 bytes of input reserve 200,000 nanos: more than the budget.
    let large = format!(
        r#"{{"model":"text-embedding-3-small","input":"{}"}}"#,
        "a".repeat(10_000)
    );
    let refused = send(large).await.unwrap();
    assert_eq!(refused.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hmac_clients_budget_bounds_every_user_it_asserts() {
    let upstream = Upstream::start().await;
    let limits = r#"{"desk":{"daily_budget_usd":0.00012}}"#;
    let app = app(&upstream, &[("CLIENT_LIMITS", limits)]).await;
    // One request fits; after its cost, a second one's reservation does not.
    let each = reservation(CHAT, 16);
    assert!(each <= 120_000 && each > 120_000 - USAGE_COST, "{each}");
    let send = |user: &str| {
        let signed = common::hmac_sign(
            common::HMAC_SECRET,
            "POST",
            "/v1/chat/completions",
            common::CLIENT,
            common::PRODUCT,
            user,
            Some(&common::nonce()),
            common::now(),
            CHAT.as_bytes(),
        );
        signed
            .apply(app.client.post(app.url("/v1/chat/completions")))
            .header("content-type", "application/json")
            .body(CHAT)
            .send()
    };
    let first = send("user-1").await.unwrap();
    assert_eq!(first.status(), 200);
    // No (product, user) budget: no x-budget-* headers.
    assert!(header(&first, "x-budget-limit-usd").is_none());
    let _ = first.bytes().await.unwrap();
    // A new user id does not bring a new budget: the client's is what is left.
    let second = send("user-2").await.unwrap();
    assert_eq!(second.status(), 429);
    let (_, code, _) = common::error_of(second).await;
    assert_eq!(code, "budget_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_work_on_redis_cluster() {
    let upstream = Upstream::start().await;
    let cluster = common::redis::RedisCluster::start();
    let url = cluster.url();
    let overrides = [
        ("DAILY_BUDGET_USD", "0.001"),
        ("PRODUCT_LIMITS", r#"{"demo":{"product_daily_budget_usd":1}}"#),
        ("REDIS_URL", url.as_str()),
        ("REDIS_CLUSTER", "true"),
        ("REDIS_TIMEOUT_MS", "5000"),
    ];
    let app = app(&upstream, &overrides).await;
    let first = app.chat(CHAT).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-budget-remaining-usd").as_deref(), Some("0.001"));
    let _ = first.bytes().await.unwrap();
    let second = app.chat(CHAT).await;
    assert_eq!(
        header(&second, "x-budget-remaining-usd"),
        Some(usd(1_000_000 - USAGE_COST))
    );
    let _ = second.bytes().await.unwrap();
    // Both scopes live in the cluster, each under its own hash tag.
    let keys: Vec<String> = cluster
        .keys()
        .into_iter()
        .filter(|k| k.contains(":budget:") && !k.ends_with(":due"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("{p:x64656d6f:u:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("{p:x64656d6f}")), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_response_keeps_its_settled_tokens_for_the_requests_that_continue_it() {
    let upstream = MockUpstream::openai().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let app = TestApp::spawn(
        &upstream.url(),
        &[
            ("MODEL_PRICES", PRICES),
            ("DAILY_BUDGET_USD", "0.1"),
            ("REDIS_URL", &url),
            ("REDIS_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let create = |body: String| {
        app.client
            .post(app.url("/v1/responses"))
            .bearer_auth(jwt(common::PRODUCT, common::USER))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first = create(r#"{"model":"gpt-4o","input":"hi","max_output_tokens":100}"#.to_owned())
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let answer: serde_json::Value = first.json().await.unwrap();
    let id = answer["id"].as_str().unwrap().to_owned();
    // The mock reports 3 input and 2 output tokens: the record holds 5 once settled (the
    // reservation's count before).
    let record = || {
        redis
            .keys()
            .into_iter()
            .find(|k| k.contains(":resp:"))
            .map(|k| redis.cli(&["GET", &k]))
    };
    eventually("the record holds the settled tokens", || {
        record().as_deref() == Some("5")
    })
    .await;

    let next = create(format!(
        r#"{{"model":"gpt-4o","input":"more","max_output_tokens":100,"previous_response_id":"{id}"}}"#
    ))
    .await
    .unwrap();
    assert_eq!(next.status(), 200);
    // Budget-only refusals: what cannot be reserved.
    for (body, param) in [
        (r#"{"model":"gpt-4o","input":"hi","background":true}"#, "background"),
        (
            r#"{"model":"gpt-4o","input":"hi","service_tier":"priority"}"#,
            "service_tier",
        ),
    ] {
        let refused = create(body.to_owned()).await.unwrap();
        assert_eq!(refused.status(), 400, "{body}");
        let (_, code, named) = common::error_of(refused).await;
        assert_eq!(
            (code.as_str(), named.as_deref()),
            ("unsupported_parameter", Some(param))
        );
    }
}
