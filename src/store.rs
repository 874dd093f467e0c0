//! The shared Redis store behind limits and nonces, and the switch to memory when it is
//! absent, slow or down.
//!
//! It owns the connection (single node or cluster, plain or TLS), the per-operation
//! timeout and a circuit breaker. It must never delay startup, fail a request because
//! Redis is unavailable (callers get `None` and decide in memory), hold a lock across an
//! `.await`, run background loops (Cloud Run throttles the CPU between requests: probes
//! are started by requests), or log the URL's user info.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

// A poisoned lock only means a panic elsewhere; an `Instant` is always valid.
use crate::lock::lock;
use crate::metrics;
use crate::settings::RedisSettings;

/// After a failure, requests skip Redis (memory decides) this long, then one request
/// starts a background probe. Short, so limits are shared again soon after Redis is back;
/// long enough that requests do not each wait the operation timeout while it is down.
const BREAKER_OPEN: Duration = Duration::from_secs(1);
/// A connection attempt or probe may take this long; no request waits for it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// While Redis stays down, one error line at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Ids up to this many bytes appear in keys hex-encoded; longer ones as their SHA-256.
const MAX_ID_BYTES_IN_KEY: usize = 64;

/// The Redis store, cheap to share; see the module documentation.
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when no client could be built from the settings (logged once at start).
    connector: Option<Connector>,
    prefix: String,
    timeout: Duration,
    /// The URL without user info: the only form that is logged.
    url: String,
    link: watch::Sender<Link>,
    /// False while the breaker is open: requests decide in memory.
    healthy: AtomicBool,
    retry_at: Mutex<Instant>,
    probing: AtomicBool,
    errors: AtomicU64,
    last_error_log: Mutex<Instant>,
}

#[allow(clippy::large_enum_variant, reason = "one per process, never moved")]
enum Connector {
    Single(redis::Client),
    Cluster(ClusterClient),
}

#[derive(Clone)]
enum Link {
    Connecting,
    Ready(Conn),
    Down,
}

/// A connection of either kind (they are different types in redis-rs).
#[derive(Clone)]
pub(crate) enum Conn {
    /// Multiplexed, reconnects by itself.
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Why an operation went to memory instead.
enum Failure {
    NotConnected,
    TimedOut,
    Redis(RedisError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConnected => f.write_str("not connected"),
            Self::TimedOut => f.write_str("timed out"),
            // redis-rs errors name the kind and the server's message, never the URL's
            // credentials.
            Self::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl Store {
    /// Starts connecting in the background; never waits for Redis. Called outside a
    /// tokio runtime, it connects on the first request instead.
    pub fn start(settings: &RedisSettings) -> Self {
        let url = settings.redacted_url();
        let connector = match connector(settings) {
            Ok(c) => Some(c),
            Err(error) => {
                tracing::error!(redis = %url, %error, "cannot use this Redis URL: limits and nonces stay in memory");
                None
            }
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        let connect_now = connector.is_some() && runtime.is_some();
        let inner = Arc::new(Inner {
            connector,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            url,
            // While the first connection is under way, requests wait for it within their
            // operation timeout, as for any Redis operation.
            link: watch::Sender::new(if connect_now { Link::Connecting } else { Link::Down }),
            healthy: AtomicBool::new(connect_now),
            retry_at: Mutex::new(Instant::now()),
            probing: AtomicBool::new(connect_now),
            errors: AtomicU64::new(0),
            last_error_log: Mutex::new(Instant::now()),
        });
        if let (true, Some(runtime)) = (connect_now, runtime) {
            let task = Arc::clone(&inner);
            runtime.spawn(async move { task.probe().await });
        }
        Self { inner }
    }

    /// Records `nonce` of `client` for `ttl` if it is new (`SET NX` with expiry).
    /// `Some(true)`: new; `Some(false)`: seen before; `None`: Redis unavailable, the
    /// caller decides in memory instead.
    pub async fn claim_nonce(&self, client: &str, nonce: &str, ttl: Duration) -> Option<bool> {
        let key = self.key(&format!("c:{}", id_part(client)), &format!("nonce:{}", id_part(nonce)));
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run(|mut conn| async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(millis)
                .query_async(&mut conn)
                .await?;
            Ok(set.is_some())
        })
        .await
    }

    /// True while decisions go to Redis (connected and the breaker closed).
    pub fn is_using_redis(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire) && matches!(*self.inner.link.borrow(), Link::Ready(_))
    }

    /// Redis operations that failed or timed out since startup (each decided in memory).
    pub fn error_count(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// `<prefix>:{<tag>}:<rest>`: everything of one identity shares the hash tag, so one
    /// decision's keys live in one Redis Cluster slot.
    pub(crate) fn key(&self, tag: &str, rest: &str) -> String {
        format!("{}:{{{tag}}}:{rest}", self.inner.prefix)
    }

    /// Runs `op` on Redis within the operation timeout. `None` when the breaker is open,
    /// there is no connection, or `op` fails or is late: the caller decides in memory.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        if !inner.admits() {
            return None;
        }
        let attempt = async {
            let conn = inner.ready_conn().await.ok_or(Failure::NotConnected)?;
            op(conn).await.map_err(Failure::Redis)
        };
        match tokio::time::timeout(inner.timeout, attempt).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(failure)) => {
                inner.failed(&failure);
                None
            }
            Err(_) => {
                inner.failed(&Failure::TimedOut);
                None
            }
        }
    }
}

impl Inner {
    /// Whether a request may use Redis now. While the breaker is open, the first request
    /// after [`BREAKER_OPEN`] starts one background probe; none waits for it.
    fn admits(self: &Arc<Self>) -> bool {
        if self.healthy.load(Ordering::Acquire) {
            return true;
        }
        if self.connector.is_none() {
            return false;
        }
        let due = Instant::now() >= *lock(&self.retry_at);
        if due && !self.probing.swap(true, Ordering::AcqRel) {
            let inner = Arc::clone(self);
            tokio::spawn(async move { inner.probe().await });
        }
        false
    }

    async fn ready_conn(&self) -> Option<Conn> {
        let mut link = self.link.subscribe();
        let link = link.wait_for(|l| !matches!(l, Link::Connecting)).await.ok()?;
        match &*link {
            Link::Ready(conn) => Some(conn.clone()),
            Link::Connecting | Link::Down => None,
        }
    }

    /// Connects when there is no connection, then checks it with a PING; closes the
    /// breaker on success. On failure the connection is dropped, so the next probe starts
    /// afresh (a cluster connection does not always recover from losing every node).
    async fn probe(self: Arc<Self>) {
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, async {
            let needs_connection = !matches!(*self.link.borrow(), Link::Ready(_));
            if needs_connection {
                let conn = self.connect().await.map_err(Failure::Redis)?;
                self.link.send_replace(Link::Ready(conn));
            }
            let mut conn = self.ready_conn().await.ok_or(Failure::NotConnected)?;
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(Failure::Redis)
        })
        .await
        .unwrap_or(Err(Failure::TimedOut));
        match outcome {
            Ok(()) => {
                metrics::set_redis_fallback(false);
                if self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!(redis = %self.url, "connected to Redis: limits and nonces are shared");
                } else {
                    tracing::warn!(redis = %self.url, "Redis answers again: limits and nonces are shared again");
                }
            }
            Err(failure) => {
                self.link.send_replace(Link::Down);
                self.failed(&failure);
            }
        }
        self.probing.store(false, Ordering::Release);
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match &self.connector {
            Some(connector) => connector.connect(self.timeout).await,
            None => Err(RedisError::from((redis::ErrorKind::Client, "no Redis client"))),
        }
    }

    /// Opens the breaker. One warning when Redis stops answering; while it stays down, an
    /// error line at most once per [`ERROR_LOG_INTERVAL`].
    fn failed(&self, failure: &Failure) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::redis_error();
        metrics::set_redis_fallback(true);
        *lock(&self.retry_at) = Instant::now() + BREAKER_OPEN;
        if self.healthy.swap(false, Ordering::AcqRel) {
            *lock(&self.last_error_log) = Instant::now();
            tracing::warn!(
                redis = %self.url,
                error = %failure,
                "Redis unavailable: deciding limits and nonces in memory until it answers"
            );
            return;
        }
        let mut last = lock(&self.last_error_log);
        if last.elapsed() >= ERROR_LOG_INTERVAL {
            *last = Instant::now();
            drop(last);
            tracing::error!(redis = %self.url, error = %failure, "Redis still unavailable: limits and nonces in memory");
        }
    }
}

impl Connector {
    async fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(PROBE_TIMEOUT))
                    .set_response_timeout(Some(timeout.max(Duration::from_millis(500))))
                    // One quick retry: the probe itself is retried after the breaker's interval.
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Self::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }
}

/// One connection made now, with the server's client, TLS and timeouts but without the
/// breaker or the fallback: for the operator's subcommands, which report a failure
/// instead of deciding in memory. Its errors never hold the URL's user info.
pub(crate) async fn connect_once(settings: &RedisSettings) -> RedisResult<Conn> {
    connector(settings)?.connect(settings.timeout).await
}

fn connector(settings: &RedisSettings) -> RedisResult<Connector> {
    let url = settings.url.expose().as_str();
    // With a CA, it is the only trusted root (Memorystore's own CA); else the system's.
    let certs = settings.ca_cert.clone().map(|pem| TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    });
    if settings.cluster {
        let mut builder = ClusterClientBuilder::new(vec![url])
            .connection_timeout(PROBE_TIMEOUT)
            .response_timeout(settings.timeout.max(Duration::from_millis(500)))
            .retries(1);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        return Ok(Connector::Cluster(builder.build()?));
    }
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(url, certs)?,
        None => redis::Client::open(url)?,
    };
    Ok(Connector::Single(client))
}

/// An id as it appears in a key: `x` + hex of its bytes, or `h` + hex of its SHA-256 when
/// longer than [`MAX_ID_BYTES_IN_KEY`]. Hex has no `{`, `}` or `:`, and the two forms
/// cannot meet, so distinct ids never share a key.
pub(crate) fn id_part(id: &str) -> String {
    if id.len() <= MAX_ID_BYTES_IN_KEY {
        format!("x{}", hex::encode(id))
    } else {
        format!("h{}", hex::encode(Sha256::digest(id.as_bytes())))
    }
}

/// The inverse of [`id_part`]: the id of an `x` part. `None` for an `h` part (a long id's
/// hash, which cannot be inverted: compare it with `id_part` of the candidates instead)
/// and for anything `id_part` never writes.
pub(crate) fn id_from_part(part: &str) -> Option<String> {
    let bytes = hex::decode(part.strip_prefix('x')?).ok()?;
    (bytes.len() <= MAX_ID_BYTES_IN_KEY)
        .then(|| String::from_utf8(bytes).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_from_their_key_part() {
        for id in ["alice", "a:b", "u}:{x", "", "ユーザー", &"u".repeat(64)] {
            assert_eq!(id_from_part(&id_part(id)).as_deref(), Some(id), "{id}");
        }
        // A long id's hash cannot be inverted; neither can what `id_part` never writes.
        assert_eq!(id_from_part(&id_part(&"u".repeat(65))), None);
        for bad in ["", "x6", "xzz", "616263", "xff", "X61"] {
            assert_eq!(id_from_part(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_in_keys_cannot_break_the_hash_tag_or_collide() {
        assert_eq!(id_part("a:b"), "x613a62");
        let tricky = id_part("u}:{x");
        assert!(!tricky.contains(['{', '}', ':']));
        let long = "u".repeat(200);
        let hashed = id_part(&long);
        assert!(hashed.starts_with('h') && hashed.len() == 65);
        assert_ne!(id_part(&"u".repeat(65)), hashed);
    }
}
