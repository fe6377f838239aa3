//! Guided (constrained) decoding: the request parameters and the trait a grammar engine
//! implements. The engine asks a [`TokenConstraint`] for the allowed-token mask before each
//! sample and commits the sampled token to it; `infermux-guided` implements it with llguidance.

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::error::ValidationError;

/// What the output must match (EasyDeL's `GuidedDecodingParams`); exactly one mode is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuidedDecodingParams {
    /// A JSON schema (as a JSON value, or a string holding one) the output must validate against.
    pub json: Option<serde_json::Value>,
    /// A regular expression the whole output must match.
    pub regex: Option<String>,
    /// The output is exactly one of these strings.
    pub choice: Option<Vec<String>>,
    /// A context-free grammar in Lark syntax (as llguidance accepts it).
    pub grammar: Option<String>,
    /// The output is any JSON object.
    pub json_object: Option<bool>,
    /// Name of the guided-decoding engine; `None` or `"llguidance"`.
    pub backend: Option<String>,
    /// Whether `backend` was chosen automatically (informational, as in EasyDeL).
    pub backend_was_auto: bool,
    /// Do not fall back to unconstrained decoding (infermux never falls back; accepted for parity).
    pub disable_fallback: bool,
    /// JSON modes: no optional whitespace between tokens of the JSON output.
    pub disable_any_whitespace: bool,
    /// JSON schema mode: objects without `additionalProperties` allow no extra keys.
    pub disable_additional_properties: bool,
    /// JSON modes: the regex that whitespace between JSON tokens must match.
    pub whitespace_pattern: Option<String>,
    /// Structural tags (vLLM); not supported, rejected at validation.
    pub structural_tag: Option<String>,
}

/// The constraint kind a [`GuidedDecodingParams`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidedMode {
    /// `json`: a JSON schema.
    JsonSchema,
    /// `regex`.
    Regex,
    /// `choice`.
    Choice,
    /// `grammar`: a Lark grammar.
    Grammar,
    /// `json_object`: any JSON object.
    JsonObject,
}

impl GuidedDecodingParams {
    /// A JSON-schema constraint.
    pub fn json_schema(schema: serde_json::Value) -> Self {
        Self {
            json: Some(schema),
            ..Self::default()
        }
    }

    /// A regex constraint.
    pub fn regex(pattern: impl Into<String>) -> Self {
        Self {
            regex: Some(pattern.into()),
            ..Self::default()
        }
    }

    /// A choice among fixed strings.
    pub fn choice<S: Into<String>>(options: impl IntoIterator<Item = S>) -> Self {
        Self {
            choice: Some(options.into_iter().map(Into::into).collect()),
            ..Self::default()
        }
    }

    /// A Lark grammar constraint.
    pub fn grammar(lark: impl Into<String>) -> Self {
        Self {
            grammar: Some(lark.into()),
            ..Self::default()
        }
    }

    /// Which mode is set; errors unless exactly one is.
    pub fn mode(&self) -> Result<GuidedMode, ValidationError> {
        let set: Vec<GuidedMode> = [
            (self.json.is_some(), GuidedMode::JsonSchema),
            (self.regex.is_some(), GuidedMode::Regex),
            (self.choice.is_some(), GuidedMode::Choice),
            (self.grammar.is_some(), GuidedMode::Grammar),
            (self.json_object == Some(true), GuidedMode::JsonObject),
        ]
        .into_iter()
        .filter_map(|(on, mode)| on.then_some(mode))
        .collect();
        match set.as_slice() {
            [mode] => Ok(*mode),
            [] => Err(ValidationError::field(
                "guided_decoding",
                "set one of json, regex, choice, grammar or json_object",
            )),
            _ => Err(ValidationError::field(
                "guided_decoding",
                format!("only one mode may be set, got {set:?}"),
            )),
        }
    }

    /// Checks the fields that need no grammar engine.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.mode()?;
        if let Some(choice) = &self.choice
            && choice.is_empty()
        {
            return Err(ValidationError::field(
                "guided_decoding.choice",
                "needs at least one option",
            ));
        }
        if self.structural_tag.is_some() {
            return Err(ValidationError::field(
                "guided_decoding.structural_tag",
                "structural tags are not supported",
            ));
        }
        if let Some(backend) = &self.backend
            && backend != "llguidance"
            && backend != "auto"
        {
            return Err(ValidationError::field(
                "guided_decoding.backend",
                format!("unknown backend {backend:?}; available: llguidance"),
            ));
        }
        Ok(())
    }
}

/// A set of allowed token ids over the vocabulary, one bit per id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl TokenMask {
    /// A mask over `len` ids with nothing allowed.
    pub fn none(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(32)],
            len,
        }
    }

    /// Number of ids the mask covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mask covers no id at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `id` is allowed (ids past the end are not).
    pub fn allows(&self, id: TokenId) -> bool {
        let i = id as usize;
        i < self.len && self.words[i / 32] >> (i % 32) & 1 == 1
    }

    /// Allows `id` (ignored past the end).
    pub fn allow(&mut self, id: TokenId) {
        let i = id as usize;
        if i < self.len {
            self.words[i / 32] |= 1 << (i % 32);
        }
    }

    /// The raw words, bit `i % 32` of word `i / 32` standing for id `i` (llguidance's layout).
    pub fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }

    /// Number of allowed ids.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Why a constraint could not be compiled or advanced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuidedError {
    /// The schema, regex or grammar is invalid, too large, or took too long to compile.
    #[error("invalid `guided_decoding` ({mode:?} constraint): {reason}")]
    Invalid {
        /// The constraint kind.
        mode: GuidedMode,
        /// What was wrong, as the grammar engine reports it.
        reason: String,
    },
    /// The grammar engine failed while decoding (e.g. a token it did not allow was committed).
    #[error("guided decoding failed: {0}")]
    Runtime(String),
}

/// One sequence's live constraint: which tokens may come next, given what was committed.
pub trait TokenConstraint: Send {
    /// Fills `mask` (sized to the model's vocabulary) with the ids allowed next; EOS ids are
    /// allowed when the output so far is complete.
    fn compute_mask(&mut self, mask: &mut TokenMask) -> Result<(), GuidedError>;
    /// Advances past the sampled `token`.
    fn commit(&mut self, token: TokenId) -> Result<(), GuidedError>;
    /// Whether nothing but EOS may follow: the engine then ends the sequence.
    fn is_finished(&self) -> bool;
    /// An independent copy in the same state (for `n > 1` and beams).
    fn fork(&self) -> Box<dyn TokenConstraint>;
}

/// A grammar engine: compiles request parameters into per-sequence constraints.
pub trait GuidedDecoder: Send + Sync {
    /// Compiles `params` for a model with `vocab_size` logits. Errors are request errors,
    /// returned within the engine's compile limits (never a hang).
    fn compile(
        &self,
        params: &GuidedDecodingParams,
        vocab_size: usize,
    ) -> Result<Box<dyn TokenConstraint>, GuidedError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_mode() {
        assert_eq!(
            GuidedDecodingParams::regex("a+").mode(),
            Ok(GuidedMode::Regex)
        );
        assert!(GuidedDecodingParams::default().validate().is_err());
        let two = GuidedDecodingParams {
            regex: Some("a".into()),
            choice: Some(vec!["b".into()]),
            ..Default::default()
        };
        assert!(two.validate().is_err());
        assert!(
            GuidedDecodingParams::choice(Vec::<String>::new())
                .validate()
                .is_err()
        );
    }

    #[test]
    fn mask_bits() {
        let mut m = TokenMask::none(40);
        m.allow(0);
        m.allow(33);
        m.allow(99);
        assert!(m.allows(0) && m.allows(33) && !m.allows(1) && !m.allows(99));
        assert_eq!(m.count(), 2);
    }
}
