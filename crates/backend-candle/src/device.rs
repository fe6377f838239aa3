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
    use infermux_core::DeviceMissing;
    let unavailable = |missing| BackendError::DeviceUnavailable {
        runtime: "candle",
        device: Device::Cuda(ordinal),
        missing,
    };
    infermux_core::cuda::check_driver(ordinal).map_err(unavailable)?;
    // The libraries candle opens with its first CUDA device (cuBLAS, its Lt half, cuRAND; the
    // kernels are PTX loaded through the driver); cudarc panics on a missing one.
    // SAFETY: each probe only tries to load the library (its initializers run, as they would
    // for candle) and drops it.
    let present = unsafe {
        [
            ("cublas", cudarc::cublas::sys::is_culib_present()),
            ("cublasLt", cudarc::cublaslt::sys::is_culib_present()),
            ("curand", cudarc::curand::sys::is_culib_present()),
        ]
    };
    if let Some((name, _)) = present.iter().find(|(_, found)| !found) {
        return Err(unavailable(DeviceMissing::Library {
            library: format!("lib{name}"),
            reason: format!(
                "no name of it loads (tried {}; is its folder on LD_LIBRARY_PATH?)",
                cudarc::get_lib_name_candidates(name).join(", ")
            ),
        }));
    }
    candle_core::Device::new_cuda(ordinal)
        .map_err(|e| unavailable(DeviceMissing::Runtime(e.to_string())))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<candle_core::Device, BackendError> {
    Err(BackendError::DeviceUnavailable {
        runtime: "candle",
        device: Device::Cuda(ordinal),
        missing: infermux_core::DeviceMissing::NotCompiled,
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
