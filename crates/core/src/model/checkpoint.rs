//! A model folder's safetensors files as their headers declare them (each tensor's name, dtype,
//! shape and byte range, read without touching the data), and the checks that every tensor lies
//! inside its file and that the files hold exactly what a config's [`WeightPlan`] needs.
//!
//! Done once here, with no tensor library, so every backend loads knowing the shapes are right
//! and a lying `config.json` or a truncated file is a typed error before anything is allocated.
//! A safetensors file is an 8-byte little-endian header length, a JSON header mapping each name
//! to `{dtype, shape, data_offsets}` (offsets from the end of the header), then the data.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::model::config::ModelConfig;
use crate::model::plan::{TensorSpec, WeightPlan};

/// Largest header accepted (a real checkpoint's is tens of kilobytes per shard).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Element types the backends load (each converts to the serving precision as it reads).
pub const WEIGHT_DTYPES: &[&str] = &["F32", "F16", "BF16"];

/// One tensor as its file's header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Index into [`Checkpoint::files`] of the file holding it.
    pub file: usize,
    /// The safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub begin: u64,
    /// One past its last byte in the file.
    pub end: u64,
}

/// Every tensor of a (possibly sharded) checkpoint, by name, from the headers alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The files, in the order given to [`Checkpoint::read`].
    pub files: Vec<PathBuf>,
    /// Each tensor's entry.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// How the files store tensors.
    pub format: WeightFormat,
}

/// How a checkpoint's files store tensors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// safetensors: dtypes are safetensors names, shapes row-major.
    #[default]
    Safetensors,
    /// One GGUF file ([`crate::model::gguf`]): tensors under their Hugging Face names, dtypes
    /// are ggml type names (`Q4_1`), rows of the Llama q/k projections in llama.cpp's order.
    Gguf,
}

impl WeightFormat {
    /// The dtypes the backends load from this format.
    pub fn loadable(self) -> Vec<String> {
        match self {
            Self::Safetensors => WEIGHT_DTYPES.iter().map(|s| s.to_string()).collect(),
            Self::Gguf => crate::model::gguf::GGUF_TYPES
                .iter()
                .map(|t| t.name())
                .collect(),
        }
    }
}

/// Bytes per element of a safetensors dtype; `None` for a name this reader does not know (such
/// a tensor is an error only if the model uses it).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

fn bad(path: &Path, reason: String) -> ModelError {
    ModelError::InvalidConfig {
        file: path.to_path_buf(),
        reason,
    }
}

impl Checkpoint {
    /// Reads the headers of `files` and checks each entry: a known layout, a byte range inside
    /// the file whose length matches the shape and dtype, and no tensor declared twice.
    pub fn read(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut tensors = BTreeMap::new();
        for (index, path) in files.iter().enumerate() {
            for (name, info) in read_header(path, index)? {
                if let Some(prev) = tensors.insert(name.clone(), info) {
                    return Err(bad(
                        path,
                        format!(
                            "tensor {name} is also declared by {}",
                            files[prev.file].display()
                        ),
                    ));
                }
            }
        }
        Ok(Self {
            files: files.to_vec(),
            tensors,
            format: WeightFormat::Safetensors,
        })
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The entry of `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Checks a shard index against the headers: each tensor it names is in the shard it names.
    pub fn check_index(
        &self,
        index_path: &Path,
        dir: &Path,
        weight_map: &BTreeMap<String, String>,
    ) -> Result<(), ModelError> {
        for (name, shard) in weight_map {
            let holder = self.get(name).map(|t| &self.files[t.file]);
            if holder != Some(&dir.join(shard)) {
                return Err(bad(
                    index_path,
                    format!(
                        "weight_map puts tensor {name} in {shard}, whose header does not hold it"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks the tensors against what `config` implies: as many layers as
    /// `num_hidden_layers`, and every tensor of the [`WeightPlan`] present with its shape and a
    /// dtype the backends load. Errors name `config_path` and the first mismatching tensor
    /// (expected and found shape, and the config fields the differing dimension comes from).
    pub fn check_config(&self, config_path: &Path, config: &ModelConfig) -> Result<(), ModelError> {
        let mismatch = |reason: String| bad(config_path, reason);
        let layers = self
            .tensors
            .keys()
            .filter_map(|n| layer_index(n).map(|i| (i, n)))
            .max_by_key(|(i, _)| *i);
        let found_layers = layers.map_or(0, |(i, _)| i.saturating_add(1));
        if let Some((i, name)) = layers
            && i >= config.num_layers
        {
            return Err(mismatch(format!(
                "num_hidden_layers is {} but the weights hold layer {i} ({name})",
                config.num_layers
            )));
        }
        if found_layers < config.num_layers {
            return Err(mismatch(format!(
                "num_hidden_layers is {} but the weights hold {found_layers} layers (no tensor \
                 model.layers.{found_layers}.*)",
                config.num_layers
            )));
        }
        let plan = WeightPlan::new(config, |n| self.contains(n));
        let loadable = self.format.loadable();
        for spec in plan.tensors() {
            let Some(t) = self.get(&spec.name) else {
                let why = if spec.name.ends_with(".bias") {
                    " (config.json asks for biases: attention_bias, mlp_bias, or the Qwen2 \
                     architecture)"
                } else if spec.name.ends_with("_norm.weight") && config.qk_norm {
                    " (Qwen3 has per-head q/k norms)"
                } else {
                    ""
                };
                return Err(mismatch(format!(
                    "the weights have no tensor {}, which the config implies{why}",
                    spec.name
                )));
            };
            let file = self.files[t.file].display();
            if t.shape != spec.shape {
                return Err(mismatch(format!(
                    "does not match the weights: tensor {} in {file} has shape {:?}, the config \
                     implies {:?}{}",
                    spec.name,
                    t.shape,
                    spec.shape,
                    dimension_hint(config, spec, &t.shape)
                )));
            }
            if !loadable.contains(&t.dtype) {
                return Err(bad(
                    &self.files[t.file],
                    format!(
                        "tensor {} has dtype {}; infermux loads {}",
                        spec.name,
                        t.dtype,
                        loadable.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `i` of a `model.layers.{i}.…` tensor name.
fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Which config fields the dimensions that differ come from, e.g. ` (dimension 1 is
/// hidden_size = 1024)`.
fn dimension_hint(config: &ModelConfig, spec: &TensorSpec, found: &[usize]) -> String {
    if found.len() != spec.shape.len() {
        return format!(" (rank {} instead of {})", found.len(), spec.shape.len());
    }
    let c = config;
    let named = [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("head_dim", c.head_dim),
        ("num_attention_heads × head_dim", c.num_heads * c.head_dim),
        (
            "num_key_value_heads × head_dim",
            c.num_kv_heads * c.head_dim,
        ),
    ];
    let parts: Vec<String> = spec
        .shape
        .iter()
        .zip(found)
        .enumerate()
        .filter(|(_, (e, f))| e != f)
        .map(|(d, (&e, _))| {
            let names: Vec<&str> = named
                .iter()
                .filter(|(_, v)| *v == e)
                .map(|(n, _)| *n)
                .collect();
            if names.is_empty() {
                format!("dimension {d} should be {e}")
            } else {
                format!("dimension {d} is {} = {e}", names.join(" = "))
            }
        })
        .collect();
    format!(" ({})", parts.join("; "))
}

/// One file's header entries, each checked against the file's size.
fn read_header(path: &Path, index: usize) -> Result<Vec<(String, TensorInfo)>, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size < 8 {
        return Err(bad(
            path,
            format!("truncated: the file is {size} bytes, shorter than its 8-byte header length"),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(
            path,
            format!(
                "the header length is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit \
                 (not a safetensors file?)"
            ),
        ));
    }
    if header_len > size - 8 {
        return Err(bad(
            path,
            format!(
                "truncated: the header is {header_len} bytes but the file holds {} after the \
                 length",
                size - 8
            ),
        ));
    }
    let mut header = Vec::with_capacity(header_len as usize);
    file.take(header_len).read_to_end(&mut header).map_err(io)?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| {
            bad(
                path,
                format!("the safetensors header is not a JSON object: {e}"),
            )
        })?;
    let data_start = 8 + header_len;
    let data_len = size - data_start;
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry = |reason: &str| bad(path, format!("tensor {name}: {reason}"));
        let dtype = value
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| entry("no string `dtype`"))?
            .to_string();
        let shape = value
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| entry("no `shape` of whole numbers"))?;
        let offsets = value
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| match o.as_slice() {
                [b, e] => Some((b.as_u64()?, e.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| entry("no `data_offsets` pair"))?;
        let (begin, end) = offsets;
        if begin > end {
            return Err(entry(&format!(
                "data_offsets [{begin}, {end}] are reversed"
            )));
        }
        if end > data_len {
            return Err(entry(&format!(
                "truncated: its data ends at byte {end} after the header but the file holds \
                 only {data_len}"
            )));
        }
        if let Some(elem) = dtype_size(&dtype) {
            let bytes = shape
                .iter()
                .try_fold(elem, |acc, &d| acc.checked_mul(d as u64));
            if bytes != Some(end - begin) {
                return Err(entry(&format!(
                    "shape {shape:?} of {dtype} needs {} bytes but data_offsets span {}",
                    bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
                    end - begin
                )));
            }
        }
        out.push((
            name,
            TensorInfo {
                file: index,
                dtype,
                shape,
                begin: data_start + begin,
                end: data_start + end,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::{Value, json};

    use super::*;
    use crate::model::ModelDir;

    /// The committed tiny random models.
    pub(crate) fn tiny(variant: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/tiny")
            .join(variant)
    }

    /// A temporary copy of a tiny model folder, removed on drop.
    pub(crate) struct Folder(pub PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    impl Folder {
        pub(crate) fn copy_of(variant: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "infermux-model-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            for entry in std::fs::read_dir(tiny(variant)).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
            Self(dir)
        }

        /// Rewrites `config.json` through `edit`.
        pub(crate) fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
            let path = self.0.join("config.json");
            let mut v: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            edit(v.as_object_mut().unwrap());
            std::fs::write(path, v.to_string()).unwrap();
        }

        fn open_err(&self) -> String {
            ModelDir::open(&self.0).unwrap_err().to_string()
        }
    }

    /// A safetensors file's header and data.
    fn split(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        (header, bytes[8 + n..].to_vec())
    }

    fn join(path: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        std::fs::write(path, out).unwrap();
    }

    fn assert_mentions(err: &str, words: &[&str]) {
        for w in words {
            assert!(err.contains(w), "{w:?} missing from: {err}");
        }
    }

    #[test]
    fn every_tiny_variant_opens_and_declares_its_plan() {
        for v in ["llama3", "llamabias", "mistral", "qwen2", "qwen3"] {
            let dir = ModelDir::open(tiny(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
            let plan = WeightPlan::new(&dir.config, |n| dir.checkpoint.contains(n));
            let t = dir.checkpoint.get("model.embed_tokens.weight").unwrap();
            assert_eq!(t.shape, plan.embed.shape, "{v}");
            assert_eq!(t.end - t.begin, (256 * 64 * 4) as u64, "{v}");
            assert!(
                plan.tensors().all(|s| dir.checkpoint.contains(&s.name)),
                "{v}"
            );
        }
    }

    #[test]
    fn a_config_the_weights_contradict_names_the_tensor_and_the_field() {
        let cases: &[(&str, Value, &[&str])] = &[
            (
                "hidden_size",
                json!(128),
                &[
                    "model.embed_tokens.weight",
                    "[256, 64]",
                    "[256, 128]",
                    "hidden_size = 128",
                ],
            ),
            (
                "vocab_size",
                json!(512),
                &["model.embed_tokens.weight", "[512, 64]", "vocab_size = 512"],
            ),
            (
                "intermediate_size",
                json!(100),
                &["gate_proj.weight", "intermediate_size = 100"],
            ),
            (
                "head_dim",
                json!(32),
                &[
                    "q_proj.weight",
                    "[128, 64]",
                    "num_attention_heads × head_dim",
                ],
            ),
            (
                "num_key_value_heads",
                json!(4),
                &[
                    "k_proj.weight",
                    "[64, 64]",
                    "num_key_value_heads × head_dim",
                ],
            ),
            (
                "num_hidden_layers",
                json!(3),
                &["num_hidden_layers is 3", "2 layers"],
            ),
            (
                "num_hidden_layers",
                json!(1000),
                &["num_hidden_layers is 1000", "2 layers"],
            ),
            (
                "num_hidden_layers",
                json!(1),
                &["num_hidden_layers is 1", "layer 1"],
            ),
            (
                "attention_bias",
                json!(true),
                &["q_proj.bias", "attention_bias"],
            ),
            ("mlp_bias", json!(true), &["gate_proj.bias", "mlp_bias"]),
        ];
        for (field, value, words) in cases {
            let f = Folder::copy_of("llama3");
            f.edit_config(|c| {
                c.insert(field.to_string(), value.clone());
            });
            let err = f.open_err();
            assert_mentions(&err, words);
            assert!(err.contains("config.json"), "{err}");
        }
    }

    #[test]
    fn truncated_or_malformed_weights_are_errors_naming_the_file() {
        let weights = |f: &Folder| f.0.join("model.safetensors");
        let f = Folder::copy_of("llama3");
        let (header, data) = split(&tiny("llama3").join("model.safetensors"));
        let last = header
            .iter()
            .filter_map(|(n, e)| Some((e.get("data_offsets")?[1].as_u64()?, n)))
            .max()
            .unwrap();
        assert_eq!(last.0, data.len() as u64);
        let bytes = std::fs::read(weights(&f)).unwrap();
        std::fs::write(weights(&f), &bytes[..bytes.len() - 100]).unwrap();
        assert_mentions(&f.open_err(), &["model.safetensors", "truncated", last.1]);
        std::fs::write(weights(&f), &bytes[..4]).unwrap();
        assert_mentions(&f.open_err(), &["truncated", "8-byte"]);
        std::fs::write(weights(&f), &bytes[..200]).unwrap();
        assert_mentions(&f.open_err(), &["truncated", "header"]);
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(weights(&f), &huge).unwrap();
        assert_mentions(&f.open_err(), &["header length", "limit"]);
        let mut junk = bytes.clone();
        junk[8] = b'!';
        std::fs::write(weights(&f), &junk).unwrap();
        assert_mentions(&f.open_err(), &["model.safetensors", "JSON"]);

        let edits: &[(&str, Value, &[&str])] = &[
            ("dtype", json!("I32"), &["model.norm.weight", "dtype I32"]),
            (
                "dtype",
                json!("F64"),
                &["model.norm.weight", "needs 512 bytes"],
            ),
            (
                "shape",
                json!([64, 2]),
                &["model.norm.weight", "needs 512 bytes"],
            ),
            ("shape", json!([-64]), &["model.norm.weight", "shape"]),
            (
                "data_offsets",
                json!([8, 4]),
                &["model.norm.weight", "reversed"],
            ),
            (
                "data_offsets",
                json!([0, 1u64 << 40]),
                &["model.norm.weight", "truncated"],
            ),
        ];
        for (key, value, words) in edits {
            let mut h = header.clone();
            h["model.norm.weight"][*key] = value.clone();
            join(&weights(&f), &h, &data);
            assert_mentions(&f.open_err(), words);
        }
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let f = Folder::copy_of("llama3");
        let (mut header, data) = split(&f.0.join("model.safetensors"));
        header.remove("model.layers.1.mlp.down_proj.weight");
        join(&f.0.join("model.safetensors"), &header, &data);
        assert_mentions(
            &f.open_err(),
            &["no tensor model.layers.1.mlp.down_proj.weight"],
        );
    }

    #[test]
    fn sharded_checkpoints_are_checked_against_their_index() {
        let f = Folder::copy_of("llama3");
        let (header, data) = split(&f.0.join("model.safetensors"));
        std::fs::remove_file(f.0.join("model.safetensors")).unwrap();
        // Two shards holding the same data, each declaring half of the tensors.
        let (mut a, mut b) = (serde_json::Map::new(), serde_json::Map::new());
        let mut weight_map = serde_json::Map::new();
        let tensors = header.iter().filter(|(n, _)| *n != "__metadata__");
        for (i, (name, entry)) in tensors.enumerate() {
            let (shard, file) = if i % 2 == 0 {
                (&mut a, "model-00001-of-00002.safetensors")
            } else {
                (&mut b, "model-00002-of-00002.safetensors")
            };
            shard.insert(name.clone(), entry.clone());
            weight_map.insert(name.clone(), json!(file));
        }
        join(&f.0.join("model-00001-of-00002.safetensors"), &a, &data);
        join(&f.0.join("model-00002-of-00002.safetensors"), &b, &data);
        let index = f.0.join("model.safetensors.index.json");
        let write_index = |m: &serde_json::Map<String, Value>| {
            std::fs::write(&index, json!({"weight_map": m}).to_string()).unwrap()
        };
        write_index(&weight_map);
        let dir = ModelDir::open(&f.0).unwrap();
        assert_eq!(dir.weight_files.len(), 2);
        assert_eq!(dir.checkpoint.tensors.len(), weight_map.len());

        let mut wrong = weight_map.clone();
        wrong.insert(
            "model.norm.weight".into(),
            json!(
                if weight_map["model.norm.weight"] == "model-00001-of-00002.safetensors" {
                    "model-00002-of-00002.safetensors"
                } else {
                    "model-00001-of-00002.safetensors"
                }
            ),
        );
        write_index(&wrong);
        assert_mentions(&f.open_err(), &["index.json", "model.norm.weight"]);

        let mut outside = weight_map.clone();
        outside.insert("model.norm.weight".into(), json!("../model.safetensors"));
        write_index(&outside);
        assert_mentions(&f.open_err(), &["index.json", "not a file name"]);

        write_index(&weight_map);
        b.insert(
            "model.norm.weight".into(),
            header["model.norm.weight"].clone(),
        );
        join(&f.0.join("model-00002-of-00002.safetensors"), &b, &data);
        assert_mentions(&f.open_err(), &["model.norm.weight", "also declared"]);
    }
}
