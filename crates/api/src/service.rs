//! `ServiceClient`: the entry point that loads models and hands out sampling clients.

use std::path::Path;

use infermux_core::{Engine, ModelDir};

use crate::backend_kind::{LoadOptions, load_backend};
use crate::error::{Error, Result};
use crate::sampling_client::SamplingClient;
use crate::tokenizer::Tokenizer;

/// Creates [`SamplingClient`]s, each with its own engine over a loaded model.
#[derive(Debug, Clone, Default)]
pub struct ServiceClient {
    options: LoadOptions,
}

impl ServiceClient {
    /// A client that loads models on the default backend (candle, CPU, f32).
    pub fn new() -> Self {
        Self::default()
    }

    /// A client that loads models with `options`.
    pub fn with_options(options: LoadOptions) -> Self {
        Self { options }
    }

    /// The options models are loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// Loads the Hugging Face model folder at `model` (config, safetensors, tokenizer.json) and
    /// starts an engine for it.
    pub fn create_sampling_client(&self, model: impl AsRef<Path>) -> Result<SamplingClient> {
        let dir = ModelDir::open(model.as_ref())?;
        let tokenizer_path = dir.path.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::Model(infermux_core::ModelError::MissingFile {
                dir: dir.path.clone(),
                file: "tokenizer.json".into(),
            }));
        }
        let tokenizer = Tokenizer::from_model_dir(&dir.path)?;
        let backend = load_backend(&dir, &self.options)?;
        let engine =
            Engine::start(backend, self.options.engine).map_err(|e| Error::Engine(e.into()))?;
        let base_model = dir
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.path.display().to_string());
        Ok(SamplingClient::new(engine, tokenizer, base_model))
    }
}
