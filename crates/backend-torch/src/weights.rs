//! Reading named tensors from (possibly sharded) safetensors files into a device and kind.

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use crate::error::TorchBackendError;

/// All tensors of the model's safetensors files, by name.
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    device: Device,
    kind: Kind,
}

impl Weights {
    /// Reads every file in `paths`; tensors are converted when taken with [`Weights::get`].
    pub fn open(paths: &[PathBuf], device: Device, kind: Kind) -> Result<Self, TorchBackendError> {
        let mut tensors = HashMap::new();
        for path in paths {
            let named = Tensor::read_safetensors(path).map_err(|e| {
                TorchBackendError::Weights(format!("reading {}: {e}", path.display()))
            })?;
            tensors.extend(named);
        }
        Ok(Self {
            tensors,
            device,
            kind,
        })
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` on the target device and kind, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, TorchBackendError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| TorchBackendError::Weights(format!("tensor {name} is missing")))?;
        let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        if dims != shape {
            return Err(TorchBackendError::Weights(format!(
                "tensor {name} has shape {dims:?}, expected {shape:?}"
            )));
        }
        t.f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(|e| TorchBackendError::Weights(format!("tensor {name}: {e}")))
    }

    /// The tensor `name` if present (biases, optional norms).
    pub fn get_opt(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<Tensor>, TorchBackendError> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}
