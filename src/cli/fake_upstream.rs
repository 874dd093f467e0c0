//! The local stand-in for OpenAI's chat completions that `dev` uses when no
//! `OPENAI_API_KEY` is set, so that the whole path works offline.
//!
//! It answers like `POST /v1/chat/completions` (plain JSON, or `stream: true` as
//! Server-Sent Events ending with `data: [DONE]`), echoing the requested model. It binds
//! 127.0.0.1 only and never calls anything.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::mint_jwt::unix_now;

/// A running fake upstream; stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    base: &'static str,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Binds 127.0.0.1 on an ephemeral port and serves in the background.
    pub async fn start() -> io::Result<Self> {
        Self::start_at("/v1", "the api-key-server dev upstream").await
    }

    /// Like [`Self::start`], answering chat completions at `base` + `/chat/completions`
    /// and greeting as `name`, so that a reply tells which upstream answered.
    pub async fn start_at(base: &'static str, name: &'static str) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let router = Router::new().route(
            &format!("{base}/chat/completions"),
            post(move |body: Bytes| async move { chat_completions(&body, name) }),
        );
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "the fake upstream stopped");
            }
        });
        Ok(Self { addr, base, task })
    }

    /// The URL for `OPENAI_BASE_URL`.
    pub fn url(&self) -> String {
        format!("{}/chat/completions", self.base_url())
    }

    /// The API base, for a `PRODUCT_UPSTREAMS` entry's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chat_completions(body: &Bytes, name: &str) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "invalid JSON", "type": "invalid_request_error", "code": null, "param": null}}),
        );
    };
    let model = request["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let prompt = last_user_message(&request);
    let reply = format!("Hello from {name}! You said: {prompt}");
    let id = format!("chatcmpl-dev{:x}", unix_now());
    let created = unix_now();
    let prompt_tokens = words(&prompt);
    let completion_tokens = words(&reply);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });

    if request["stream"].as_bool() != Some(true) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": usage,
                "system_fingerprint": "fp_dev",
            }),
        );
    }

    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_dev",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    events.extend(
        reply
            .split_inclusive(' ')
            .map(|piece| chunk(json!({"content": piece}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if request["stream_options"]["include_usage"].as_bool() == Some(true) {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }));
    }
    let mut sse = String::new();
    for event in &events {
        let _ = write!(sse, "data: {event}\n\n");
    }
    sse.push_str("data: [DONE]\n\n");
    let mut response = Response::new(Body::from(sse));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// The text of the last `user` message (string content or text parts).
fn last_user_message(request: &Value) -> String {
    let Some(message) = request["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
    else {
        return String::new();
    };
    match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn words(text: &str) -> usize {
    text.split_whitespace().count().max(1)
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
