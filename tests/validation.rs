//! Request validation over HTTP, and the order of checks.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use common::{CHAT, MockUpstream, TestApp, error_of, jwt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

async fn app(overrides: &[(&str, &str)]) -> (MockUpstream, TestApp) {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), overrides).await;
    (upstream, app)
}

async fn expect_400(app: &TestApp, body: &str, code: &str, param: Option<&str>) {
    let response = app.chat(body).await;
    assert_eq!(response.status(), 400, "{body}");
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, got_code, got_param) = error_of(response).await;
    assert_eq!(kind, "invalid_request_error", "{body}");
    assert_eq!(got_code, code, "{body}");
    assert_eq!(got_param.as_deref(), param, "{body}");
}

#[tokio::test]
async fn bodies_that_are_not_a_json_object_are_invalid_json() {
    let (upstream, app) = app(&[]).await;
    for body in ["", "not json", "[1,2]", "\"text\"", "{\"model\":", "{} trailing"] {
        expect_400(&app, body, "invalid_json", None).await;
    }
    let duplicate = format!(r#"{{"model":"gpt-4o",{MSG},"model":"gpt-4o-mini"}}"#);
    expect_400(&app, &duplicate, "invalid_json", None).await;
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn deeply_nested_unknown_fields_are_forwarded_without_recursing() {
    // Values the proxy does not check are skipped as raw text, never built into a tree,
    // so depth costs no stack; valid JSON is forwarded as it came.
    let (upstream, app) = app(&[]).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let nested = format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"x":{deep}}}"#);
    let response = app.chat(&nested).await;
    assert_eq!(response.status(), 200);
    assert!(upstream.last().body == nested.as_bytes(), "forwarded byte for byte");
    let unbalanced = format!(r#"{{"model":"gpt-4o",{MSG},"x":{}}}"#, "[".repeat(100_000));
    let response = app.chat(&unbalanced).await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(response).await.1, "invalid_json");
    app.shutdown().await;
}

#[tokio::test]
async fn non_utf8_bytes_are_invalid_json() {
    let (_upstream, app) = app(&[]).await;
    let mut body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}]}"#);
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(response).await.1, "invalid_json");
    app.shutdown().await;
}

#[tokio::test]
async fn model_and_messages_rules() {
    let (upstream, app) = app(&[]).await;
    expect_400(&app, &format!("{{{MSG}}}"), "missing_required_field", Some("model")).await;
    expect_400(&app, &format!(r#"{{"model":7,{MSG}}}"#), "invalid_type", Some("model")).await;
    expect_400(
        &app,
        &format!(r#"{{"model":"gpt-5",{MSG}}}"#),
        "model_not_allowed",
        Some("model"),
    )
    .await;
    expect_400(
        &app,
        r#"{"model":"gpt-4o"}"#,
        "missing_required_field",
        Some("messages"),
    )
    .await;
    expect_400(
        &app,
        r#"{"model":"gpt-4o","messages":[]}"#,
        "invalid_messages",
        Some("messages"),
    )
    .await;
    expect_400(
        &app,
        r#"{"model":"gpt-4o","messages":"hi"}"#,
        "invalid_type",
        Some("messages"),
    )
    .await;
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn token_limit_rules_for_both_fields() {
    let (upstream, app) = app(&[("MAX_TOKENS", "100")]).await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let with = |v: &str| format!(r#"{{"model":"gpt-4o",{MSG},"{field}":{v}}}"#);
        expect_400(&app, &with("101"), "max_tokens_too_large", Some(field)).await;
        expect_400(&app, &with("0"), "invalid_value", Some(field)).await;
        expect_400(&app, &with("-1"), "invalid_value", Some(field)).await;
        expect_400(&app, &with("100.0"), "invalid_type", Some(field)).await;
        expect_400(&app, &with("\"50\""), "invalid_type", Some(field)).await;
        let response = app.chat(&with("100")).await;
        assert_eq!(response.status(), 200, "{field}");
        assert_eq!(upstream.last().body, with("100").as_bytes(), "forwarded unchanged");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn temperature_rules() {
    let (_upstream, app) = app(&[("TEMPERATURE_RANGE", "[0.5, 1.5]")]).await;
    let with = |v: &str| format!(r#"{{"model":"gpt-4o",{MSG},"temperature":{v}}}"#);
    expect_400(&app, &with("0.4"), "temperature_out_of_range", Some("temperature")).await;
    expect_400(&app, &with("1.6"), "temperature_out_of_range", Some("temperature")).await;
    expect_400(&app, &with("\"1\""), "invalid_type", Some("temperature")).await;
    for ok in ["0.5", "1.5", "1", "null"] {
        assert_eq!(app.chat(&with(ok)).await.status(), 200, "{ok}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_limit_is_added_and_everything_else_kept_in_order() {
    let (upstream, app) = app(&[("MAX_TOKENS", "512")]).await;
    let body = r#"{"zeta":1,"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":null,"tools":[{"type":"function"}],"alpha":{"nested":[1,2.50,"x"]}}"#;
    assert_eq!(app.chat(body).await.status(), 200);
    let sent = String::from_utf8(upstream.last().body.to_vec()).unwrap();
    assert_eq!(
        sent,
        r#"{"zeta":1,"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}],"alpha":{"nested":[1,2.50,"x"]},"max_tokens":512}"#
    );
    assert_eq!(upstream.last().headers["content-length"], sent.len().to_string());
    app.shutdown().await;
}

#[tokio::test]
async fn default_tokens_field_can_be_max_completion_tokens() {
    let (upstream, app) = app(&[("DEFAULT_TOKENS_FIELD", "max_completion_tokens")]).await;
    assert_eq!(app.chat(&format!(r#"{{"model":"gpt-4o",{MSG}}}"#)).await.status(), 200);
    let sent: serde_json::Value = serde_json::from_slice(&upstream.last().body).unwrap();
    assert_eq!(sent["max_completion_tokens"], 2048);
    assert!(sent.get("max_tokens").is_none());
    app.shutdown().await;
}

#[tokio::test]
async fn unchanged_bodies_are_forwarded_byte_for_byte_whatever_the_content_type() {
    let (upstream, app) = app(&[]).await;
    let body = "{ \"model\" : \"gpt-4o\",\n \"messages\": [{\"role\":\"user\",\"content\":\"h\\u00e9\"}], \"max_tokens\": 7, \"top_p\": 1.0e0 }";
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body, body.as_bytes());
    assert_eq!(upstream.last().headers["content-type"], "application/json");
    // No content type at all.
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn n_and_stream_options_rules() {
    let (upstream, app) = app(&[]).await;
    let with = |member: &str| format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,{member}}}"#);
    expect_400(&app, &with(r#""n":1.0"#), "invalid_type", Some("n")).await;
    expect_400(&app, &with(r#""n":129"#), "invalid_value", Some("n")).await;
    expect_400(
        &app,
        &with(r#""stream_options":true"#),
        "invalid_type",
        Some("stream_options"),
    )
    .await;
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn chat_streams_ask_the_upstream_for_usage_unless_the_product_says_not() {
    let upstream = MockUpstream::openai().await;
    let stream = format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5}}"#);
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    assert_eq!(app.chat(&stream).await.status(), 200);
    let asked =
        format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"stream_options":{{"include_usage":true}}}}"#);
    assert_eq!(upstream.last().body, asked.as_bytes());
    app.shutdown().await;

    let upstreams = format!(
        r#"{{"demo":{{"base_url":"http://{}/v1","stream_usage":false}}}}"#,
        upstream.addr
    );
    let app = TestApp::spawn(&upstream.url(), &[("PRODUCT_UPSTREAMS", &upstreams)]).await;
    assert_eq!(app.chat(&stream).await.status(), 200);
    assert_eq!(upstream.last().body, stream.as_bytes());
    app.shutdown().await;
}

#[tokio::test]
async fn an_oversized_body_is_413_in_the_envelope() {
    let (upstream, app) = app(&[("MAX_BODY_BYTES", "1000")]).await;
    let big = format!(r#"{{"model":"gpt-4o",{MSG},"pad":"{}"}}"#, "x".repeat(2000));
    let response = app.chat(&big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(response.headers()["connection"], "close");
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("invalid_request_error", "body_too_large")
    );

    // Chunked, no declared length: refused once the actual size passes the limit.
    let chunks = vec![Ok::<_, std::io::Error>(bytes::Bytes::from(big.clone()))];
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_declared_oversized_body_is_refused_without_waiting_for_it() {
    let (_upstream, app) = app(&[("MAX_BODY_BYTES", "1000"), ("CLIENT_TIMEOUT_SECONDS", "30")]).await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n{";
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf))
        .await
        .expect("answered before the body")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("body_too_large"), "{reply}");
    // The rest of the body may still come: the client is told not to reuse the connection.
    assert!(reply.to_ascii_lowercase().contains("connection: close"), "{reply}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_body_slower_than_the_client_timeout_is_408() {
    let (_upstream, app) = app(&[("CLIENT_TIMEOUT_SECONDS", "0.3")]).await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{\"model\"";
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    assert!(reply.contains("x-should-retry: false"), "{reply}");
    app.shutdown().await;
}

#[tokio::test]
async fn checks_run_in_the_contract_order() {
    let (upstream, app) = app(&[("MAX_BODY_BYTES", "200")]).await;
    let url = app.url("/v1/chat/completions");
    // 413 before 401: an oversized body without credentials.
    let response = app.client.post(&url).body("x".repeat(500)).send().await.unwrap();
    assert_eq!(response.status(), 413);
    // 401 before 400: invalid JSON without credentials.
    let response = app.client.post(&url).body("not json").send().await.unwrap();
    assert_eq!(response.status(), 401);
    // 403 before 400: a valid token for an unknown product, with an invalid body.
    let response = app
        .client
        .post(&url)
        .bearer_auth(jwt("unknown-product", "u"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("permission_error", "product_not_allowed")
    );
    // 400 before the upstream.
    let response = app
        .client
        .post(&url)
        .bearer_auth(jwt("demo", "u"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}
