//! The listener: accept loop, connection settings, and the graceful drain.
//!
//! hyper's connection builder is used directly (not `axum::serve`) because the contract
//! needs a header read timeout and a bounded drain on SIGTERM.
//!
//! With `METRICS_PORT` set, [`start`] also binds the separate `GET /metrics` listener
//! ([`crate::metrics`]); it stays up during the drain so a last scrape still works.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::{self, App};
use crate::metrics::{self, MetricsServer};
use crate::settings::Settings;

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
        header_timeout: settings.client_timeout,
        grace: settings.shutdown_grace,
    };
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

struct Options {
    header_timeout: Duration,
    grace: Duration,
}

async fn serve(listener: TcpListener, app: Arc<App>, options: Options, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

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
        // hyper's header timeout starts only once it knows the protocol: a client that
        // sends nothing, or part of an HTTP/2 preface, or only a preface, would hold its
        // socket forever. The first request head must arrive within the client timeout.
        let first_request = Arc::new(AtomicBool::new(false));
        let service = Service {
            app: Arc::clone(&app),
            seen: Arc::clone(&first_request),
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        let header_timeout = options.header_timeout;
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => return,
                () = tokio::time::sleep(header_timeout) => {}
            }
            if first_request.load(Ordering::Relaxed) {
                let _ = connection.await;
            }
            // Else the connection is dropped, which closes the socket.
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(options.grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over: closing the remaining connections");
    }
}

/// One connection's service: each request goes to [`app::handle`].
#[derive(Clone)]
struct Service {
    app: Arc<App>,
    /// Set by the first request, for the first-request-head timer.
    seen: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<crate::telemetry::LoggedBody>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.seen.store(true, Ordering::Relaxed);
        // The future is moved into the box by value: keep it small (see `app::handle`).
        Box::pin(app::handle(Arc::clone(&self.app), request).map(Ok))
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
