//! Routes: health, models, 404 and 405 in the envelope, request ids on every response.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use common::{MockUpstream, TestApp, error_of, jwt};

async fn app() -> (MockUpstream, TestApp) {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[("ALLOWED_MODELS", r#"["gpt-4o","gpt-4o-mini","ft:gpt-4o:acme"]"#)],
    )
    .await;
    (upstream, app)
}

#[tokio::test]
async fn health_routes_answer_ok_without_credentials() {
    let (_upstream, app) = app().await;
    for path in ["/healthz", "/health"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"status": "ok"}));
    }
    app.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_are_404_in_the_envelope() {
    let (_upstream, app) = app().await;
    for path in ["/", "/v1/completions", "/v1/chat/completions/x", "/v2/models"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.headers()["x-should-retry"], "false");
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(response.headers()["content-type"], "application/json");
        let (kind, code, param) = error_of(response).await;
        assert_eq!(
            (kind.as_str(), code.as_str(), param),
            ("invalid_request_error", "not_found", None)
        );
    }
    let response = app.client.post(app.url("/nope")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 404);
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let (upstream, app) = app().await;
    let cases = [
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::PUT, "/v1/chat/completions", "POST"),
        (reqwest::Method::POST, "/health", "GET, HEAD"),
        (reqwest::Method::DELETE, "/healthz", "GET, HEAD"),
        (reqwest::Method::POST, "/v1/models", "GET, HEAD"),
        (reqwest::Method::POST, "/v1/models/gpt-4o", "GET, HEAD"),
    ];
    for (method, path, allow) in cases {
        let response = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert_eq!(response.headers()["x-should-retry"], "false");
        let (kind, code, _) = error_of(response).await;
        assert_eq!(
            (kind.as_str(), code.as_str()),
            ("invalid_request_error", "method_not_allowed")
        );
    }
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn models_list_is_openai_shaped_and_needs_credentials() {
    let (_upstream, app) = app().await;
    let response = app.client.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("authentication_error", "missing_credentials")
    );

    let response = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(jwt("demo", "u"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // Chat models, then embedding models (`ALLOWED_EMBEDDING_MODELS`' default).
    assert_eq!(
        ids,
        [
            "gpt-4o",
            "gpt-4o-mini",
            "ft:gpt-4o:acme",
            "text-embedding-3-small",
            "text-embedding-3-large"
        ]
    );
    for model in body["data"].as_array().unwrap() {
        assert_eq!(model["object"], "model");
        assert!(model["created"].is_i64());
        assert!(model["owned_by"].is_string());
    }
    app.shutdown().await;
}

#[tokio::test]
async fn one_model_or_model_not_found() {
    let (_upstream, app) = app().await;
    let token = jwt("demo", "u");
    for (path, id) in [
        ("/v1/models/gpt-4o-mini", "gpt-4o-mini"),
        ("/v1/models/ft:gpt-4o:acme", "ft:gpt-4o:acme"),
        ("/v1/models/ft%3Agpt-4o%3Aacme", "ft:gpt-4o:acme"),
    ] {
        let response = app.client.get(app.url(path)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["id"], id);
        assert_eq!(body["object"], "model");
    }
    let response = app
        .client
        .get(app.url("/v1/models/gpt-5"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("invalid_request_error", "model_not_found")
    );
    // Credentials come before the model lookup.
    let response = app.client.get(app.url("/v1/models/gpt-5")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    app.shutdown().await;
}

#[tokio::test]
async fn request_ids_are_echoed_when_valid_and_replaced_otherwise() {
    let (upstream, app) = app().await;
    let sent = "client-id_1.2-ABC";
    let response = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", sent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], sent);

    for bad in ["has space", "semi;colon", &"a".repeat(129)] {
        let response = app
            .client
            .get(app.url("/health"))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, bad);
        assert!(
            !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        );
    }
    let a = app.client.get(app.url("/nope")).send().await.unwrap().headers()["x-request-id"].clone();
    let b = app.client.get(app.url("/nope")).send().await.unwrap().headers()["x-request-id"].clone();
    assert_ne!(a, b);

    // The same id travels upstream.
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .header("x-request-id", "trace-me-123")
        .body(common::CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
    assert_eq!(upstream.last().headers["x-request-id"], "trace-me-123");
    app.shutdown().await;
}

#[tokio::test]
async fn head_on_health_has_no_body() {
    let (_upstream, app) = app().await;
    let response = app.client.head(app.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty());
    app.shutdown().await;
}
