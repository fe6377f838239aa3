//! Choosing and constructing a backend at run time.

use infermux_core::{Backend, DType, Device, EngineConfig, ModelDir};

use crate::error::{Error, Result};

/// The inference runtimes infermux can drive.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// candle: pure Rust, the default.
    #[default]
    Candle,
    /// libtorch through `tch` (feature `torch`).
    Torch,
    /// ONNX Runtime through `ort` (feature `onnx`).
    Onnx,
}

impl BackendKind {
    /// All kinds, in display order.
    pub const ALL: [BackendKind; 3] = [Self::Candle, Self::Torch, Self::Onnx];

    /// Lower-case name, as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Candle => "candle",
            Self::Torch => "torch",
            Self::Onnx => "onnx",
        }
    }

    /// Whether this build includes the backend.
    pub fn is_available(self) -> bool {
        match self {
            Self::Candle => cfg!(feature = "candle"),
            Self::Torch => cfg!(feature = "torch"),
            Self::Onnx => false,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown backend {s:?} (expected candle, torch or onnx)"))
    }
}

/// How to load a model: which backend, where, in which precision, with which engine limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The runtime.
    pub backend: BackendKind,
    /// CPU or CUDA.
    pub device: Device,
    /// Precision.
    pub dtype: DType,
    /// Scheduler limits.
    pub engine: EngineConfig,
}

/// Builds the chosen backend over an opened model folder.
pub(crate) fn load_backend(dir: &ModelDir, options: &LoadOptions) -> Result<Box<dyn Backend>> {
    let unavailable = |feature: &str| Error::Backend {
        backend: options.backend,
        reason: format!(
            "not compiled into this build (enable the `{feature}` feature of `infermux`)"
        ),
    };
    match options.backend {
        #[cfg(feature = "candle")]
        BackendKind::Candle => {
            let opts = infermux_backend_candle::CandleOptions {
                device: options.device,
                dtype: options.dtype,
            };
            let backend = infermux_backend_candle::CandleBackend::from_model_dir(dir, opts)
                .map_err(|e| Error::Backend {
                    backend: BackendKind::Candle,
                    reason: e.to_string(),
                })?;
            Ok(Box::new(backend))
        }
        #[cfg(not(feature = "candle"))]
        BackendKind::Candle => {
            let _ = dir;
            Err(unavailable("candle"))
        }
        #[cfg(feature = "torch")]
        BackendKind::Torch => {
            let opts = infermux_backend_torch::TorchOptions {
                device: options.device,
                dtype: options.dtype,
            };
            let backend =
                infermux_backend_torch::TorchBackend::from_model_dir(dir, opts).map_err(|e| {
                    Error::Backend {
                        backend: BackendKind::Torch,
                        reason: e.to_string(),
                    }
                })?;
            Ok(Box::new(backend))
        }
        #[cfg(not(feature = "torch"))]
        BackendKind::Torch => Err(unavailable("torch")),
        BackendKind::Onnx => Err(unavailable("onnx")),
    }
}
