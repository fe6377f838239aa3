//! A Hugging Face model folder (config, weights, generation defaults) read into typed values
//! that every backend shares: the architecture facts and the RoPE frequencies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::TokenId;
use crate::error::ModelError;
use crate::model::checkpoint::Checkpoint;

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

/// Typed reads of one JSON object's fields; each error names the field (`prefix` + key) and
/// the value found, so a lying config says what lies.
struct Fields<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
    prefix: &'static str,
}

/// A number for an error message, as a config would write it: `0`, `-1`, `0.5`, `1e-300`.
fn num(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else if (1e-4..1e15).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// A JSON value for an error message, cut short when long.
fn shown(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 60 {
        let cut = (0..=57).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

impl<'a> Fields<'a> {
    fn of(value: &'a serde_json::Value, what: &str, prefix: &'static str) -> Result<Self, String> {
        match value.as_object() {
            Some(map) => Ok(Self { map, prefix }),
            None => Err(format!(
                "{what} must be a JSON object, got {}",
                shown(value)
            )),
        }
    }

    /// The field, `None` when absent or `null`.
    fn get(&self, key: &str) -> Option<&'a serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A whole number in `1..=max`, if present.
    fn count(&self, key: &str, max: usize) -> Result<Option<usize>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let name = self.name(key);
        match v.as_u64() {
            Some(n) if n >= 1 && n <= max as u64 => Ok(Some(n as usize)),
            Some(n) => Err(format!("{name} is {n}, outside 1..={max}")),
            None if v.as_i64().is_some() => Err(format!("{name} is {v}, it must be positive")),
            None => Err(format!(
                "{name} must be a positive whole number, got {}",
                shown(v)
            )),
        }
    }

    /// A whole number in `1..=max` that must be present.
    fn required_count(&self, key: &str, max: usize) -> Result<usize, String> {
        self.count(key, max)?
            .ok_or_else(|| format!("missing field {} (a positive whole number)", self.name(key)))
    }

    /// A finite number, if present (JSON has no NaN or infinity; a string is an error).
    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!(
                "{} must be a finite number, got {}",
                self.name(key),
                shown(v)
            )),
        }
    }

    /// A number in `(0, max]`, if present.
    fn positive(&self, key: &str, max: f64) -> Result<Option<f64>, String> {
        match self.number(key)? {
            Some(x) if x > 0.0 && x <= max => Ok(Some(x)),
            Some(x) => Err(format!(
                "{} is {}, it must be positive and at most {max:e}",
                self.name(key),
                num(x)
            )),
            None => Ok(None),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| format!("{} must be true or false, got {}", self.name(key), shown(v)))
    }

    fn text(&self, key: &str) -> Result<Option<&'a str>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| format!("{} must be a string, got {}", self.name(key), shown(v)))
    }

    /// A token id or a list of them, each below `vocab_size`.
    fn token_ids(&self, key: &str, vocab_size: usize) -> Result<Option<Vec<TokenId>>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let name = self.name(key);
        let one = |x: &serde_json::Value| -> Result<TokenId, String> {
            match x.as_u64() {
                Some(id) if id < vocab_size as u64 => Ok(id as TokenId),
                Some(id) => Err(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {vocab_size})"
                )),
                None => Err(format!(
                    "{name} must be a token id or a list of them, got {}",
                    shown(x)
                )),
            }
        };
        match v.as_array() {
            Some(list) => list.iter().map(one).collect::<Result<_, _>>().map(Some),
            None => one(v).map(|id| Some(vec![id])),
        }
    }
}

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
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
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
/// `config.json`'s), without looking for weights (graph-only folders have none).
pub fn read_config(dir: &Path) -> Result<(ModelConfig, Vec<TokenId>), ModelError> {
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
mod tests {
    use super::*;

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
        "rms_norm_eps":1e-5,"rope_theta":100000.0,"max_position_embeddings":8192,
        "tie_word_embeddings":true,"eos_token_id":2}"#;

    #[test]
    fn parses_a_llama_config() {
        let c = ModelConfig::from_json(Path::new("config.json"), SMOL).unwrap();
        assert_eq!(
            (c.architecture, c.head_dim, c.num_kv_heads),
            (Architecture::Llama, 64, 3)
        );
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
        assert_eq!(c.eos_token_ids, vec![2]);
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        assert!((f[1] - 100000f64.powf(-2.0 / 64.0) as f32).abs() < 1e-9);
    }

    #[test]
    fn unknown_architecture_names_the_supported_ones() {
        let json = SMOL.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        let err = ModelConfig::from_json(Path::new("config.json"), &json)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPTNeoXForCausalLM") && err.contains("Qwen3ForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn llama3_scaling_matches_the_reference_rule() {
        let json = SMOL.replace(
            "\"rope_theta\":100000.0",
            "\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}",
        );
        let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
        let f = c.rope_inv_freq();
        let base = |i: usize| 500000f64.powf(-2.0 * i as f64 / 64.0);
        // Highest frequency is untouched, lowest is divided by the factor.
        assert!((f[0] as f64 - base(0)).abs() < 1e-7);
        assert!((f[31] as f64 - base(31) / 8.0).abs() < 1e-12);
    }

    /// `SMOL` with `key` set to the JSON `value` (`None`: removed).
    fn smol_with(key: &str, value: Option<&str>) -> String {
        let mut v: serde_json::Value = serde_json::from_str(SMOL).unwrap();
        let map = v.as_object_mut().unwrap();
        match value {
            Some(x) => map.insert(key.into(), serde_json::from_str(x).unwrap()),
            None => map.remove(key),
        };
        v.to_string()
    }

    #[test]
    fn lying_fields_are_errors_naming_the_field_and_value() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "num_hidden_layers",
                Some("1e9"),
                "num_hidden_layers must be a positive whole number, got 1000000000.0",
            ),
            (
                "num_hidden_layers",
                Some("1000000000"),
                "num_hidden_layers is 1000000000, outside 1..=1024",
            ),
            ("num_hidden_layers", Some("0"), "num_hidden_layers is 0"),
            (
                "num_hidden_layers",
                Some("-3"),
                "num_hidden_layers is -3, it must be positive",
            ),
            (
                "max_position_embeddings",
                Some("1e12"),
                "max_position_embeddings must be a positive whole number",
            ),
            (
                "max_position_embeddings",
                Some("1000000000000"),
                "max_position_embeddings is 1000000000000, outside 1..=2097152",
            ),
            ("hidden_size", None, "missing field hidden_size"),
            (
                "hidden_size",
                Some("\"576\""),
                "hidden_size must be a positive whole number, got \"576\"",
            ),
            (
                "hidden_size",
                Some("576.5"),
                "hidden_size must be a positive whole number, got 576.5",
            ),
            (
                "hidden_size",
                Some("1e30"),
                "hidden_size must be a positive whole number",
            ),
            (
                "intermediate_size",
                Some("null"),
                "missing field intermediate_size",
            ),
            ("vocab_size", Some("-5"), "vocab_size is -5"),
            (
                "vocab_size",
                Some("[49152]"),
                "vocab_size must be a positive whole number",
            ),
            ("num_attention_heads", Some("0"), "num_attention_heads is 0"),
            (
                "num_key_value_heads",
                Some("4"),
                "must be a multiple of num_key_value_heads (4)",
            ),
            ("num_key_value_heads", Some("0"), "num_key_value_heads is 0"),
            (
                "num_key_value_heads",
                Some("18"),
                "must be a multiple of num_key_value_heads (18)",
            ),
            ("head_dim", Some("0"), "head_dim is 0"),
            ("head_dim", Some("63"), "head_dim must be even"),
            (
                "head_dim",
                Some("4096"),
                "head_dim is 4096, outside 1..=1024",
            ),
            (
                "rope_theta",
                Some("0"),
                "rope_theta is 0, it must be positive",
            ),
            (
                "rope_theta",
                Some("-1"),
                "rope_theta is -1, it must be positive",
            ),
            (
                "rope_theta",
                Some("\"1e4\""),
                "rope_theta must be a finite number, got \"1e4\"",
            ),
            ("rope_theta", Some("1e-300"), "rope_theta 1e-300"),
            (
                "rms_norm_eps",
                Some("-1"),
                "rms_norm_eps is -1, it must be positive",
            ),
            (
                "rms_norm_eps",
                Some("0"),
                "rms_norm_eps is 0, it must be positive",
            ),
            (
                "rms_norm_eps",
                Some("\"NaN\""),
                "rms_norm_eps must be a finite number, got \"NaN\"",
            ),
            ("rms_norm_eps", Some("1e-300"), "rms_norm_eps is 1e-300"),
            ("rms_norm_eps", Some("5"), "rms_norm_eps is 5"),
            (
                "tie_word_embeddings",
                Some("\"yes\""),
                "tie_word_embeddings must be true or false",
            ),
            (
                "attention_bias",
                Some("1"),
                "attention_bias must be true or false",
            ),
            (
                "eos_token_id",
                Some("49152"),
                "eos_token_id 49152 is outside the vocabulary (vocab_size 49152)",
            ),
            (
                "eos_token_id",
                Some("[2, -1]"),
                "eos_token_id must be a token id",
            ),
            (
                "bos_token_id",
                Some("1e9"),
                "bos_token_id must be a token id",
            ),
            (
                "torch_dtype",
                Some("\"int8\""),
                "torch_dtype \"int8\" is not supported",
            ),
            ("dtype", Some("7"), "dtype must be a string"),
            (
                "hidden_act",
                Some("\"gelu\""),
                "hidden_act \"gelu\" is not supported",
            ),
            ("sliding_window", Some("0"), "sliding_window is 0"),
            (
                "use_sliding_window",
                Some("\"no\""),
                "use_sliding_window must be true or false",
            ),
            (
                "architectures",
                Some("\"LlamaForCausalLM\""),
                "architectures must be a list of strings",
            ),
            (
                "rope_scaling",
                Some("5"),
                "rope_scaling must be a JSON object, got 5",
            ),
            (
                "rope_scaling",
                Some(r#"{"rope_type":"yarn","factor":4}"#),
                "rope_scaling.rope_type \"yarn\" is not supported",
            ),
            (
                "rope_scaling",
                Some(r#"{"rope_type":"linear","factor":0}"#),
                "rope_scaling.factor is 0",
            ),
            (
                "rope_scaling",
                Some(r#"{"type":"linear","factor":"2"}"#),
                "rope_scaling.factor must be a finite number",
            ),
            (
                "rope_scaling",
                Some(r#"{"rope_type":"linear"}"#),
                "needs a numeric rope_scaling.factor",
            ),
            (
                "rope_scaling",
                Some(
                    r#"{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
                ),
                "rope_scaling.high_freq_factor (4) must be greater than rope_scaling.low_freq_factor (4)",
            ),
            (
                "rope_scaling",
                Some(
                    r#"{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":-1}"#,
                ),
                "rope_scaling.original_max_position_embeddings is -1",
            ),
            (
                "rope_parameters",
                Some(r#"{"rope_type":"default","rope_theta":0}"#),
                "rope_parameters.rope_theta is 0",
            ),
        ];
        for (key, value, expected) in cases {
            let json = if *key == "rope_parameters" {
                smol_with("rope_theta", None)
                    .replace('}', &format!(",\"rope_parameters\":{}}}", value.unwrap()))
            } else {
                smol_with(key, *value)
            };
            let err = ModelConfig::from_json(Path::new("dir/config.json"), &json)
                .expect_err(&format!("{key} = {value:?} was accepted"));
            let text = err.to_string();
            assert!(matches!(err, ModelError::InvalidConfig { .. }), "{text}");
            assert!(
                text.starts_with("dir/config.json: ") && text.contains(expected),
                "{key} = {value:?}: expected {expected:?} in {text:?}"
            );
        }
    }

    #[test]
    fn config_files_that_are_not_json_objects_are_errors() {
        for body in [
            "",
            "{",
            "not json",
            "[1, 2]",
            "null",
            "{\"hidden_size\": NaN}",
        ] {
            let err = ModelConfig::from_json(Path::new("config.json"), body)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not valid JSON") || err.contains("must be a JSON object"),
                "{body:?}: {err}"
            );
        }
    }

    #[test]
    fn large_but_real_values_are_accepted() {
        // A million-position context (Qwen2.5-1M's 1010000) with head_dim 128 fits the caps.
        let json = smol_with("max_position_embeddings", Some("1010000")).replace(
            "\"num_attention_heads\":9",
            "\"num_attention_heads\":9,\"head_dim\":128",
        );
        let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
        assert_eq!((c.max_position_embeddings, c.head_dim), (1_010_000, 128));
        // The cap is a limit, not a default: past it, the RoPE table bound names both fields.
        let json = smol_with("max_position_embeddings", Some("2097152")).replace(
            "\"num_attention_heads\":9",
            "\"num_attention_heads\":9,\"head_dim\":256",
        );
        let err = ModelConfig::from_json(Path::new("config.json"), &json)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_position_embeddings 2097152 with head_dim 256"),
            "{err}"
        );
        // Mistral's sliding window caps the context.
        let json = smol_with("sliding_window", Some("4096"))
            .replace("LlamaForCausalLM", "MistralForCausalLM");
        let c = ModelConfig::from_json(Path::new("config.json"), &json).unwrap();
        assert_eq!(c.max_position_embeddings, 4096);
    }

    #[test]
    fn generation_config_eos_ids_are_checked_against_the_vocabulary() {
        let dir = std::env::temp_dir().join(format!("infermux-gen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), SMOL).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [2, 7]}"#,
        )
        .unwrap();
        assert_eq!(read_config(&dir).unwrap().1, vec![2, 7]);
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": 99999}"#,
        )
        .unwrap();
        let err = read_config(&dir).unwrap_err().to_string();
        assert!(
            err.contains("generation_config.json") && err.contains("eos_token_id 99999"),
            "{err}"
        );
        std::fs::write(dir.join("generation_config.json"), "{").unwrap();
        let err = read_config(&dir).unwrap_err().to_string();
        assert!(
            err.contains("generation_config.json") && err.contains("not valid JSON"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_folder_files_are_named() {
        let dir = std::env::temp_dir().join(format!("infermux-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), SMOL).unwrap();
        let err = ModelDir::open(&dir).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
