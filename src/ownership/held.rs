//! Holding back the start of an answer until its id is found: the frames read so far are
//! kept (at most [`MAX_HELD`] bytes), then handed on ahead of the rest of the body.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;

use super::scan::{IdScanner, Scan};

/// Most bytes held back: the id comes first in OpenAI's answers and events.
const MAX_HELD: usize = 64 * 1024;

/// Reads `body` until `scanner` finds the id, gives up, the body ends or [`MAX_HELD`]
/// bytes are held; returns a body that gives the held frames first, then the rest
/// (an error met while reading comes after the held frames, as it came).
pub(super) async fn hold_until_id(mut body: Body, mut scanner: IdScanner) -> (Body, Option<String>) {
    let mut held = VecDeque::new();
    let mut size = 0usize;
    let mut error = None;
    let mut id = None;
    while size < MAX_HELD {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
            Some(Ok(frame)) => {
                let scan = frame.data_ref().map_or(Scan::More, |data| {
                    size += data.len();
                    scanner.feed(data)
                });
                held.push_back(frame);
                match scan {
                    Scan::More => {}
                    Scan::Found(found) => {
                        id = Some(found);
                        break;
                    }
                    Scan::GiveUp => break,
                }
            }
        }
    }
    let body = Body::new(Prefixed {
        held,
        error,
        rest: body,
    });
    (body, id)
}

struct Prefixed {
    held: VecDeque<Frame<Bytes>>,
    error: Option<axum::Error>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.error.is_none() && self.rest.is_end_stream()
    }
}
