//! `ServiceClient`: the entry point that loads models and hands out sampling clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infermux_core::{Backend, Engine, EngineTools, ModelError};

use crate::backend_kind::{LoadOptions, load_backend};
use crate::error::{Error, Result};
use crate::registry::ModelRegistry;
use crate::sampling_client::SamplingClient;
use crate::tokenizer::Tokenizer;

/// Creates [`SamplingClient`]s, each with its own engine over a loaded model.
#[derive(Debug, Clone, Default)]
pub struct ServiceClient {
    options: LoadOptions,
    registry: ModelRegistry,
}

/// Which model a sampling client serves: Tinker's `create_sampling_client(base_model=...)` or
/// `create_sampling_client(model_path=...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model name resolved through the [`ModelRegistry`] (`NAME` or `ORG/NAME`).
    BaseModel(String),
    /// A model folder.
    ModelPath(PathBuf),
}

impl ModelSource {
    /// [`ModelSource::BaseModel`].
    pub fn base_model(name: impl Into<String>) -> Self {
        Self::BaseModel(name.into())
    }

    /// [`ModelSource::ModelPath`].
    pub fn model_path(path: impl Into<PathBuf>) -> Self {
        Self::ModelPath(path.into())
    }
}

impl ServiceClient {
    /// A client that loads models on the default backend (candle, CPU, f32).
    pub fn new() -> Self {
        Self::default()
    }

    /// A client that loads models with `options`.
    pub fn with_options(options: LoadOptions) -> Self {
        Self {
            options,
            registry: ModelRegistry::default(),
        }
    }

    /// Resolves base model names through `registry` (default: [`ModelRegistry::from_env`]).
    pub fn with_registry(mut self, registry: ModelRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// The registry base model names are resolved through.
    pub fn registry(&self) -> &ModelRegistry {
        &self.registry
    }

    /// Starts a sampling client for the model `base_model` names (`SmolLM2-135M-Instruct` or
    /// `HuggingFaceTB/SmolLM2-135M-Instruct`), found offline by the registry; an unknown name
    /// is an error listing the available ones. `get_base_model` reports the name as given.
    pub fn create_sampling_client_from_base_model(
        &self,
        base_model: &str,
    ) -> Result<SamplingClient> {
        let path = self.registry.resolve(base_model)?;
        self.load(&path, base_model.trim().to_string())
    }

    /// Starts a sampling client for `source`: a registry name or a model folder.
    pub fn create_sampling_client_from(&self, source: ModelSource) -> Result<SamplingClient> {
        match source {
            ModelSource::BaseModel(name) => self.create_sampling_client_from_base_model(&name),
            ModelSource::ModelPath(path) => self.create_sampling_client(path),
        }
    }

    /// The options models are loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// Loads the Hugging Face model folder at `model` (config.json, tokenizer.json, and the
    /// weights or graph the backend needs) and starts an engine for it. The config is
    /// range-checked and the weights' headers checked against it before anything is allocated:
    /// a lying or truncated folder is an [`Error::Model`] naming the field or tensor.
    pub fn create_sampling_client(&self, model: impl AsRef<Path>) -> Result<SamplingClient> {
        let path = model.as_ref();
        let base_model = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        self.load(path, base_model)
    }

    fn load(&self, path: &Path, base_model: String) -> Result<SamplingClient> {
        if !path.is_dir() {
            return Err(ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "(the folder itself)".into(),
            }
            .into());
        }
        // The config first: it is cheap to check, and a config that lies fails before a
        // backend sizes anything from it (the backends check it again, with the weights'
        // headers, before reading any tensor).
        let (config, _) = infermux_core::model::read_config(path)?;
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
        Ok(SamplingClient::new(
            engine,
            tokenizer,
            base_model,
            config,
            self.options.backend,
        ))
    }
}
