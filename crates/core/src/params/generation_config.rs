//! The model's `generation_config.json` defaults and how they fill a request's parameters.

use std::path::Path;

use serde::Deserialize;

use super::SamplingParams;
use crate::TokenId;
use crate::error::ModelError;

/// The sampling defaults a model ships in `generation_config.json` (Hugging Face names).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default nucleus mass.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<i32>,
    /// Default min-p.
    pub min_p: Option<f32>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Default completion budget.
    pub max_new_tokens: Option<usize>,
    /// Hugging Face's switch for sampling; `false` means greedy.
    pub do_sample: Option<bool>,
    /// EOS id(s): one id or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<TokenId>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TokenId>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ids {
        One(TokenId),
        Many(Vec<TokenId>),
        None(()),
    }
    Ok(match Ids::deserialize(d)? {
        Ids::One(id) => vec![id],
        Ids::Many(ids) => ids,
        Ids::None(()) => Vec::new(),
    })
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a model folder; a missing file gives the empty config.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            file: path,
            reason: e.to_string(),
        })
    }
}

impl SamplingParams {
    /// Fills fields the request left at their defaults from the model's generation config
    /// (vLLM's behaviour): sampling knobs, `max_tokens`, and extra EOS ids as stop tokens.
    pub fn update_with_generation_config(&mut self, config: &GenerationConfig) {
        let d = SamplingParams::default();
        if self.temperature == d.temperature {
            if config.do_sample == Some(false) {
                self.temperature = 0.0;
            } else if let Some(t) = config.temperature {
                self.temperature = t;
            }
        }
        if self.top_p == d.top_p
            && let Some(v) = config.top_p
        {
            self.top_p = v;
        }
        if self.top_k == d.top_k
            && let Some(v) = config.top_k
        {
            self.top_k = v;
        }
        if self.min_p == d.min_p
            && let Some(v) = config.min_p
        {
            self.min_p = v;
        }
        if self.repetition_penalty == d.repetition_penalty
            && let Some(v) = config.repetition_penalty
        {
            self.repetition_penalty = v;
        }
        if self.max_tokens == d.max_tokens
            && let Some(v) = config.max_new_tokens
        {
            self.max_tokens = Some(v);
        }
        if !self.ignore_eos {
            for &id in &config.eos_token_id {
                if !self.stop_token_ids.contains(&id) {
                    self.stop_token_ids.push(id);
                }
            }
        }
    }
}
