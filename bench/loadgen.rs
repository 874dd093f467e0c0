//! The benchmark's load generator and mock upstream (`bench/run.sh` drives it; the
//! figures land in `docs/benchmarks.md`).
//!
//! - `mock`: a fast upstream on 127.0.0.1 answering a fixed chat completion, or Server-Sent
//!   Events (N chunks at a fixed interval) when the request body says `"stream":true`; on
//!   `.../responses` a Responses API object (its id new each time, as the proxy records
//!   every id for its owner), on `.../embeddings` a fixed embeddings list.
//! - `mint`: a pool of RS256 tokens, one per line, minted before a timed run so that
//!   signing never loads the generator while it measures.
//! - `run`: a closed loop over N persistent HTTP/1.1 connections for a fixed time (after a
//!   warm-up), sending one API's fixed request (`--api`), with a latency histogram, the measured process's CPU time per request
//!   (from `/proc`) and its memory; one JSON line on stdout.
//! - `streams`: N concurrent long streams (one per connection, started evenly over a ramp,
//!   each followed by the next on its connection), timing the first chunk and the gaps,
//!   and the measured processes' CPU per forwarded chunk and memory; one JSON line.
//! - `coldstart`: process start to the first `200` from `/healthz`.
//!
//! It is a Cargo example so that it shares the crate's dependencies and build; it never
//! runs in the test suite and only ever talks to 127.0.0.1.
#![allow(
    clippy::print_stdout,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a command-line tool whose output is a report of measured figures"
)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use hmac::{KeyInit, Mac};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

type HmacSha256 = hmac::Hmac<Sha256>;
type Error = Box<dyn std::error::Error + Send + Sync>;

/// The request every mode sends: it names its own `max_tokens`, so the proxy forwards the
/// original bytes (the common case).
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;
const CHAT_STREAM: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16,"stream":true}"#;

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}"#;
const CHUNK: &[u8] = b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

/// The Responses API request: its own `max_output_tokens`, as the chat request.
const RESPONSES: &str = r#"{"model":"gpt-4o-mini","input":"Say hello in one word.","max_output_tokens":16}"#;
const EMBEDDINGS: &str = r#"{"model":"text-embedding-3-small","input":"hello"}"#;

/// The mock's Responses API answer around its id (`resp_bench_<n>`).
const RESPONSE_HEAD: &str = r#"{"id":"resp_bench_"#;
const RESPONSE_TAIL: &str = r#"","object":"response","created_at":1700000000,"status":"completed","model":"gpt-4o-mini","output":[{"type":"message","id":"msg_bench","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello!","annotations":[]}]}],"usage":{"input_tokens":14,"output_tokens":2,"total_tokens":16}}"#;
const EMBEDDING_LIST: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0123,-0.0456,0.0789]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":1,"total_tokens":1}}"#;

/// Numbers the mock's Responses answers: each id is new.
static RESPONSE_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Parser)]
#[command(about = "Load generator and mock upstream of the api-key-server benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a fast mock of OpenAI's chat completions (plain JSON and SSE), Responses and
    /// embeddings.
    Mock(MockArgs),
    /// Mint RS256 tokens for distinct users, one per line.
    Mint(MintArgs),
    /// Put load on a URL and print one JSON line of figures.
    Run(RunArgs),
    /// Hold N concurrent streams on a URL and print one JSON line of figures.
    Streams(StreamsArgs),
    /// Time a command from process start to the first 200 from `/healthz`.
    Coldstart(ColdArgs),
    /// Wait until 127.0.0.1:<port>/healthz answers 200 (at most 10 s).
    Wait {
        #[arg(long)]
        port: u16,
    },
}

#[derive(Args)]
struct MockArgs {
    /// Port on 127.0.0.1 (0: any); the bound address is printed on stdout.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// SSE data chunks per streamed answer (plus the final `[DONE]`).
    #[arg(long, default_value_t = 10)]
    sse_chunks: u32,
    /// Time between SSE chunks, in microseconds.
    #[arg(long, default_value_t = 5000)]
    sse_interval_us: u64,
}

#[derive(Args)]
struct MintArgs {
    /// PEM of the RSA private key.
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "bench")]
    kid: String,
    #[arg(long, default_value = "demo")]
    product: String,
    /// Tokens to mint, each for its own user.
    #[arg(long)]
    count: usize,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3000)]
    ttl: u64,
    /// Threads that sign.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// No credentials (direct to the mock, or nginx that adds the key).
    Plain,
    /// JWTs from `--tokens`, round robin (the cache's hit pattern).
    Jwt,
    /// Each JWT from `--tokens` once (an RSA verification per request); stops when used up.
    JwtNew,
    /// HMAC headers signed per request, with a fresh nonce.
    Hmac,
}

/// Which API `run` calls: the request body, and the path the URL must end with.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Api {
    /// `POST .../chat/completions`.
    Chat,
    /// `POST .../responses`.
    Responses,
    /// `POST .../embeddings`.
    Embeddings,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/chat/completions",
            Self::Responses => "/responses",
            Self::Embeddings => "/embeddings",
        }
    }

    fn body(self, stream: bool) -> Result<&'static str, Error> {
        match (self, stream) {
            (Self::Chat, false) => Ok(CHAT),
            (Self::Chat, true) => Ok(CHAT_STREAM),
            (Self::Responses, false) => Ok(RESPONSES),
            (Self::Embeddings, false) => Ok(EMBEDDINGS),
            _ => Err("--stream is for --api chat only".into()),
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// `http://127.0.0.1:<port>/v1/chat/completions` (or `.../responses`, `.../embeddings`:
    /// its path ends with `--api`'s).
    #[arg(long)]
    url: String,
    /// The API called: its fixed request body.
    #[arg(long, value_enum, default_value = "chat")]
    api: Api,
    #[arg(long, value_enum, default_value = "plain")]
    mode: Mode,
    /// Persistent connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unmeasured seconds before.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Processes whose CPU time and memory are reported (the proxy, or nginx's processes).
    #[arg(long)]
    pid: Vec<u32>,
    /// The row this run belongs to, copied into the output.
    #[arg(long, default_value = "")]
    label: String,
    /// Token file (`mint`), for the JWT modes.
    #[arg(long)]
    tokens: Option<PathBuf>,
    #[arg(long, default_value = "bench")]
    hmac_client: String,
    #[arg(long, env = "BENCH_HMAC_SECRET", hide_env_values = true, default_value = "")]
    hmac_secret: String,
    #[arg(long, default_value = "demo")]
    product: String,
    /// Distinct HMAC users, round robin.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Ask for `stream: true` and time the first chunk and the gaps between chunks.
    #[arg(long)]
    stream: bool,
}

#[derive(Args)]
struct StreamsArgs {
    /// `http://127.0.0.1:<port>/v1/chat/completions`.
    #[arg(long)]
    url: String,
    /// `plain` (direct, nginx) or `jwt`.
    #[arg(long, value_enum, default_value = "plain")]
    mode: Mode,
    /// Token file (`mint`), for `jwt`.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Concurrent streams, each on its own persistent connection.
    #[arg(long)]
    streams: usize,
    /// Seconds over which the connections start their first stream, evenly: set it to a
    /// stream's length so that streams start at a steady pace, not in waves.
    #[arg(long, default_value_t = 5.0)]
    ramp: f64,
    /// Unmeasured seconds before the window (at least the ramp).
    #[arg(long, default_value_t = 6.0)]
    warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Processes whose CPU time and memory are reported.
    #[arg(long)]
    pid: Vec<u32>,
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Args)]
struct ColdArgs {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The command (its environment is this process's, plus `PORT`).
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mock(args) => runtime().and_then(|rt| rt.block_on(mock(args))),
        Command::Mint(args) => mint(&args),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run(args))),
        Command::Streams(args) => runtime().and_then(|rt| rt.block_on(streams(args))),
        Command::Coldstart(args) => coldstart(&args),
        Command::Wait { port } => wait(port),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One thread: the generator and the mock share one pinned core, and a single-threaded
/// runtime spends nothing on work stealing.
fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

// ---------------------------------------------------------------------------------------
// mock

type MockBody = Either<Full<Bytes>, StreamBody<tokio_stream::Chunks>>;

/// A minimal stream of SSE frames on tokio's timer, without pulling in a stream crate.
mod tokio_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll, ready};
    use std::time::Duration;

    use bytes::Bytes;
    use hyper::body::Frame;
    use tokio::time::{Instant, Sleep};

    pub struct Chunks {
        pub start: Instant,
        pub interval: Duration,
        pub sent: u32,
        pub total: u32,
        pub sleep: Option<Pin<Box<Sleep>>>,
    }

    impl futures_util::Stream for Chunks {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let this = &mut *self;
            if this.sent > this.total {
                return Poll::Ready(None);
            }
            // Chunk i is due at start + i * interval, so delays do not accumulate.
            if this.sent > 0 {
                let due = this.start + this.interval * this.sent;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            let data = if this.sent == this.total {
                super::DONE
            } else {
                super::CHUNK
            };
            this.sent += 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data)))))
        }
    }
}

#[derive(Clone, Copy)]
struct MockConfig {
    chunks: u32,
    interval: Duration,
}

async fn mock(args: MockArgs) -> Result<(), Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)).await?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let config = MockConfig {
        chunks: args.sse_chunks,
        interval: Duration::from_micros(args.sse_interval_us),
    };
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |request| mock_answer(request, config));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn mock_answer(request: Request<Incoming>, config: MockConfig) -> Result<Response<MockBody>, Infallible> {
    let path = request.uri().path();
    let api = [Api::Responses, Api::Embeddings]
        .into_iter()
        .find(|api| path.ends_with(api.path()))
        .unwrap_or(Api::Chat);
    let body = request
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let needle = b"\"stream\":true";
    let stream = api == Api::Chat && body.windows(needle.len()).any(|w| w == needle);
    let (content_type, body) = if api == Api::Responses {
        let n = RESPONSE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let answer = format!("{RESPONSE_HEAD}{n}{RESPONSE_TAIL}");
        ("application/json", Either::Left(Full::new(Bytes::from(answer))))
    } else if api == Api::Embeddings {
        (
            "application/json",
            Either::Left(Full::new(Bytes::from_static(EMBEDDING_LIST.as_bytes()))),
        )
    } else if stream {
        let chunks = tokio_stream::Chunks {
            start: tokio::time::Instant::now(),
            interval: config.interval,
            sent: 0,
            total: config.chunks,
            sleep: None,
        };
        ("text/event-stream", Either::Right(StreamBody::new(chunks)))
    } else {
        (
            "application/json",
            Either::Left(Full::new(Bytes::from_static(COMPLETION.as_bytes()))),
        )
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-request-id", HeaderValue::from_static("req_mock_upstream"));
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------
// mint

fn mint(args: &MintArgs) -> Result<(), Error> {
    let pem = std::fs::read(&args.key)?;
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem)?;
    let mut jwt_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    jwt_header.kid = Some(args.kid.clone());
    let now = unix_now();
    let threads = args.threads.max(1);
    let tokens: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (key, jwt_header) = (&key, &jwt_header);
                scope.spawn(move || {
                    (t..args.count)
                        .step_by(threads)
                        .map(|i| {
                            let claims = json!({
                                "sub": format!("user-{i}"),
                                "product": args.product,
                                "iat": now,
                                "exp": now + args.ttl,
                            });
                            jsonwebtoken::encode(jwt_header, &claims, key)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(args.count);
        for worker in workers {
            all.extend(worker.join().map_err(|_| "a signing thread panicked")??);
        }
        Ok::<_, Error>(all)
    })?;
    std::fs::write(&args.out, tokens.join("\n") + "\n")?;
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------
// run

/// What each connection task needs to build its requests.
struct Plan {
    authority: HeaderValue,
    path: String,
    body: Bytes,
    mode: Mode,
    tokens: Vec<HeaderValue>,
    next_token: AtomicUsize,
    hmac: Option<HmacPlan>,
    stream: bool,
    recording: AtomicBool,
    stop: AtomicBool,
}

struct HmacPlan {
    client: HeaderValue,
    client_str: String,
    product: HeaderValue,
    product_str: String,
    secret: Vec<u8>,
    users: Vec<(String, HeaderValue)>,
    body_hash: String,
    nonce_prefix: u64,
    counter: AtomicU64,
}

/// One connection's results, merged at the end.
struct Tally {
    latency: Histogram<u64>,
    first_chunk: Histogram<u64>,
    gaps: Histogram<u64>,
    done: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Result<Self, Error> {
        let histogram = || Histogram::<u64>::new_with_bounds(1_000, 120_000_000_000, 3);
        Ok(Self {
            latency: histogram()?,
            first_chunk: histogram()?,
            gaps: histogram()?,
            done: 0,
            errors: 0,
            first_error: None,
        })
    }

    fn merge(&mut self, other: &Self) -> Result<(), Error> {
        self.latency.add(&other.latency)?;
        self.first_chunk.add(&other.first_chunk)?;
        self.gaps.add(&other.gaps)?;
        self.done += other.done;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        Ok(())
    }
}

/// The address and the requests of a `run`, from its arguments.
fn run_plan(args: &RunArgs) -> Result<(SocketAddr, Plan), Error> {
    let uri: http::Uri = args.url.parse()?;
    let authority = uri.authority().ok_or("the URL needs host:port")?.clone();
    let addr: SocketAddr = authority.as_str().parse()?;
    let tokens = match args.mode {
        Mode::Jwt | Mode::JwtNew => {
            let path = args.tokens.as_deref().ok_or("JWT modes need --tokens")?;
            read_tokens(path)?
        }
        _ => Vec::new(),
    };
    if !uri.path().ends_with(args.api.path()) {
        return Err(format!("--url's path should end with {} for this --api", args.api.path()).into());
    }
    let body = args.api.body(args.stream)?;
    let hmac = (args.mode == Mode::Hmac).then(|| hmac_plan(args, body)).transpose()?;
    let plan = Plan {
        authority: HeaderValue::from_str(authority.as_str())?,
        path: uri.path().to_owned(),
        body: Bytes::from_static(body.as_bytes()),
        mode: args.mode,
        tokens,
        next_token: AtomicUsize::new(0),
        hmac,
        stream: args.stream,
        recording: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    };
    Ok((addr, plan))
}

async fn run(args: RunArgs) -> Result<(), Error> {
    let (addr, plan) = run_plan(&args)?;
    let plan = Arc::new(plan);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        tasks.spawn(connection_loop(sender, Arc::clone(&plan)));
    }

    // Warm-up, then the measured window; a JWT pool that runs dry ends the window early.
    let all_done = async {
        let mut tallies = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            tallies.push(joined?);
        }
        Ok::<_, Error>(tallies)
    };
    tokio::pin!(all_done);
    let mut early: Option<Result<Vec<Result<Tally, Error>>, Error>> = None;
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs_f64(args.warmup)) => {}
        finished = &mut all_done => early = Some(finished),
    }
    let before = Usage::read(&args.pid);
    let start = Instant::now();
    plan.recording.store(true, Ordering::SeqCst);
    if early.is_none() {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs_f64(args.duration)) => {}
            finished = &mut all_done => early = Some(finished),
        }
    }
    plan.recording.store(false, Ordering::SeqCst);
    let elapsed = start.elapsed();
    let after = Usage::read(&args.pid);
    plan.stop.store(true, Ordering::SeqCst);
    let tallies = match early {
        Some(finished) => finished?,
        None => all_done.await?,
    };

    let mut total = Tally::new()?;
    for tally in tallies {
        total.merge(&tally?)?;
    }
    let seconds = elapsed.as_secs_f64();
    let cpu_ns = match (before.cpu_ns, after.cpu_ns) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let us = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
    let mut line = json!({
        "label": args.label,
        "mode": args.mode.to_possible_value().map(|v| v.get_name().to_owned()),
        "api": args.api.to_possible_value().map(|v| v.get_name().to_owned()),
        "stream": args.stream,
        "connections": args.connections,
        "seconds": seconds,
        "requests": total.done,
        "errors": total.errors,
        "first_error": total.first_error,
        "rps": total.done as f64 / seconds,
        "p50_us": us(&total.latency, 0.5),
        "p99_us": us(&total.latency, 0.99),
        "p999_us": us(&total.latency, 0.999),
        "cpu_us_per_request": cpu_ns.filter(|_| total.done > 0).map(|ns| ns as f64 / 1000.0 / total.done as f64),
        "cpu_utilisation": cpu_ns.map(|ns| ns as f64 / 1e9 / seconds),
        "rss_kib": after.rss_kib,
        "peak_rss_kib": after.hwm_kib,
    });
    if args.stream {
        line["first_chunk_p50_us"] = json!(us(&total.first_chunk, 0.5));
        line["first_chunk_p99_us"] = json!(us(&total.first_chunk, 0.99));
        line["gap_p50_us"] = json!(us(&total.gaps, 0.5));
        line["gap_p99_us"] = json!(us(&total.gaps, 0.99));
    }
    println!("{line}");
    Ok(())
}

fn read_tokens(path: &Path) -> Result<Vec<HeaderValue>, Error> {
    let text = std::fs::read_to_string(path)?;
    let tokens = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
        .collect::<Result<Vec<_>, _>>()?;
    if tokens.is_empty() {
        return Err(format!("{}: no tokens", path.display()).into());
    }
    Ok(tokens)
}

fn hmac_plan(args: &RunArgs, body: &str) -> Result<HmacPlan, Error> {
    if args.hmac_secret.len() < 32 {
        return Err("HMAC mode needs BENCH_HMAC_SECRET (>= 32 bytes)".into());
    }
    let users = (0..args.users.max(1))
        .map(|i| {
            let user = format!("user-{i}");
            let value = HeaderValue::from_str(&user)?;
            Ok((user, value))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Ok(HmacPlan {
        client: HeaderValue::from_str(&args.hmac_client)?,
        client_str: args.hmac_client.clone(),
        product: HeaderValue::from_str(&args.product)?,
        product_str: args.product.clone(),
        secret: args.hmac_secret.as_bytes().to_vec(),
        users,
        // The body never changes, so its hash is computed once; the proxy hashes every body.
        body_hash: hex::encode(Sha256::digest(body.as_bytes())),
        // Nonces are unique across runs too: a prefix from the clock, then a counter.
        nonce_prefix: u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0),
        counter: AtomicU64::new(0),
    })
}

async fn connection_loop(
    mut sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    plan: Arc<Plan>,
) -> Result<Tally, Error> {
    let mut tally = Tally::new()?;
    while !plan.stop.load(Ordering::Relaxed) {
        let Some(request) = build_request(&plan)? else {
            break; // the token pool is used up
        };
        sender.ready().await?;
        let sent = Instant::now();
        let recording = plan.recording.load(Ordering::Relaxed);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut last = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if plan.stream && frame.is_data() {
                let now = Instant::now();
                if recording {
                    match last {
                        None => tally.first_chunk.record(nanos(now - sent))?,
                        Some(previous) => tally.gaps.record(nanos(now - previous))?,
                    }
                }
                last = Some(now);
            }
        }
        if recording && plan.recording.load(Ordering::Relaxed) {
            tally.latency.record(nanos(sent.elapsed()))?;
            tally.done += 1;
            if status != StatusCode::OK {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(status.to_string());
                }
            }
        }
    }
    Ok(tally)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1_000)
}

fn build_request(plan: &Plan) -> Result<Option<Request<Full<Bytes>>>, Error> {
    let mut request = Request::new(Full::new(plan.body.clone()));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = plan.path.parse()?;
    let headers = request.headers_mut();
    headers.insert(header::HOST, plan.authority.clone());
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    match plan.mode {
        Mode::Plain => {}
        Mode::Jwt => {
            let i = plan.next_token.fetch_add(1, Ordering::Relaxed) % plan.tokens.len();
            headers.insert(header::AUTHORIZATION, plan.tokens[i].clone());
        }
        Mode::JwtNew => {
            let i = plan.next_token.fetch_add(1, Ordering::Relaxed);
            let Some(token) = plan.tokens.get(i) else {
                return Ok(None);
            };
            headers.insert(header::AUTHORIZATION, token.clone());
        }
        Mode::Hmac => {
            let hmac = plan.hmac.as_ref().ok_or("no HMAC plan")?;
            let n = hmac.counter.fetch_add(1, Ordering::Relaxed);
            let (user, user_value) = &hmac.users[usize::try_from(n).unwrap_or(0) % hmac.users.len()];
            let timestamp = unix_now().to_string();
            let nonce = format!("{:016x}{n:016x}", hmac.nonce_prefix);
            let mut mac = HmacSha256::new_from_slice(&hmac.secret)?;
            for part in [
                timestamp.as_str(),
                "POST",
                plan.path.as_str(),
                hmac.client_str.as_str(),
                hmac.product_str.as_str(),
                user.as_str(),
                nonce.as_str(),
            ] {
                mac.update(part.as_bytes());
                mac.update(b"\n");
            }
            mac.update(hmac.body_hash.as_bytes());
            let signature = hex::encode(mac.finalize().into_bytes());
            headers.insert("x-client-id", hmac.client.clone());
            headers.insert("x-timestamp", HeaderValue::from_str(&timestamp)?);
            headers.insert("x-nonce", HeaderValue::from_str(&nonce)?);
            headers.insert("x-product-id", hmac.product.clone());
            headers.insert("x-user-id", user_value.clone());
            headers.insert("x-signature", HeaderValue::from_str(&signature)?);
        }
    }
    Ok(Some(request))
}

/// CPU time and memory of the measured processes, from `/proc`.
struct Usage {
    cpu_ns: Option<u64>,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
}

impl Usage {
    fn read(pids: &[u32]) -> Self {
        if pids.is_empty() {
            return Self {
                cpu_ns: None,
                rss_kib: None,
                hwm_kib: None,
            };
        }
        let mut usage = Self {
            cpu_ns: Some(0),
            rss_kib: Some(0),
            hwm_kib: Some(0),
        };
        for &pid in pids {
            let cpu = cpu_ns(pid);
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            };
            usage.cpu_ns = usage.cpu_ns.zip(cpu).map(|(a, b)| a + b);
            usage.rss_kib = usage.rss_kib.zip(field("VmRSS:")).map(|(a, b)| a + b);
            usage.hwm_kib = usage.hwm_kib.zip(field("VmHWM:")).map(|(a, b)| a + b);
        }
        usage
    }
}

/// Nanoseconds on CPU of all of a process's threads: `schedstat` (nanosecond counts) where
/// the kernel has it, else `stat`'s utime + stime (clock ticks, assumed 100 Hz).
fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut from_schedstat = 0u64;
    let mut ok = true;
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        match text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) {
            Some(ns) => from_schedstat += ns,
            None => ok = false,
        }
    }
    if ok {
        return Some(from_schedstat);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

// ---------------------------------------------------------------------------------------
// streams

/// One connection's samples (nanoseconds), merged into histograms at the end: a histogram
/// per connection would cost thousands of connections hundreds of KiB each.
#[derive(Default)]
struct StreamTally {
    first_chunk: Vec<u64>,
    gaps: Vec<u64>,
    /// Streams sent in the window and read to their end in it.
    completed: u64,
    /// Data frames received in the window.
    chunks: u64,
    /// Over the whole run, ramp included: answers other than 200, broken connections.
    errors: u64,
    first_error: Option<String>,
}

impl StreamTally {
    fn error(&mut self, error: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

async fn streams(args: StreamsArgs) -> Result<(), Error> {
    let uri: http::Uri = args.url.parse()?;
    let authority = uri.authority().ok_or("the URL needs host:port")?.clone();
    let addr: SocketAddr = authority.as_str().parse()?;
    let tokens = match args.mode {
        Mode::Jwt => read_tokens(args.tokens.as_deref().ok_or("--mode jwt needs --tokens")?)?,
        Mode::Plain => Vec::new(),
        Mode::JwtNew | Mode::Hmac => return Err("streams takes --mode plain or jwt".into()),
    };
    let plan = Arc::new(Plan {
        authority: HeaderValue::from_str(authority.as_str())?,
        path: uri.path().to_owned(),
        body: Bytes::from_static(CHAT_STREAM.as_bytes()),
        mode: args.mode,
        tokens,
        next_token: AtomicUsize::new(0),
        hmac: None,
        stream: true,
        recording: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });

    let start = tokio::time::Instant::now();
    let ramp = Duration::from_secs_f64(args.ramp);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.streams {
        let at = start + ramp.mul_f64(i as f64 / args.streams.max(1) as f64);
        tasks.spawn(stream_loop(addr, Arc::clone(&plan), at));
    }
    tokio::time::sleep_until(start + Duration::from_secs_f64(args.warmup.max(args.ramp))).await;
    let before = Usage::read(&args.pid);
    let window = Instant::now();
    plan.recording.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    plan.recording.store(false, Ordering::SeqCst);
    let seconds = window.elapsed().as_secs_f64();
    let after = Usage::read(&args.pid);
    plan.stop.store(true, Ordering::SeqCst);

    let histogram = || Histogram::<u64>::new_with_bounds(1_000, 120_000_000_000, 3);
    let (mut first_chunk, mut gaps) = (histogram()?, histogram()?);
    let mut total = StreamTally::default();
    while let Some(joined) = tasks.join_next().await {
        let tally = joined?;
        for &ns in &tally.first_chunk {
            first_chunk.record(ns)?;
        }
        for &ns in &tally.gaps {
            gaps.record(ns)?;
        }
        total.completed += tally.completed;
        total.chunks += tally.chunks;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let cpu_ns = match (before.cpu_ns, after.cpu_ns) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let us = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
    let line = json!({
        "label": args.label,
        "streams": args.streams,
        "seconds": seconds,
        "completed": total.completed,
        "chunks": total.chunks,
        "errors": total.errors,
        "first_error": total.first_error,
        "first_chunk_p50_us": us(&first_chunk, 0.5),
        "first_chunk_p99_us": us(&first_chunk, 0.99),
        "gap_p50_us": us(&gaps, 0.5),
        "gap_p99_us": us(&gaps, 0.99),
        "cpu_us_per_chunk": cpu_ns.filter(|_| total.chunks > 0).map(|ns| ns as f64 / 1000.0 / total.chunks as f64),
        "cpu_utilisation": cpu_ns.map(|ns| ns as f64 / 1e9 / seconds),
        "rss_kib": after.rss_kib,
        "peak_rss_kib": after.hwm_kib,
    });
    println!("{line}");
    Ok(())
}

/// One connection from `at` on: stream after stream until the run stops. A connection
/// that breaks is counted and made again (at most 100 times).
async fn stream_loop(addr: SocketAddr, plan: Arc<Plan>, at: tokio::time::Instant) -> StreamTally {
    let mut tally = StreamTally::default();
    tokio::time::sleep_until(at).await;
    for _ in 0..100 {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        match streams_on_connection(addr, &plan, &mut tally).await {
            Ok(()) => break,
            Err(error) => tally.error(error),
        }
    }
    tally
}

async fn streams_on_connection(addr: SocketAddr, plan: &Plan, tally: &mut StreamTally) -> Result<(), Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    while !plan.stop.load(Ordering::Relaxed) {
        let request = build_request(plan)?.ok_or("no request to send")?;
        sender.ready().await?;
        let sent = Instant::now();
        let recording = plan.recording.load(Ordering::Relaxed);
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            tally.error(response.status());
        }
        let mut body = response.into_body();
        let mut last = None;
        while let Some(frame) = body.frame().await {
            if frame?.is_data() {
                let now = Instant::now();
                if plan.recording.load(Ordering::Relaxed) {
                    tally.chunks += 1;
                    match last {
                        None if recording => tally.first_chunk.push(nanos(now - sent)),
                        Some(previous) => tally.gaps.push(nanos(now - previous)),
                        None => {}
                    }
                }
                last = Some(now);
            }
            // A stream lasts seconds: the run does not wait for the ones in flight.
            if plan.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        if recording && plan.recording.load(Ordering::Relaxed) {
            tally.completed += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// coldstart

fn coldstart(args: &ColdArgs) -> Result<(), Error> {
    let (program, rest) = args.command.split_first().ok_or("no command")?;
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let start = Instant::now();
        let mut child = std::process::Command::new(program)
            .args(rest)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let ready = loop {
            if start.elapsed() > Duration::from_secs(10) {
                break None;
            }
            if healthz_ok(port) {
                break Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        times.push(ready.ok_or("no 200 from /healthz within 10 s")?);
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let line = json!({
        "label": "coldstart",
        "runs": times.len(),
        "median_ms": ms(times[times.len() / 2]),
        "min_ms": ms(times[0]),
        "max_ms": ms(times[times.len() - 1]),
    });
    println!("{line}");
    Ok(())
}

fn wait(port: u16) -> Result<(), Error> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if healthz_ok(port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("127.0.0.1:{port}/healthz gave no 200 within 10 s").into())
}

fn healthz_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}
