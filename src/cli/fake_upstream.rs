//! The local stand-in for OpenAI that `dev` uses when no `OPENAI_API_KEY` is set, so
//! that the whole path works offline.
//!
//! It answers like `POST /v1/chat/completions` (plain JSON, or `stream: true` as
//! Server-Sent Events ending with `data: [DONE]`), `POST /v1/responses` (plain, or
//! streamed as named events), the stored-response routes (any id: it keeps nothing), and
//! `POST /v1/embeddings`, echoing the requested model. It binds 127.0.0.1 only and never
//! calls anything.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
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
        let router = Router::new()
            .route(
                &format!("{base}/chat/completions"),
                post(move |body: Bytes| async move { chat_completions(&body, name) }),
            )
            .route(&format!("{base}/responses"), post(responses))
            .route(&format!("{base}/responses/{{id}}"), get(stored).delete(deleted))
            .route(&format!("{base}/responses/{{id}}/input_items"), get(input_items))
            .route(&format!("{base}/responses/{{id}}/cancel"), post(stored))
            .route(&format!("{base}/embeddings"), post(embeddings));
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

static RESPONSE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A Responses API object: `status` `completed` with one message, or `in_progress`
/// with none.
fn response_object(id: &str, model: &str, reply: Option<&str>, input_tokens: usize) -> Value {
    let output = reply.map_or_else(Vec::new, |text| {
        vec![json!({
            "type": "message",
            "id": format!("msg_{id}"),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        })]
    });
    let output_tokens = reply.map_or(0, words);
    json!({
        "id": id,
        "object": "response",
        "created_at": unix_now(),
        "status": if reply.is_some() { "completed" } else { "in_progress" },
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    })
}

async fn responses(body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "invalid JSON", "type": "invalid_request_error", "code": null, "param": null}}),
        );
    };
    let model = request["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let prompt = match &request["input"] {
        Value::String(text) => text.clone(),
        Value::Array(items) => last_user_message(&json!({ "messages": items })),
        _ => String::new(),
    };
    let reply = format!("Hello from the api-key-server dev upstream! You said: {prompt}");
    let n = RESPONSE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("resp_dev{:x}{n:x}", unix_now());
    let input_tokens = words(&prompt);
    let done = response_object(&id, &model, Some(&reply), input_tokens);
    if request["stream"].as_bool() != Some(true) {
        return json_response(StatusCode::OK, &done);
    }
    let mut events = vec![(
        "response.created",
        json!({"type": "response.created", "response": response_object(&id, &model, None, input_tokens)}),
    )];
    for piece in reply.split_inclusive(' ') {
        events.push((
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "item_id": format!("msg_{id}"), "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push((
        "response.completed",
        json!({"type": "response.completed", "response": done}),
    ));
    let mut sse = String::new();
    for (number, (name, mut event)) in events.into_iter().enumerate() {
        event["sequence_number"] = json!(number);
        let _ = write!(sse, "event: {name}\ndata: {event}\n\n");
    }
    let mut response = Response::new(Body::from(sse));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// `GET /v1/responses/{id}` and `POST .../cancel`: it keeps nothing, so any id is a
/// completed response.
async fn stored(Path(id): Path<String>) -> Response {
    json_response(
        StatusCode::OK,
        &response_object(
            &id,
            "gpt-4o-mini",
            Some("Hello from the api-key-server dev upstream!"),
            1,
        ),
    )
}

async fn deleted(Path(id): Path<String>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "response", "deleted": true}),
    )
}

async fn input_items() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false}),
    )
}

/// Three numbers per input, from its length: enough to see the answer made the trip.
async fn embeddings(body: Bytes) -> Response {
    let request = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("text-embedding-3-small").to_owned();
    let inputs: Vec<Value> = match &request["input"] {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let base64 = request["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            #[allow(clippy::cast_precision_loss, reason = "a small length, shown as a number")]
            let vector = [input.to_string().len() as f32 / 100.0, 0.5, -0.25];
            // The SDKs ask for base64 (little-endian f32s) unless told otherwise.
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = inputs.len();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
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
