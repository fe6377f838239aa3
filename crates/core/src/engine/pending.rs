//! [`Pending`]: the one future type for replies. `.await` it on any executor, or `.wait()` for
//! it from synchronous code.
//!
//! The engine returns `Pending<T>` (errors are [`EngineError`]); the `infermux` façade returns
//! `Pending<T, infermux::Error>` (there called `SamplerFuture`) for in-process and remote
//! replies alike, so a caller learns one type whatever serves the request. It is a boxed `Send`
//! future: dropping it drops what it waits on, which cancels the request (the engine notices
//! the closed reply channel and frees the request's KV slots at its next step).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::EngineError;

/// The eventual reply to one request: `Result<T, E>`. Dropping it cancels the request.
///
/// `Send + 'static` and `Unpin`, so it can be spawned, stored and polled through `&mut`.
#[must_use = "a request is cancelled when its Pending is dropped"]
pub struct Pending<T, E = EngineError> {
    inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
}

impl<T, E> fmt::Debug for Pending<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, E: Send + 'static> Pending<T, E> {
    /// Wraps any future of a result (e.g. an `async` block over other replies).
    pub fn new(future: impl Future<Output = Result<T, E>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }

    /// A reply that is already known (a validation error, a filtered-out request).
    pub fn ready(reply: Result<T, E>) -> Self {
        Self::new(std::future::ready(reply))
    }

    /// The same reply with its value converted by `f` and its error by `From`; dropping the
    /// result still cancels the request.
    pub fn map<U, E2>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Pending<U, E2>
    where
        U: Send + 'static,
        E2: From<E> + Send + 'static,
    {
        Pending::new(async move { self.await.map(f).map_err(E2::from) })
    }

    /// Blocks the calling thread until the reply arrives. Do not call it on an async
    /// executor's thread (it would stall the executor): `.await` the reply there.
    pub fn wait(self) -> Result<T, E> {
        pollster::block_on(self.inner)
    }

    /// Tinker's spelling of [`Pending::wait`].
    pub fn result(self) -> Result<T, E> {
        self.wait()
    }
}

impl<T: Send + 'static> Pending<T, EngineError> {
    /// The reply the engine thread will send on `rx`; a closed channel (the engine stopped)
    /// reads as [`EngineError::Shutdown`].
    pub(crate) fn from_channel(rx: flume::Receiver<Result<T, EngineError>>) -> Self {
        Self::new(async move { rx.recv_async().await.unwrap_or(Err(EngineError::Shutdown)) })
    }
}

impl<T, E> Future for Pending<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_unpin<T: Send + Unpin + 'static>() {}

    #[test]
    fn is_send_and_unpin() {
        assert_send_unpin::<Pending<Vec<u32>>>();
    }

    #[test]
    fn wait_is_woken_from_another_thread() {
        let (tx, rx) = flume::bounded(1);
        let pending = Pending::<u32>::from_channel(rx);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(Ok(7)).unwrap();
        });
        assert_eq!(pending.wait().unwrap(), 7);
        sender.join().unwrap();
    }

    #[test]
    fn a_closed_channel_is_shutdown_and_map_converts() {
        let (tx, rx) = flume::bounded::<Result<u32, EngineError>>(1);
        drop(tx);
        let pending = Pending::from_channel(rx);
        assert!(matches!(pending.wait(), Err(EngineError::Shutdown)));
        let three = Pending::<u32, EngineError>::ready(Ok(3));
        let mapped: Pending<String, EngineError> = three.map(|v| v.to_string());
        assert_eq!(mapped.result().unwrap(), "3");
    }

    #[test]
    fn dropping_it_closes_the_channel() {
        let (tx, rx) = flume::bounded::<Result<u32, EngineError>>(1);
        let pending = Pending::from_channel(rx).map::<u32, EngineError>(|v| v + 1);
        assert!(!tx.is_disconnected());
        drop(pending);
        assert!(tx.is_disconnected());
    }
}
