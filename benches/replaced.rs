//! The hand-written parts that replaced a library for speed, each against the library it
//! replaced, doing the same work (`bench/replaced.sh` runs the comparison):
//!
//! - `router/*`: [`Route::of`] and the method checks of `app::dispatch`, against axum's
//!   `Router` (matchit, with the `matched-path` feature the crate used) with the same
//!   routes and fallbacks; `router/none` only builds the request and calls the handler.
//! - `log/*`: a chat request's log line written directly (`log/direct`, today's), through a
//!   `tracing` event and the Cloud Logging formatter it replaced (`log/tracing`), through
//!   tracing-subscriber's own text formatter (`log/text`, `LOG_FORMAT=text`); `log/off`
//!   is the part of [`LogLine`] that is not the line (request id, metrics), with the
//!   request line filtered out. Lines go to stdout.
//! - `time/*`: the line's RFC 3339 timestamp with microseconds, from jiff's `Timestamp`
//!   (what the line uses since the hand-written formatter measured here did not earn its
//!   lines: docs/benchmarks.md), from tracing-subscriber's `SystemTime` and from the
//!   `time` crate.
//! - `pool/*`: one chat request through [`Upstream::forward`] (today's pool) and through
//!   the legacy client it replaced, to a mock upstream in another process on loopback,
//!   the answer read to its end.
//!
//! `replaced run VARIANT N` runs N iterations of one variant and prints the wall time per
//! iteration on stderr; the script runs it under callgrind for two values of N, so that
//! the difference, divided by the difference of N, is the instructions of one iteration
//! without the start-up. `replaced mock` is the mock upstream. Without arguments (as
//! `cargo test` runs it), every variant runs a few iterations in its own process and the
//! variants' outputs are checked against each other.
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::print_stdout,
    reason = "a benchmark harness, whose children report on stdout"
)]

#[path = "replaced/legacy_client.rs"]
mod legacy_client;
#[path = "replaced/tracing_line.rs"]
mod tracing_line;

use std::convert::Infallible;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use api_key_server::app::Route;
use api_key_server::request::Outcome;
use api_key_server::settings::{LogFormat, Settings};
use api_key_server::telemetry::{self, LogLine, RequestLog};
use api_key_server::upstream::{Call, Upstreams};
use axum::Router;
use axum::body::Body;
use axum::extract::Request as AxumRequest;
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tower::ServiceExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Every variant, hand-written first in each part.
const VARIANTS: [&str; 12] = [
    "router/by-hand",
    "router/axum",
    "router/none",
    "log/direct",
    "log/tracing",
    "log/text",
    "log/off",
    "time/jiff",
    "time/tracing-subscriber",
    "time/time-crate",
    "pool/by-hand",
    "pool/legacy-client",
];

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;
/// The answer of `bench/loadgen.rs`'s mock (259 bytes).
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["run", variant, n] => {
            let n: u64 = n.parse().expect("an iteration count");
            let elapsed = run(variant, n);
            #[allow(clippy::cast_precision_loss, reason = "a figure to print")]
            let per_iteration = elapsed.as_nanos() as f64 / n.max(1) as f64;
            eprintln!("replaced: {variant} {n} iterations, {per_iteration:.1} ns each");
        }
        ["mock"] => mock(),
        // `cargo test` passes no argument (`cargo bench` passes `--bench`): check every
        // variant once, each in its own process (a process has one log subscriber).
        _ => check(),
    }
}

/// Runs `n` iterations of `variant` after its set-up; returns their wall time.
fn run(variant: &str, n: u64) -> Duration {
    let (part, _) = variant.split_once('/').expect("part/variant");
    match part {
        "router" => router(variant, n),
        "log" => log(variant, n),
        "time" => timestamp(variant, n),
        "pool" => pool(variant, n),
        _ => panic!("unknown variant {variant}"),
    }
}

// ---------------------------------------------------------------------------------------
// router

/// What a handler answers here: the same for every route, so that only routing differs.
async fn answer(request: AxumRequest) -> Response {
    black_box(&request);
    Response::new(Body::empty())
}

fn status(code: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = code;
    response
}

async fn not_found() -> Response {
    status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed() -> Response {
    status(StatusCode::METHOD_NOT_ALLOWED)
}

/// `app::dispatch`'s routing, with [`answer`] for every handler.
async fn by_hand(request: AxumRequest) -> Response {
    let route = Route::of(request.uri().path());
    // The log line's route template, which axum gives as `MatchedPath`.
    black_box(route.template());
    let method = request.method();
    let get = method == Method::GET || method == Method::HEAD;
    match route {
        Route::Unknown => not_found().await,
        Route::ChatCompletions if method == Method::POST => answer(request).await,
        Route::ChatCompletions => method_not_allowed().await,
        _ if !get => method_not_allowed().await,
        _ => answer(request).await,
    }
}

/// The routes of `app::router` before commit 3ebf990, with [`answer`] for every handler.
fn axum_router() -> Router {
    Router::new()
        .route("/healthz", get(answer).fallback(method_not_allowed))
        .route("/health", get(answer).fallback(method_not_allowed))
        .route("/v1/chat/completions", post(answer).fallback(method_not_allowed))
        .route("/v1/models", get(answer).fallback(method_not_allowed))
        .route("/v1/models/{*model}", get(answer).fallback(method_not_allowed))
        .fallback(not_found)
}

/// A body-less request as hyper hands it over, boxed into axum's body as a router does.
fn request(method: Method, uri: &Uri) -> AxumRequest {
    let mut request = Request::new(Body::new(Empty::<Bytes>::new()));
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    request
}

/// Routes `request` with `variant`; every future here is ready at once.
fn route(variant: &str, router: &Router, request: AxumRequest) -> Response {
    let answered = match variant {
        "router/by-hand" => by_hand(request).now_or_never(),
        // A clone per request, as a hyper service over a router makes one.
        "router/axum" => router
            .clone()
            .oneshot(request)
            .now_or_never()
            .map(|r| r.unwrap_or_else(|e| match e {})),
        "router/none" => answer(request).now_or_never(),
        _ => panic!("unknown variant {variant}"),
    };
    answered.expect("no handler here waits")
}

fn router(variant: &str, n: u64) -> Duration {
    let router = axum_router();
    let uri = Uri::from_static("/v1/chat/completions");
    let start = Instant::now();
    for _ in 0..n {
        let response = route(variant, &router, request(Method::POST, &uri));
        black_box(response);
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// log

fn log(variant: &str, n: u64) -> Duration {
    let subscriber = |filter: &str| {
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(std::io::stdout)
    };
    match variant {
        "log/direct" => telemetry::init(LogFormat::Json),
        "log/tracing" => subscriber("info")
            .event_format(tracing_line::CloudLogging::new(None))
            .init(),
        "log/text" => telemetry::init(LogFormat::Text),
        "log/off" => subscriber("info,request=off").init(),
        _ => panic!("unknown variant {variant}"),
    }
    // A chat request as the proxy logs it after a 200 from the upstream.
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from_static("/v1/chat/completions");
    request
        .headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static("OpenAI/Python 1.54.0"));
    let product: Arc<str> = Arc::from("demo");
    let user: Arc<str> = Arc::from("user-0042");
    let upstream_id = HeaderValue::from_static("req_mock_upstream");
    let start = Instant::now();
    for _ in 0..n {
        let line = LogLine::begin(&request, Route::ChatCompletions.template());
        let log = RequestLog {
            product: Some(product.clone()),
            user: Some(user.clone()),
            upstream_status: Some(200),
            upstream_request_id: Some(upstream_id.clone()),
            upstream_latency: Some(Duration::from_micros(830)),
            ..RequestLog::default()
        };
        // An empty body has ended: dropping it writes the line.
        drop(line.finish(Outcome {
            response: Response::new(Body::empty()),
            log,
        }));
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------
// time

fn timestamp(variant: &str, n: u64) -> Duration {
    let description =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
    let mut text = String::with_capacity(64);
    let mut bytes = Vec::with_capacity(64);
    let start = Instant::now();
    for _ in 0..n {
        text.clear();
        bytes.clear();
        match variant {
            "time/jiff" => {
                let now = jiff::Timestamp::try_from(SystemTime::now()).unwrap();
                std::fmt::Write::write_fmt(&mut text, format_args!("{now:.6}")).unwrap();
            }
            "time/tracing-subscriber" => tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut text))
                .unwrap(),
            "time/time-crate" => {
                time::OffsetDateTime::now_utc()
                    .format_into(&mut bytes, description)
                    .unwrap();
            }
            _ => panic!("unknown variant {variant}"),
        }
        black_box((&text, &bytes));
    }
    let elapsed = start.elapsed();
    // The last one, for `check`.
    println!("{text}{}", String::from_utf8_lossy(&bytes));
    elapsed
}

// ---------------------------------------------------------------------------------------
// pool

fn pool(variant: &str, n: u64) -> Duration {
    // The mock runs in its own process, so that callgrind counts the client alone.
    let mut mock = Command::new(std::env::current_exe().unwrap())
        .arg("mock")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let url: Uri = format!("http://127.0.0.1:{}/v1/chat/completions", port.trim())
        .parse()
        .unwrap();

    // The proxy's runtime when it may use one CPU.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let elapsed = runtime.block_on(async {
        let settings = Settings::from_lookup(|name| match name {
            "API_KEY_SERVER_PRODUCT_KEYS" => Some(r#"{"bench":"sk-bench"}"#.to_owned()),
            "API_KEY_SERVER_CLIENT_HMAC_SECRETS" => Some(r#"{"c":"0123456789abcdef0123456789abcdef"}"#.to_owned()),
            "API_KEY_SERVER_OPENAI_BASE_URL" => Some(url.to_string()),
            _ => None,
        })
        .unwrap();
        let upstreams = Upstreams::new(&settings);
        let by_hand = upstreams.of("bench").unwrap();
        let legacy = legacy_client::LegacyUpstream::new(url, Duration::from_secs(120), Duration::from_secs(300));
        let body = Bytes::from_static(CHAT.as_bytes());
        let authorization = HeaderValue::from_static("Bearer sk-bench");
        let request_id = HeaderValue::from_static("req_0123456789abcdef000000000001");
        let mut client_headers = HeaderMap::new();
        client_headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        client_headers.insert(header::USER_AGENT, HeaderValue::from_static("OpenAI/Python 1.54.0"));
        let start = Instant::now();
        for _ in 0..n {
            let args = (body.clone(), &authorization, &request_id, &client_headers);
            let forwarded = match variant {
                "pool/by-hand" => by_hand
                    .forward(Call {
                        method: http::Method::POST,
                        path: "/chat/completions",
                        body: Some(args.0),
                        request_id: args.2,
                        client_headers: args.3,
                    })
                    .await
                    .map_err(|f| f.error),
                "pool/legacy-client" => legacy.forward(args.0, args.1, args.2, args.3).await,
                _ => panic!("unknown variant {variant}"),
            }
            .unwrap();
            assert_eq!(forwarded.status, 200);
            let answer = forwarded.response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(answer, COMPLETION.as_bytes());
        }
        start.elapsed()
    });
    drop(mock.stdin.take());
    let _ = mock.wait();
    elapsed
}

/// The mock upstream: `bench/loadgen.rs`'s answer to a chat request, on a free port of
/// 127.0.0.1 printed on stdout; it ends when its stdin closes (the benchmark ended).
fn mock() {
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    let mut response = http::Response::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())));
                    let headers = response.headers_mut();
                    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    headers.insert("x-request-id", HeaderValue::from_static("req_mock_upstream"));
                    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// check (`cargo test`)

/// Runs `variant` for `n` iterations in a child process; returns its stdout.
fn output_of(variant: &str, n: u64) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["run", variant, &n.to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{variant} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A request line without what differs from one line to the next (time, latency, id).
fn steady(line: &str) -> serde_json::Value {
    let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
    for key in ["time", "latency_ms", "request_id"] {
        value[key] = serde_json::Value::Null;
    }
    value["httpRequest"]["latency"] = serde_json::Value::Null;
    value
}

fn check() {
    // The two routers answer every kind of path alike.
    let router = axum_router();
    for (method, path, expected) in [
        (Method::POST, "/v1/chat/completions", StatusCode::OK),
        (Method::GET, "/v1/chat/completions", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/healthz", StatusCode::OK),
        (Method::HEAD, "/health", StatusCode::OK),
        (Method::POST, "/v1/models", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/v1/models/gpt-4o", StatusCode::OK),
        (Method::GET, "/v1/models/a/b", StatusCode::OK),
        (Method::GET, "/nope", StatusCode::NOT_FOUND),
    ] {
        let uri = Uri::from_static(path);
        for variant in ["router/by-hand", "router/axum"] {
            let response = route(variant, &router, request(method.clone(), &uri));
            assert_eq!(response.status(), expected, "{variant} {method} {path}");
        }
    }

    // Every variant runs, each in its own process.
    let outputs: std::collections::HashMap<&str, String> = VARIANTS
        .iter()
        .map(|variant| (*variant, output_of(variant, 2)))
        .collect();

    // The direct line is the line the tracing formatter wrote; the text format writes
    // one line too, and `off` none.
    let direct = &outputs["log/direct"];
    assert_eq!(direct.lines().count(), 2, "{direct}");
    for (a, b) in direct.lines().zip(outputs["log/tracing"].lines()) {
        assert_eq!(steady(a), steady(b), "\n{a}\n{b}");
    }
    assert_eq!(outputs["log/text"].lines().count(), 2);
    assert_eq!(outputs["log/off"], "");

    // The three timestamps have one form (digit for digit; their values were read at
    // different times).
    let form = |variant: &str| outputs[variant].trim().replace(|c: char| c.is_ascii_digit(), "0");
    assert_eq!(form("time/jiff"), "0000-00-00T00:00:00.000000Z");
    assert_eq!(form("time/tracing-subscriber"), form("time/jiff"));
    assert_eq!(form("time/time-crate"), form("time/jiff"));
}
