//! A result that arrives from the engine thread: `.await` it, or `.wait()` from sync code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::error::EngineError;

type Reply<T> = Result<T, EngineError>;

/// The eventual reply to one request. Dropping it cancels the request.
#[must_use = "a request is cancelled when its Pending is dropped"]
pub struct Pending<T: 'static> {
    state: State<T>,
}

enum State<T: 'static> {
    Idle(flume::Receiver<Reply<T>>),
    Polling(flume::r#async::RecvFut<'static, Reply<T>>),
    Taken,
}

impl<T: 'static> Pending<T> {
    pub(crate) fn new(rx: flume::Receiver<Reply<T>>) -> Self {
        Self {
            state: State::Idle(rx),
        }
    }

    /// A reply that is already known (e.g. a validation error).
    pub(crate) fn ready(reply: Reply<T>) -> Self {
        let (tx, rx) = flume::bounded(1);
        let _ = tx.send(reply);
        Self::new(rx)
    }

    /// Blocks the calling thread until the reply arrives.
    pub fn wait(self) -> Reply<T> {
        match self.state {
            State::Idle(rx) => rx.recv().unwrap_or(Err(EngineError::Shutdown)),
            State::Polling(fut) => block_on(fut).unwrap_or(Err(EngineError::Shutdown)),
            State::Taken => Err(EngineError::Shutdown),
        }
    }
}

impl<T: 'static> Future for Pending<T> {
    type Output = Reply<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let State::Idle(_) = self.state {
            let State::Idle(rx) = std::mem::replace(&mut self.state, State::Taken) else {
                unreachable!()
            };
            self.state = State::Polling(rx.into_recv_async());
        }
        match &mut self.state {
            State::Polling(fut) => Pin::new(fut)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(EngineError::Shutdown))),
            _ => Poll::Ready(Err(EngineError::Shutdown)),
        }
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives a future to completion on the current thread.
fn block_on<F: Future + Unpin>(mut fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = Pin::new(&mut fut).poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
