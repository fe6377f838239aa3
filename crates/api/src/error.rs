//! The façade's error type: one enum over every way a call can fail.

use infermux_core::{EngineError, ModelError};

use crate::BackendKind;

/// Errors of the `infermux` API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was invalid or the engine failed serving it.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model folder could not be used.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A `base_model` name did not resolve in the local model registry.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// A remote `infermux serve` could not be reached or answered with an error.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// The chosen backend could not be created.
    #[error("{backend} backend: {reason}")]
    Backend {
        /// Which backend.
        backend: BackendKind,
        /// Why.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
