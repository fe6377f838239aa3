//! Llama-architecture GGUF → Hugging Face `config.json`, `generation_config.json` and f32 safetensors.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::{Value as Json, json};

/// Hyper-parameters of a Llama model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

/// Opens a GGUF file and parses its header.
pub fn open(path: &Path) -> Result<(Content, File)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content =
        Content::read(&mut file).with_context(|| format!("reading GGUF {}", path.display()))?;
    Ok((content, file))
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` for `gguf` into `out`.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let (content, mut file) = open(gguf)?;
    let params = LlamaParams::from_gguf(&content)?;
    write_json(&out.join("config.json"), &config_json(&params))?;
    write_json(
        &out.join("generation_config.json"),
        &generation_config_json(&params),
    )?;
    let tensors = dequantize_all(&content, &mut file, &params)?;
    save_safetensors(&tensors, &out.join("model.safetensors"))
}

impl LlamaParams {
    /// Reads the hyper-parameters; fails on non-Llama files or unsupported features.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = meta_str(md, "general.architecture")?;
        if arch != "llama" {
            bail!("unsupported GGUF architecture {arch:?} (only \"llama\")");
        }
        if md.contains_key("llama.rope.scaling.type") {
            bail!("GGUF uses RoPE scaling, which this converter does not support");
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = meta_usize(md, &key("embedding_length"))?;
        let num_heads = meta_usize(md, &key("attention.head_count"))?;
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(v) => value_usize(v)?,
            None => hidden_size / num_heads,
        };
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .map(|v| v.to_vec().map(Vec::len));
        let vocab_size = match md.get(&key("vocab_size")) {
            Some(v) => value_usize(v)?,
            None => tokens.context("GGUF has neither vocab_size nor tokens")??,
        };
        let has = |name: &str| content.tensor_infos.contains_key(name);
        Ok(Self {
            hidden_size,
            intermediate_size: meta_usize(md, &key("feed_forward_length"))?,
            num_layers: meta_usize(md, &key("block_count"))?,
            num_heads,
            num_kv_heads: meta_usize(md, &key("attention.head_count_kv"))?,
            head_dim,
            max_position_embeddings: meta_usize(md, &key("context_length"))?,
            rope_theta: match md.contains_key(&key("rope.freq_base")) {
                true => meta_f64(md, &key("rope.freq_base"))?,
                false => 10_000.0, // llama.cpp's default when the key is absent
            },
            rms_norm_eps: meta_f64(md, &key("attention.layer_norm_rms_epsilon"))?,
            vocab_size,
            bos_token_id: meta_opt_u32(md, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: meta_opt_u32(md, "tokenizer.ggml.eos_token_id")?,
            pad_token_id: meta_opt_u32(md, "tokenizer.ggml.padding_token_id")?,
            tie_word_embeddings: !has("output.weight"),
            attention_bias: has("blk.0.attn_q.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
        })
    }
}

/// A standard `LlamaForCausalLM` `config.json`.
pub fn config_json(p: &LlamaParams) -> Json {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.head_dim,
        "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": p.rope_theta,
        "rope_scaling": null,
        "rms_norm_eps": p.rms_norm_eps,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": p.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": p.mlp_bias,
        "bos_token_id": p.bos_token_id,
        "eos_token_id": p.eos_token_id,
        "pad_token_id": p.pad_token_id,
        "torch_dtype": "float32",
    })
}

/// `generation_config.json` with only the special token ids (no sampling defaults).
pub fn generation_config_json(p: &LlamaParams) -> Json {
    json!({
        "bos_token_id": p.bos_token_id,
        "eos_token_id": p.eos_token_id,
        "pad_token_id": p.pad_token_id,
    })
}

/// Dequantizes every tensor to f32 under its Hugging Face name, undoing the q/k RoPE permutation.
pub fn dequantize_all(
    content: &Content,
    file: &mut File,
    p: &LlamaParams,
) -> Result<HashMap<String, Tensor>> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut progress = Progress::new(names.len());
    let mut out = HashMap::with_capacity(names.len());
    for name in names {
        let hf = hf_tensor_name(name).with_context(|| format!("unsupported GGUF tensor {name}"))?;
        let tensor = content
            .tensor(file, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .with_context(|| format!("dequantizing {name}"))?;
        let tensor = match rope_heads(name, p) {
            Some(n_head) => unpermute_rope_rows(&tensor, n_head)?,
            None => tensor,
        };
        out.insert(hf, tensor);
        progress.step();
    }
    Ok(out)
}

/// Number of heads whose rows llama.cpp permuted, for q/k projection weights (and biases).
fn rope_heads(gguf_name: &str, p: &LlamaParams) -> Option<usize> {
    let kind = gguf_name.strip_prefix("blk.")?.split('.').nth(1)?;
    match kind {
        "attn_q" => Some(p.num_heads),
        "attn_k" => Some(p.num_kv_heads),
        _ => None,
    }
}

/// Inverse of llama.cpp's `permute`: rows `[n_head, 2, d/2]` back to `[n_head, d/2, 2]` order.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims();
    let rows = dims[0];
    if !rows.is_multiple_of(2 * n_head) {
        bail!("cannot un-permute {rows} rows into {n_head} heads");
    }
    let rest: usize = dims[1..].iter().product();
    let t = w
        .reshape((n_head, rows / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
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
            format!("model.layers.{layer}.{}", hf_layer_part(part)?)
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

fn hf_layer_part(part: &str) -> Option<&'static str> {
    Some(match part {
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
    })
}

/// Saves tensors as safetensors with `{"format": "pt"}` metadata, like transformers does.
fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    eprintln!("writing {}", path.display());
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by_key(|(name, _)| name.as_str());
    safetensors::serialize_to_file(sorted, Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))?;
    make_world_readable(path)
}

/// The safetensors crate creates files with mode 0600; use the usual 0644.
#[cfg(unix)]
fn make_world_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting permissions of {}", path.display()))
}

#[cfg(not(unix))]
fn make_world_readable(_path: &Path) -> Result<()> {
    Ok(())
}

/// Writes pretty-printed JSON with a trailing newline.
pub fn write_json(path: &Path, value: &Json) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Progress on stderr: an updating line on a terminal, a few lines otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        eprintln!("dequantizing {total} tensors…");
        Self {
            total,
            done: 0,
            tty,
        }
    }

    fn step(&mut self) {
        self.done += 1;
        let (done, total) = (self.done, self.total);
        if self.tty {
            eprint!("\rdequantizing {total} tensors… {done}/{total}");
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else if done % 50 == 0 || done == total {
            eprintln!("dequantizing {total} tensors… {done}/{total}");
        }
    }
}

fn meta<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))
}

fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    Ok(meta(md, key)?.to_string()?.as_str())
}

fn meta_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    value_usize(meta(md, key)?).with_context(|| format!("GGUF metadata {key}"))
}

fn meta_opt_u32(md: &HashMap<String, Value>, key: &str) -> Result<Option<u32>> {
    md.get(key)
        .map(value_u32)
        .transpose()
        .with_context(|| format!("GGUF metadata {key}"))
}

/// A float metadata value; f32 values are rounded to their shortest decimal form (1e-5, not 9.99e-6).
fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    match meta(md, key)? {
        Value::F32(v) => Ok(v.to_string().parse()?),
        Value::F64(v) => Ok(*v),
        v => bail!("GGUF metadata {key} is not a float: {v:?}"),
    }
}

/// Any integer metadata value that fits in a u32.
pub fn value_u32(v: &Value) -> Result<u32> {
    Ok(u32::try_from(value_usize(v)?)?)
}

/// Any non-negative integer metadata value as usize.
pub fn value_usize(v: &Value) -> Result<usize> {
    let n: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        v => bail!("not an integer: {v:?}"),
    };
    Ok(usize::try_from(n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward `permute` (convert_hf_to_gguf.py), to check the inverse against.
    fn permute(w: &Tensor, n_head: usize) -> Tensor {
        let dims = w.dims().to_vec();
        let w = w
            .reshape((n_head, 2, dims[0] / n_head / 2, dims[1]))
            .unwrap();
        w.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let w = Tensor::arange(0f32, 24.0 * 3.0, &Device::Cpu).unwrap();
        let w = w.reshape((24, 3)).unwrap();
        let back = unpermute_rope_rows(&permute(&w, 3), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn maps_tensor_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            (
                "blk.7.attn_k.weight",
                "model.layers.7.self_attn.k_proj.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_tensor_name(gguf).as_deref(), Some(hf));
        }
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
    }
}
