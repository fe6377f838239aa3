//! `ServiceClient`: the entry point that loads models and hands out sampling clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use infermux_core::{Backend, Engine, EngineTools, ModelError};

use infermux_core::model::lora::ADAPTER_CONFIG;

use crate::backend_kind::{BackendKind, LoadOptions, load_backend};
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
        self.load(&path, base_model.trim().to_string(), None)
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
    /// weights or graph the backend needs), or a GGUF file (config, tokenizer and chat
    /// template from its metadata, weights in their ggml types), and starts an engine for it. The config is
    /// range-checked and the weights' headers checked against it before anything is allocated:
    /// a lying or truncated folder is an [`Error::Model`] naming the field or tensor.
    ///
    /// A PEFT adapter folder (`adapter_config.json`) is Tinker's `model_path` of trained
    /// weights: its base (`base_model_name_or_path`: a folder, or a name the registry knows)
    /// is loaded with the adapter, as [`ServiceClient::create_lora_sampling_client`].
    pub fn create_sampling_client(&self, model: impl AsRef<Path>) -> Result<SamplingClient> {
        let path = model.as_ref();
        if path.join(ADAPTER_CONFIG).is_file() {
            let base = self.adapter_base(path)?;
            return self.create_lora_sampling_client(base, path);
        }
        self.load(path, folder_name(path), None)
    }

    /// Starts a sampling client on the model folder `base` with the PEFT adapter in `adapter`
    /// (Tinker's sampling client on trained LoRA weights). candle and torch load the adapter
    /// into the base's engine, where requests on the base and on other adapters share its
    /// batches; onnx merges it into the weights at load (`W + B A`; its graph holds the
    /// weights), so that engine serves the adapted model only.
    pub fn create_lora_sampling_client(
        &self,
        base: impl AsRef<Path>,
        adapter: impl AsRef<Path>,
    ) -> Result<SamplingClient> {
        let (base, adapter) = (base.as_ref(), adapter.as_ref());
        if self.options.backend == BackendKind::Onnx {
            return self.load(base, folder_name(base), Some(adapter));
        }
        self.load(base, folder_name(base), None)?
            .create_lora_client(adapter)
    }

    /// The base model folder an adapter's `base_model_name_or_path` names.
    fn adapter_base(&self, adapter: &Path) -> Result<PathBuf> {
        let file = adapter.join(ADAPTER_CONFIG);
        let invalid = |reason: String| ModelError::InvalidConfig {
            file: file.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
            path: file.clone(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let Some(name) = json["base_model_name_or_path"].as_str() else {
            return Err(invalid(
                "base_model_name_or_path is missing: give the base model with \
                 create_lora_sampling_client(base, adapter)"
                    .into(),
            )
            .into());
        };
        // As PEFT wrote it (a folder as the trainer named it, absolute or relative to where it
        // ran), then relative to the adapter, then a name the registry knows.
        let given = Path::new(name);
        for folder in [given.to_path_buf(), adapter.join(given)] {
            if folder.join("config.json").is_file() {
                return Ok(folder);
            }
        }
        Ok(self.registry.resolve(name)?)
    }

    fn load(
        &self,
        path: &Path,
        base_model: String,
        merge: Option<&Path>,
    ) -> Result<SamplingClient> {
        let gguf = infermux_core::model::gguf::is_gguf(path);
        if !path.is_dir() && !gguf {
            return Err(ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "(the folder itself, or a GGUF file)".into(),
            }
            .into());
        }
        // The config first: it is cheap to check, and a config that lies fails before a
        // backend sizes anything from it (the backends check it again, with the weights'
        // headers, before reading any tensor).
        let (config, _) = infermux_core::model::read_config(path)?;
        let backend = load_backend(path, &self.options, merge)?;
        let tokenizer = Tokenizer::from_model_path(path)?;
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

/// A folder's last component, the name a client reports as its base model.
fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
