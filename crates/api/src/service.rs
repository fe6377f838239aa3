//! `ServiceClient`: the entry point that loads models and hands out sampling clients.

use std::path::Path;
use std::sync::Arc;

use infermux_core::{Backend, Engine, EngineTools, ModelError};

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

    /// Loads the Hugging Face model folder at `model` (config.json, tokenizer.json, and the
    /// weights or graph the backend needs) and starts an engine for it.
    pub fn create_sampling_client(&self, model: impl AsRef<Path>) -> Result<SamplingClient> {
        let path = model.as_ref();
        if !path.is_dir() {
            return Err(ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "(the folder itself)".into(),
            }
            .into());
        }
        let backend = load_backend(path, &self.options)?;
        if !path.join("tokenizer.json").is_file() {
            return Err(ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "tokenizer.json".into(),
            }
            .into());
        }
        let tokenizer = Tokenizer::from_model_dir(path)?;
        let tools = EngineTools {
            codec: Some(Arc::new(tokenizer.clone())),
            guided: crate::guided::decoder(&tokenizer, backend.info()),
        };
        let engine = Engine::start_with(backend, self.options.engine, tools)
            .map_err(|e| Error::Engine(e.into()))?;
        let base_model = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(SamplingClient::new(engine, tokenizer, base_model))
    }
}
