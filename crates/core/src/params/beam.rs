//! Beam-search parameters (EasyDeL's `BeamSearchParams`).

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Keeps the `beam_width` most likely sequences at each step and returns them, best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeamSearchParams {
    /// Beams kept per step (and sequences returned).
    pub beam_width: usize,
    /// Tokens generated per beam at most.
    pub max_tokens: usize,
    /// Keep extending beams past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Scales logits before the log-softmax that scores beams; `0` means none (as `1`).
    #[serde(default)]
    pub temperature: f32,
    /// Finished beams are ranked by `cumulative_logprob / len^length_penalty` (as Hugging Face).
    #[serde(default = "one")]
    pub length_penalty: f32,
    /// Keep EOS in the returned text (beam search has no stop strings of its own).
    #[serde(default)]
    pub include_stop_str_in_output: bool,
}

fn one() -> f32 {
    1.0
}

impl BeamSearchParams {
    /// `beam_width` beams of up to `max_tokens` tokens, other fields at their defaults.
    pub fn new(beam_width: usize, max_tokens: usize) -> Self {
        Self {
            beam_width,
            max_tokens,
            ignore_eos: false,
            temperature: 0.0,
            length_penalty: 1.0,
            include_stop_str_in_output: false,
        }
    }

    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.beam_width == 0 {
            return Err(ValidationError::field("beam_width", "must be at least 1"));
        }
        if self.max_tokens == 0 {
            return Err(ValidationError::field("max_tokens", "must be at least 1"));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ValidationError::field(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if self.temperature > 0.0 && !(1.0 / self.temperature).is_finite() {
            return Err(ValidationError::field(
                "temperature",
                format!(
                    "must be 0 or at least {:e} (its inverse scales the logits), got {:e}",
                    1.0 / f32::MAX,
                    self.temperature
                ),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(ValidationError::field(
                "length_penalty",
                "must be a finite number",
            ));
        }
        Ok(())
    }
}
