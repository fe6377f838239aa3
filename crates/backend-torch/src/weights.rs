//! The checkpoint's tensors by Hugging Face name, handed out shape-checked on the target device
//! and kind.

use std::collections::HashMap;
use std::path::PathBuf;

use infermux_core::model::TensorSpec;
use tch::{Device, Kind, Tensor};

use crate::error::TorchBackendError;

/// All tensors of the model's (possibly sharded) safetensors files, as stored.
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    device: Device,
    kind: Kind,
}

impl Weights {
    /// Reads every file in `paths`; tensors are moved and converted when loaded.
    pub fn open(paths: &[PathBuf], device: Device, kind: Kind) -> Result<Self, TorchBackendError> {
        let mut tensors = HashMap::new();
        for path in paths {
            let named = Tensor::read_safetensors(path).map_err(|e| TorchBackendError::Read {
                path: path.clone(),
                message: e.to_string(),
            })?;
            tensors.extend(named);
        }
        Ok(Self {
            tensors,
            device,
            kind,
        })
    }

    /// Whether the checkpoint holds a tensor named `name` (the plan asks about optional ones).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `spec` names, checked against its shape, on the target device and kind.
    pub fn load(&self, spec: &TensorSpec) -> Result<Tensor, TorchBackendError> {
        let name = &spec.name;
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| TorchBackendError::MissingTensor(name.clone()))?;
        let found: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        if found != spec.shape {
            return Err(TorchBackendError::Shape {
                name: name.clone(),
                found,
                expected: spec.shape.clone(),
            });
        }
        t.f_to_device(self.device)
            .and_then(|t| t.f_to_kind(self.kind))
            .map_err(|e| TorchBackendError::Tensor {
                name: name.clone(),
                message: e.to_string(),
            })
    }
}
