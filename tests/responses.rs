//! The Responses API and embeddings against the real app: stored responses reachable only
//! by their owner (product, principal, user) by every route and by
//! `previous_response_id`, streamed or not, in memory and in Redis; validation and the
//! tool and shared-object policy.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use common::redis::RedisServer;
use common::{CLIENT, HMAC_SECRET, MockUpstream, PRODUCT, TestApp, USER, error_of, hmac_sign, jwt, nonce, now};
use reqwest::Method;

/// Who sends a request.
#[derive(Clone, Copy)]
enum As<'a> {
    Jwt(&'a str, &'a str),
    /// HMAC client `desk` asserting (product, user).
    Hmac(&'a str, &'a str),
}

const ALICE: As<'static> = As::Jwt(PRODUCT, USER);
const BOB: As<'static> = As::Jwt(PRODUCT, "bob");
const DESK_ALICE: As<'static> = As::Hmac(PRODUCT, USER);
const OTHER_ALICE: As<'static> = As::Jwt("other", USER);

async fn send(app: &TestApp, who: As<'_>, method: Method, path: &str, body: &str) -> reqwest::Response {
    let mut request = app.client.request(method.clone(), app.url(path)).body(body.to_owned());
    match who {
        As::Jwt(product, user) => request = request.bearer_auth(jwt(product, user)),
        As::Hmac(product, user) => {
            let signed = hmac_sign(
                HMAC_SECRET,
                method.as_str(),
                path.split('?').next().unwrap_or(path),
                CLIENT,
                product,
                user,
                Some(&nonce()),
                now(),
                body.as_bytes(),
            );
            request = signed.apply(request);
        }
    }
    request.send().await.unwrap()
}

const CREATE: &str = r#"{"model":"gpt-4o","input":"hi"}"#;
const CREATE_STREAM: &str = r#"{"model":"gpt-4o","input":"hi","stream":true}"#;

/// Creates a response as `who` and returns its id (from the JSON body or the stream).
async fn create(app: &TestApp, who: As<'_>, body: &str) -> String {
    let response = send(app, who, Method::POST, "/v1/responses", body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    if body.contains("\"stream\":true") {
        assert!(text.starts_with("event: response.created\n"), "{text}");
        assert!(text.contains("event: response.completed\n"));
        let start = text.find("\"id\":\"").unwrap() + 6;
        text[start..].split('"').next().unwrap().to_owned()
    } else {
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["id"].as_str().unwrap().to_owned()
    }
}

/// Every route to `id`, and a continuation of it, answers `who` 404
/// `response_not_found`, and none reaches the upstream.
async fn assert_unreachable(app: &TestApp, upstream: &MockUpstream, who: As<'_>, id: &str) {
    let before = upstream.requests().len();
    let routes = [
        (Method::GET, format!("/v1/responses/{id}")),
        (Method::DELETE, format!("/v1/responses/{id}")),
        (Method::GET, format!("/v1/responses/{id}/input_items?limit=2")),
        (Method::POST, format!("/v1/responses/{id}/cancel")),
    ];
    for (method, path) in routes {
        let response = send(app, who, method.clone(), &path, "").await;
        assert_eq!(response.status(), 404, "{method} {path}");
        assert_eq!(response.headers()["x-should-retry"], "false");
        let (kind, code, _) = error_of(response).await;
        assert_eq!(
            (kind.as_str(), code.as_str()),
            ("invalid_request_error", "response_not_found")
        );
    }
    for stream in ["false", "true"] {
        let body = format!(r#"{{"model":"gpt-4o","input":"again","previous_response_id":"{id}","stream":{stream}}}"#);
        let response = send(app, who, Method::POST, "/v1/responses", &body).await;
        assert_eq!(response.status(), 404);
        assert_eq!(error_of(response).await.1, "response_not_found");
    }
    assert_eq!(upstream.requests().len(), before, "nothing went upstream");
}

/// The owner reaches `id` by every route (query string included), continues it, and
/// deletes it; after the delete it is gone for the owner too.
async fn assert_owner_reaches(app: &TestApp, upstream: &MockUpstream, who: As<'_>, id: &str) {
    let response = send(app, who, Method::GET, &format!("/v1/responses/{id}"), "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().path, format!("/v1/responses/{id}"));
    assert_eq!(upstream.last().method, Method::GET);
    let response = send(
        app,
        who,
        Method::GET,
        &format!("/v1/responses/{id}/input_items?limit=2"),
        "",
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last().target,
        format!("/v1/responses/{id}/input_items?limit=2")
    );
    assert!(upstream.last().headers.get("content-type").is_none());
    let response = send(app, who, Method::POST, &format!("/v1/responses/{id}/cancel"), "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().method, Method::POST);
    let body = format!(r#"{{"model":"gpt-4o","input":"again","previous_response_id":"{id}"}}"#);
    let next = send(app, who, Method::POST, "/v1/responses", &body).await;
    assert_eq!(next.status(), 200);
    let response = send(app, who, Method::DELETE, &format!("/v1/responses/{id}"), "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().method, Method::DELETE);
    assert_unreachable(app, upstream, who, id).await;
}

async fn isolation(app: &TestApp, upstream: &MockUpstream) {
    for body in [CREATE, CREATE_STREAM] {
        for (owner, others) in [
            (ALICE, [BOB, DESK_ALICE, OTHER_ALICE]),
            (DESK_ALICE, [ALICE, As::Hmac(PRODUCT, "bob"), As::Hmac("other", USER)]),
            (OTHER_ALICE, [ALICE, DESK_ALICE, As::Jwt("other", "bob")]),
        ] {
            let id = create(app, owner, body).await;
            for other in others {
                assert_unreachable(app, upstream, other, &id).await;
            }
            assert_owner_reaches(app, upstream, owner, &id).await;
        }
    }
}

#[tokio::test]
async fn stored_responses_are_reachable_only_by_their_owner_in_memory() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    isolation(&app, &upstream).await;
    // An id the proxy never saw created, existing upstream or not.
    assert_unreachable(&app, &upstream, ALICE, "resp_someone_elses").await;
    assert_unreachable(&app, &upstream, ALICE, "resp%5Fx").await;
}

const REDIS_TIMEOUT: &str = "1000";

#[tokio::test]
async fn stored_responses_are_reachable_only_by_their_owner_in_redis_across_instances() {
    let redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let overrides = [
        ("REDIS_URL", redis.url()),
        ("REDIS_TIMEOUT_MS", REDIS_TIMEOUT.to_owned()),
    ];
    let overrides: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = TestApp::spawn(&upstream.url(), &overrides).await;
    let b = TestApp::spawn(&upstream.url(), &overrides).await;
    isolation(&a, &upstream).await;

    // Created through one instance, found through the other; deleted through the
    // other, gone for the first.
    for body in [CREATE, CREATE_STREAM] {
        let id = create(&a, ALICE, body).await;
        assert_unreachable(&b, &upstream, BOB, &id).await;
        let response = send(&b, ALICE, Method::GET, &format!("/v1/responses/{id}"), "").await;
        assert_eq!(response.status(), 200);
        let response = send(&b, ALICE, Method::DELETE, &format!("/v1/responses/{id}"), "").await;
        assert_eq!(response.status(), 200);
        assert_unreachable(&a, &upstream, ALICE, &id).await;
    }
    // One key per record, under its owner's hash tag.
    let records: Vec<String> = redis.keys().into_iter().filter(|k| k.contains(":resp:")).collect();
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|k| k.starts_with("api-key-server:{o:p:")),
        "{records:?}"
    );
    let ttl: u64 = redis.cli(&["TTL", &records[0]]).parse().unwrap();
    assert!(ttl > 29 * 24 * 3600 && ttl <= 30 * 24 * 3600, "{ttl}");
}

#[tokio::test]
async fn redis_down_answers_503_for_an_unknown_id_and_keeps_new_records_until_it_is_back() {
    let mut redis = RedisServer::start();
    let upstream = MockUpstream::openai().await;
    let overrides = [
        ("REDIS_URL", redis.url()),
        ("REDIS_TIMEOUT_MS", REDIS_TIMEOUT.to_owned()),
    ];
    let overrides: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = TestApp::spawn(&upstream.url(), &overrides).await;
    let b = TestApp::spawn(&upstream.url(), &overrides).await;
    let before = create(&a, ALICE, CREATE).await;
    redis.kill();

    let response = send(&a, ALICE, Method::GET, &format!("/v1/responses/{before}"), "").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-should-retry"], "true");
    let (kind, code, _) = error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("server_error", "ownership_unavailable")
    );

    // Created during the outage: kept in memory, the owner finds it, others do not.
    let during = create(&a, ALICE, CREATE_STREAM).await;
    let response = send(&a, ALICE, Method::GET, &format!("/v1/responses/{during}"), "").await;
    assert_eq!(response.status(), 200);
    let response = send(&a, BOB, Method::GET, &format!("/v1/responses/{during}"), "").await;
    assert_eq!(response.status(), 404);

    // Back: the record made during the outage reaches Redis, and the other instance.
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let response = send(&a, ALICE, Method::GET, &format!("/v1/responses/{during}"), "").await;
        assert_eq!(response.status(), 200);
        let response = send(&b, ALICE, Method::GET, &format!("/v1/responses/{during}"), "").await;
        if response.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the record never reached Redis");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn responses_validation_and_the_default_output_limit() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let post = |body: String| {
        let app = &app;
        async move { send(app, ALICE, Method::POST, "/v1/responses", &body).await }
    };
    for (value, code) in [
        ("15", "invalid_value"),
        ("0", "invalid_value"),
        ("2049", "max_tokens_too_large"),
        ("16.0", "invalid_type"),
        ("\"100\"", "invalid_type"),
    ] {
        let response = post(format!(
            r#"{{"model":"gpt-4o","input":"x","max_output_tokens":{value}}}"#
        ))
        .await;
        assert_eq!(response.status(), 400, "{value}");
        let (_, got, param) = error_of(response).await;
        assert_eq!(
            (got.as_str(), param.as_deref()),
            (code, Some("max_output_tokens")),
            "{value}"
        );
    }
    let response = post(r#"{"input":"x","model":"gpt-4o","max_output_tokens":null,"user":"u"}"#.to_owned()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last().body,
        r#"{"input":"x","model":"gpt-4o","user":"u","max_output_tokens":2048}"#.as_bytes()
    );
    let exact = r#"{"model":"gpt-4o", "input":"x", "max_output_tokens":16}"#;
    assert_eq!(post(exact.to_owned()).await.status(), 200);
    assert_eq!(upstream.last().body, exact.as_bytes());
    assert_eq!(upstream.last().path, "/v1/responses");

    for (body, code, param) in [
        (r#"{"model":"gpt-4o"}"#, "missing_required_field", "input"),
        (r#"{"model":"gpt-9","input":"x"}"#, "model_not_allowed", "model"),
        (
            r#"{"model":"gpt-4o","input":"x","temperature":3}"#,
            "temperature_out_of_range",
            "temperature",
        ),
    ] {
        let response = post(body.to_owned()).await;
        assert_eq!(response.status(), 400);
        let (_, got, got_param) = error_of(response).await;
        assert_eq!((got.as_str(), got_param.as_deref()), (code, Some(param)), "{body}");
    }
}

#[tokio::test]
async fn tools_and_shared_objects_policy_for_responses_and_chat() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let before = upstream.requests().len();
    let refused = |path: &'static str, body: String| {
        let app = &app;
        async move {
            let response = send(app, ALICE, Method::POST, path, &body).await;
            assert_eq!(response.status(), 400, "{body}");
            let (_, code, param) = error_of(response).await;
            (code, param.unwrap_or_default())
        }
    };
    let tool = |t: &str| format!(r#"{{"model":"gpt-4o","input":"x","tools":[{t}]}}"#);
    assert_eq!(
        refused("/v1/responses", tool(r#"{"type":"web_search"}"#)).await,
        ("tool_not_allowed".into(), "tools".into())
    );
    let chat_tool = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"tools":[{"type":"file_search"}]}"#;
    assert_eq!(
        refused("/v1/chat/completions", chat_tool.to_owned()).await,
        ("tool_not_allowed".into(), "tools".into())
    );
    let web = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],"web_search_options":{}}"#;
    assert_eq!(
        refused("/v1/chat/completions", web.to_owned()).await.0,
        "tool_not_allowed"
    );

    for name in ["file_id", "file_ids", "vector_store_ids", "container_id"] {
        let deep = format!(
            r#"{{"model":"gpt-4o","input":[{{"role":"user","content":[{{"type":"input_file","x":{{"y":[{{"{name}":"f_1"}}]}}}}]}}]}}"#
        );
        assert_eq!(
            refused("/v1/responses", deep).await,
            ("unsupported_parameter".into(), name.into())
        );
        let chat = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"file","file":{{"{name}":"f_1"}}}}]}}]}}"#
        );
        assert_eq!(
            refused("/v1/chat/completions", chat).await,
            ("unsupported_parameter".into(), name.into())
        );
    }
    for (body, param) in [
        (
            r#"{"model":"gpt-4o","input":[{"type":"item_reference","id":"msg_1"}]}"#,
            "input",
        ),
        (
            r#"{"model":"gpt-4o","input":"x","conversation":"conv_1"}"#,
            "conversation",
        ),
        (r#"{"model":"gpt-4o","input":"x","prompt":{"id":"pmpt_1"}}"#, "prompt"),
    ] {
        assert_eq!(
            refused("/v1/responses", body.to_owned()).await,
            ("unsupported_parameter".into(), param.into())
        );
    }
    assert_eq!(upstream.requests().len(), before, "nothing refused went upstream");

    // Inside JSON Schema objects and metadata the names are only names.
    let schema = r#"{"type":"object","properties":{"file_id":{"type":"string"},"vector_store_ids":{"type":"array"}}}"#;
    for (path, body) in [
        (
            "/v1/responses",
            format!(
                r#"{{"model":"gpt-4o","input":"x","metadata":{{"file_id":"f"}},"tools":[{{"type":"function","name":"f","parameters":{schema}}}],"text":{{"format":{{"type":"json_schema","name":"s","schema":{schema}}}}}}}"#
            ),
        ),
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"x"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{schema}}}}}],"response_format":{{"type":"json_schema","json_schema":{{"name":"s","schema":{schema}}}}}}}"#
            ),
        ),
    ] {
        let response = send(&app, ALICE, Method::POST, path, &body).await;
        assert_eq!(response.status(), 200, "{body}");
    }
}

#[tokio::test]
async fn tools_allowed_by_setting_pass() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[("ALLOWED_TOOLS", r#"["function","web_search"]"#)]).await;
    let body = r#"{"model":"gpt-4o","input":"x","tools":[{"type":"web_search"}]}"#;
    assert_eq!(
        send(&app, ALICE, Method::POST, "/v1/responses", body).await.status(),
        200
    );
}

#[tokio::test]
async fn embeddings_are_validated_and_forwarded() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let body = r#"{"model":"text-embedding-3-small","input":["a","b"],"encoding_format":"float"}"#;
    let response = send(&app, DESK_ALICE, Method::POST, "/v1/embeddings", body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-ratelimit-limit-requests"));
    let value: serde_json::Value = response.json().await.unwrap();
    assert_eq!(value["data"][0]["object"], "embedding");
    assert_eq!(upstream.last().path, "/v1/embeddings");
    assert_eq!(upstream.last().body, body.as_bytes());

    for (input, code) in [
        (r#""""#, "invalid_value"),
        ("[]", "invalid_value"),
        (r#"["a",1]"#, "invalid_value"),
        ("[[]]", "invalid_value"),
        ("{}", "invalid_type"),
    ] {
        let body = format!(r#"{{"model":"text-embedding-3-small","input":{input}}}"#);
        let response = send(&app, ALICE, Method::POST, "/v1/embeddings", &body).await;
        assert_eq!(response.status(), 400, "{input}");
        let (_, got, param) = error_of(response).await;
        assert_eq!((got.as_str(), param.as_deref()), (code, Some("input")));
    }
    let many = format!(
        r#"{{"model":"text-embedding-3-small","input":[{}]}}"#,
        vec!["1"; 2049].join(",")
    );
    assert_eq!(
        send(&app, ALICE, Method::POST, "/v1/embeddings", &many).await.status(),
        400
    );
    let chat_model = r#"{"model":"gpt-4o","input":"a"}"#;
    let response = send(&app, ALICE, Method::POST, "/v1/embeddings", chat_model).await;
    assert_eq!(error_of(response).await.1, "model_not_allowed");
    let response = send(
        &app,
        ALICE,
        Method::POST,
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"a","dimensions":0}"#,
    )
    .await;
    assert_eq!(error_of(response).await.2.as_deref(), Some("dimensions"));
}

#[tokio::test]
async fn models_lists_embedding_models_too_and_methods_are_checked() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let response = send(&app, ALICE, Method::GET, "/v1/models", "").await;
    let value: serde_json::Value = response.json().await.unwrap();
    let ids: Vec<&str> = value["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small",
            "text-embedding-3-large"
        ]
    );
    let response = send(&app, ALICE, Method::GET, "/v1/models/text-embedding-3-large", "").await;
    assert_eq!(response.status(), 200);

    for (method, path, allow) in [
        (Method::GET, "/v1/responses", "POST"),
        (Method::GET, "/v1/embeddings", "POST"),
        (Method::PUT, "/v1/responses/resp_1", "GET, HEAD, DELETE"),
        (Method::GET, "/v1/responses/resp_1/cancel", "POST"),
        (Method::POST, "/v1/responses/resp_1/input_items", "GET, HEAD"),
    ] {
        let response = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow);
    }
}

#[tokio::test]
async fn log_lines_of_responses_routes_name_the_response() {
    let upstream = MockUpstream::openai().await;
    let env = common::base_env(&upstream.url());
    let server = common::ServerProcess::start(&env).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let created: serde_json::Value = client
        .post(server.url("/v1/responses"))
        .bearer_auth(jwt(PRODUCT, USER))
        .body(CREATE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let response = client
        .get(server.url(&format!("/v1/responses/{id}")))
        .bearer_auth(jwt(PRODUCT, "bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lines = loop {
        let lines: Vec<serde_json::Value> = server
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["message"] == "request")
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "two request lines");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines[0]["response_id"], id.as_str());
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[1]["response_id"], id.as_str());
    assert_eq!(lines[1]["error"], "response_not_found");
}

#[tokio::test]
async fn a_streamed_responses_id_is_recorded_before_the_client_sees_it() {
    use axum::response::Response;
    use http::HeaderValue;
    use std::sync::{Arc, Mutex};
    // An upstream whose stream stays open after `response.created` until the test ends it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let slot = Arc::new(Mutex::new(Some(tx)));
    let router = axum::Router::new()
        .route("/v1/responses/{id}", axum::routing::get(|| async { "{}" }))
        .route(
            "/v1/responses",
            axum::routing::post(move || {
                let slot = slot.clone();
                async move {
                    let (feed, body, _dropped) = common::channel_body();
                    if let Some(tx) = slot.lock().unwrap().take() {
                        let _ = tx.send(feed);
                    }
                    let mut response = Response::new(body);
                    response
                        .headers_mut()
                        .insert("content-type", HeaderValue::from_static("text/event-stream"));
                    response
                }
            }),
        );
    let upstream = MockUpstream::start(router).await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    // The answer's head waits for the id too: send from a task of its own.
    let request = app
        .client
        .post(app.url("/v1/responses"))
        .bearer_auth(jwt(PRODUCT, USER))
        .body(CREATE_STREAM)
        .send();
    let pending = tokio::spawn(request);
    let feed = rx.await.unwrap();
    let first = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_live\",\"status\":\"in_progress\"}}\n\n";
    // The id arrives split across two chunks.
    feed.send(Ok(bytes::Bytes::from(&first[..60]))).await.unwrap();
    feed.send(Ok(bytes::Bytes::from(&first[60..]))).await.unwrap();
    let mut stream = pending.await.unwrap().unwrap();
    assert_eq!(stream.status(), 200);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("resp_live\"") {
        let chunk = stream.chunk().await.unwrap().expect("more of the stream");
        seen.extend_from_slice(&chunk);
    }
    // The stream is still open, and the record already exists: the owner reaches it,
    // nobody else does.
    let response = send(&app, BOB, Method::GET, "/v1/responses/resp_live", "").await;
    assert_eq!(response.status(), 404);
    let response = send(&app, ALICE, Method::GET, "/v1/responses/resp_live", "").await;
    assert_eq!(response.status(), 200);
    drop(feed);
    assert!(stream.chunk().await.unwrap().is_none());
}
