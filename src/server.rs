//! The listener: accept loop, connection settings, and the graceful drain.
//!
//! hyper's connection builder is used directly (not `axum::serve`) because the contract
//! needs a header read timeout, a bounded drain on SIGTERM, connections closed when idle
//! ([`idle`]) and responses cut when their client stops reading ([`stall`]).
//!
//! With `METRICS_PORT` set, [`start`] also binds the separate `GET /metrics` listener
//! ([`crate::metrics`]); it stays up during the drain so a last scrape still works.

mod client_io;
mod framing;
mod idle;
mod stall;

pub use self::framing::DeclaredTooLarge;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::client_io::ClientIo;
use self::idle::{Activity, InFlight};
use self::stall::Stall;
use crate::app::{self, App};
use crate::metrics::{self, MetricsServer};
use crate::settings::Settings;
use crate::telemetry::LoggedBody;

/// A server started by [`start`].
pub struct Running {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The metrics listener's address, when `METRICS_PORT` is set.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    metrics: Option<MetricsServer>,
}

impl Running {
    /// Stops accepting and drains in-flight requests for up to the grace period.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
        if let Some(metrics) = self.metrics.take() {
            metrics.stop();
        }
    }
}

/// Installs the process-wide TLS provider once (the upstream client and Redis share it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Binds `ip:settings.port` and serves until [`Running::shutdown`].
pub async fn start(settings: Settings, ip: IpAddr) -> io::Result<Running> {
    install_crypto_provider();
    let listener = TcpListener::bind(SocketAddr::new(ip, settings.port)).await?;
    let addr = listener.local_addr()?;
    let metrics = start_metrics(&settings, ip).await?;
    let options = Options {
        client_timeout: settings.client_timeout,
        stall_timeout: settings.upstream.idle_timeout,
        max_body_bytes: settings.max_body_bytes,
        grace: settings.shutdown_grace,
    };
    if settings.budgets.any() && settings.redis.is_none() {
        tracing::warn!(
            "budgets are set without REDIS_URL: each instance keeps its own, and they start again at a restart"
        );
    }
    let app = Arc::new(App::new(settings));
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve(listener, app, options, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        metrics_addr: metrics.as_ref().map(|m| m.addr),
        shutdown: Some(tx),
        task,
        metrics,
    })
}

/// The metrics listener on `ip:METRICS_PORT`, or `None` when the port is unset.
async fn start_metrics(settings: &Settings, ip: IpAddr) -> io::Result<Option<MetricsServer>> {
    metrics::set_redis_configured(settings.redis.is_some());
    match settings.metrics_port {
        Some(port) => metrics::serve(SocketAddr::new(ip, port)).await.map(Some),
        None => Ok(None),
    }
}

#[derive(Clone, Copy)]
struct Options {
    /// `CLIENT_TIMEOUT_SECONDS`: for a request head, and for a connection without requests.
    client_timeout: Duration,
    /// `UPSTREAM_IDLE_TIMEOUT_SECONDS`: for a response whose client takes nothing.
    stall_timeout: Duration,
    max_body_bytes: usize,
    grace: Duration,
}

/// hyper's HTTP/1.1 buffers per client connection, at most (its default is about 400 KiB):
/// the read buffer, so also the largest request head (431 beyond), and the queue of
/// response bytes waiting for the socket. A client that reads slowly keeps that queue
/// full, and each frame in it is a slice that keeps alive the whole upstream read buffer
/// it came from: with hyper's defaults a stalled stream held about 1 MiB, with these about
/// 0.3 MiB (`tests/slow_readers.rs`). 128 KiB still takes any head a client needs (a JWT
/// of 80 KiB included).
const CLIENT_BUF_BYTES: usize = 128 * 1024;

async fn serve(listener: TcpListener, app: Arc<App>, options: Options, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(stall::Executor {
        idle: options.stall_timeout,
    });
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.client_timeout)
        .keep_alive(true)
        .max_buf_size(CLIENT_BUF_BYTES);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // Each connection's task holds a receiver: the drain signals them all, then waits
    // until every one has dropped it.
    let (drain, draining) = watch::channel(());

    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            Arc::clone(&builder),
            stream,
            Arc::clone(&app),
            options,
            draining.clone(),
        ));
    }
    drop(listener);
    drop(draining);
    tracing::info!("shutting down: draining in-flight requests");
    let _ = drain.send(());
    if tokio::time::timeout(options.grace, drain.closed()).await.is_err() {
        tracing::warn!("grace period over: closing the remaining connections");
    }
    // Spend admitted while Redis was unavailable and not written to it yet goes with
    // this instance (contract: "logged as lost").
    let lost = app.budgets.unreplayed();
    if lost > crate::budget::Nanos::ZERO {
        crate::metrics::budget_outage_spend("lost", lost.0);
        tracing::warn!(lost_usd = %lost, "stopping with budget spend that Redis never received: it is lost");
    }
    let unsettled = app.budgets.unsettled();
    if unsettled > 0 {
        tracing::warn!(
            unsettled,
            "stopping with settlements Redis never took: their reservations are charged in full when they expire"
        );
    }
}

/// Serves one connection until the client ends it, it stays without a request for the
/// client timeout, or the server drains.
async fn connection(
    builder: Arc<auto::Builder<stall::Executor>>,
    stream: TcpStream,
    app: Arc<App>,
    options: Options,
    mut draining: watch::Receiver<()>,
) {
    let activity = Activity::new();
    let service = Service {
        app,
        activity: Arc::clone(&activity),
    };
    let io = TokioIo::new(ClientIo::new(stream, options.max_body_bytes));
    let mut connection = std::pin::pin!(builder.serve_connection(io, service));
    // HTTP/1.1 responses are polled in this task: watch them for a client that stopped
    // reading (HTTP/2 streams have their own tasks, see `stall::Executor`).
    let mut stall = Stall::new(options.stall_timeout);
    let mut timer = std::pin::pin!(None);
    let mut serve = std::future::poll_fn(|cx| stall.poll(connection.as_mut(), timer.as_mut(), cx));
    tokio::select! {
        // Ended, or cut by the stall watch (dropping it closes the socket).
        _ = &mut serve => return,
        () = activity.idle_for(options.client_timeout, Instant::now()) => {}
        _ = draining.changed() => {}
    }
    drop(serve);
    // hyper's header timeout starts only once it knows the protocol: a client that sends
    // nothing, or part of an HTTP/2 preface, or only a preface, gets no graceful goodbye.
    if !activity.seen() {
        return;
    }
    // HTTP/2: GOAWAY, then the streams in flight finish; HTTP/1.1: closed after the
    // response in flight. A client that keeps the connection from ending (an HTTP/2
    // peer that never acknowledges) is dropped once idle for another client timeout.
    connection.as_mut().graceful_shutdown();
    let serve = std::future::poll_fn(|cx| stall.poll(connection.as_mut(), timer.as_mut(), cx));
    tokio::select! {
        _ = serve => {}
        () = activity.idle_for(options.client_timeout, Instant::now()) => {}
    }
}

/// One connection's service: each request goes to [`app::handle`], counted in flight
/// until its response body ends.
#[derive(Clone)]
struct Service {
    app: Arc<App>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<ResponseBody>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // Made before the future, so that a request dropped before its answer is counted
        // out too.
        let in_flight = self.activity.begin();
        // The future is moved into the box by value: keep it small (see `app::handle`).
        Box::pin(app::handle(Arc::clone(&self.app), request).map(move |response| {
            Ok(response.map(|inner| ResponseBody {
                inner,
                _in_flight: in_flight,
            }))
        }))
    }
}

/// The response body as hyper sees it: counts the request in flight until it ends, and
/// tells the stall watch when it waits for the client.
struct ResponseBody {
    inner: LoggedBody,
    _in_flight: InFlight,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        stall::body_polled();
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &poll
            && !self.inner.is_end_stream()
        {
            stall::body_waiting();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped inside the task that polled it: that task waits for nobody now.
        stall::body_polled();
    }
}

/// Resolves on SIGTERM (Cloud Run) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// call it before the listener starts, so that a SIGTERM arriving as soon as the service
/// accepts connections drains them instead of killing the process.
#[cfg(unix)]
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let wait = |installed: io::Result<tokio::signal::unix::Signal>| async move {
            match installed {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(term) => {},
            () = wait(interrupt) => {},
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
pub fn shutdown_signal() -> impl Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
