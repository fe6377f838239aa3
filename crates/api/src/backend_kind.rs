//! Choosing and constructing a backend at run time.

use std::path::Path;

#[allow(unused_imports)]
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
            Self::Onnx => cfg!(feature = "onnx"),
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

/// Builds the chosen backend over the model folder at `path`; with `merge`, onnx merges that
/// PEFT adapter into the weights (the other backends load adapters into a running engine).
pub(crate) fn load_backend(
    path: &Path,
    options: &LoadOptions,
    merge: Option<&Path>,
) -> Result<Box<dyn Backend>> {
    #[cfg(not(feature = "onnx"))]
    let _ = merge;
    let failed = |reason: String| Error::Backend {
        backend: options.backend,
        reason,
    };
    match options.backend {
        #[cfg(feature = "candle")]
        BackendKind::Candle => {
            let dir = ModelDir::open(path)?;
            let opts = infermux_backend_candle::CandleOptions {
                device: options.device,
                dtype: options.dtype,
                ..Default::default()
            };
            let backend = infermux_backend_candle::CandleBackend::from_model_dir(&dir, opts)
                .map_err(|e| failed(e.to_string()))?;
            Ok(Box::new(backend))
        }
        #[cfg(feature = "torch")]
        BackendKind::Torch => {
            let dir = ModelDir::open(path)?;
            let opts = infermux_backend_torch::TorchOptions {
                device: options.device,
                dtype: options.dtype,
            };
            let backend = infermux_backend_torch::TorchBackend::from_model_dir(&dir, opts)
                .map_err(|e| failed(e.to_string()))?;
            Ok(Box::new(backend))
        }
        #[cfg(feature = "onnx")]
        BackendKind::Onnx => {
            if options.dtype != DType::F32 {
                return Err(failed(
                    "a graph's precision is fixed when it is exported (`--dtype` of the exporter)"
                        .into(),
                ));
            }
            let opts = infermux_backend_onnx::OnnxOptions {
                device: options.device,
                ..Default::default()
            };
            let backend = match merge {
                Some(adapter) => {
                    infermux_backend_onnx::OnnxBackend::load_merged(path, adapter, opts)
                }
                None => infermux_backend_onnx::OnnxBackend::load(path, opts),
            }
            .map_err(|e| match e {
                infermux_backend_onnx::OnnxBackendError::Adapter(e) => Error::Adapter(e),
                e => failed(e.to_string()),
            })?;
            Ok(Box::new(backend))
        }
        #[allow(unreachable_patterns)]
        other => Err(failed(format!(
            "{} cannot be served: not compiled into this build (enable the `{other}` feature of `infermux`)",
            path.display()
        ))),
    }
}
