//! Why a CUDA device cannot be used, found at run time without linking CUDA: every backend asks
//! [`check_driver`] before its runtime touches the device, so a machine without a GPU gets a
//! typed [`DeviceMissing`] instead of a loader failure or a panic deep in a runtime.

use crate::error::DeviceMissing;

/// The CUDA driver library's name (its SONAME on Linux).
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";

/// Loads the CUDA driver and asks it for devices: `Ok(count)` when `ordinal` is one of them,
/// else what is missing.
pub fn check_driver(ordinal: usize) -> Result<usize, DeviceMissing> {
    // SAFETY: loading the driver runs only its initializers, which are made to run in any
    // process that uses CUDA; the symbols are called with their documented C signatures
    // (`CUresult cuInit(unsigned)`, `CUresult cuDeviceGetCount(int*)`) while the library is held.
    unsafe {
        let lib = libloading::Library::new(DRIVER_LIBRARY)
            .map_err(|e| DeviceMissing::Driver(format!("{DRIVER_LIBRARY} ({e})")))?;
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> i32> = lib
            .get(b"cuInit\0")
            .map_err(|e| DeviceMissing::Runtime(format!("{DRIVER_LIBRARY} has no cuInit: {e}")))?;
        let count_fn: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
            lib.get(b"cuDeviceGetCount\0").map_err(|e| {
                DeviceMissing::Runtime(format!("{DRIVER_LIBRARY} has no cuDeviceGetCount: {e}"))
            })?;
        let status = init(0);
        // CUDA_ERROR_NO_DEVICE (100): a driver without a GPU.
        if status == 100 {
            return Err(DeviceMissing::NoDevice { ordinal, count: 0 });
        }
        if status != 0 {
            return Err(DeviceMissing::Runtime(format!(
                "cuInit failed with CUresult {status}"
            )));
        }
        let mut count = 0i32;
        let status = count_fn(&mut count);
        if status != 0 {
            return Err(DeviceMissing::Runtime(format!(
                "cuDeviceGetCount failed with CUresult {status}"
            )));
        }
        let count = count.max(0) as usize;
        if ordinal >= count {
            return Err(DeviceMissing::NoDevice { ordinal, count });
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device ordinal past any real machine's count is never available; without a driver the
    /// answer names the driver library.
    #[test]
    fn an_absent_device_is_a_typed_answer() {
        match check_driver(1 << 20) {
            Err(DeviceMissing::Driver(message)) => assert!(message.contains(DRIVER_LIBRARY)),
            Err(DeviceMissing::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 1 << 20),
            other => panic!("unexpected answer {other:?}"),
        }
    }
}
