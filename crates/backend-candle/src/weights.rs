//! Reading named tensors from (possibly sharded) safetensors files into a device and dtype.

use std::path::PathBuf;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::CandleBackendError;

/// Memory-mapped safetensors files, read by tensor name.
pub(crate) struct Weights {
    files: MmapedSafetensors,
    device: Device,
    dtype: DType,
}

impl Weights {
    /// Maps `paths`; tensors are converted to `dtype` on `device` as they are read.
    pub fn open(
        paths: &[PathBuf],
        device: &Device,
        dtype: DType,
    ) -> Result<Self, CandleBackendError> {
        // SAFETY: the files are mapped read-only; like every safetensors loader we assume they
        // are not modified while the model is loaded.
        let files = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| CandleBackendError::Weights(format!("mapping {paths:?}: {e}")))?;
        Ok(Self {
            files,
            device: device.clone(),
            dtype,
        })
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    /// The tensor `name`, checked against the expected `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, CandleBackendError> {
        let t = self
            .files
            .load(name, &self.device)
            .map_err(|e| CandleBackendError::Weights(format!("tensor {name}: {e}")))?;
        if t.dims() != shape {
            return Err(CandleBackendError::Weights(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        t.to_dtype(self.dtype)
            .map_err(|e| CandleBackendError::Weights(format!("tensor {name}: {e}")))
    }
}
