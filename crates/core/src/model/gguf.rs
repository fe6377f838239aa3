//! GGUF files (llama.cpp's format) as a model source: the header read without the tensor data,
//! the config built from its metadata, and its tensors listed under their Hugging Face names
//! with their ggml types, so the one [`WeightPlan`](crate::model::WeightPlan) checks them as it
//! checks a safetensors folder.
//!
//! A GGUF file is `GGUF`, a version (2 or 3), a tensor count and a metadata count, the metadata
//! (typed key/value pairs: the architecture's hyper-parameters, the tokenizer's vocabulary,
//! merges and special ids, the chat template), each tensor's name, dims (innermost first), ggml
//! type and offset, then the data at `general.alignment` (default 32). Every count and length is
//! bounded by the bytes left in the file before anything is allocated from it.
//!
//! llama.cpp's converter permutes the rows of the Llama q and k projections (its RoPE rotates
//! adjacent pairs, Hugging Face's rotates halves); [`rope_permuted_heads`] says which tensors and
//! [`unpermute_rows`] undoes it on rows of any element type, quantized blocks included.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::TokenId;
use crate::error::ModelError;
use crate::model::checkpoint::{Checkpoint, TensorInfo, WeightFormat};
use crate::model::config::ModelConfig;

/// The file magic, `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Default alignment of the tensor data.
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGUF architectures infermux runs (llama.cpp's names).
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama"];

/// A ggml tensor type: how a row of `block_size` elements is stored in `type_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights: f16 scale, 32 × 4-bit (value − 8).
    Q4_0,
    /// 32 weights: f16 scale and minimum, 32 × 4-bit.
    Q4_1,
    /// 32 weights: f16 scale, 32 × 5-bit (value − 16).
    Q5_0,
    /// 32 weights: f16 scale and minimum, 32 × 5-bit.
    Q5_1,
    /// 32 weights: f16 scale, 32 × int8.
    Q8_0,
    /// 256-weight super-block, 2-bit.
    Q2K,
    /// 256-weight super-block, 3-bit.
    Q3K,
    /// 256-weight super-block of 8 × 32, 4-bit with 6-bit scales and minimums.
    Q4K,
    /// 256-weight super-block of 8 × 32, 5-bit with 6-bit scales and minimums.
    Q5K,
    /// 256-weight super-block of 16 × 16, 6-bit with 8-bit scales.
    Q6K,
    /// A type this reader knows by number only (an i-quant, a ternary type, ...).
    Other(u32),
}

impl GgmlType {
    /// The type of ggml's numeric code.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// ggml's numeric code of the type (the inverse of [`GgmlType::from_code`]).
    pub fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
            Self::Other(code) => code,
        }
    }

    /// llama.cpp's name of the type (`Q4_1`, `Q6_K`, ...).
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q5_0 => "Q5_0".into(),
            Self::Q5_1 => "Q5_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q2K => "Q2_K".into(),
            Self::Q3K => "Q3_K".into(),
            Self::Q4K => "Q4_K".into(),
            Self::Q5K => "Q5_K".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Other(code) => format!("ggml type {code}"),
        }
    }

    /// The type named `name` (as [`GgmlType::name`] writes it).
    pub fn from_name(name: &str) -> Option<Self> {
        (0..=40)
            .map(Self::from_code)
            .find(|t| !matches!(t, Self::Other(_)) && t.name() == name)
    }

    /// `(elements per block, bytes per block)`; `None` for a type known by number only.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Other(_) => return None,
        })
    }

    /// Whether the type is a plain float (read as values, not as quantized blocks).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes of a row of `elements` values, or `None` when `elements` is not a whole number of
    /// blocks (or the type is unknown).
    pub fn row_bytes(self, elements: usize) -> Option<usize> {
        let (block, bytes) = self.block()?;
        elements
            .is_multiple_of(block)
            .then(|| elements / block * bytes)
    }
}

/// The ggml types infermux loads from a GGUF (each backend says which of them it runs).
pub const GGUF_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any integer type, widened.
    Int(i128),
    /// `f32` or `f64`, widened (an f32 keeps its shortest decimal form: 1e-5, not 9.99e-6).
    Float(f64),
    /// A bool.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a non-negative integer that fits `usize`.
    pub fn as_usize(&self) -> Option<usize> {
        match self {
            Self::Int(v) => usize::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as an integer.
    pub fn as_int(&self) -> Option<i128> {
        match self {
            Self::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// The value as a float (integers too).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor as the header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// llama.cpp's name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Dims, innermost first (ggml's order: `[in, out]` for a projection).
    pub dims: Vec<usize>,
    /// Its type.
    pub ggml_type: GgmlType,
    /// First byte in the file.
    pub begin: u64,
    /// Bytes it takes (`None` when its type is unknown or its rows are not whole blocks).
    pub bytes: Option<u64>,
}

/// A GGUF file's header: metadata and tensor directory.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
}

/// Whether `path` is a GGUF file (by its magic), so a model path can be a file or a folder.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && u32::from_le_bytes(magic) == MAGIC
}

/// A reader that knows how many bytes are left, so no count read from the file allocates more
/// than the file could hold.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
    path: PathBuf,
}

impl<R: Read> Reader<R> {
    fn bad(&self, reason: impl Into<String>) -> ModelError {
        ModelError::InvalidConfig {
            file: self.path.clone(),
            reason: format!("not a readable GGUF file: {}", reason.into()),
        }
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("truncated at byte {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A count of items of at least `min_item` bytes each, checked against the bytes left.
    fn count(&mut self, what: &str, min_item: u64) -> Result<usize, ModelError> {
        let n = self.u64()?;
        if n.saturating_mul(min_item) > self.left() {
            return Err(self.bad(format!(
                "{what} count {n} cannot fit in the {} bytes left",
                self.left()
            )));
        }
        usize::try_from(n).map_err(|_| self.bad(format!("{what} count {n}")))
    }

    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count("string length", 1)?;
        let mut buf = vec![0u8; n];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.bad(format!("truncated string at byte {}: {e}", self.pos)))?;
        self.pos += n as u64;
        String::from_utf8(buf)
            .map_err(|_| self.bad(format!("a string before byte {} is not UTF-8", self.pos)))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, ModelError> {
        Ok(match ty {
            0 => MetaValue::Int(self.bytes::<1>()?[0].into()),
            1 => MetaValue::Int((self.bytes::<1>()?[0] as i8).into()),
            2 => MetaValue::Int(u16::from_le_bytes(self.bytes()?).into()),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?).into()),
            4 => MetaValue::Int(self.u32()?.into()),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?).into()),
            6 => {
                let v = f32::from_le_bytes(self.bytes()?);
                // The shortest decimal that reads back as this f32 (1e-5, not 9.99999e-6).
                MetaValue::Float(v.to_string().parse().unwrap_or(v as f64))
            }
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested more than 2 deep"));
                }
                let item = self.u32()?;
                let n = self.count("array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Int(self.u64()?.into()),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?).into()),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path` (metadata and tensor directory, not the
    /// data) and checks that every tensor's bytes lie inside the file.
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            len,
            path: path.to_path_buf(),
        };
        if r.u32()? != MAGIC {
            return Err(r.bad("it does not start with \"GGUF\""));
        }
        let version = r.u32()?;
        if !matches!(version, 2 | 3) {
            return Err(r.bad(format!(
                "version {version} (infermux reads versions 2 and 3)"
            )));
        }
        // A tensor entry is at least 8 (name) + 4 + 8 (one dim) + 4 + 8 bytes; a key/value
        // pair at least 8 + 4 + 1.
        let tensor_count = r.count("tensor", 32)?;
        let kv_count = r.count("metadata", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut entries = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if !(1..=4).contains(&n_dims) {
                return Err(r.bad(format!(
                    "tensor {name} has {n_dims} dims (ggml allows 1 to 4)"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| {
                    let d = r.u64()?;
                    usize::try_from(d).map_err(|_| r.bad(format!("tensor {name}: dim {d}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = GgmlType::from_code(r.u32()?);
            let offset = r.u64()?;
            entries.push((name, dims, ggml_type, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_usize() {
                Some(a) if a.is_power_of_two() => a as u64,
                _ => return Err(r.bad(format!("general.alignment is {v:?}, not a power of two"))),
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, dims, ggml_type, offset) in entries {
            let begin = data_start.checked_add(offset);
            let elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = elements.and_then(|e| {
                let inner = *dims.first()?;
                let row = ggml_type.row_bytes(inner)? as u64;
                row.checked_mul((e / inner.max(1)) as u64)
            });
            let (Some(begin), Some(_)) = (begin, elements) else {
                return Err(r.bad(format!(
                    "tensor {name}: offset {offset} or dims {dims:?} overflow"
                )));
            };
            if let Some(b) = bytes
                && begin.checked_add(b).is_none_or(|end| end > len)
            {
                return Err(r.bad(format!(
                    "tensor {name} ({} {dims:?}, {b} bytes at {begin}) ends past the file's {len} bytes",
                    ggml_type.name()
                )));
            }
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                begin,
                bytes,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
        })
    }

    fn invalid(&self, reason: String) -> ModelError {
        ModelError::InvalidConfig {
            file: self.path.clone(),
            reason,
        }
    }

    /// The metadata value `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, ModelError> {
        self.get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.invalid("metadata lacks general.architecture".into()))
    }

    fn arch_usize(&self, arch: &str, key: &str) -> Result<usize, ModelError> {
        let full = format!("{arch}.{key}");
        match self.get(&full) {
            Some(v) => v
                .as_usize()
                .ok_or_else(|| self.invalid(format!("metadata {full} is {v:?}, not a count"))),
            None => Err(self.invalid(format!("metadata lacks {full}"))),
        }
    }

    /// The Hugging Face `config.json` this file's metadata describes (a Llama), so the GGUF is
    /// range-checked by the same [`ModelConfig::from_json`] as a folder.
    pub fn config_json(&self) -> Result<serde_json::Value, ModelError> {
        let arch = self.architecture()?;
        if !SUPPORTED_GGUF_ARCHITECTURES.contains(&arch) {
            return Err(ModelError::UnsupportedArchitecture {
                found: format!("{arch} (GGUF general.architecture)"),
                supported: SUPPORTED_GGUF_ARCHITECTURES,
            });
        }
        let has = |k: &str| self.metadata.contains_key(&format!("{arch}.{k}"));
        if has("rope.scaling.type") || self.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
            return Err(self.invalid(
                "the file uses RoPE scaling (rope.scaling.* or rope_freqs), which infermux does \
                 not read from GGUF"
                    .into(),
            ));
        }
        let hidden = self.arch_usize(arch, "embedding_length")?;
        let heads = self.arch_usize(arch, "attention.head_count")?;
        let head_dim = match has("attention.key_length") {
            true => self.arch_usize(arch, "attention.key_length")?,
            false => hidden.checked_div(heads).unwrap_or(0),
        };
        let vocab = match has("vocab_size") {
            true => self.arch_usize(arch, "vocab_size")?,
            false => self
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(<[_]>::len)
                .ok_or_else(|| self.invalid("metadata has neither vocab_size nor tokens".into()))?,
        };
        let float = |key: &str, default: Option<f64>| -> Result<f64, ModelError> {
            let full = format!("{arch}.{key}");
            match (self.get(&full), default) {
                (Some(v), _) => v
                    .as_f64()
                    .ok_or_else(|| self.invalid(format!("metadata {full} is {v:?}, not a number"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(self.invalid(format!("metadata lacks {full}"))),
            }
        };
        let id = |k: &str| {
            self.get(&format!("tokenizer.ggml.{k}"))
                .and_then(MetaValue::as_usize)
        };
        let has_tensor = |n: &str| self.tensors.iter().any(|t| t.name == n);
        Ok(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": self.arch_usize(arch, "feed_forward_length")?,
            "num_hidden_layers": self.arch_usize(arch, "block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.arch_usize(arch, "attention.head_count_kv")?,
            "head_dim": head_dim,
            "max_position_embeddings": self.arch_usize(arch, "context_length")?,
            // llama.cpp's default when the key is absent.
            "rope_theta": float("rope.freq_base", Some(10_000.0))?,
            "rms_norm_eps": float("attention.layer_norm_rms_epsilon", None)?,
            "vocab_size": vocab,
            "tie_word_embeddings": !has_tensor("output.weight"),
            "attention_bias": has_tensor("blk.0.attn_q.bias"),
            "mlp_bias": has_tensor("blk.0.ffn_up.bias"),
            "hidden_act": "silu",
            "bos_token_id": id("bos_token_id"),
            "eos_token_id": id("eos_token_id"),
            "pad_token_id": id("padding_token_id"),
        }))
    }

    /// The model config and EOS ids, range-checked like a folder's `config.json`.
    pub fn config(&self) -> Result<(ModelConfig, Vec<TokenId>), ModelError> {
        let json = self.config_json()?.to_string();
        let config = ModelConfig::from_json(&self.path, &json)?;
        let eos = config.eos_token_ids.clone();
        Ok((config, eos))
    }

    /// The tensors under their Hugging Face names, with shapes in Hugging Face order
    /// (`[out, in]`) and ggml type names as dtypes; tensors the model does not use
    /// (llama.cpp's extras) are left out. A tensor whose type is unknown or whose rows are not
    /// whole blocks is kept with its type's name, for the plan check to refuse by name.
    pub fn checkpoint(&self) -> Result<Checkpoint, ModelError> {
        let mut tensors = BTreeMap::new();
        for t in &self.tensors {
            let Some(hf) = hf_tensor_name(&t.name) else {
                continue;
            };
            let end = t.begin + t.bytes.unwrap_or(0);
            let dtype = match t.bytes {
                Some(_) => t.ggml_type.name(),
                None if t.ggml_type.block().is_some() => format!(
                    "{} (rows of {} values are not whole {}-value blocks)",
                    t.ggml_type.name(),
                    t.dims[0],
                    t.ggml_type.block().map_or(0, |b| b.0)
                ),
                None => t.ggml_type.name(),
            };
            let info = TensorInfo {
                file: 0,
                dtype,
                shape: t.dims.iter().rev().copied().collect(),
                begin: t.begin,
                end,
            };
            if tensors.insert(hf.clone(), info).is_some() {
                return Err(self.invalid(format!("tensor {} is declared twice", t.name)));
            }
        }
        Ok(Checkpoint {
            files: vec![self.path.clone()],
            tensors,
            format: WeightFormat::Gguf,
        })
    }
}

/// Maps a llama.cpp tensor name to the Hugging Face Llama name.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let part = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// For a tensor of a GGUF Llama (by its Hugging Face name), the number of heads whose rows
/// llama.cpp permuted: the q and k projections' weights and biases.
pub fn rope_permuted_heads(config: &ModelConfig, hf_name: &str) -> Option<usize> {
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (_, part) = rest.split_once('.')?;
    match part.rsplit_once('.')?.0 {
        "self_attn.q_proj" => Some(config.num_heads),
        "self_attn.k_proj" => Some(config.num_kv_heads),
        _ => None,
    }
}

/// Undoes llama.cpp's q/k row permutation: `data` holds `rows` rows of equal length (any
/// element type: floats, or a row's quantized blocks as bytes), in llama.cpp's order `[n_head,
/// d/2, 2]`; returns them in Hugging Face's `[n_head, 2, d/2]` order. `None` when `rows` is not
/// a multiple of `2 × n_head` or `data` is not `rows` whole rows.
pub fn unpermute_rows<T: Copy>(data: &[T], rows: usize, n_head: usize) -> Option<Vec<T>> {
    if rows == 0
        || n_head == 0
        || !rows.is_multiple_of(2 * n_head)
        || !data.len().is_multiple_of(rows)
    {
        return None;
    }
    let row = data.len() / rows;
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for pair in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + i * 2 + pair;
                out.extend_from_slice(&data[src * row..][..row]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
