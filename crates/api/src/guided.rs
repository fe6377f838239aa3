//! The guided-decoding engine a loaded model gets (llguidance, with the `guided` feature).
//!
//! Building llguidance's token trie takes a second or so, so it happens on the first guided
//! request, not at model load.

use std::sync::Arc;

use infermux_core::{GuidedDecoder, ModelInfo};

use crate::tokenizer::Tokenizer;

/// llguidance over the model's tokenizer, built lazily; `None` without the `guided` feature.
#[cfg(feature = "guided")]
pub(crate) fn decoder(tokenizer: &Tokenizer, info: &ModelInfo) -> Option<Arc<dyn GuidedDecoder>> {
    Some(Arc::new(lazy::LazyLlg {
        tokenizer: tokenizer.hf().clone(),
        eos: info.eos_token_ids.clone(),
        vocab_size: info.vocab_size,
        built: std::sync::OnceLock::new(),
    }))
}

/// llguidance over the model's tokenizer, built lazily; `None` without the `guided` feature.
#[cfg(not(feature = "guided"))]
pub(crate) fn decoder(_tokenizer: &Tokenizer, _info: &ModelInfo) -> Option<Arc<dyn GuidedDecoder>> {
    None
}

#[cfg(feature = "guided")]
mod lazy {
    use std::sync::OnceLock;

    use infermux_core::{
        GuidedDecoder, GuidedDecodingParams, GuidedError, TokenConstraint, TokenId,
    };
    use infermux_guided::{LimitsConfig, LlgDecoder};

    pub(super) struct LazyLlg {
        pub tokenizer: tokenizers::Tokenizer,
        pub eos: Vec<TokenId>,
        pub vocab_size: usize,
        pub built: OnceLock<Result<LlgDecoder, String>>,
    }

    impl GuidedDecoder for LazyLlg {
        fn compile(
            &self,
            params: &GuidedDecodingParams,
            vocab_size: usize,
        ) -> Result<Box<dyn TokenConstraint>, GuidedError> {
            let decoder = self.built.get_or_init(|| {
                LlgDecoder::new(
                    self.tokenizer.clone(),
                    &self.eos,
                    self.vocab_size,
                    LimitsConfig::default(),
                )
                .map_err(|e| e.to_string())
            });
            match decoder {
                Ok(d) => d.compile(params, vocab_size),
                Err(e) => Err(GuidedError::Runtime(format!(
                    "the guided-decoding engine could not be built for this tokenizer: {e}"
                ))),
            }
        }
    }
}
