//! Mapping infermux's device and dtype names onto tch's, and tch errors onto ours.

use infermux_core::{BackendError, DType, Device, DeviceMissing};

/// Wraps a tch error as a [`BackendError`].
pub(crate) fn runtime_error(err: tch::TchError) -> BackendError {
    BackendError::Runtime {
        runtime: "libtorch",
        message: err.to_string(),
    }
}

/// The tch device for an infermux device. CUDA needs the driver, a device with this ordinal and
/// libtorch's CUDA library (`libtorch_cuda.so`, from the install, with the CUDA libraries it
/// links); each missing piece is its own [`DeviceMissing`].
pub fn tch_device(device: Device) -> Result<tch::Device, BackendError> {
    let Device::Cuda(ordinal) = device else {
        return Ok(tch::Device::Cpu);
    };
    let unavailable = |missing| BackendError::DeviceUnavailable {
        runtime: "libtorch",
        device,
        missing,
    };
    infermux_core::cuda::check_driver(ordinal).map_err(unavailable)?;
    load_cuda_runtime().map_err(|reason| {
        unavailable(DeviceMissing::Library {
            library: CUDA_LIBRARY.into(),
            reason,
        })
    })?;
    let count = tch::Cuda::device_count() as usize;
    if !tch::Cuda::is_available() || ordinal >= count {
        return Err(unavailable(DeviceMissing::Runtime(format!(
            "libtorch sees {count} CUDA devices, device {ordinal} was asked for"
        ))));
    }
    Ok(tch::Device::Cuda(ordinal))
}

/// libtorch's CUDA kernels; the linker drops it (`--as-needed`: no symbol of it is referenced).
const CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// Loads [`CUDA_LIBRARY`] globally (so its kernels register) once; the loader's reason when it
/// cannot be loaded.
fn load_cuda_runtime() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: dlopen with a constant, NUL-terminated name; the handle is intentionally
            // leaked so the library stays loaded for the life of the process. dlerror's string
            // is copied at once, before any other loader call can replace it.
            unsafe {
                if !dlopen(c"libtorch_cuda.so".as_ptr(), RTLD_NOW | RTLD_GLOBAL).is_null() {
                    return Ok(());
                }
                let error = dlerror();
                Err(if error.is_null() {
                    "dlopen failed".to_string()
                } else {
                    std::ffi::CStr::from_ptr(error)
                        .to_string_lossy()
                        .into_owned()
                })
            }
        })
        .clone()
}

const RTLD_NOW: i32 = 2;
const RTLD_GLOBAL: i32 = 0x100;

unsafe extern "C" {
    fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
    fn dlerror() -> *const std::ffi::c_char;
}

/// The tch kind for an infermux dtype.
pub fn tch_kind(dtype: DType) -> tch::Kind {
    match dtype {
        DType::F32 => tch::Kind::Float,
        DType::Bf16 => tch::Kind::BFloat16,
        DType::F16 => tch::Kind::Half,
    }
}
