//! The `Sampler` trait: what every sampling client (in-process or remote) can do, as an
//! object-safe interface, and `SamplerFuture`, its reply (`.await` it or `.wait()` for it).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use infermux_core::{ModelInput, SamplingParams};

use crate::error::Result;
use crate::sampling_client::SamplingClient;
use crate::types::SampleResponse;

/// Tinker's sampling interface, implemented by the in-process [`SamplingClient`] and by
/// [`RemoteSamplingClient`](crate::RemoteSamplingClient) (a server's native endpoints over HTTP).
///
/// Object safe: hold an `Arc<dyn Sampler>` to write code that works with either. Implementors
/// are `Send + Sync`, so one instance can be shared by every thread and task.
pub trait Sampler: Send + Sync {
    /// Draws `num_samples` continuations of `prompt`, optionally with the prompt's logprobs
    /// (first entry `None`) and its top-k alternatives per position.
    fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> SamplerFuture<SampleResponse>;

    /// Logprob of each prompt token given the ones before it; the first entry is `None`.
    fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>>;

    /// The name of the model sampled from.
    fn get_base_model(&self) -> String;
}

impl Sampler for SamplingClient {
    fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> SamplerFuture<SampleResponse> {
        SamplerFuture::new(SamplingClient::sample(
            self,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
        ))
    }

    fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        SamplerFuture::new(SamplingClient::compute_logprobs(self, prompt))
    }

    fn get_base_model(&self) -> String {
        SamplingClient::get_base_model(self)
    }
}

macro_rules! forward_sampler {
    ($($ty:ty),*) => {$(
        impl<S: Sampler + ?Sized> Sampler for $ty {
            fn sample(
                &self,
                prompt: ModelInput,
                num_samples: usize,
                sampling_params: SamplingParams,
                include_prompt_logprobs: bool,
                topk_prompt_logprobs: usize,
            ) -> SamplerFuture<SampleResponse> {
                (**self).sample(
                    prompt,
                    num_samples,
                    sampling_params,
                    include_prompt_logprobs,
                    topk_prompt_logprobs,
                )
            }

            fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
                (**self).compute_logprobs(prompt)
            }

            fn get_base_model(&self) -> String {
                (**self).get_base_model()
            }
        }
    )*};
}

forward_sampler!(&S, Box<S>, Arc<S>);

/// The reply of a [`Sampler`] call: `.await` it in async code (any executor), or call
/// [`SamplerFuture::wait`] (alias [`SamplerFuture::result`]) from synchronous code. It is
/// `Send + 'static`, so it can be spawned. Dropping it cancels the request where the sampler
/// can (the in-process engine frees the request's KV slots; the remote client stops retrying).
#[must_use = "a request is cancelled when its future is dropped"]
pub struct SamplerFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<T>> + Send>>,
}

impl<T> std::fmt::Debug for SamplerFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerFuture").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> SamplerFuture<T> {
    /// Wraps any future of a result.
    pub fn new(future: impl Future<Output = Result<T>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(future),
        }
    }

    /// A future that is already resolved.
    pub fn ready(result: Result<T>) -> Self {
        Self::new(std::future::ready(result))
    }

    /// Blocks the calling thread until the reply arrives. Do not call it on an async
    /// executor's thread: `.await` the future there.
    pub fn wait(self) -> Result<T> {
        block_on(self.inner)
    }

    /// Tinker's spelling of [`SamplerFuture::wait`].
    pub fn result(self) -> Result<T> {
        self.wait()
    }
}

impl<T> Future for SamplerFuture<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// Wakes a parked thread.
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` to completion on the calling thread, parking it between polls.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn object_safe_and_thread_safe() {
        assert_send_sync::<Arc<dyn Sampler>>();
        assert_send_sync::<SamplingClient>();
        assert_send::<SamplerFuture<SampleResponse>>();
    }

    #[test]
    fn block_on_waits_for_a_wake_from_another_thread() {
        let (tx, rx) = flume::bounded::<u32>(1);
        let fut = SamplerFuture::new(async move { Ok(rx.recv_async().await.unwrap()) });
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        assert_eq!(fut.wait().unwrap(), 7);
        t.join().unwrap();
    }
}
