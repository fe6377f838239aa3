//! Reading named tensors from (possibly sharded) safetensors files, or from a GGUF file, into a
//! device and dtype.

use std::borrow::Cow;
use std::path::PathBuf;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use infermux_core::model::gguf::{GgmlType, rope_permuted_heads, unpermute_rows};
use infermux_core::model::{Checkpoint, ModelConfig, ModelDir, WeightFormat};

use crate::cpu::ElemKind;
use crate::error::CandleBackendError;

/// Where the tensors come from.
enum Files {
    Safetensors(MmapedSafetensors),
    /// A mapped GGUF file with its directory under Hugging Face names (see
    /// `infermux_core::model::gguf`).
    Gguf {
        map: memmap2::Mmap,
        checkpoint: Checkpoint,
        config: Box<ModelConfig>,
    },
}

/// Memory-mapped weight files, read by tensor name.
pub(crate) struct Weights {
    files: Files,
    device: Device,
    dtype: DType,
}

fn err(name: &str, e: impl std::fmt::Display) -> CandleBackendError {
    CandleBackendError::Weights(format!("tensor {name}: {e}"))
}

/// candle's type for a ggml type of a GGUF.
fn candle_ggml(t: GgmlType) -> Option<GgmlDType> {
    Some(match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Other(_) => return None,
    })
}

/// A GGUF tensor's type and bytes (rows in Hugging Face order).
type RawTensor<'a> = (GgmlType, Cow<'a, [u8]>);

/// A quantized tensor's rows as stored (q/k rows already in Hugging Face order).
pub(crate) struct QuantTensor<'a> {
    pub ggml: GgmlType,
    pub bytes: Cow<'a, [u8]>,
    /// `[out, in]`.
    pub shape: [usize; 2],
}

impl QuantTensor<'_> {
    /// As a candle quantized tensor on `device`.
    pub fn to_qtensor(&self, device: &Device) -> candle_core::Result<QTensor> {
        let dt = candle_ggml(self.ggml).ok_or_else(|| {
            candle_core::Error::Msg(format!("no candle type for {}", self.ggml.name()))
        })?;
        QTensor::new(
            QStorage::from_data(self.bytes.clone(), device, dt)?,
            (self.shape[0], self.shape[1]),
        )
    }
}

/// A tensor's values as stored in 16 bits.
pub(crate) enum HalfValues<'a> {
    F16(Cow<'a, [half::f16]>),
    Bf16(Cow<'a, [half::bf16]>),
}

impl HalfValues<'_> {
    /// The values, when stored as f16.
    pub fn f16(&self) -> Option<&[half::f16]> {
        match self {
            Self::F16(v) => Some(v),
            Self::Bf16(_) => None,
        }
    }

    /// The values, when stored as bf16.
    pub fn bf16(&self) -> Option<&[half::bf16]> {
        match self {
            Self::Bf16(v) => Some(v),
            Self::F16(_) => None,
        }
    }
}

/// The safetensors view of `name`, checked against `shape`.
fn checked_view<'a>(
    files: &'a MmapedSafetensors,
    name: &str,
    shape: &[usize],
) -> Result<safetensors::tensor::TensorView<'a>, CandleBackendError> {
    let view = files.get(name).map_err(|e| err(name, e))?;
    if view.shape() != shape {
        return Err(err(
            name,
            format!("has shape {:?}, expected {shape:?}", view.shape()),
        ));
    }
    Ok(view)
}

/// Little-endian 16-bit values of `bytes`: borrowed when aligned, copied otherwise.
fn cast_u16<T: bytemuck::Pod>(bytes: Cow<'_, [u8]>) -> Cow<'_, [T]> {
    let copy = |b: &[u8]| {
        let n = b.len() / size_of::<T>();
        let mut v = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&b[..n * size_of::<T>()]);
        v
    };
    match bytes {
        Cow::Borrowed(b) => match bytemuck::try_cast_slice(b) {
            Ok(v) => Cow::Borrowed(v),
            Err(_) => Cow::Owned(copy(b)),
        },
        Cow::Owned(b) => Cow::Owned(copy(&b)),
    }
}

impl Weights {
    /// Maps the weights of `dir`; tensors are converted to `dtype` on `device` as they are read.
    pub fn open(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self, CandleBackendError> {
        let paths = &dir.weight_files;
        let files = match dir.checkpoint.format {
            WeightFormat::Safetensors => {
                // SAFETY: the files are mapped read-only; like every safetensors loader we
                // assume they are not modified while the model is loaded.
                let files = unsafe { MmapedSafetensors::multi(paths) }
                    .map_err(|e| CandleBackendError::Weights(format!("mapping {paths:?}: {e}")))?;
                Files::Safetensors(files)
            }
            WeightFormat::Gguf => {
                let path: &PathBuf = &dir.checkpoint.files[0];
                let file = std::fs::File::open(path).map_err(|e| {
                    CandleBackendError::Weights(format!("opening {}: {e}", path.display()))
                })?;
                // SAFETY: mapped read-only; as with safetensors, the file is assumed not to
                // change while the model loads (every range was checked against its length).
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
                    CandleBackendError::Weights(format!("mapping {}: {e}", path.display()))
                })?;
                Files::Gguf {
                    map,
                    checkpoint: dir.checkpoint.clone(),
                    config: Box::new(dir.config.clone()),
                }
            }
        };
        Ok(Self {
            files,
            device: device.clone(),
            dtype,
        })
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.files {
            Files::Safetensors(f) => f.get(name).is_ok(),
            Files::Gguf { checkpoint, .. } => checkpoint.contains(name),
        }
    }

    /// A GGUF tensor's type and raw bytes (rows in Hugging Face order), checked against `shape`.
    fn gguf(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<RawTensor<'_>>, CandleBackendError> {
        let Files::Gguf {
            map,
            checkpoint,
            config,
        } = &self.files
        else {
            return Ok(None);
        };
        let info = checkpoint
            .get(name)
            .ok_or_else(|| err(name, "not in the file"))?;
        if info.shape != shape {
            return Err(err(
                name,
                format!("has shape {:?}, expected {shape:?}", info.shape),
            ));
        }
        let ggml = GgmlType::from_name(&info.dtype)
            .ok_or_else(|| err(name, format!("type {}", info.dtype)))?;
        let bytes = &map[info.begin as usize..info.end as usize];
        let bytes = match rope_permuted_heads(config, name) {
            Some(heads) => Cow::Owned(unpermute_rows(bytes, shape[0], heads).ok_or_else(|| {
                err(
                    name,
                    format!("{} rows do not split into {heads} heads", shape[0]),
                )
            })?),
            None => Cow::Borrowed(bytes),
        };
        Ok(Some((ggml, bytes)))
    }

    /// The tensor `name` in its quantized type, when it is a quantized GGUF tensor (`None` for
    /// safetensors and float tensors).
    pub fn quantized(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<QuantTensor<'_>>, CandleBackendError> {
        let Some((ggml, bytes)) = self.gguf(name, shape)? else {
            return Ok(None);
        };
        let &[out, inp] = shape else {
            return Ok(None);
        };
        Ok((!ggml.is_float()).then_some(QuantTensor {
            ggml,
            bytes,
            shape: [out, inp],
        }))
    }

    /// The tensor `name` as stored, when it is stored as f16 or bf16 (safetensors or GGUF),
    /// checked against `shape`; borrowed from the mapped file when aligned.
    pub fn host_half(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<HalfValues<'_>>, CandleBackendError> {
        let (kind, bytes) = match &self.files {
            Files::Gguf { .. } => {
                let Some((ggml, bytes)) = self.gguf(name, shape)? else {
                    return Ok(None);
                };
                match ggml {
                    GgmlType::F16 => (ElemKind::F16, bytes),
                    GgmlType::BF16 => (ElemKind::Bf16, bytes),
                    _ => return Ok(None),
                }
            }
            Files::Safetensors(files) => {
                let view = checked_view(files, name, shape)?;
                match view.dtype() {
                    safetensors::Dtype::F16 => (ElemKind::F16, Cow::Borrowed(view.data())),
                    safetensors::Dtype::BF16 => (ElemKind::Bf16, Cow::Borrowed(view.data())),
                    _ => return Ok(None),
                }
            }
        };
        if !cfg!(target_endian = "little") {
            return Ok(None);
        }
        Ok(Some(match kind {
            ElemKind::F16 => HalfValues::F16(cast_u16(bytes)),
            _ => HalfValues::Bf16(cast_u16(bytes)),
        }))
    }

    /// The tensor `name` as host f32 values, checked against `shape`: borrowed from the
    /// mapped file when it is stored as aligned f32 (a load then packs straight from the page
    /// cache: the copies into a tensor and out of it took half of a 135M model's 0.9 s load),
    /// converted (or dequantized) otherwise.
    pub fn host_f32(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<Cow<'_, [f32]>, CandleBackendError> {
        let files = match &self.files {
            Files::Safetensors(files) => files,
            Files::Gguf { .. } => {
                let Some((ggml, bytes)) = self.gguf(name, shape)? else {
                    unreachable!("a GGUF file's tensors are read by gguf()")
                };
                let dt = candle_ggml(ggml).ok_or_else(|| err(name, ggml.name()))?;
                let values = QStorage::from_data(bytes, &Device::Cpu, dt)
                    .and_then(|s| QTensor::new(s, shape))
                    .and_then(|t| t.dequantize(&Device::Cpu))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| err(name, e))?;
                return Ok(Cow::Owned(values));
            }
        };
        let view = checked_view(files, name, shape)?;
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
            .map_err(|e| err(name, e))
    }

    /// The tensor `name`, checked against the expected `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, CandleBackendError> {
        let t = match &self.files {
            Files::Safetensors(files) => {
                files.load(name, &self.device).map_err(|e| err(name, e))?
            }
            Files::Gguf { .. } => {
                let values = self.host_f32(name, shape)?;
                Tensor::from_slice(&values, shape, &self.device).map_err(|e| err(name, e))?
            }
        };
        if t.dims() != shape {
            return Err(err(
                name,
                format!("has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        t.to_dtype(self.dtype).map_err(|e| err(name, e))
    }
}
