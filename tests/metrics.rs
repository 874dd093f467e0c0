//! The Prometheus endpoint on `METRICS_PORT`: off by default, and after some traffic its
//! counters say what happened, by route template (never a raw path), status and code.
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{HMAC_SECRET, MockUpstream, PRODUCT_KEY, ServerProcess, base_env, jwt, set};
use serde_json::Value;

/// The metrics address from the `metrics endpoint ready` line.
fn metrics_addr(server: &ServerProcess) -> Option<SocketAddr> {
    let lines = server.lines.lock().expect("lines");
    lines.iter().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        if v["message"] != "metrics endpoint ready" {
            return None;
        }
        let port = v["address"].as_str()?.rsplit(':').next()?.parse::<u16>().ok()?;
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    })
}

/// The value of the sample line `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(client: &reqwest::Client, addr: SocketAddr) -> (String, String) {
    let response = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, response.text().await.expect("text"))
}

/// The metrics line follows the `listening` line that `ServerProcess::start` waited for.
async fn wait_for_metrics_addr(server: &ServerProcess) -> SocketAddr {
    let mut addr = None;
    for _ in 0..200 {
        addr = metrics_addr(server);
        if addr.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    addr.unwrap_or_else(|| panic!("a metrics line in:\n{}", server.output()))
}

/// Two good chats, a refused model, a model lookup, a request without credentials and
/// an unknown path.
async fn send_traffic(server: &ServerProcess, client: &reqwest::Client, token: &str) {
    let chat = |body: &'static str| {
        client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(token)
            .body(body)
            .send()
    };
    for _ in 0..2 {
        let r = chat(common::CHAT).await.expect("chat");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let r = chat(r#"{"model":"gpt-3","messages":[{"role":"user","content":"hi"}]}"#)
        .await
        .expect("chat");
    assert_eq!(r.status(), 400);
    r.bytes().await.expect("body");
    let r = client
        .get(server.url("/v1/models/gpt-4o"))
        .bearer_auth(token)
        .send()
        .await
        .expect("model");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    let r = client.get(server.url("/v1/models")).send().await.expect("models");
    assert_eq!(r.status(), 401);
    r.bytes().await.expect("body");
    let r = client
        .get(server.url("/raw/path/secret-ish-123"))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    r.bytes().await.expect("body");
}

#[tokio::test]
async fn the_metrics_endpoint_counts_requests_by_route_status_and_code() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    set(&mut env, "METRICS_PORT", "0");
    let server = ServerProcess::start(&env).await;
    let addr = wait_for_metrics_addr(&server).await;
    let client = reqwest::Client::new();
    let token = jwt("demo", "alice");

    send_traffic(&server, &client, &token).await;

    let expected = [
        (
            r#"api_key_server_requests_total{route="/v1/chat/completions",status="200",code=""}"#,
            2.0,
        ),
        (
            r#"api_key_server_requests_total{route="/v1/chat/completions",status="400",code="model_not_allowed"}"#,
            1.0,
        ),
        (
            r#"api_key_server_requests_total{route="/v1/models/{*model}",status="200",code=""}"#,
            1.0,
        ),
        (
            r#"api_key_server_requests_total{route="/v1/models",status="401",code="missing_credentials"}"#,
            1.0,
        ),
        (
            r#"api_key_server_requests_total{route="unmatched",status="404",code="not_found"}"#,
            1.0,
        ),
        ("api_key_server_upstream_latency_seconds_count", 2.0),
        (
            r#"api_key_server_limiter_decisions_total{outcome="admitted",backend="memory"}"#,
            2.0,
        ),
        (
            r#"api_key_server_limiter_decisions_total{outcome="admitted",backend="redis"}"#,
            0.0,
        ),
        ("api_key_server_redis_configured", 0.0),
        ("api_key_server_redis_fallback_active", 0.0),
        ("api_key_server_redis_errors_total", 0.0),
    ];
    // A request is counted when its body ends, which can be a moment after the client
    // read it: scrape until the counts are there (bounded).
    let mut last = String::new();
    for _ in 0..200 {
        let (content_type, text) = scrape(&client, addr).await;
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        if expected
            .iter()
            .all(|(series, value)| sample(&text, series) == Some(*value))
        {
            last = text;
            break;
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (series, value) in expected {
        assert_eq!(sample(&last, series), Some(value), "{series} in:\n{last}");
    }
    let sum = sample(&last, "api_key_server_upstream_latency_seconds_sum").expect("latency sum");
    assert!(sum > 0.0 && sum < 10.0, "upstream latency sum {sum}");
    // Limiter decisions are exposed for every outcome and backend from the start.
    for outcome in ["admitted", "rate_limited", "quota_exceeded"] {
        for backend in ["redis", "memory"] {
            let series =
                format!(r#"api_key_server_limiter_decisions_total{{outcome="{outcome}",backend="{backend}"}}"#);
            assert!(sample(&last, &series).is_some(), "{series} in:\n{last}");
        }
    }
    assert!(
        !last.contains("api_key_server_upstream_failures_total{"),
        "traffic the upstream answered counts no upstream failure:\n{last}"
    );
    assert!(!last.contains("/raw/path"), "raw paths are never labels:\n{last}");
    // Users never label a series; products and models do, on the usage counters only
    // (both are bounded by the settings).
    for secret in [PRODUCT_KEY, HMAC_SECRET, "alice"] {
        assert!(!last.contains(secret), "{secret} in the metrics");
    }
    let input = r#"api_key_server_tokens_total{product="demo",model="gpt-4o",kind="input"}"#;
    assert!(sample(&last, input).is_some_and(|n| n > 0.0), "{input} in:\n{last}");
    for line in last.lines().filter(|l| l.contains("demo")) {
        assert!(
            line.contains("api_key_server_tokens_total{") || line.contains("api_key_server_cost_nanousd_total{"),
            "{line}"
        );
    }

    // The metrics are not served on the service's own port.
    let r = client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics on the main port");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn without_metrics_port_there_is_no_metrics_listener() {
    let upstream = MockUpstream::openai().await;
    let server = ServerProcess::start(&base_env(&upstream.url())).await;
    let r = reqwest::Client::new()
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    // By now the startup lines (a metrics line would come right after `listening`) and
    // this request's line are out.
    for _ in 0..200 {
        if server.output().contains("\"path\":\"/health\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics_addr(&server), None, "{}", server.output());
    assert!(!server.output().contains("/metrics"), "{}", server.output());
}

#[tokio::test]
async fn an_unreachable_redis_shows_as_fallback_errors_and_memory_decisions() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    set(&mut env, "METRICS_PORT", "0");
    let port = common::closed_port().await;
    set(&mut env, "REDIS_URL", &format!("redis://127.0.0.1:{port}"));
    let server = ServerProcess::start(&env).await;
    let addr = wait_for_metrics_addr(&server).await;
    let client = reqwest::Client::new();
    let r = client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "alice"))
        .body(common::CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut last = String::new();
    for _ in 0..200 {
        let (_, text) = scrape(&client, addr).await;
        let done = sample(&text, "api_key_server_redis_fallback_active") == Some(1.0)
            && sample(
                &text,
                r#"api_key_server_limiter_decisions_total{outcome="admitted",backend="memory"}"#,
            ) == Some(1.0);
        last = text;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(sample(&last, "api_key_server_redis_configured"), Some(1.0), "{last}");
    assert_eq!(
        sample(&last, "api_key_server_redis_fallback_active"),
        Some(1.0),
        "{last}"
    );
    assert!(
        sample(&last, "api_key_server_redis_errors_total").is_some_and(|n| n >= 1.0),
        "{last}"
    );
    assert_eq!(
        sample(
            &last,
            r#"api_key_server_limiter_decisions_total{outcome="admitted",backend="memory"}"#
        ),
        Some(1.0),
        "{last}"
    );
}
