//! Why a CUDA device cannot be used, found at run time without linking CUDA: every backend asks
//! [`check_driver`] before its runtime touches the device, so a machine without a GPU gets a
//! typed [`DeviceMissing`] instead of a loader failure or a panic deep in a runtime.

use std::sync::OnceLock;

use crate::error::DeviceMissing;

/// The CUDA driver library's name (its SONAME on Linux).
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";
/// The oldest driver API the CUDA builds run on (`cuDriverGetVersion`'s 1000 × major + 10 ×
/// minor): their kernels are PTX from nvcc 13.0 and their bindings are cudarc's 13.0 ones.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// Loads the CUDA driver and asks it for devices: `Ok(count)` when `ordinal` is one of them,
/// else what is missing.
pub fn check_driver(ordinal: usize) -> Result<usize, DeviceMissing> {
    let lib = driver()?;
    let status = |name: &str, code: i32| -> Result<(), DeviceMissing> {
        match code {
            0 => Ok(()),
            // CUDA_ERROR_NO_DEVICE: a driver without a GPU (or without access to one).
            100 => Err(DeviceMissing::NoDevice { ordinal, count: 0 }),
            code => Err(DeviceMissing::Driver(format!(
                "{name} failed with CUresult {code}"
            ))),
        }
    };
    // SAFETY: the symbols are called with their documented C signatures (`CUresult
    // cuInit(unsigned)`, `cuDriverGetVersion(int*)`, `cuDeviceGetCount(int*)`), with valid
    // out-pointers, while the library stays loaded (it is never unloaded, see `driver`).
    unsafe {
        let symbol = |name: &'static [u8]| {
            lib.get::<unsafe extern "C" fn(*mut i32) -> i32>(name)
                .map_err(|e| DeviceMissing::Driver(format!("{DRIVER_LIBRARY} has no symbol: {e}")))
        };
        let init = lib
            .get::<unsafe extern "C" fn(u32) -> i32>(b"cuInit\0")
            .map_err(|e| DeviceMissing::Driver(format!("{DRIVER_LIBRARY} has no cuInit: {e}")))?;
        status("cuInit", init(0))?;
        let mut version = 0i32;
        status(
            "cuDriverGetVersion",
            symbol(b"cuDriverGetVersion\0")?(&mut version),
        )?;
        if version < MIN_DRIVER_VERSION {
            return Err(DeviceMissing::Driver(format!(
                "the driver supports CUDA {}.{}, this build needs {}.{} or newer",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER_VERSION / 1000,
                MIN_DRIVER_VERSION % 1000 / 10
            )));
        }
        let mut count = 0i32;
        status(
            "cuDeviceGetCount",
            symbol(b"cuDeviceGetCount\0")?(&mut count),
        )?;
        let count = count.max(0) as usize;
        if ordinal >= count {
            return Err(DeviceMissing::NoDevice { ordinal, count });
        }
        Ok(count)
    }
}

/// The driver library, loaded once and never unloaded: the runtimes load it too, and unloading
/// a driver after `cuInit` is a known source of crashes.
fn driver() -> Result<&'static libloading::Library, DeviceMissing> {
    static DRIVER: OnceLock<Result<libloading::Library, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            // SAFETY: loading the driver runs only its initializers, which are made to run in
            // any process that uses CUDA.
            unsafe { libloading::Library::new(DRIVER_LIBRARY) }
                .map_err(|e| format!("{DRIVER_LIBRARY} cannot be loaded: {e}"))
        })
        .as_ref()
        .map_err(|e| DeviceMissing::Driver(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device ordinal past any real machine's count is never available: the answer is a
    /// missing (or unusable) driver or a missing device, never a panic.
    #[test]
    fn an_absent_device_is_a_typed_answer() {
        match check_driver(1 << 20) {
            Err(DeviceMissing::Driver(message)) => assert!(!message.is_empty()),
            Err(DeviceMissing::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 1 << 20),
            other => panic!("unexpected answer {other:?}"),
        }
    }
}
