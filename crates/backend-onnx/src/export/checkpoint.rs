//! The tensors of a (possibly sharded) safetensors checkpoint, read one at a time as f32.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header mapping names to
//! `{dtype, shape, data_offsets}`, then the data. The header is parsed here with serde_json and
//! each tensor is read with a positioned read when the exporter writes it, so the exporter holds
//! one tensor at a time, needs no memory map (no `unsafe`) and no `safetensors` crate (whose
//! `read_metadata` wants the whole file in memory).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ExportError;

/// Element types a checkpoint tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// A header entry; `dtype` is kept as text so that an unsupported type is an error only when
/// that tensor is used.
#[derive(Debug, Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    begin: u64,
    end: u64,
}

/// The open checkpoint: every tensor's location, by name.
pub(crate) struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Reads the headers of `paths`.
    pub fn open(paths: &[PathBuf]) -> Result<Self, ExportError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let io = |source| ExportError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0).map_err(io)?;
            let header_len = u64::from_le_bytes(len);
            if header_len > size.saturating_sub(8) || header_len > 100 << 20 {
                return Err(bad_file(path, "header length exceeds the file"));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8).map_err(io)?;
            let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| bad_file(path, &format!("header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, value) in raw {
                if name == "__metadata__" {
                    continue;
                }
                let e: RawEntry = serde_json::from_value(value)
                    .map_err(|e| bad_file(path, &format!("entry {name}: {e}")))?;
                let (begin, end) = (data_start + e.data_offsets.0, data_start + e.data_offsets.1);
                if begin > end || end > size {
                    return Err(bad_file(
                        path,
                        &format!("tensor {name} lies outside the file"),
                    ));
                }
                tensors.insert(
                    name,
                    Entry {
                        file: index,
                        dtype: e.dtype,
                        shape: e.shape,
                        begin,
                        end,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, tensors })
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Checks that `name` exists with `shape`.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<(), ExportError> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(ExportError::Tensor {
                name: name.to_string(),
                reason: format!("shape {:?}, expected {shape:?}", e.shape),
            });
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry, ExportError> {
        self.tensors.get(name).ok_or_else(|| ExportError::Tensor {
            name: name.to_string(),
            reason: "missing from the checkpoint".into(),
        })
    }

    /// Appends the values of `name` (f32, f16 or bf16 in the file) to `out` as f32.
    pub fn read_f32(&self, name: &str, out: &mut Vec<f32>) -> Result<(), ExportError> {
        let e = self.entry(name)?;
        let dtype = match e.dtype.as_str() {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => {
                return Err(ExportError::Tensor {
                    name: name.to_string(),
                    reason: format!("element type {other} (supported: F32, F16, BF16)"),
                });
            }
        };
        let count: usize = e.shape.iter().product();
        if (e.end - e.begin) as usize != count * dtype.size() {
            return Err(ExportError::Tensor {
                name: name.to_string(),
                reason: format!("{} bytes for shape {:?}", e.end - e.begin, e.shape),
            });
        }
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; count * dtype.size()];
        file.read_exact_at(&mut bytes, e.begin)
            .map_err(|source| ExportError::Io {
                path: path.clone(),
                source,
            })?;
        out.reserve(count);
        match dtype {
            Dtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            Dtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        Ok(())
    }
}

fn bad_file(path: &Path, reason: &str) -> ExportError {
    ExportError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `(name, dtype, shape, bytes)`.
    fn write(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let header = serde_json::to_vec(&header).unwrap();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&data);
        std::fs::write(path, file).unwrap();
    }

    #[test]
    fn reads_f32_f16_and_bf16_as_f32_and_checks_shapes() {
        let dir = std::env::temp_dir().join(format!("infermux-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let values = [1.5f32, -2.0, 0.25];
        let f32s = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16s = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        write(
            &path,
            &[
                ("a", "F32", vec![3], f32s),
                ("b", "F16", vec![1, 3], f16s),
                ("c", "BF16", vec![3, 1], bf16s),
                ("d", "I64", vec![1], vec![0; 8]),
            ],
        );
        let ckpt = Checkpoint::open(std::slice::from_ref(&path)).unwrap();
        let mut out = Vec::new();
        for name in ["a", "b", "c"] {
            ckpt.read_f32(name, &mut out).unwrap();
        }
        assert_eq!(out, [values, values, values].concat());
        assert!(ckpt.contains("d") && !ckpt.contains("__metadata__"));
        ckpt.check("b", &[1, 3]).unwrap();
        let err = ckpt.check("b", &[3]).unwrap_err().to_string();
        assert!(
            err.contains("[1, 3]") && err.contains("expected [3]"),
            "{err}"
        );
        let err = ckpt.read_f32("d", &mut out).unwrap_err().to_string();
        assert!(err.contains("I64"), "{err}");
        assert!(
            ckpt.check("missing", &[1])
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        std::fs::write(&path, 1u64.to_le_bytes().repeat(2)).unwrap();
        assert!(matches!(
            Checkpoint::open(&[path]),
            Err(ExportError::Checkpoint { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
