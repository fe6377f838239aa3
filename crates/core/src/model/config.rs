//! A Hugging Face model folder (config, weights, generation defaults) read into typed values
//! that every backend shares: the architecture facts and the RoPE frequencies.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::TokenId;
use crate::error::ModelError;

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

/// `config.json` as Hugging Face writes it; only the fields infermux reads.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    eos_token_id: Option<TokenIds>,
}

/// A token id field that may be a single id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(TokenId),
    Many(Vec<TokenId>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<TokenId> {
        match self {
            Self::One(t) => vec![t],
            Self::Many(v) => v,
        }
    }
}

impl ModelConfig {
    /// Parses a `config.json` body; `path` is only used in error messages.
    pub fn from_json(path: &Path, json: &str) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::InvalidConfig {
            file: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_default();
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
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(invalid(format!(
                "hidden_act {act:?} is not supported (only \"silu\")"
            )));
        }
        if raw.num_attention_heads == 0 {
            return Err(invalid("num_attention_heads must be positive".into()));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            )));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head_dim must be even and positive, got {head_dim}"
            )));
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_scaling = parse_rope_scaling(rope).map_err(invalid)?;
        let mut max_position_embeddings = raw.max_position_embeddings;
        if architecture == Architecture::Mistral || raw.use_sliding_window.unwrap_or(false) {
            // Sliding-window attention is not implemented: cap the context to the window so
            // every position sees exactly what the reference model would.
            if let Some(w) = raw.sliding_window {
                max_position_embeddings = max_position_embeddings.min(w);
            }
        }
        Ok(Self {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            // As transformers' modeling files: Qwen2 always biases q/k/v and never o; Mistral
            // has no biases; Llama and Qwen3 follow `attention_bias` (q/k/v and o) and Llama
            // `mlp_bias`.
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Mistral => false,
                Architecture::Llama | Architecture::Qwen3 => raw.attention_bias.unwrap_or(false),
            },
            attention_out_bias: matches!(architecture, Architecture::Llama | Architecture::Qwen3)
                && raw.attention_bias.unwrap_or(false),
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        })
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

fn parse_rope_scaling(value: Option<&serde_json::Value>) -> Result<RopeScaling, String> {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| {
        v.get(key)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope scaling {kind:?} needs numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope scaling type {other:?} is not supported (default, linear, llama3)"
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
    /// EOS ids: `generation_config.json`'s if present, else `config.json`'s.
    pub eos_token_ids: Vec<TokenId>,
}

impl ModelDir {
    /// Reads `config.json` and finds the weights (`model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        let missing = |file: &str| ModelError::MissingFile {
            dir: path.clone(),
            file: file.to_string(),
        };
        if !path.is_dir() {
            return Err(missing("(the folder itself)"));
        }
        let (config, eos_token_ids) = read_config(&path)?;
        let weight_files = find_weights(&path)?;
        Ok(Self {
            path,
            config,
            weight_files,
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
    let generation_eos = read_generation_eos(&dir.join("generation_config.json"))?;
    let eos = generation_eos.unwrap_or_else(|| config.eos_token_ids.clone());
    Ok((config, eos))
}

fn read(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn find_weights(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
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
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index: Index =
        serde_json::from_str(&read(&index_path)?).map_err(|e| ModelError::InvalidConfig {
            file: index_path.clone(),
            reason: e.to_string(),
        })?;
    let mut files: Vec<String> = index.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: f,
                })
            }
        })
        .collect()
}

fn read_generation_eos(path: &Path) -> Result<Option<Vec<TokenId>>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct GenerationConfig {
        eos_token_id: Option<TokenIds>,
    }
    let g: GenerationConfig =
        serde_json::from_str(&read(path)?).map_err(|e| ModelError::InvalidConfig {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(g.eos_token_id.map(TokenIds::into_vec))
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
