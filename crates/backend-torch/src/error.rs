//! Errors of loading a model into libtorch.

use std::path::PathBuf;

use infermux_core::{BackendError, ModelError};

/// Why a [`crate::TorchBackend`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TorchBackendError {
    /// The model folder or its config is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A safetensors file could not be read.
    #[error("reading {}: {message}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// libtorch's message.
        message: String,
    },
    /// The checkpoint lacks a tensor the model's weight plan needs.
    #[error("tensor {0} is missing from the checkpoint")]
    MissingTensor(String),
    /// A tensor's shape differs from the one the config implies.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor's Hugging Face name.
        name: String,
        /// Its shape in the checkpoint.
        found: Vec<usize>,
        /// The shape the weight plan requires.
        expected: Vec<usize>,
    },
    /// libtorch failed to move, convert or fuse a tensor.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// The tensor (the first part, for fused projections).
        name: String,
        /// libtorch's message.
        message: String,
    },
    /// The device could not be opened, or a runtime table could not be built on it.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
