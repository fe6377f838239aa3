//! Errors of loading a graph into ONNX Runtime.

use infermux_core::model::AdapterError;
use infermux_core::{BackendError, ModelError};

/// Why an [`crate::OnnxBackend`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum OnnxBackendError {
    /// The model folder or its config is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The ONNX Runtime library could not be found or loaded.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// The graph does not have the Optimum "text-generation-with-past" interface.
    #[error("graph {path}: {reason}")]
    Graph {
        /// The graph file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The adapter to merge cannot be used with this model.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The backend failed while preparing.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Wraps an ort error as a [`BackendError`].
pub(crate) fn runtime_error<R>(err: ort::Error<R>) -> BackendError {
    BackendError::Runtime {
        runtime: "onnxruntime",
        message: err.to_string(),
    }
}
