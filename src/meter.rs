//! The metered response: reads the upstream's token usage from the body as it passes
//! to the client ([`crate::usage`]), prices it, settles the request's budget when the body
//! ends ([`crate::budget::admission`]), and leaves the figures for the request's log line.
//!
//! Nothing is held back for metering: JSON bodies and Responses streams pass frame by
//! frame as they come, chat streams event by event (the usage-only chunk the proxy asked
//! for is taken out). The settlement runs before the body's end reaches the client, so a
//! client that sends its next request after reading the answer finds its spend settled.
//! A body that is dropped (client gone) or cut (upstream failure) is settled on the way
//! out: from its usage if that had arrived, else at its reservation.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::budget::admission::{Admission, Budgets};
use crate::budget::price::{self, Nanos, Prices};
use crate::lock::lock;
use crate::usage::Usage;
use crate::usage::chat_sse::ChatStream;
use crate::usage::json::{JsonScanner, Layout};
use crate::usage::responses_sse::ResponsesStream;

/// A metered request's figures, as the log line writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    /// As the upstream reports it: cached tokens included.
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// `None` for a model without a price.
    pub cost: Option<Nanos>,
    /// The upstream reported no usage: these are the reservation's.
    pub estimated: bool,
}

/// What the log line reads of a metered request; the figures arrive when the body ends.
#[derive(Debug, Clone, Default)]
pub struct MeterLog {
    pub model: Box<str>,
    /// With budgets: the reservation, and where it was decided (`redis` or `memory`).
    pub reservation: Option<Nanos>,
    pub budget_store: Option<&'static str>,
    /// On a budget refusal: `user`, `product` or `client`.
    pub budget_scope: Option<&'static str>,
    pub figures: Arc<Mutex<Option<Figures>>>,
}

impl MeterLog {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.into(),
            ..Self::default()
        }
    }

    pub fn figures(&self) -> Option<Figures> {
        *lock(&self.figures)
    }
}

/// The worst case of a request, in tokens (contract: "Reservation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Reserved {
    /// Its price; 0 for a model without prices (only possible without budgets).
    pub fn cost(self, prices: Option<&Prices>) -> Nanos {
        prices.map_or(Nanos::ZERO, |prices| price::cost(&self.usage(), prices))
    }

    fn usage(self) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            cached_tokens: 0,
            reported_output_tokens: Some(self.output_tokens),
            total_tokens: None,
        }
    }
}

/// How the body carries its usage.
pub enum Reader {
    /// A JSON answer: its top-level `usage`.
    Json(Box<JsonScanner>),
    /// A chat stream: the usage chunk, taken out when the client did not ask for it.
    Chat(Box<ChatStream>),
    /// A Responses stream: the final event's `response.usage`.
    Responses(Box<ResponsesStream>),
}

impl Reader {
    pub fn json() -> Self {
        Self::Json(Box::new(JsonScanner::new(Layout::Body)))
    }

    pub fn chat(strip_usage_chunk: bool) -> Self {
        Self::Chat(Box::new(ChatStream::new(strip_usage_chunk)))
    }

    pub fn responses() -> Self {
        Self::Responses(Box::default())
    }

    fn usage(&self) -> Option<Usage> {
        match self {
            Self::Json(scanner) => scanner.usage(),
            Self::Chat(stream) => stream.usage(),
            Self::Responses(stream) => stream.usage(),
        }
    }
}

/// What the end of the body settles.
pub struct Meter {
    pub product: Arc<str>,
    pub log: Arc<Mutex<Option<Figures>>>,
    pub model: Box<str>,
    pub prices: Option<Prices>,
    pub reserved: Reserved,
    pub budget: Option<(Budgets, Admission)>,
    /// Told the settled input + output tokens.
    pub settled: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Meter {
    /// The figures from `usage` (or the reservation's when there is none), written for the
    /// log line and the metrics; returns what the budget settles.
    fn figures(&mut self, usage: Option<Usage>) -> Nanos {
        let figures = match usage {
            Some(usage) => Figures {
                input_tokens: usage.input_tokens,
                cached_tokens: usage.cached_tokens.min(usage.input_tokens),
                output_tokens: usage.output_tokens(),
                cost: self.prices.as_ref().map(|prices| price::cost(&usage, prices)),
                estimated: false,
            },
            None => Figures {
                input_tokens: self.reserved.input_tokens,
                cached_tokens: 0,
                output_tokens: self.reserved.output_tokens,
                cost: self.prices.as_ref().map(|prices| self.reserved.cost(Some(prices))),
                estimated: true,
            },
        };
        crate::metrics::usage(
            &self.product,
            &self.model,
            figures.input_tokens,
            figures.cached_tokens,
            figures.output_tokens,
            figures.cost.map(|c| c.0),
        );
        *lock(&self.log) = Some(figures);
        if let Some(settled) = self.settled.take() {
            settled(figures.input_tokens.saturating_add(figures.output_tokens));
        }
        // A reservation charged instead of usage is the reservation itself, priced at
        // admission (the same prices unless the settings changed in between).
        match (&self.budget, usage) {
            (Some((_, admission)), None) => admission.amount,
            _ => figures.cost.unwrap_or(Nanos::ZERO),
        }
    }
}

type Settling = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The client's body: the upstream's, metered.
pub struct MeteredBody {
    inner: Body,
    reader: Reader,
    /// Chat events ready to go to the client.
    ready: VecDeque<Bytes>,
    scratch: Vec<Bytes>,
    meter: Option<Meter>,
    settling: Option<Settling>,
    /// The upstream's error, given to the client once the settlement is done.
    failed: Option<axum::Error>,
    ended: bool,
}

impl MeteredBody {
    pub fn new(inner: Body, reader: Reader, meter: Meter) -> Self {
        Self {
            inner,
            reader,
            ready: VecDeque::new(),
            scratch: Vec::new(),
            meter: Some(meter),
            settling: None,
            failed: None,
            ended: false,
        }
    }

    /// The body ended or failed: figures now, and the settlement to run before the end
    /// reaches the client.
    fn finish(&mut self) {
        let Some(mut meter) = self.meter.take() else { return };
        let cost = meter.figures(self.reader.usage());
        if let Some((budgets, admission)) = meter.budget
            && let Some(admission) = budgets.settle_locally(admission, cost)
        {
            self.settling = Some(Box::pin(async move { budgets.settle(admission, cost).await }));
        }
    }

    /// The upstream's body ended cleanly.
    fn end(&mut self) {
        match &mut self.reader {
            Reader::Chat(stream) => {
                stream.finish(&mut self.scratch);
                self.ready.extend(self.scratch.drain(..));
            }
            Reader::Json(scanner) => scanner.finish(),
            Reader::Responses(_) => {}
        }
        self.ended = true;
        self.finish();
    }

    fn feed(&mut self, data: &Bytes) {
        match &mut self.reader {
            Reader::Json(scanner) => scanner.feed(data),
            Reader::Chat(stream) => {
                stream.feed(data, &mut self.scratch);
                self.ready.extend(self.scratch.drain(..));
            }
            Reader::Responses(stream) => {
                stream.feed(data);
            }
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            // The settlement runs before the last bytes go out: a client that has read the
            // whole answer finds its spend settled.
            if let Some(settling) = &mut this.settling {
                std::task::ready!(settling.as_mut().poll(cx));
                this.settling = None;
            }
            if let Some(data) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.ended {
                return Poll::Ready(this.failed.take().map(Err));
            }
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let data = data.clone();
                    this.feed(&data);
                    let chat = matches!(this.reader, Reader::Chat(_));
                    // A body of known length is not polled past its last bytes: its end
                    // is here.
                    if this.inner.is_end_stream() {
                        if !chat {
                            this.ready.push_back(data);
                        }
                        this.end();
                        continue;
                    }
                    if chat {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(error)) => {
                    this.failed = Some(error);
                    this.ended = true;
                    this.finish();
                }
                None => this.end(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty() && self.settling.is_none() && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // A chat stream may lose its usage chunk: only the inner's lower bound holds.
        match self.reader {
            Reader::Chat(_) => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before its end (the client went away): settle on a task of its own.
        if let Some(mut meter) = self.meter.take() {
            let cost = meter.figures(self.reader.usage());
            if let Some((budgets, admission)) = meter.budget {
                budgets.settle_later(admission, cost);
            }
        }
        // Dropped while settling: finish that settlement without the client.
        if let Some(settling) = self.settling.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(settling);
        }
    }
}
