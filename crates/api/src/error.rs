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
    /// A LoRA adapter could not be loaded, found or unloaded.
    #[error(transparent)]
    Adapter(#[from] infermux_core::AdapterError),
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A `base_model` name did not resolve in the local model registry.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// A remote `infermux serve` could not be reached or answered with an error.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The chosen backend could not be created.
    #[error("{backend} backend: {reason}")]
    Backend {
        /// Which backend.
        backend: BackendKind,
        /// Why.
        reason: String,
    },
}

/// Why a remote call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    /// The server address cannot be used.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// Why it is unusable.
        reason: String,
    },
    /// No reply could be had (connection refused or reset, timeout), after every retry.
    #[error("POST {url}: {message} (after {attempts} tries)")]
    Transport {
        /// The endpoint.
        url: String,
        /// Tries made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// The server answered with an error status (the last one, if retries were made).
    #[error("POST {url}: HTTP {status}{}: {message} (after {attempts} tries)", kind.as_deref().map(|k| format!(" {k}")).unwrap_or_default())]
    Status {
        /// The endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The error `type` of the reply (`invalid_request_error`, ...), if it had one.
        kind: Option<String>,
        /// The request field at fault, if the server named one.
        param: Option<String>,
        /// The server's message (or the start of its body).
        message: String,
        /// Tries made.
        attempts: u32,
    },
    /// The reply was not the JSON the endpoint promises.
    #[error("POST {url}: malformed reply: {message}")]
    Decode {
        /// The endpoint.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The request was dropped (its future cancelled) before it completed.
    #[error("POST {url}: cancelled")]
    Cancelled {
        /// The endpoint.
        url: String,
    },
}

impl RemoteError {
    /// The HTTP status of a [`RemoteError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
