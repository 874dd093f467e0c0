//! A connection's requests in flight, and the timer that ends a connection left idle.
//!
//! The contract closes a client connection (HTTP/1.1 keep-alive or HTTP/2) with no request
//! in flight for `CLIENT_TIMEOUT_SECONDS`. hyper times the wait for the next HTTP/1.1
//! head, but nothing ends an HTTP/2 connection whose client sent one request and then
//! nothing; so every connection counts its requests here, and one timer per connection
//! (not per request) checks the count.
//!
//! A request is in flight from the service call until its response body ends or is
//! dropped ([`InFlight`] is the guard that travels with it). The per-request cost is a few
//! atomic operations and, when the last request ends, a clock read: no allocation, no task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Shared by a connection's task, its service and its requests' guards.
pub(super) struct Activity {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// When the count last fell to 0, in milliseconds since `accepted`.
    idle_since_ms: AtomicU64,
    /// A request was ever called on this connection (its protocol is known).
    seen: AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            seen: AtomicBool::new(false),
        })
    }

    /// Counts a request in; it is counted out when the guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// A request was ever served on this connection.
    pub(super) fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    /// Resolves once no request has been in flight for `timeout`, counting from `from` at
    /// the earliest. One timer, woken at most once per `timeout` while requests run.
    ///
    /// A request that starts just as this resolves is not cut: the caller ends the
    /// connection gracefully, which lets requests in flight finish.
    pub(super) async fn idle_for(&self, timeout: Duration, from: Instant) {
        let mut deadline = from + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let now = Instant::now();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                deadline = now + timeout;
                continue;
            }
            let idle_since = self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            let due = idle_since.max(from) + timeout;
            if due <= now {
                return;
            }
            deadline = due;
        }
    }
}

/// A request in flight: counted out of its connection's [`Activity`] when dropped (the
/// response body ended, or the request or its body was dropped).
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = u64::try_from(self.0.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.0.idle_since_ms.store(since, Ordering::Release);
        }
    }
}
