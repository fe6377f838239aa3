//! The guided-decoding engine a loaded model gets (llguidance, with the `guided` feature).

use std::sync::Arc;

use infermux_core::{GuidedDecoder, ModelInfo};

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// llguidance over the model's tokenizer; `None` without the `guided` feature.
#[cfg(feature = "guided")]
pub(crate) fn decoder(
    tokenizer: &Tokenizer,
    info: &ModelInfo,
) -> Result<Option<Arc<dyn GuidedDecoder>>> {
    let decoder = infermux_guided::LlgDecoder::new(
        tokenizer.hf().clone(),
        &info.eos_token_ids,
        info.vocab_size,
    )
    .map_err(|e| crate::error::Error::Tokenizer(format!("guided decoding: {e}")))?;
    Ok(Some(Arc::new(decoder)))
}

/// llguidance over the model's tokenizer; `None` without the `guided` feature.
#[cfg(not(feature = "guided"))]
pub(crate) fn decoder(
    _tokenizer: &Tokenizer,
    _info: &ModelInfo,
) -> Result<Option<Arc<dyn GuidedDecoder>>> {
    Ok(None)
}
