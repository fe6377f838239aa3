//! Errors of loading a model into libtorch.

use infermux_core::{BackendError, ModelError};

/// Why a [`crate::TorchBackend`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TorchBackendError {
    /// The model folder or its config is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A weight is missing, malformed or of the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// The device could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
