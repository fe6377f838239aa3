//! Mapping infermux's device and dtype names onto tch's, and tch errors onto ours.

use infermux_core::{BackendError, DType, Device};

/// Wraps a tch error as a [`BackendError`].
pub(crate) fn runtime_error(err: tch::TchError) -> BackendError {
    BackendError::Runtime {
        runtime: "libtorch",
        message: err.to_string(),
    }
}

/// The tch device for an infermux device; CUDA must be available in the libtorch install.
pub fn tch_device(device: Device) -> Result<tch::Device, BackendError> {
    match device {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda(ordinal) => {
            load_cuda_runtime();
            if !tch::Cuda::is_available() || ordinal >= tch::Cuda::device_count() as usize {
                return Err(BackendError::Runtime {
                    runtime: "libtorch",
                    message: format!(
                        "CUDA device {ordinal} is not available (libtorch sees {} CUDA devices)",
                        tch::Cuda::device_count()
                    ),
                });
            }
            Ok(tch::Device::Cuda(ordinal))
        }
    }
}

/// The linker drops `libtorch_cuda.so` (no symbol of it is referenced), so CUDA kernels are
/// only registered once it is loaded: load it explicitly before touching a CUDA device.
fn load_cuda_runtime() {
    static LOADED: std::sync::Once = std::sync::Once::new();
    LOADED.call_once(|| {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is intentionally
        // leaked so the library stays loaded for the life of the process.
        unsafe {
            let _ = dlopen(c"libtorch_cuda.so".as_ptr(), RTLD_NOW | RTLD_GLOBAL);
        }
    });
}

const RTLD_NOW: i32 = 2;
const RTLD_GLOBAL: i32 = 0x100;

unsafe extern "C" {
    fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
}

/// The tch kind for an infermux dtype.
pub fn tch_kind(dtype: DType) -> tch::Kind {
    match dtype {
        DType::F32 => tch::Kind::Float,
        DType::Bf16 => tch::Kind::BFloat16,
        DType::F16 => tch::Kind::Half,
    }
}
