//! The `Sampler` trait: what every sampling client (in-process or remote) can do, as an
//! object-safe interface, and `SamplerFuture`, the one reply type of this crate (`.await` it
//! or `.wait()` for it).

use std::sync::Arc;

use infermux_core::{ModelInput, SamplingParams};

use crate::error::Error;
use crate::sampling_client::SamplingClient;
use crate::types::SampleResponse;

/// Tinker's sampling interface, implemented by the in-process [`SamplingClient`] and, with
/// feature `remote`, by `RemoteSamplingClient` (a server's native endpoints over HTTP).
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
        SamplingClient::sample(
            self,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
        )
    }

    fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        SamplingClient::compute_logprobs(self, prompt)
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

/// The reply of every call of this crate that computes something ([`Sampler`]'s methods,
/// [`SamplingClient::sample`], `DeploymentSampler::sample_with_tokens`, ...): `.await` it in
/// async code (any executor), or call `.wait()` (alias `.result()`) from synchronous code; see
/// [`Pending`](infermux_core::Pending), the engine's reply type this is an instance of. It is
/// `Send + 'static`, so it can be spawned. Dropping it cancels the request where the sampler
/// can (the in-process engine frees the request's KV slots; the remote client stops retrying).
///
/// Build one with `SamplerFuture::new(async { ... })` or `SamplerFuture::ready(result)`.
pub type SamplerFuture<T> = infermux_core::Pending<T, Error>;

/// The former name of [`SamplerFuture`] (the in-process client's replies): the same type.
pub type ApiFuture<T> = SamplerFuture<T>;

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
    fn wait_is_woken_from_another_thread() {
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
