//! Everything between logits and the next token, once for all backends.

pub mod logprobs;
pub mod rng;
pub mod sampler;

pub use logprobs::{argmax, logsumexp, token_logprob, top_logprobs};
pub use rng::SeqRng;
pub use sampler::{SampledToken, sample_token};
