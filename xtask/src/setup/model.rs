//! Llama-architecture GGUF → Hugging Face `config.json`, `generation_config.json` and f32 safetensors.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use infermux_core::model::ModelConfig;
use infermux_core::model::gguf::{GgufFile, hf_tensor_name, rope_permuted_heads, unpermute_rows};
use serde_json::{Value as Json, json};

/// Opens a GGUF file and parses its header.
pub fn open(path: &Path) -> Result<(Content, File)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content =
        Content::read(&mut file).with_context(|| format!("reading GGUF {}", path.display()))?;
    Ok((content, file))
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` for `gguf` into `out`:
/// the config the library reads from the metadata ([`GgufFile::config_json`]), so the folder
/// and `--model file.gguf` are one model.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let header = GgufFile::read(gguf)?;
    let mut config = header.config_json()?;
    config["rope_scaling"] = Json::Null;
    config["attention_dropout"] = json!(0.0);
    config["torch_dtype"] = json!("float32");
    let (model_config, _) = header.config()?;
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        }),
    )?;
    let (content, mut file) = open(gguf)?;
    let tensors = dequantize_all(&content, &mut file, &model_config)?;
    save_safetensors(&tensors, &out.join("model.safetensors"))
}

/// Dequantizes every tensor to f32 under its Hugging Face name, undoing the q/k RoPE permutation.
pub fn dequantize_all(
    content: &Content,
    file: &mut File,
    config: &ModelConfig,
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
        let tensor = match rope_permuted_heads(config, &hf) {
            Some(n_head) => {
                let dims = tensor.dims().to_vec();
                let values = tensor.flatten_all()?.to_vec1::<f32>()?;
                let rows = unpermute_rows(&values, dims[0], n_head)
                    .with_context(|| format!("un-permuting {name} into {n_head} heads"))?;
                Tensor::from_vec(rows, dims, &Device::Cpu)?
            }
            None => tensor,
        };
        out.insert(hf, tensor);
        progress.step();
    }
    Ok(out)
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
