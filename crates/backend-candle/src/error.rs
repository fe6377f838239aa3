//! Errors of loading a model into candle.

use infermux_core::{BackendError, ModelError};

/// Why a [`crate::CandleBackend`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CandleBackendError {
    /// The model folder or its config is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A weight is missing, malformed or of the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// The options ask for CPU instructions this machine lacks.
    #[error("CPU kernels: {requested:?} requested, but this CPU supports at most {available:?}")]
    UnsupportedIsa {
        /// What the options asked for.
        requested: crate::Isa,
        /// The best this CPU has.
        available: crate::Isa,
    },
    /// The device could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
}
