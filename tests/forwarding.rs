//! Forwarding: the headers each way, status pass-through, and the upstream's failures.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use common::{
    CHAT, COMPLETION, MockUpstream, PRODUCT_KEY, Signed, TestApp, closed_port, closing_upstream, error_of, jwt,
    raw_upstream,
};
use http::{HeaderValue, StatusCode};

#[tokio::test]
async fn the_upstream_sees_exactly_the_allowed_headers() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let response = app
        .client
        .post(app.url("/v1/chat/completions?debug=1"))
        .bearer_auth(jwt("demo", "alice"))
        .header("accept", "application/json")
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("openai-beta", "assistants=v2")
        .header("x-stainless-lang", "python")
        .header("x-stainless-retry-count", "0")
        .header("cookie", "session=abc")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("openai-organization", "org-client")
        .header("openai-project", "proj-client")
        .header("x-serverless-authorization", "Bearer google-id-token")
        .header("proxy-authorization", "Basic cHJveHk=")
        .header("x-goog-iap-jwt-assertion", "iap-assertion")
        .header("x-custom", "1")
        .header("x-request-id", "rid-1")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    let mut names: Vec<&str> = seen.headers.keys().map(http::HeaderName::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "openai-beta",
            "user-agent",
            "x-request-id",
            "x-stainless-lang",
            "x-stainless-retry-count"
        ]
    );
    assert_eq!(seen.headers["authorization"], format!("Bearer {PRODUCT_KEY}"));
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["content-length"], CHAT.len().to_string());
    assert_eq!(seen.headers["user-agent"], "OpenAI/Python 1.99.0");
    assert_eq!(seen.headers["x-request-id"], "rid-1");
    assert_eq!(seen.body, CHAT.as_bytes());
    app.shutdown().await;
}

#[tokio::test]
async fn the_upstream_gets_an_origin_form_target_and_its_host() {
    let upstream = MockUpstream::openai().await;
    let url = format!("http://{}/v1/chat/completions?api-version=2024-10-21", upstream.addr);
    let app = TestApp::spawn(&url, &[]).await;
    assert_eq!(app.chat(CHAT).await.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/chat/completions?api-version=2024-10-21");
    assert_eq!(seen.headers["host"], upstream.addr.to_string());
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    const STREAM: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    for i in 0..20 {
        let body = if i % 2 == 0 { CHAT } else { STREAM };
        let response = app.chat(body).await;
        assert_eq!(response.status(), 200);
        // The whole body: only then is the connection free for the next request.
        let text = response.text().await.unwrap();
        assert!(text.contains("chatcmpl-1"), "{text}");
    }
    assert_eq!(upstream.requests().len(), 20);
    assert_eq!(upstream.connections(), 1, "one connection for all");
    app.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_by_a_new_one() {
    // Each connection answers once, looking reusable, then closes: every request after the
    // first finds its pooled connection closed (or closing as the request goes out) and
    // must still succeed, on a new connection.
    let (addr, connections) = closing_upstream().await;
    let app = TestApp::spawn(&format!("http://{addr}/v1/chat/completions"), &[]).await;
    for _ in 0..5 {
        let response = app.chat(CHAT).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), COMPLETION);
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 5);
    app.shutdown().await;
}

#[tokio::test]
async fn hmac_requests_forward_none_of_the_hmac_headers() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let signed = Signed::chat(CHAT.as_bytes());
    let response = signed
        .apply(app.client.post(app.url("/v1/chat/completions")))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.last();
    for name in [
        "x-client-id",
        "x-timestamp",
        "x-nonce",
        "x-product-id",
        "x-user-id",
        "x-signature",
    ] {
        assert!(!seen.headers.contains_key(name), "{name} forwarded");
    }
    assert_eq!(seen.headers["authorization"], format!("Bearer {PRODUCT_KEY}"));
    app.shutdown().await;
}

#[tokio::test]
async fn the_client_sees_exactly_the_allowed_upstream_headers() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let response = app.chat(CHAT).await;
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["openai-processing-ms"], "7");
    assert_eq!(h["openai-version"], "2020-10-01");
    assert_eq!(h["x-upstream-request-id"], "upstream-req-42");
    assert_ne!(h["x-request-id"], "upstream-req-42");
    for stripped in ["openai-organization", "set-cookie", "server"] {
        assert!(!h.contains_key(stripped), "{stripped} passed");
    }
    // The x-ratelimit-* headers are the proxy's own bucket, not the upstream's 99999.
    assert_eq!(h["x-ratelimit-limit-requests"], "100000");
    assert_eq!(response.text().await.unwrap(), common::COMPLETION);
    app.shutdown().await;
}

fn answering(status: u16, body: &'static str, headers: &'static [(&'static str, &'static str)]) -> Router {
    Router::new().route(
        "/v1/chat/completions",
        post(move || async move {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in headers {
                response.headers_mut().insert(*k, HeaderValue::from_static(v));
            }
            response
        }),
    )
}

#[tokio::test]
async fn upstream_statuses_and_bodies_pass_through() {
    for (status, retry_headers) in [
        (400, &[("content-type", "application/json")][..]),
        (404, &[][..]),
        (
            429,
            &[
                ("retry-after", "7"),
                ("retry-after-ms", "6500"),
                ("x-should-retry", "true"),
            ][..],
        ),
        (500, &[][..]),
        (503, &[][..]),
    ] {
        let body = r#"{"error":{"message":"upstream says no","type":"x","code":"y","param":null}}"#;
        let upstream = MockUpstream::start(answering(status, body, retry_headers)).await;
        let app = TestApp::spawn(&upstream.url(), &[]).await;
        let response = app.chat(CHAT).await;
        assert_eq!(response.status().as_u16(), status);
        for (k, v) in retry_headers {
            assert_eq!(response.headers()[*k], *v, "{status} {k}");
        }
        assert_eq!(response.text().await.unwrap(), body);
        app.shutdown().await;
    }
}

#[tokio::test]
async fn upstream_401_and_403_become_502_without_the_upstream_body() {
    for status in [401, 403] {
        let upstream = MockUpstream::start(answering(
            status,
            r#"{"error":{"message":"Incorrect API key provided: sk-te***"}}"#,
            &[],
        ))
        .await;
        let app = TestApp::spawn(&upstream.url(), &[]).await;
        let response = app.chat(CHAT).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let text = response.text().await.unwrap();
        assert!(!text.contains("Incorrect API key"), "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["type"], "upstream_error");
        assert_eq!(body["error"]["code"], "upstream_auth_failed");
        app.shutdown().await;
    }
}

#[tokio::test]
async fn redirects_pass_through_and_are_not_followed() {
    let upstream = MockUpstream::start(answering(307, "", &[("location", "http://127.0.0.1:9/elsewhere")])).await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let response = client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 307);
    assert_eq!(response.headers()["location"], "http://127.0.0.1:9/elsewhere");
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

async fn expect_502(app: &TestApp, code: &str, retry: &str) {
    let response = app.chat(CHAT).await;
    assert_eq!(response.status(), 502, "{code}");
    assert_eq!(response.headers()["x-should-retry"], retry, "{code}");
    assert!(response.headers().contains_key("x-ratelimit-limit-requests"));
    let (kind, got, _) = error_of(response).await;
    assert_eq!((kind.as_str(), got.as_str()), ("upstream_error", code));
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_upstream_unreachable() {
    let url = format!("http://127.0.0.1:{}/v1/chat/completions", closed_port().await);
    let app = TestApp::spawn(&url, &[]).await;
    expect_502(&app, "upstream_unreachable", "true").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_reset_or_garbage_before_the_headers_is_502_upstream_unreachable() {
    for reply in [&b""[..], b"this is not http\r\n\r\n", b"HTTP/1.1 2"] {
        let addr = raw_upstream(reply).await;
        let app = TestApp::spawn(&format!("http://{addr}/v1/chat/completions"), &[]).await;
        expect_502(&app, "upstream_unreachable", "true").await;
        app.shutdown().await;
    }
}

#[tokio::test]
async fn a_failed_tls_handshake_is_502_upstream_unreachable() {
    // `https` towards a peer that answers the handshake in plain HTTP.
    let plain = MockUpstream::openai().await;
    let app = TestApp::spawn(&format!("https://{}/v1/chat/completions", plain.addr), &[]).await;
    expect_502(&app, "upstream_unreachable", "true").await;
    assert!(plain.requests().is_empty(), "no request reached it");
    app.shutdown().await;
}

#[tokio::test]
async fn no_headers_in_time_is_502_upstream_timeout() {
    let router = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "late"
        }),
    );
    let upstream = MockUpstream::start(router).await;
    let app = TestApp::spawn(&upstream.url(), &[("UPSTREAM_TIMEOUT_SECONDS", "0.3")]).await;
    let started = std::time::Instant::now();
    expect_502(&app, "upstream_timeout", "false").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    app.shutdown().await;
}
