//! Mapping infermux's device and dtype names onto candle's, and candle errors onto ours.

use infermux_core::{BackendError, DType, Device};

/// Wraps a candle error as a [`BackendError`].
pub(crate) fn runtime_error(err: candle_core::Error) -> BackendError {
    BackendError::Runtime {
        runtime: "candle",
        message: err.to_string(),
    }
}

/// The candle device for an infermux device; CUDA needs the `cuda` feature.
pub fn candle_device(device: Device) -> Result<candle_core::Device, BackendError> {
    match device {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(ordinal) => cuda_device(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<candle_core::Device, BackendError> {
    candle_core::Device::new_cuda(ordinal).map_err(runtime_error)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<candle_core::Device, BackendError> {
    Err(BackendError::Runtime {
        runtime: "candle",
        message: "this build has no CUDA support: rebuild with the `cuda` feature".into(),
    })
}

/// The candle dtype for an infermux dtype.
pub fn candle_dtype(dtype: DType) -> candle_core::DType {
    match dtype {
        DType::F32 => candle_core::DType::F32,
        DType::Bf16 => candle_core::DType::BF16,
        DType::F16 => candle_core::DType::F16,
    }
}
