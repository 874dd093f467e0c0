//! Routes, 404/405, health, and the error envelope on every route.
mod common;

use common::{MockUpstream, TestApp};

#[tokio::test]
async fn health_routes_answer_ok() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    for path in ["/healthz", "/health"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"status": "ok"}));
    }
    app.shutdown().await;
}
