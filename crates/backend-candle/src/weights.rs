//! Reading named tensors from (possibly sharded) safetensors files into a device and dtype.

use std::borrow::Cow;
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

    /// The tensor `name` as host f32 values, checked against `shape`: borrowed from the
    /// mapped file when it is stored as aligned f32 (a load then packs straight from the page
    /// cache: the copies into a tensor and out of it took half of a 135M model's 0.9 s load),
    /// converted otherwise.
    pub fn host_f32(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Cow<'_, [f32]>, CandleBackendError> {
        let err =
            |e: candle_core::Error| CandleBackendError::Weights(format!("tensor {name}: {e}"));
        let view = self.files.get(name).map_err(err)?;
        if view.shape() != shape {
            return Err(CandleBackendError::Weights(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        if view.dtype() == safetensors::Dtype::F32 && cfg!(target_endian = "little") {
            // SAFETY: every bit pattern is a valid f32; `align_to` yields only the aligned,
            // whole-f32 middle, which is used only if it is the entire buffer.
            let (head, floats, tail) = unsafe { view.data().align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return Ok(Cow::Borrowed(floats));
            }
        }
        let t = self.get(name, shape)?;
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map(Cow::Owned)
            .map_err(err)
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
