//! The client's socket as hyper sees it: writes tell the stall watch that bytes reached
//! the client ([`super::stall`]); reads go through the framing observer, and fail with
//! [`DeclaredTooLarge`] once a chunked body declared more than `MAX_BODY_BYTES`
//! ([`super::framing`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::{DeclaredTooLarge, Framing};
use super::stall;

pub(super) struct ClientIo<T> {
    inner: T,
    framing: Framing,
    /// The body being read declared too much: the next read fails. Not the read that
    /// brought the size, whose bytes may still hold the request's head.
    too_large: bool,
}

impl<T> ClientIo<T> {
    pub(super) fn new(inner: T, max_body_bytes: usize) -> Self {
        Self {
            inner,
            framing: Framing::new(max_body_bytes),
            too_large: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.too_large {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, DeclaredTooLarge)));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll
            && this.framing.observe(&buf.filled()[before..])
        {
            this.too_large = true;
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll
            && n > 0
        {
            stall::progressed();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll
            && n > 0
        {
            stall::progressed();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
