//! A Hugging Face model folder (config, weights, generation defaults) read into typed values
//! that every backend shares: the architecture facts and the RoPE frequencies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::TokenId;
use crate::error::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::fields::{Fields, num, shown};

/// Architectures (the `architectures[0]` of `config.json`) that infermux implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

/// The Llama-family variants, which differ only in small, named ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1–3, SmolLM.
    Llama,
    /// Mistral (Llama layout; sliding window caps the context).
    Mistral,
    /// Qwen2: biases on the q/k/v projections.
    Qwen2,
    /// Qwen3: RMSNorm on each head of q and k.
    Qwen3,
}

/// Rotary embedding scaling, from `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Divisor of positions.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Scale of low frequencies.
        factor: f64,
        /// Wavelength threshold factor for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold factor for high frequencies.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// The numbers a backend needs to build a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which variant.
    pub architecture: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Maximum positions.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Whether the attention output projection carries a bias (Llama and Qwen3 with
    /// `attention_bias`; never Qwen2 or Mistral).
    pub attention_out_bias: bool,
    /// Whether the MLP's gate/up/down projections carry biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Whether q and k get a per-head RMSNorm (Qwen3).
    pub qk_norm: bool,
    /// End-of-sequence ids from config.json.
    pub eos_token_ids: Vec<TokenId>,
}

/// Largest `max_position_embeddings` accepted. Backends build RoPE tables of this many rows when
/// they load, so a config claiming more (`1e12`) is an error, not a failed allocation; the
/// largest Llama-family contexts (about a million positions) fit.
pub const MAX_POSITIONS: usize = 1 << 21;

/// Largest RoPE tables (cos and sin in f32, `max_position_embeddings × head_dim × 4` bytes) a
/// config may imply, for the same reason.
pub const MAX_ROPE_TABLE_BYTES: usize = 1 << 30;

/// Upper bounds of the size fields: far above any Llama-family model, low enough that the plan,
/// the KV sizing and the shape products they feed cannot overflow or allocate absurdly.
const MAX_HIDDEN: usize = 1 << 16;
const MAX_INTERMEDIATE: usize = 1 << 18;
const MAX_LAYERS: usize = 1 << 10;
const MAX_HEADS: usize = 1 << 10;
const MAX_HEAD_DIM: usize = 1 << 10;
const MAX_VOCAB: usize = 1 << 22;

/// Precisions a checkpoint may declare in `torch_dtype` / `dtype`.
const CHECKPOINT_DTYPES: &[&str] = &["float32", "float16", "bfloat16"];

impl ModelConfig {
    /// Parses and checks a `config.json` body; `path` is only used in error messages. Every
    /// field is range-checked before anything is sized from it, and each error names the field
    /// and the value found.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            file: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let f = Fields::of(&value, "config.json", "").map_err(invalid)?;
        let arch_name = match f.get("architectures") {
            None => String::new(),
            Some(v) => match v.as_array().map(|a| a.first().map(|x| x.as_str())) {
                Some(None) => String::new(),
                Some(Some(Some(name))) => name.to_string(),
                _ => {
                    return Err(invalid(format!(
                        "architectures must be a list of strings, got {}",
                        shown(v)
                    )));
                }
            },
        };
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    found: arch_name,
                    supported: SUPPORTED_ARCHITECTURES,
                });
            }
        };
        Self::from_fields(architecture, &f).map_err(invalid)
    }

    fn from_fields(architecture: Architecture, f: &Fields<'_>) -> Result<Self, String> {
        if let Some(act) = f.text("hidden_act")?
            && act != "silu"
        {
            return Err(format!(
                "hidden_act {act:?} is not supported (only \"silu\")"
            ));
        }
        for key in ["torch_dtype", "dtype"] {
            if let Some(d) = f.text(key)?
                && !CHECKPOINT_DTYPES.contains(&d)
            {
                return Err(format!(
                    "{key} {d:?} is not supported (one of {})",
                    CHECKPOINT_DTYPES.join(", ")
                ));
            }
        }
        let hidden_size = f.required_count("hidden_size", MAX_HIDDEN)?;
        let intermediate_size = f.required_count("intermediate_size", MAX_INTERMEDIATE)?;
        let num_layers = f.required_count("num_hidden_layers", MAX_LAYERS)?;
        let num_heads = f.required_count("num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = f
            .count("num_key_value_heads", MAX_HEADS)?
            .unwrap_or(num_heads);
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads \
                 ({num_kv_heads})"
            ));
        }
        let head_dim = match f.get("head_dim") {
            Some(_) => f.count("head_dim", MAX_HEAD_DIM)?.unwrap_or_default(),
            None if hidden_size / num_heads == 0 => {
                return Err(format!(
                    "head_dim is absent and hidden_size / num_attention_heads = {hidden_size} / \
                     {num_heads} is 0"
                ));
            }
            None => hidden_size / num_heads,
        };
        if !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
            return Err(format!(
                "head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}"
            ));
        }
        let vocab_size = f.required_count("vocab_size", MAX_VOCAB)?;
        let rms_norm_eps = f.positive("rms_norm_eps", 1.0)?.unwrap_or(1e-6);
        if (rms_norm_eps as f32) < f32::MIN_POSITIVE {
            return Err(format!(
                "rms_norm_eps is {rms_norm_eps:e}, below the smallest normal f32 ({:e}): the \
                 norm of a zero row would be NaN",
                f32::MIN_POSITIVE
            ));
        }
        let mut max_position_embeddings =
            f.required_count("max_position_embeddings", MAX_POSITIONS)?;
        // Qwen2/3 write `sliding_window` even when `use_sliding_window` is false: check it
        // whenever present, use it only where it applies.
        let sliding_window = f.count("sliding_window", usize::MAX)?;
        let use_sliding_window = f.flag("use_sliding_window")?;
        if architecture == Architecture::Mistral || use_sliding_window.unwrap_or(false) {
            // Sliding-window attention is not implemented: cap the context to the window so
            // every position sees exactly what the reference model would.
            if let Some(w) = sliding_window {
                max_position_embeddings = max_position_embeddings.min(w);
            }
        }
        let table_bytes = max_position_embeddings as u64 * head_dim as u64 * 4;
        if table_bytes > MAX_ROPE_TABLE_BYTES as u64 {
            return Err(format!(
                "max_position_embeddings {max_position_embeddings} with head_dim {head_dim} \
                 implies RoPE tables of {table_bytes} bytes, over the {MAX_ROPE_TABLE_BYTES} \
                 limit"
            ));
        }
        // `rope_parameters` (transformers 5) or `rope_scaling` (earlier) hold the scaling, and
        // in transformers 5 the base.
        let (rope_key, rope) = match f.get("rope_parameters") {
            Some(v) => ("rope_parameters", Some(v)),
            None => ("rope_scaling", f.get("rope_scaling")),
        };
        let rope = match rope {
            Some(v) => Some(Fields::of(
                v,
                rope_key,
                if rope_key == "rope_parameters" {
                    "rope_parameters."
                } else {
                    "rope_scaling."
                },
            )?),
            None => None,
        };
        let rope_theta = match f.number("rope_theta")? {
            Some(t) => Some((f.name("rope_theta"), t)),
            None => match &rope {
                Some(r) => r.number("rope_theta")?.map(|t| (r.name("rope_theta"), t)),
                None => None,
            },
        };
        let rope_theta = match rope_theta {
            Some((_, t)) if t > 0.0 => t,
            Some((field, t)) => return Err(format!("{field} is {}, it must be positive", num(t))),
            None => 10_000.0,
        };
        let rope_scaling = match &rope {
            Some(r) => parse_rope_scaling(r)?,
            None => RopeScaling::None,
        };
        let attention_bias = f.flag("attention_bias")?;
        let mlp_bias = f.flag("mlp_bias")?;
        let eos_token_ids = f.token_ids("eos_token_id", vocab_size)?.unwrap_or_default();
        f.token_ids("bos_token_id", vocab_size)?;
        let config = Self {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: f.flag("tie_word_embeddings")?.unwrap_or(false),
            // As transformers' modeling files: Qwen2 always biases q/k/v and never o; Mistral
            // has no biases; Llama and Qwen3 follow `attention_bias` (q/k/v and o) and Llama
            // `mlp_bias`.
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Mistral => false,
                Architecture::Llama | Architecture::Qwen3 => attention_bias.unwrap_or(false),
            },
            attention_out_bias: matches!(architecture, Architecture::Llama | Architecture::Qwen3)
                && attention_bias.unwrap_or(false),
            mlp_bias: architecture == Architecture::Llama && mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            eos_token_ids,
        };
        config.check_rope_angles()?;
        Ok(config)
    }

    /// Every RoPE angle the tables will hold is finite: a tiny `rope_theta` or an extreme
    /// scaling that passes the field checks must still not put NaN into a forward pass.
    fn check_rope_angles(&self) -> Result<(), String> {
        let last = self.max_position_embeddings.saturating_sub(1) as f32;
        match self
            .rope_inv_freq()
            .iter()
            .position(|&f| !f.is_finite() || f < 0.0 || !(last * f).is_finite())
        {
            None => Ok(()),
            Some(i) => Err(format!(
                "rope_theta {} (with the config's rope scaling) gives RoPE frequency {i} a \
                 non-finite angle within max_position_embeddings {}",
                num(self.rope_theta),
                self.max_position_embeddings
            )),
        }
    }

    /// Bytes one cached position takes across all layers, keys and values, in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: crate::DType) -> u64 {
        let elem = match dtype {
            crate::DType::F32 => 4,
            crate::DType::Bf16 | crate::DType::F16 => 2,
        };
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * elem) as u64
    }

    /// RoPE inverse frequencies, one per pair of head dimensions, with scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                scale_inv_freq(base, self.rope_scaling) as f32
            })
            .collect()
    }

    /// `(cos, sin)` tables of shape `[max_positions, head_dim / 2]`, row-major, in f32.
    pub fn rope_tables(&self, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
        let inv_freq = self.rope_inv_freq();
        let mut cos = Vec::with_capacity(max_positions * inv_freq.len());
        let mut sin = Vec::with_capacity(max_positions * inv_freq.len());
        for pos in 0..max_positions {
            for &f in &inv_freq {
                // Same rounding as the reference: the angle is formed in f32.
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }
}

/// The scaling rule of a `rope_scaling` / `rope_parameters` object, its factors checked: each
/// positive and finite, and llama3's `high_freq_factor` above `low_freq_factor` (its smoothing
/// divides by their difference).
fn parse_rope_scaling(r: &Fields<'_>) -> Result<RopeScaling, String> {
    let kind = match r.text("rope_type")? {
        Some(k) => k,
        None => r.text("type")?.unwrap_or("default"),
    };
    let factor = |key: &str| {
        r.positive(key, f64::MAX)?
            .ok_or_else(|| format!("rope scaling {kind:?} needs a numeric {}", r.name(key)))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: factor("factor")?,
        }),
        "llama3" => {
            let low_freq_factor = factor("low_freq_factor")?;
            let high_freq_factor = factor("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(format!(
                    "{} ({}) must be greater than {} ({})",
                    r.name("high_freq_factor"),
                    num(high_freq_factor),
                    r.name("low_freq_factor"),
                    num(low_freq_factor)
                ));
            }
            Ok(RopeScaling::Llama3 {
                factor: factor("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: factor("original_max_position_embeddings")?,
            })
        }
        other => Err(format!(
            "{} {other:?} is not supported (default, linear, llama3)",
            r.name("rope_type")
        )),
    }
}

/// Applies a scaling rule to one inverse frequency (as transformers' `_compute_*_parameters`).
fn scale_inv_freq(inv_freq: f64, scaling: RopeScaling) -> f64 {
    match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
            if wavelen > low_freq_wavelen {
                inv_freq / factor
            } else if wavelen < high_freq_wavelen {
                inv_freq
            } else {
                let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

/// A Hugging Face model folder: its parsed config and the files a backend loads.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The folder.
    pub path: PathBuf,
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// Safetensors files holding the weights (one, or the shards of an index).
    pub weight_files: Vec<PathBuf>,
    /// Every tensor the weight files declare, from their headers, checked against the config.
    pub checkpoint: Checkpoint,
    /// EOS ids: `generation_config.json`'s if present, else `config.json`'s.
    pub eos_token_ids: Vec<TokenId>,
}

impl ModelDir {
    /// Reads and checks `config.json`, finds the weights (`model.safetensors`, or the shards
    /// listed by `model.safetensors.index.json`), and reads their headers (never the data):
    /// every tensor must lie inside its file, and the files must hold each tensor the config
    /// implies with its shape, and no layers beyond the config's. So a backend loads knowing
    /// the shapes are right, and nothing is sized from a config the weights contradict.
    ///
    /// `path` may also be a GGUF file ([`crate::model::gguf`]): the config comes from its
    /// metadata and the checkpoint lists its tensors under their Hugging Face names.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        if crate::model::gguf::is_gguf(&path) {
            let gguf = crate::model::gguf::GgufFile::read(&path)?;
            let (config, eos_token_ids) = gguf.config()?;
            let checkpoint = gguf.checkpoint()?;
            checkpoint.check_config(&path, &config)?;
            return Ok(Self {
                weight_files: checkpoint.files.clone(),
                path,
                config,
                checkpoint,
                eos_token_ids,
            });
        }
        if !path.is_dir() {
            return Err(ModelError::MissingFile {
                dir: path.clone(),
                file: "(the folder itself)".to_string(),
            });
        }
        let (config, eos_token_ids) = read_config(&path)?;
        let (weight_files, index) = find_weights(&path)?;
        let checkpoint = Checkpoint::read(&weight_files)?;
        if let Some((index_path, weight_map)) = index {
            checkpoint.check_index(&index_path, &path, &weight_map)?;
        }
        checkpoint.check_config(&path.join("config.json"), &config)?;
        Ok(Self {
            path,
            config,
            weight_files,
            checkpoint,
            eos_token_ids,
        })
    }
}

/// Reads a folder's `config.json` and its EOS ids (`generation_config.json`'s if present, else
/// `config.json`'s), without looking for weights (graph-only folders have none); of a GGUF
/// file, its metadata's.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, Vec<TokenId>), ModelError> {
    if crate::model::gguf::is_gguf(dir) {
        return crate::model::gguf::GgufFile::read(dir)?.config();
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "config.json".into(),
        });
    }
    let config = ModelConfig::from_json(&config_path, &read(&config_path)?)?;
    let generation_eos =
        read_generation_eos(&dir.join("generation_config.json"), config.vocab_size)?;
    let eos = generation_eos.unwrap_or_else(|| config.eos_token_ids.clone());
    Ok((config, eos))
}

/// Largest JSON file of a model folder read whole (configs and shard indexes are kilobytes).
const MAX_JSON_BYTES: u64 = 64 << 20;

fn read(path: &Path) -> Result<String, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_JSON_BYTES {
        return Err(ModelError::InvalidConfig {
            file: path.to_path_buf(),
            reason: format!("the file is {len} bytes, over the {MAX_JSON_BYTES}-byte limit"),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// A shard index: its path and its `weight_map` (tensor name → shard file name).
type ShardIndex = (PathBuf, BTreeMap<String, String>);

/// The weight files, and the shard index when there is one.
fn find_weights(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>), ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::MissingFile {
            dir: dir.to_path_buf(),
            file: "model.safetensors (or model.safetensors.index.json)".into(),
        });
    }
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index =
        serde_json::from_str(&read(&index_path)?).map_err(|e| ModelError::InvalidConfig {
            file: index_path.clone(),
            reason: format!("expected {{\"weight_map\": {{tensor: file}}}}: {e}"),
        })?;
    let mut files: Vec<&String> = index.weight_map.values().collect();
    files.sort();
    files.dedup();
    let files = files
        .into_iter()
        .map(|f| {
            let p = dir.join(f);
            // A shard is a file name inside the folder, not a path out of it.
            let plain = Path::new(f).components().count() == 1
                && !matches!(
                    Path::new(f).components().next(),
                    Some(std::path::Component::ParentDir | std::path::Component::RootDir)
                );
            if !plain {
                Err(ModelError::InvalidConfig {
                    file: index_path.clone(),
                    reason: format!("weight_map names shard {f:?}, which is not a file name"),
                })
            } else if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: f.clone(),
                })
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((files, Some((index_path, index.weight_map))))
}

/// `generation_config.json`'s EOS ids, each checked against the vocabulary.
fn read_generation_eos(path: &Path, vocab_size: usize) -> Result<Option<Vec<TokenId>>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let invalid = |reason: String| ModelError::InvalidConfig {
        file: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(&read(path)?).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let f = Fields::of(&value, "generation_config.json", "").map_err(invalid)?;
    f.token_ids("eos_token_id", vocab_size).map_err(invalid)
}

#[cfg(test)]
mod tests;
