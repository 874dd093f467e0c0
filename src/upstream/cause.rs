//! [`Cause`]: why an upstream exchange failed, told apart from the error chain so that an
//! operator can tell a TLS problem from a dead host. The client's answer stays the
//! contract's code ([`Cause::error`]); the cause goes into the request's log line
//! (`upstream_error_cause`) and the `api_key_server_upstream_failures_total` metric.
//!
//! Classification reads only the types and kinds of the errors in the chain (hyper's
//! `is_*` methods, `io::ErrorKind`, rustls's error type), never their text: an error's
//! message may echo what the upstream sent, and nothing of it may reach a log line.

use std::error::Error;
use std::io;
use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use futures_util::future::MapErr;
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiFuture, GaiResolver, Name};

use super::{IdleTimeoutError, UpstreamError};

/// Why an upstream exchange failed. Each is one word of the log line and one value of
/// the metric's `cause` label (see [`Cause::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// `connect_refused`: nothing listens at the upstream's address (TCP RST to our SYN).
    ConnectRefused,
    /// `connect_failed`: TCP connect failed otherwise (host or network unreachable, the
    /// system's connect timeout).
    ConnectFailed,
    /// `dns`: the upstream's host name did not resolve.
    Dns,
    /// `tls`: the TLS handshake failed (certificate, protocol, a peer that does not speak
    /// TLS, or the connection dropped during the handshake).
    Tls,
    /// `reset`: the connection was reset (RST) or broke while writing.
    Reset,
    /// `closed`: the upstream closed the connection before its response (head, or body
    /// once the headers came) was complete.
    Closed,
    /// `protocol`: the upstream's answer was not valid HTTP/1.1.
    Protocol,
    /// `timeout`: no response headers within `UPSTREAM_TIMEOUT_SECONDS` (connecting
    /// included).
    Timeout,
    /// `idle_timeout`: after the headers, no body bytes for longer than
    /// `UPSTREAM_IDLE_TIMEOUT_SECONDS` (the response was cut: `upstream_aborted`).
    IdleTimeout,
    /// `pool_wait`: `UPSTREAM_TIMEOUT_SECONDS` passed while the request waited for room
    /// to open a connection (the pool's bounds, see `upstream/pool.rs`).
    PoolWait,
    /// `other`: an error none of the above describes.
    Other,
}

impl Cause {
    /// Every cause, in the order of the README's list.
    pub const ALL: [Self; 11] = [
        Self::ConnectRefused,
        Self::ConnectFailed,
        Self::Dns,
        Self::Tls,
        Self::Reset,
        Self::Closed,
        Self::Protocol,
        Self::Timeout,
        Self::IdleTimeout,
        Self::PoolWait,
        Self::Other,
    ];

    /// Whether the request may have reached the upstream: then a budget charges its
    /// reservation (contract: a request whose body was sent but that got no status). A
    /// failure to connect, resolve, shake hands or get a connection sent nothing. A
    /// timeout may have come after the body went out, so it counts as sent.
    pub fn after_sending(self) -> bool {
        !matches!(
            self,
            Self::ConnectRefused | Self::ConnectFailed | Self::Dns | Self::Tls | Self::PoolWait
        )
    }

    /// The log line's and the metric label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_failed",
            Self::Dns => "dns",
            Self::Tls => "tls",
            Self::Reset => "reset",
            Self::Closed => "closed",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::PoolWait => "pool_wait",
            Self::Other => "other",
        }
    }

    /// The client's answer when this happens before the response headers: the
    /// contract's `upstream_timeout` for a deadline, `upstream_unreachable` otherwise.
    pub fn error(self) -> UpstreamError {
        match self {
            Self::Timeout | Self::PoolWait => UpstreamError::Timeout,
            _ => UpstreamError::Unreachable,
        }
    }

    /// The cause of an error of the connector (TCP, then TLS for `https`).
    pub(crate) fn of_connect(error: &(dyn Error + 'static)) -> Self {
        // hyper-rustls hands the TLS handshake's error over as an `io::Error` of its own,
        // while the TCP phase's come as hyper-util's (unnameable) `ConnectError`: an
        // `io::Error` on top is the handshake's, whatever broke it.
        if error.is::<io::Error>() {
            return Self::Tls;
        }
        match Self::of(error) {
            cause @ (Self::Dns | Self::ConnectRefused) => cause,
            _ => Self::ConnectFailed,
        }
    }

    /// The cause of an error of an exchange on a connection (hyper's error), or of a
    /// response body (which may be our idle timer's).
    pub(crate) fn of(error: &(dyn Error + 'static)) -> Self {
        // A chain is a few links; the bound only guards against a cycle.
        const MAX_LINKS: usize = 16;
        let mut next = Some(error);
        // What a less specific link said, kept in case no deeper one says more.
        let mut fallback = None;
        for _ in 0..MAX_LINKS {
            let Some(error) = next else { break };
            if error.is::<IdleTimeoutError>() {
                return Self::IdleTimeout;
            }
            if error.is::<DnsError>() {
                return Self::Dns;
            }
            if error.is::<rustls::Error>() {
                return Self::Tls;
            }
            if let Some(error) = error.downcast_ref::<hyper::Error>() {
                if error.is_parse() {
                    return Self::Protocol;
                }
                if error.is_incomplete_message() || error.is_closed() || error.is_canceled() {
                    fallback = fallback.or(Some(Self::Closed));
                }
            }
            if let Some(error) = error.downcast_ref::<io::Error>() {
                match error.kind() {
                    io::ErrorKind::ConnectionRefused => return Self::ConnectRefused,
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                        return Self::Reset;
                    }
                    io::ErrorKind::UnexpectedEof => fallback = fallback.or(Some(Self::Closed)),
                    io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::NetworkDown
                    | io::ErrorKind::AddrNotAvailable => fallback = fallback.or(Some(Self::ConnectFailed)),
                    _ => {}
                }
                // `io::Error::source` skips the error it wraps (it returns that one's
                // source): the wrapped one is looked at through `get_ref`.
                if let Some(inner) = error.get_ref() {
                    next = Some(inner);
                    continue;
                }
            }
            next = error.source();
        }
        fallback.unwrap_or(Self::Other)
    }
}

/// The host name did not resolve: set by [`Resolver`] on the resolver's error, so that
/// it can be told apart from the connect errors it travels with.
#[derive(Debug, thiserror::Error)]
#[error("dns error")]
pub(crate) struct DnsError(#[source] io::Error);

/// hyper-util's resolver (`getaddrinfo` on a blocking thread), its errors marked as
/// [`DnsError`]. An IP address in the URL is never resolved.
#[derive(Clone)]
pub(crate) struct Resolver(GaiResolver);

impl Resolver {
    pub(crate) fn new() -> Self {
        Self(GaiResolver::new())
    }
}

impl tower::Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = DnsError;
    type Future = MapErr<GaiFuture, fn(io::Error) -> DnsError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        self.0.poll_ready(cx).map_err(DnsError)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        self.0.call(name).map_err(DnsError as fn(io::Error) -> DnsError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that wraps another, as connectors and hyper do.
    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Box<dyn Error + Send + Sync>);

    fn io(kind: io::ErrorKind) -> io::Error {
        io::Error::from(kind)
    }

    #[test]
    fn io_kinds_name_their_cause_through_wrappers() {
        let refused = Wrapper(Box::new(io(io::ErrorKind::ConnectionRefused)));
        assert_eq!(Cause::of(&refused), Cause::ConnectRefused);
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
        ] {
            assert_eq!(Cause::of(&Wrapper(Box::new(io(kind)))), Cause::Reset, "{kind:?}");
        }
        assert_eq!(Cause::of(&io(io::ErrorKind::UnexpectedEof)), Cause::Closed);
        assert_eq!(Cause::of(&io(io::ErrorKind::Other)), Cause::Other);
    }

    #[test]
    fn an_error_inside_an_io_error_is_looked_at() {
        // As tokio-rustls and then hyper-rustls wrap a handshake's error.
        let rustls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(Cause::of(&io::Error::other(rustls)), Cause::Tls);
        // An `UnexpectedEof` that wraps something unknown is still a close.
        let eof = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            Wrapper(Box::new(io(io::ErrorKind::Other))),
        );
        assert_eq!(Cause::of(&eof), Cause::Closed);
    }

    #[test]
    fn markers_of_our_own_win() {
        let dns = Wrapper(Box::new(DnsError(io(io::ErrorKind::Other))));
        assert_eq!(Cause::of(&dns), Cause::Dns);
        assert_eq!(Cause::of_connect(&dns), Cause::Dns);
        let idle: Box<dyn Error + Send + Sync> = Box::new(IdleTimeoutError);
        assert_eq!(Cause::of(&Wrapper(idle)), Cause::IdleTimeout);
    }

    #[test]
    fn connect_errors_are_tcp_unless_they_come_as_the_tls_phase_io_error() {
        let tcp = Wrapper(Box::new(io(io::ErrorKind::ConnectionRefused)));
        assert_eq!(Cause::of_connect(&tcp), Cause::ConnectRefused);
        let unreachable = Wrapper(Box::new(io(io::ErrorKind::HostUnreachable)));
        assert_eq!(Cause::of_connect(&unreachable), Cause::ConnectFailed);
        let unknown = Wrapper(Box::new(io(io::ErrorKind::Other)));
        assert_eq!(Cause::of_connect(&unknown), Cause::ConnectFailed);
        let handshake = io::Error::other(io(io::ErrorKind::ConnectionReset));
        assert_eq!(Cause::of_connect(&handshake), Cause::Tls);
    }

    #[test]
    fn deadlines_answer_upstream_timeout_and_the_rest_upstream_unreachable() {
        assert_eq!(Cause::Timeout.error(), UpstreamError::Timeout);
        assert_eq!(Cause::PoolWait.error(), UpstreamError::Timeout);
        assert_eq!(Cause::Tls.error(), UpstreamError::Unreachable);
        assert_eq!(Cause::Other.error(), UpstreamError::Unreachable);
    }

    #[test]
    fn the_words_are_distinct_snake_case() {
        let words: std::collections::HashSet<_> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(words.len(), Cause::ALL.len());
        assert!(
            words
                .iter()
                .all(|w| w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }
}
