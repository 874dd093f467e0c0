//! The upstream connections: HTTP/1.1 only, each lent to one request at a time, kept idle
//! in a small LIFO pool, and taken back by the response body itself once it ended cleanly.
//!
//! This replaces hyper-util's legacy client, which per request looked up a hashed pool key
//! under a mutex, raced a boxed lazy connect against the checkout and spawned a task to
//! wait for the connection to be ready again. Here a checkout is a pop under a mutex held
//! for a few instructions, and no task is spawned per request (one per connection).
//!
//! New connections are bounded ([`Limits`]): at most 16,384 open and 256 being established
//! (TCP and TLS handshakes) at once, so that a burst or a slow upstream cannot make the
//! instance open sockets without end. A stream holds its connection for its whole length,
//! so the open bound is the number of concurrent streams one origin can carry: far above
//! what one instance serves (Cloud Run allows 1,000 concurrent requests), so that the
//! file-descriptor limit, not this bound, is what a flood of streams meets first. A request that finds no room waits, within its
//! `UPSTREAM_TIMEOUT_SECONDS` deadline, for room or for a connection given back to the
//! pool, whichever comes first; when the deadline passes while it waits, it fails with
//! [`Cause::PoolWait`] (502 `upstream_timeout`).
//!
//! It must never hold the lock across an `.await`, pool a connection whose response was
//! not read to its end, or send a request again that may have reached the upstream.

use std::collections::VecDeque;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tower::ServiceExt;

use super::cause::{Cause, Resolver};
use crate::lock::lock;

/// Idle connections kept at most; beyond, the longest idle one is closed.
const MAX_IDLE: usize = 1024;
/// Idle connections older than this are closed rather than used: the upstream or a NAT on
/// the way may have forgotten them.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a checkout waits for a pooled connection to be ready for its next request
/// before closing it. A healthy one is ready at once or after one run of its task.
const READY_WAIT: Duration = Duration::from_secs(1);

/// The read buffer of an upstream connection, at most (hyper's default is about 400 KiB).
/// It grows while the upstream sends faster than the client takes, and the body frames cut
/// from it keep it alive while they wait in the client's write queue: smaller, a stream
/// whose client reads slowly holds less (`tests/slow_readers.rs`). Answer heads are far
/// smaller; large bodies are read 64 KiB at a time.
const READ_BUF_BYTES: usize = 64 * 1024;

type Sender = SendRequest<Full<Bytes>>;

/// The bounds on a pool's connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections open at most, idle or in use (each one a socket, and a task).
    pub(crate) open: usize,
    /// Connections being established at most (TCP and TLS handshakes in flight): a burst
    /// of new requests opens connections at the pace the upstream accepts them rather
    /// than all at once.
    pub(crate) connecting: usize,
}

impl Limits {
    /// 16,384 open (16 times as many as the pool keeps idle: streams in flight hold theirs);
    /// 256 handshakes at once. With 1,024 open, 4,000 concurrent streams to one origin
    /// queued behind the 1,024 in flight and failed with `pool_wait` (issue 17).
    pub(crate) const DEFAULT: Self = Self {
        open: 16 * 1024,
        connecting: 256,
    };
}

/// Connects to one upstream and keeps its idle connections.
pub(crate) struct Pool {
    connector: HttpsConnector<HttpConnector<Resolver>>,
    /// The upstream URL: the connector takes its scheme, host and port.
    destination: Uri,
    /// Oldest at the front, most recently returned at the back: checkouts take the back
    /// (the connection most likely still alive), expiry and overflow trim the front.
    idle: Mutex<VecDeque<Idle>>,
    /// One permit per open connection, held by its task until the connection closes.
    open: Arc<Semaphore>,
    /// One permit per connection being established.
    connecting: Semaphore,
    /// Told when a connection is given back, so that a request waiting for room takes it.
    returned: Notify,
}

/// What a request waiting for room to connect got first.
enum Room<'a> {
    /// Room for one more connection: its open permit and its connecting permit.
    Connect(OwnedSemaphorePermit, SemaphorePermit<'a>),
    /// A connection given back to the pool meanwhile, ready for a request.
    Returned(Sender),
}

/// What [`Pool::wait`] got first.
enum Waited<P> {
    Permit(P),
    Returned(Sender),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    pub(crate) fn new(destination: Uri) -> Arc<Self> {
        Self::with_limits(destination, Limits::DEFAULT)
    }

    pub(crate) fn with_limits(destination: Uri, limits: Limits) -> Arc<Self> {
        let mut http = HttpConnector::new_with_resolver(Resolver::new());
        // The TLS layer wraps this connector, so it must accept `https` URIs too.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .expect("the aws-lc-rs provider supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Arc::new(Self {
            connector,
            destination,
            idle: Mutex::new(VecDeque::new()),
            open: Arc::new(Semaphore::new(limits.open)),
            connecting: Semaphore::new(limits.connecting),
            returned: Notify::new(),
        })
    }

    /// Sends `request` (its target in origin-form, its `Host` set) on an idle connection,
    /// else on a new one, and waits for the response's headers for at most `timeout`
    /// (connecting, and waiting for room to connect, included). The response's body gives
    /// the connection back when it ends.
    ///
    /// Dropping the future closes the connection in use, which cancels the request.
    pub(crate) async fn send(
        self: &Arc<Self>,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<PooledBody>, Cause> {
        // Set while the request waits for room to connect: what the deadline cut short.
        let mut waiting = false;
        let result = tokio::time::timeout(timeout, self.exchange(request, &mut waiting)).await;
        match result {
            Ok(result) => result,
            Err(_) if waiting => Err(Cause::PoolWait),
            Err(_) => Err(Cause::Timeout),
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
        waiting: &mut bool,
    ) -> Result<Response<PooledBody>, Cause> {
        if let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lend(response, sender)),
                // hyper gives the request back only when none of it was written: the
                // upstream closed this idle connection just before we used it. Send it
                // once more on a new connection, as hyper-util's client did. Without the
                // request (it may have reached the upstream) there is no second try.
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(Cause::of(error.error())),
                },
            }
        }
        // Boxed: waiting for room and the connect future (TCP and TLS handshakes) are
        // large, and keeping them out of this future keeps every request's future small
        // (it is moved, by value, into the box hyper's server keeps it in).
        let mut sender = match Box::pin(self.room(waiting)).await {
            Room::Connect(open, connecting) => Box::pin(self.connect(open, connecting)).await?,
            Room::Returned(sender) => sender,
        };
        let response = sender.send_request(request).await.map_err(|e| Cause::of(&e))?;
        Ok(self.lend(response, sender))
    }

    /// Room for a new connection, at once when there is some; else waits for it, or for a
    /// connection given back meanwhile, with `waiting` set.
    async fn room(&self, waiting: &mut bool) -> Room<'_> {
        let open = match Arc::clone(&self.open).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match self.wait(Arc::clone(&self.open).acquire_owned(), waiting).await {
                Waited::Permit(permit) => permit,
                Waited::Returned(sender) => return Room::Returned(sender),
            },
        };
        let connecting = match self.connecting.try_acquire() {
            Ok(permit) => permit,
            // A connection given back makes `open` go back too (dropped here).
            Err(_) => match self.wait(self.connecting.acquire(), waiting).await {
                Waited::Permit(permit) => permit,
                Waited::Returned(sender) => return Room::Returned(sender),
            },
        };
        Room::Connect(open, connecting)
    }

    /// Waits for `permit`, or for a connection given back to the pool, whichever first,
    /// with `waiting` set meanwhile.
    async fn wait<P>(&self, permit: impl Future<Output = Result<P, AcquireError>>, waiting: &mut bool) -> Waited<P> {
        *waiting = true;
        let mut permit = pin!(permit);
        let waited = loop {
            // Registered before the pool is looked at, so that a connection given back
            // in between still wakes this request.
            let mut returned = pin!(self.returned.notified());
            returned.as_mut().enable();
            if let Some(sender) = self.checkout().await {
                break Waited::Returned(sender);
            }
            tokio::select! {
                biased;
                permit = &mut permit => {
                    break Waited::Permit(permit.expect("the pool never closes its semaphores"));
                }
                () = returned => {}
            }
        };
        *waiting = false;
        waited
    }

    /// The most recently returned connection that is still open, ready for a request.
    async fn checkout(&self) -> Option<Sender> {
        loop {
            let mut sender = self.pop()?;
            // `ready` fails at once when the connection has closed (the upstream closed
            // it, or it broke): that one is dropped and the next tried. A sender comes
            // back the moment its response body ended, which can be a little before its
            // connection task has run and asked for the next request; waiting for it is
            // far cheaper than a new connection (TCP and TLS handshakes), so it is awaited
            // rather than skipped. A connection should only stay unready if the upstream
            // answered without reading all of our request body and kept the connection
            // open: that one is given [`READY_WAIT`], then closed, so that a stuck
            // connection costs a request a short delay, not its whole deadline.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    fn pop(&self) -> Option<Sender> {
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        let newest = idle.pop_back()?;
        if now.duration_since(newest.since) <= IDLE_TIMEOUT {
            return Some(newest.sender);
        }
        // The newest is too old, so are all the others. They are dropped (which wakes
        // their connection tasks to close) after the lock is released.
        let expired = std::mem::take(&mut *idle);
        drop(idle);
        drop((newest, expired));
        None
    }

    /// Takes back a connection whose last response was read to its end.
    fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        let expired = idle
            .iter()
            .take_while(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
            .count();
        let overflow = usize::from(idle.len() - expired >= MAX_IDLE);
        // Empty, and so not allocated, unless some expired or the pool is full.
        let evicted: Vec<Idle> = idle.drain(..expired + overflow).collect();
        idle.push_back(Idle { sender, since: now });
        drop(idle);
        drop(evicted);
        // One atomic operation when nobody waits.
        self.returned.notify_one();
    }

    /// A new connection: TCP (and TLS for `https`), then an HTTP/1.1 connection task,
    /// which holds `open` for as long as the connection lives. `connecting` is given back
    /// once the handshakes are over.
    async fn connect(&self, open: OwnedSemaphorePermit, connecting: SemaphorePermit<'_>) -> Result<Sender, Cause> {
        let stream = self
            .connector
            .clone()
            .oneshot(self.destination.clone())
            .await
            .map_err(|e| Cause::of_connect(&*e))?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(READ_BUF_BYTES)
            .handshake(stream)
            .await
            .map_err(|e| Cause::of(&e))?;
        drop(connecting);
        // The task drives the socket for every request the sender carries, and ends when
        // the socket closes or the sender is dropped. Its error, if any, also reaches the
        // request or body in flight, which report it.
        tokio::spawn(async move {
            let _ = connection.await;
            drop(open);
        });
        Ok(sender)
    }

    fn lend(self: &Arc<Self>, mut response: Response<Incoming>, sender: Sender) -> Response<PooledBody> {
        if response.body().size_hint().exact().is_none() {
            own_header_values(response.headers_mut());
        }
        response.map(|body| PooledBody::new(body, Arc::clone(self), sender))
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// Replaces each header value with a copy of its bytes. hyper parses a head into slices of
/// the connection's read buffer, so a value kept alive keeps that whole buffer (8 KiB)
/// alive, and the connection reads the body into a second one. For an answer of unknown
/// length (a stream, open for seconds to minutes, whose head the response passes on to the
/// client) the copies, a few dozen bytes each, let the connection read the body into the
/// buffer it read the head into: 8 KiB less per open stream (docs/benchmarks.md). Answers
/// of known length are read at once and their buffer with them: not worth the copies.
fn own_header_values(headers: &mut http::HeaderMap) {
    for value in headers.values_mut() {
        // Always valid: the bytes come from a valid value.
        if let Ok(mut owned) = http::HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
}

/// A response body that holds its connection's sender, and returns it to the pool when
/// the body ends cleanly. An error, or a drop before the end, drops the sender with the
/// body, which closes the connection: HTTP/1 cannot reuse a connection mid-response.
pub(crate) struct PooledBody {
    inner: Incoming,
    lease: Option<(Arc<Pool>, Sender)>,
}

impl PooledBody {
    fn new(inner: Incoming, pool: Arc<Pool>, sender: Sender) -> Self {
        let mut body = Self {
            inner,
            lease: Some((pool, sender)),
        };
        // hyper's server never polls a body that is already at its end (an empty one).
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.lease.take() {
            pool.put(sender);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            // After the last frame of a body of known length, hyper's server checks
            // `is_end_stream` and polls no more: that is the end too.
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // The response is broken, and so is its connection.
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;
    use axum::serve::ListenerExt;
    use http::header;
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// The deadline of the tests' requests that are not about deadlines.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// An upstream on loopback: `/full` answers `hello` (content-length), `/empty` an
    /// empty body, `/stream` a chunked body fed by the returned channel (once).
    struct Upstream {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
    }

    type Feed = mpsc::Sender<Result<Bytes, std::io::Error>>;

    async fn upstream() -> (Upstream, oneshot::Receiver<Feed>) {
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (feed_tx, feed_rx) = oneshot::channel();
        let feed_tx = Arc::new(Mutex::new(Some(feed_tx)));
        let counted = requests.clone();
        let router = Router::new()
            .route("/full", post(|| async { "hello" }))
            .route("/empty", post(|| async { "" }))
            .route(
                "/stream",
                post(move || async move {
                    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
                    if let Some(feed) = feed_tx.lock().unwrap().take() {
                        let _ = feed.send(tx);
                    }
                    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
                    Body::from_stream(stream)
                }),
            )
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(request)
                },
            ));
        let accepted = connections.clone();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = listener.tap_io(move |_| {
            accepted.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, router).await });
        let upstream = Upstream {
            addr,
            connections,
            requests,
        };
        (upstream, feed_rx)
    }

    impl Upstream {
        fn pool(&self) -> Arc<Pool> {
            Pool::new(format!("http://{}/", self.addr).parse().unwrap())
        }

        fn request(&self, path: &str) -> Request<Full<Bytes>> {
            Request::post(path)
                .header(header::HOST, self.addr.to_string())
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_connection_returns_to_the_pool_once_its_body_is_read_and_is_reused() {
        let (upstream, _) = upstream().await;
        let pool = upstream.pool();
        for _ in 0..5 {
            let response = pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
            assert_eq!(pool.idle_count(), 0, "lent while its body is unread");
            // Read as hyper's server does: no poll after `is_end_stream`.
            let mut body = response.into_body();
            let mut read = Vec::new();
            while !body.is_end_stream() {
                let frame = body.frame().await.unwrap().unwrap();
                read.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(read, b"hello");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(upstream.connections(), 1);
    }

    #[tokio::test]
    async fn an_empty_body_returns_the_connection_at_once() {
        let (upstream, _) = upstream().await;
        let pool = upstream.pool();
        let response = pool.send(upstream.request("/empty"), DEADLINE).await.unwrap();
        assert!(response.body().is_end_stream());
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_streams_head_is_copied_out_of_the_read_buffer_intact() {
        let (addr, _) = raw_upstream(|mut socket| async move {
            use tokio::io::AsyncWriteExt;
            if !read_raw_post(&mut socket).await {
                return;
            }
            let reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-a: 1\r\nx-a: 2\r\n\
                transfer-encoding: chunked\r\n\r\n3\r\none\r\n0\r\n\r\n";
            let _ = socket.write_all(reply).await;
        })
        .await;
        let pool = Pool::new(format!("http://{addr}/").parse().unwrap());
        let response = pool
            .send(raw_post(addr, Bytes::from_static(b"{}")), DEADLINE)
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        let repeated: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(repeated, ["1", "2"], "every value, in order");
        assert_eq!(headers[header::TRANSFER_ENCODING], "chunked");
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "one");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (upstream, feed) = upstream().await;
        let pool = upstream.pool();
        let mut body = pool
            .send(upstream.request("/stream"), DEADLINE)
            .await
            .unwrap()
            .into_body();
        let feed = feed.await.unwrap();
        feed.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one");
        drop(body);
        assert_eq!(pool.idle_count(), 0);
        // The upstream sees its response body dropped: the connection closed.
        tokio::time::timeout(Duration::from_secs(5), feed.closed())
            .await
            .expect("the upstream's body is dropped");
        pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
        assert_eq!(upstream.connections(), 2);
    }

    #[tokio::test]
    async fn a_body_that_fails_does_not_return_its_connection() {
        let (upstream, feed) = upstream().await;
        let pool = upstream.pool();
        let body = pool
            .send(upstream.request("/stream"), DEADLINE)
            .await
            .unwrap()
            .into_body();
        let feed = feed.await.unwrap();
        feed.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        feed.send(Err(std::io::Error::other("broken"))).await.unwrap();
        assert!(body.collect().await.is_err());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_stream_read_to_its_end_returns_its_connection() {
        let (upstream, feed) = upstream().await;
        let pool = upstream.pool();
        let body = pool
            .send(upstream.request("/stream"), DEADLINE)
            .await
            .unwrap()
            .into_body();
        let feed = feed.await.unwrap();
        feed.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        drop(feed);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "one");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_closed_pooled_connection_is_dropped_at_checkout() {
        let (upstream, _) = upstream().await;
        let pool = upstream.pool();
        // A pooled sender whose connection task has ended.
        let (io, _) = tokio::io::duplex(64);
        let (closed, connection) = http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
        drop(connection);
        assert!(closed.is_closed());
        pool.idle.lock().unwrap().push_back(Idle {
            sender: closed,
            since: Instant::now(),
        });
        let response = pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(upstream.connections(), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_request_the_closed_connection_never_sent_is_sent_once_more_on_a_new_one() {
        let (upstream, _) = upstream().await;
        let pool = upstream.pool();
        // A pooled connection that looks alive but whose task drops it the next time it
        // runs, that is, once our request is queued on it and we wait for the answer
        // (the test runtime has one thread): an idle connection the upstream just closed.
        let stream = pool.connector.clone().oneshot(pool.destination.clone()).await.unwrap();
        let (mut sender, connection) = http1::handshake::<_, Full<Bytes>>(stream).await.unwrap();
        let (close, closed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = closed => {}
                _ = connection => {}
            }
        });
        sender.ready().await.unwrap();
        pool.put(sender);
        close.send(()).unwrap();

        let response = pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(upstream.connections(), 2, "sent again on a new connection");
        assert_eq!(
            upstream.requests.load(Ordering::SeqCst),
            1,
            "the first never reached it"
        );
        assert_eq!(pool.idle_count(), 1);
    }

    /// A raw upstream on loopback: `serve` runs on each accepted connection. Returns its
    /// address and the count of connections accepted.
    async fn raw_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(socket));
            }
        });
        (addr, accepted)
    }

    /// Reads one [`raw_post`] request (its body is `{}`) from a raw upstream's socket;
    /// false when the connection ended first.
    async fn read_raw_post(socket: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut request = Vec::new();
        while !request.ends_with(b"{}") {
            let mut chunk = [0; 1024];
            match socket.read(&mut chunk).await {
                Ok(n) if n > 0 => request.extend_from_slice(&chunk[..n]),
                _ => return false,
            }
        }
        true
    }

    /// A `POST /` to a raw upstream.
    fn raw_post(addr: SocketAddr, body: Bytes) -> Request<Full<Bytes>> {
        Request::post("/")
            .header(header::HOST, addr.to_string())
            .body(Full::new(body))
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_that_may_have_reached_the_upstream_is_not_sent_again() {
        // A raw upstream that answers the first request of a connection with keep-alive,
        // then reads the second and closes without answering.
        let (addr, accepted) = raw_upstream(|mut socket| async move {
            use tokio::io::AsyncWriteExt;
            for answer in [true, false] {
                if !read_raw_post(&mut socket).await {
                    return;
                }
                if answer {
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    socket.write_all(reply).await.unwrap();
                }
            }
        })
        .await;
        let pool = Pool::new(format!("http://{addr}/").parse().unwrap());
        let request = || raw_post(addr, Bytes::from_static(b"{}"));
        let response = pool.send(request(), DEADLINE).await.unwrap();
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.send(request(), DEADLINE).await.err(), Some(Cause::Closed));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "no second connection, no second try"
        );
    }

    #[tokio::test]
    async fn a_pooled_connection_that_stays_unready_is_closed_after_a_short_wait() {
        // A raw upstream that reads a request's head, answers at once without reading the
        // body, and then reads nothing more on that connection: our connection stays busy
        // writing a body larger than the socket buffers, so it never becomes ready again.
        let (addr, accepted) = raw_upstream(|mut socket| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0; 1024];
                match socket.read(&mut chunk).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            socket.write_all(reply).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let pool = Pool::new(format!("http://{addr}/").parse().unwrap());
        let big = Bytes::from(vec![b' '; 64 * 1024 * 1024]);
        let response = pool.send(raw_post(addr, big), DEADLINE).await.unwrap();
        assert!(response.into_body().collect().await.unwrap().to_bytes().is_empty());
        assert_eq!(pool.idle_count(), 1, "the empty body gave its connection back");

        let started = Instant::now();
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(raw_post(addr, Bytes::from_static(b"{}")), DEADLINE),
        )
        .await
        .expect("a stuck connection must not hold the request for long");
        assert!(second.is_ok());
        assert!(started.elapsed() >= READY_WAIT, "the pooled one was given its chance");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "sent on a new connection");
    }

    #[tokio::test]
    async fn connections_idle_longer_than_90_s_are_closed_not_used() {
        let (upstream, _) = upstream().await;
        let pool = upstream.pool();
        let response = pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
        response.into_body().collect().await.unwrap();
        let aged = Instant::now()
            .checked_sub(IDLE_TIMEOUT + Duration::from_secs(1))
            .unwrap();
        pool.idle.lock().unwrap().back_mut().unwrap().since = aged;
        assert!(pool.pop().is_none());
        assert_eq!(pool.idle_count(), 0);
        let response = pool.send(upstream.request("/full"), DEADLINE).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(upstream.connections(), 2);
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_1024_idle_connections() {
        let pool = Pool::new(Uri::from_static("http://127.0.0.1:9/"));
        // Connections over in-memory pipes whose tasks never run: they stay open.
        let mut connections = Vec::new();
        for _ in 0..=MAX_IDLE {
            let (io, _) = tokio::io::duplex(64);
            let (sender, connection) = http1::handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(io))
                .await
                .unwrap();
            connections.push(connection);
            pool.put(sender);
        }
        assert_eq!(pool.idle_count(), MAX_IDLE);
    }

    /// A pool of `upstream` with room for `open` connections, `connecting` at once.
    fn bounded(addr: SocketAddr, scheme: &str, open: usize, connecting: usize) -> Arc<Pool> {
        let destination = format!("{scheme}://{addr}/").parse().unwrap();
        Pool::with_limits(destination, Limits { open, connecting })
    }

    #[tokio::test]
    async fn a_request_without_room_waits_and_takes_the_connection_given_back() {
        let (upstream, feed) = upstream().await;
        let pool = bounded(upstream.addr, "http", 1, 1);
        let body = pool
            .send(upstream.request("/stream"), DEADLINE)
            .await
            .unwrap()
            .into_body();
        let feed = feed.await.unwrap();

        // Polled once: it finds no idle connection and no room for a new one. Unbounded,
        // it would be connecting by now.
        let mut second = pin!(pool.send(upstream.request("/full"), DEADLINE));
        assert!(futures_util::FutureExt::now_or_never(&mut second).is_none());
        // The first response ends: its connection goes back, and the waiter takes it.
        feed.send(Ok(Bytes::from_static(b"one"))).await.unwrap();
        drop(feed);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "one");
        let response = second.await.unwrap();
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(upstream.connections(), 1, "never more than the bound");
    }

    #[tokio::test]
    async fn a_request_that_finds_no_room_before_its_deadline_fails_with_pool_wait() {
        let (upstream, _feed) = upstream().await;
        let pool = bounded(upstream.addr, "http", 1, 1);
        let _held = pool.send(upstream.request("/stream"), DEADLINE).await.unwrap();
        let second = pool.send(upstream.request("/full"), Duration::from_millis(100)).await;
        assert_eq!(second.err(), Some(Cause::PoolWait));
        assert_eq!(
            Cause::PoolWait.error(),
            crate::upstream::UpstreamError::Timeout,
            "502 upstream_timeout"
        );
        assert_eq!(upstream.connections(), 1);
    }

    #[tokio::test]
    async fn connections_being_established_are_bounded_too() {
        // An upstream that accepts TCP and then says nothing: a TLS handshake with it
        // stays in flight, holding its connecting permit.
        let (accepted_tx, mut accepted_rx) = mpsc::unbounded_channel();
        let (addr, accepted) = raw_upstream(move |socket| {
            let accepted_tx = accepted_tx.clone();
            async move {
                let _ = accepted_tx.send(());
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(socket);
            }
        })
        .await;
        let pool = bounded(addr, "https", 8, 1);
        let first = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move {
                pool.send(raw_post(addr, Bytes::from_static(b"{}")), DEADLINE)
                    .await
                    .err()
            }
        });
        accepted_rx.recv().await.unwrap();
        let second = pool
            .send(raw_post(addr, Bytes::from_static(b"{}")), Duration::from_millis(100))
            .await;
        assert_eq!(second.err(), Some(Cause::PoolWait));
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one handshake at a time");
        first.abort();
    }

    #[tokio::test]
    async fn a_deadline_that_passes_while_connecting_is_a_timeout() {
        let (addr, _) = raw_upstream(|socket| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        })
        .await;
        let pool = bounded(addr, "https", 8, 8);
        let result = pool
            .send(raw_post(addr, Bytes::from_static(b"{}")), Duration::from_millis(100))
            .await;
        assert_eq!(result.err(), Some(Cause::Timeout));
    }

    #[tokio::test]
    async fn a_closed_connection_gives_its_room_back() {
        // Every answer closes its connection.
        let (addr, accepted) = raw_upstream(|mut socket| async move {
            use tokio::io::AsyncWriteExt;
            if !read_raw_post(&mut socket).await {
                return;
            }
            let reply = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
            let _ = socket.write_all(reply).await;
        })
        .await;
        let pool = bounded(addr, "http", 1, 1);
        for _ in 0..3 {
            let response = pool
                .send(raw_post(addr, Bytes::from_static(b"{}")), DEADLINE)
                .await
                .unwrap();
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// Raises this process's soft limit on open files to `needed` when it is lower (up to
    /// the hard limit, as any process may), through util-linux's `prlimit`: the crate has
    /// no `unsafe` for `setrlimit`. Panics when even the hard limit is too low.
    fn raise_fd_limit(needed: u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        let mut numbers = line.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
        let (soft, hard) = (numbers.next().unwrap(), numbers.next().unwrap_or(u64::MAX));
        if soft >= needed {
            return;
        }
        assert!(
            hard >= needed,
            "this test needs {needed} open files, the hard limit is {hard}"
        );
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={needed}:"))
            .status()
            .expect("prlimit (util-linux) raises the soft limit on open files");
        assert!(status.success());
    }

    #[tokio::test]
    async fn more_than_1024_concurrent_streams_to_one_origin_all_flow() {
        // Every stream stays open until all have received their first chunk: with the
        // old bound of 1,024 open connections, the 1,025th waited for room until its
        // deadline and failed with `pool_wait`.
        const STREAMS: usize = 1100;
        raise_fd_limit(2 * STREAMS as u64 + 512);
        let (finish, finished) = tokio::sync::watch::channel(false);
        let (addr, accepted) = raw_upstream(move |mut socket| {
            let mut finished = finished.clone();
            async move {
                use tokio::io::AsyncWriteExt;
                if !read_raw_post(&mut socket).await {
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if socket.write_all(head).await.is_err() {
                    return;
                }
                let _ = finished.wait_for(|finished| *finished).await;
                let _ = socket.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
            }
        })
        .await;
        let pool = Pool::new(format!("http://{addr}/").parse().unwrap());
        let (started_tx, mut started) = mpsc::channel(STREAMS);
        let mut streams = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let (pool, started_tx) = (Arc::clone(&pool), started_tx.clone());
            streams.push(tokio::spawn(async move {
                let deadline = Duration::from_secs(30);
                let response = match pool.send(raw_post(addr, Bytes::from_static(b"{}")), deadline).await {
                    Ok(response) => response,
                    Err(cause) => {
                        let _ = started_tx.send(Err(cause)).await;
                        return None;
                    }
                };
                let mut body = response.into_body();
                let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
                let _ = started_tx.send(Ok(())).await;
                let rest = body.collect().await.unwrap().to_bytes();
                Some([first, rest].concat())
            }));
        }
        drop(started_tx);
        for _ in 0..STREAMS {
            let started = started.recv().await.expect("every stream reports");
            assert_eq!(started, Ok(()), "every stream gets its answer and first chunk");
        }
        finish.send(true).unwrap();
        for stream in streams {
            assert_eq!(stream.await.unwrap().as_deref(), Some(&b"firstlast"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), STREAMS, "one connection per stream");
    }

    #[tokio::test]
    async fn a_host_name_that_does_not_resolve_is_a_dns_failure() {
        // A label longer than DNS allows (63 bytes): the system's resolver refuses the
        // name itself, without asking a server.
        let host = format!("{}.invalid", "a".repeat(64));
        let pool = Pool::new(format!("http://{host}/").parse().unwrap());
        let request = Request::post("/")
            .header(header::HOST, host)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        assert_eq!(pool.send(request, DEADLINE).await.err(), Some(Cause::Dns));
    }
}
