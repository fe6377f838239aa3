//! Everything between logits and the next token, once for all backends.

pub mod batch;
pub mod logprobs;
pub mod processors;
pub mod rng;
pub mod sampler;

pub use batch::{SamplingBatch, SlotSampling};
pub use logprobs::{argmax, logsumexp, token_logprob, top_logprobs};
pub use processors::{History, Processors};
pub use rng::SeqRng;
pub use sampler::{Knobs, SampledToken, sample_processed, sample_token};
