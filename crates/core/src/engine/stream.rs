//! A request's stream of updates: iterate it from sync code or poll it as a `futures` Stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::engine::request::StreamUpdate;
use crate::error::EngineError;

type Item = Result<StreamUpdate, EngineError>;

/// Updates of one streaming request, ending after the `finished` update or an error.
/// Dropping it cancels the request and frees its KV slots.
#[must_use = "a request is cancelled when its stream is dropped"]
pub struct GenerateStream {
    rx: flume::Receiver<Item>,
    stream: Option<flume::r#async::RecvStream<'static, Item>>,
    /// Set when the request was refused before it reached the engine (validation, KV budget).
    rejected: bool,
}

impl GenerateStream {
    pub(crate) fn new(rx: flume::Receiver<Item>) -> Self {
        Self {
            rx,
            stream: None,
            rejected: false,
        }
    }

    /// A stream that yields one error and ends.
    pub(crate) fn failed(err: EngineError) -> Self {
        let (tx, rx) = flume::bounded(1);
        let _ = tx.send(Err(err));
        Self {
            rejected: true,
            ..Self::new(rx)
        }
    }

    /// The error of a request refused at submit (invalid parameters, a KV reservation that can
    /// never fit, an engine that has shut down), taken out of the stream; `None` for a request
    /// the engine accepted. Servers call it before they start a response, so a bad streaming
    /// request gets the same 4xx as the same body without `stream`.
    pub fn take_rejection(&mut self) -> Option<EngineError> {
        if !self.rejected {
            return None;
        }
        self.rejected = false;
        self.rx.try_recv().ok().and_then(Result::err)
    }

    /// Blocks until the next update; `None` once the request is over.
    pub fn next_blocking(&mut self) -> Option<Item> {
        self.rx.recv().ok()
    }
}

impl Iterator for GenerateStream {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        self.next_blocking()
    }
}

impl futures_core::Stream for GenerateStream {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = &mut *self;
        let stream = this
            .stream
            .get_or_insert_with(|| this.rx.clone().into_stream());
        Pin::new(stream).poll_next(cx)
    }
}
