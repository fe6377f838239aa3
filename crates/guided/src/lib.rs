//! Guided (constrained) decoding for infermux through [llguidance]: JSON schema, regex,
//! choice, Lark grammar and JSON-object constraints behind core's
//! [`GuidedDecoder`](infermux_core::GuidedDecoder) / [`TokenConstraint`] contract.
//!
//! Build one [`LlgDecoder`] per model (it precomputes the tokenizer's token trie once), then
//! compile each request's [`GuidedDecodingParams`] into a per-sequence [`LlgConstraint`]:
//! before every sample, [`TokenConstraint::compute_mask`] gives the allowed ids; after it,
//! [`TokenConstraint::commit`] advances the constraint.
//!
//! ```no_run
//! use infermux_core::{GuidedDecoder, GuidedDecodingParams, TokenMask};
//! use infermux_guided::{LimitsConfig, LlgDecoder};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let decoder = LlgDecoder::from_file(
//!     "models/SmolLM2-135M-Instruct/tokenizer.json",
//!     &[2],   // EOS: <|im_end|>
//!     49152, // the model's vocab size (logits width)
//!     LimitsConfig::default(),
//! )?;
//! let params = GuidedDecodingParams::choice(["yes", "no"]);
//! let mut constraint = decoder.compile(&params, decoder.vocab_size())?;
//! let mut mask = TokenMask::none(decoder.vocab_size());
//! while !constraint.is_finished() {
//!     constraint.compute_mask(&mut mask)?;
//!     // ... sample a token among the allowed ids of `mask` ...
//!     # let token = (0..mask.len() as u32).find(|&id| mask.allows(id)).unwrap();
//!     if decoder.eos_ids().contains(&token) {
//!         break;
//!     }
//!     constraint.commit(token)?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [llguidance]: https://github.com/guidance-ai/llguidance

mod bridge;
mod constraint;
mod decoder;
mod grammar;

pub use constraint::LlgConstraint;
pub use decoder::{LimitsConfig, LlgBuildError, LlgDecoder};
pub use infermux_core::{
    GuidedDecodingParams, GuidedError, GuidedMode, TokenConstraint, TokenMask,
};
