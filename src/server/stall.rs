//! Cuts a response whose client takes none of its bytes for `UPSTREAM_IDLE_TIMEOUT_SECONDS`,
//! as a silent upstream is cut: the response ends without a clean end, and dropping it
//! cancels the upstream request.
//!
//! A response body that has handed a frame to hyper and is not asked for the next one is
//! waiting for its client: over HTTP/1.1 the socket is full, over HTTP/2 the stream's
//! flow-control window is. Bodies are polled inside the task that owns them (the
//! connection's task for HTTP/1.1, one task per stream for HTTP/2, spawned through
//! [`Executor`]), so the body tells that task through a thread-local flag, read right
//! after each poll ([`Stall::poll`]). Over HTTP/1.1 a write that moves bytes to the
//! client's socket ([`super::client_io::ClientIo`]) restarts the wait, so a slow reader is
//! not a stalled one (over HTTP/2 the window it grants gets the body polled again). The
//! timer is armed only while a body waits, once per gap, in the task's own memory: no
//! allocation, no task, no lock per request.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A body handed out a frame and was not polled since.
const WAITING: u8 = 1;
/// Bytes reached the client's socket.
const PROGRESS: u8 = 2;

thread_local! {
    /// The [`WAITING`] and [`PROGRESS`] signals of the task being polled.
    static SIGNALS: Cell<u8> = const { Cell::new(0) };
}

/// Called by a response body at each poll: the client asked for more.
pub(super) fn body_polled() {
    SIGNALS.with(|s| s.set(s.get() & !WAITING));
}

/// Called by a response body that handed out a frame and has more to come.
pub(super) fn body_waiting() {
    SIGNALS.with(|s| s.set(s.get() | WAITING));
}

/// Called when bytes reached the client's socket ([`super::client_io::ClientIo`]).
pub(super) fn progressed() {
    SIGNALS.with(|s| s.set(s.get() | PROGRESS));
}

/// One task's stall watch: whether its body waits, and since when.
pub(super) struct Stall {
    idle: Duration,
    waiting: bool,
    since: Option<Instant>,
}

impl Stall {
    pub(super) fn new(idle: Duration) -> Self {
        Self {
            idle,
            waiting: false,
            since: None,
        }
    }

    /// Polls `future` (a connection, or one HTTP/2 stream); `Ready(None)` when its response
    /// waited for the client longer than the idle timeout: the caller drops `future`.
    pub(super) fn poll<F: Future>(
        &mut self,
        future: Pin<&mut F>,
        mut timer: Pin<&mut Option<Sleep>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<F::Output>> {
        let outer = SIGNALS.with(|s| s.replace(if self.waiting { WAITING } else { 0 }));
        let poll = future.poll(cx);
        let signals = SIGNALS.with(|s| s.replace(outer));
        if let Poll::Ready(output) = poll {
            return Poll::Ready(Some(output));
        }
        self.waiting = signals & WAITING != 0;
        if !self.waiting || signals & PROGRESS != 0 {
            self.since = None;
        }
        if !self.waiting {
            // A timer left armed wakes the task once more, which is harmless.
            return Poll::Pending;
        }
        let due = *self.since.get_or_insert_with(Instant::now) + self.idle;
        // The deadline is moved only when the timer fires: a later gap never needs an
        // earlier one, so one timer entry serves every gap until then.
        loop {
            match timer.as_mut().as_pin_mut() {
                None => timer.set(Some(tokio::time::sleep_until(due))),
                Some(mut sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if Instant::now() >= due {
                        return Poll::Ready(None);
                    }
                    sleep.reset(due);
                }
            }
        }
    }
}

/// Polls `future` under a [`Stall`] watch; `None` when it was cut.
pub(super) async fn watch<F: Future>(future: F, idle: Duration) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut timer = std::pin::pin!(None);
    let mut stall = Stall::new(idle);
    std::future::poll_fn(|cx| stall.poll(future.as_mut(), timer.as_mut(), cx)).await
}

/// hyper's executor for HTTP/2 streams: each stream's task runs under a [`Stall`] watch,
/// so that a stream whose client stopped granting window is reset and its body dropped.
#[derive(Clone, Copy)]
pub(super) struct Executor {
    pub(super) idle: Duration,
}

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(watch(future, self.idle));
    }
}
