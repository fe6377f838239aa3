//! Command-line flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use infermux::{BackendKind, DType, Device};

/// LLM inference on candle, libtorch or ONNX Runtime through one API.
#[derive(Debug, Parser)]
#[command(name = "infermux", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample continuations of a prompt.
    Sample(SampleArgs),
    /// Print the logprob of each prompt token given the ones before it.
    Logprobs(LogprobsArgs),
    /// Serve the model over HTTP: OpenAI-compatible completions and chat, native sample and
    /// compute_logprobs, /v1/models, /health and Prometheus /metrics.
    Serve(ServeArgs),
}

/// Which model, on which backend, where.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Inference backend.
    #[arg(long, default_value = "candle")]
    pub backend: BackendKind,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
}

/// The prompt, as text or as token ids.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text (tokenized with the model's tokenizer, special tokens recognized).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub prompt_tokens: Option<Vec<u32>>,
}

/// How the prompt text becomes tokens.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Send --prompt as a user message through the model's chat template.
    #[arg(long, requires = "prompt", conflicts_with = "prompt_tokens")]
    pub chat: bool,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT LoRA adapter folder to run on top of the model.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Maximum tokens to generate per sample.
    #[arg(long)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of samples (they share the prompt's prefill).
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Keep generating past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop when the text contains this string (repeatable); it is left out of the text.
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Also return the K most likely alternatives per generated token.
    #[arg(long, value_name = "K")]
    pub logprobs: Option<usize>,
    #[command(flatten)]
    pub guided: GuidedArgs,
    /// Beam search with W beams instead of sampling (prints W sequences, best first).
    #[arg(long, value_name = "W", conflicts_with_all = ["num_samples", "json_schema", "regex", "choice", "grammar"])]
    pub beam_width: Option<usize>,
    /// Print JSON: per sample its tokens, text, logprobs and finish reason.
    #[arg(long)]
    pub json: bool,
}

/// Guided decoding: at most one constraint.
#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct GuidedArgs {
    /// The output must be JSON valid under the JSON schema in FILE.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// The output must match this regular expression.
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
    /// The output is exactly one of these comma-separated strings.
    #[arg(long, value_delimiter = ',', value_name = "A,B,C")]
    pub choice: Option<Vec<String>>,
    /// The output must follow the Lark grammar in FILE.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT LoRA adapter folder to run on top of the model.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Print `{"logprobs": [null, ...]}` (the default output is one line per token).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the line `listening on http://HOST:PORT` tells).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name clients give as `model` (default: the model folder's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Requests served at once (the engine batches them); more wait in the queue.
    #[arg(long, default_value_t = 64, value_parser = count(1, 1 << 24))]
    pub max_concurrent_requests: usize,
    /// Sequences served at once, summed over requests: a request takes as many as it keeps in
    /// the engine at once (prompts in its window × samples; a plain request 1). More wait in
    /// the queue.
    #[arg(long, default_value_t = 256, value_parser = count(1, 1 << 24))]
    pub max_concurrent_sequences: usize,
    /// Most sequences one request may ask for: prompts × samples drawn (n or best_of); 400
    /// beyond, naming `prompt` or `n`/`best_of`.
    #[arg(long, default_value_t = 256, value_parser = count(1, 1 << 24))]
    pub max_sequences_per_request: usize,
    /// Requests that may wait for places; past that the server answers 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = count(0, 1 << 24))]
    pub max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20, value_parser = count(1, 1 << 32))]
    pub max_body_bytes: usize,
    /// Wall-clock limit per request in seconds, queueing included (504 beyond; 0: none).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub request_timeout_secs: u64,
    /// Seconds between SSE keep-alive comments while a stream has nothing to send (0: none).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub sse_keep_alive_secs: u64,
    /// Most sequences (KV slots) the engine decodes at once. One request keeps at most half of
    /// them busy, so a later request starts at once.
    #[arg(long, default_value_t = 64, value_parser = count(1, 1 << 16))]
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512, value_parser = count(1, 1 << 24))]
    pub max_num_batched_tokens: usize,
    /// KV cache budget in bytes (vLLM's flag): plain bytes or with a suffix, binary (4GiB,
    /// 512MiB, 2G, 64K) or decimal (2GB, 500MB, 3k). Requests whose KV does not fit yet wait;
    /// one that never fits is a 400. Default: 40% of the memory available at start.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub kv_cache_memory_bytes: Option<u64>,
    /// Keep finished sequences' KV for later requests whose tokens extend them (vLLM's flag;
    /// on by default, so accepted for scripts that pass it).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn the prefix cache off: every prompt is prefilled in full.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// LoRA adapters (PEFT folders) to serve from the start, as NAME=PATH (vLLM's flag):
    /// requests name one as their `model`.
    #[arg(long, num_args = 1.., value_name = "NAME=PATH", value_parser = lora_module)]
    pub lora_modules: Vec<(String, PathBuf)>,
    /// Accepted for vLLM scripts: adapters are always available.
    #[arg(long)]
    pub enable_lora: bool,
    /// Most LoRA adapters loaded at once (vLLM's flag); loading one more is a typed error.
    #[arg(long, default_value_t = 8, value_parser = count(1, 1024))]
    pub max_loras: usize,
    /// Key every route but /health*, /ping and /metrics needs, as `Authorization: Bearer KEY`
    /// or `X-API-Key: KEY` (401 otherwise). Default: none needed.
    #[arg(long, value_name = "KEY", env = "INFERMUX_API_KEY", hide_env_values = true, value_parser = key)]
    pub api_key: Option<String>,
    /// Serve the control routes (POST /update_weights_from_disk, /pause_generation,
    /// /continue_generation); they need --admin-key and --allowed-model-dir.
    #[arg(long, requires_all = ["admin_key", "allowed_model_dir"])]
    pub enable_control_routes: bool,
    /// Key the control routes need as `Authorization: Bearer KEY` (403 otherwise); used only
    /// with --enable-control-routes.
    #[arg(long, value_name = "KEY", env = "INFERMUX_ADMIN_KEY", hide_env_values = true, value_parser = key)]
    pub admin_key: Option<String>,
    /// The folder model paths of the control routes must lie in (symlinks followed).
    #[arg(long, value_name = "DIR", requires = "enable_control_routes")]
    pub allowed_model_dir: Option<PathBuf>,
}

/// `NAME=PATH` of `--lora-modules`.
fn lora_module(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("{s:?} is not NAME=PATH")),
    }
}

/// A key: not empty, no whitespace or control characters (it travels in a header).
fn key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a key cannot be empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a key cannot hold whitespace or control characters".into());
    }
    Ok(s.to_string())
}

/// Largest number of seconds a time flag takes (ten years).
const MAX_SECS: u64 = 10 * 366 * 24 * 3600;

/// A parser of whole numbers in `min..=max` (clap's ranges exist for fixed-width types only):
/// a value outside is a usage error naming the range, not a huge allocation or an overflow.
fn count(min: usize, max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| {
        let value: u128 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number"))?;
        usize::try_from(value)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| format!("{s} is not in {min}..={max}"))
    }
}

/// A byte count: plain (`1073741824`) or a number (fractions allowed) with a unit. `KiB`,
/// `MiB`, `GiB`, `TiB` and the single letters `K`, `M`, `G`, `T` are powers of 1024 (as vLLM
/// reads upper case); `KB`, `MB`, `GB`, `TB` and lower-case `k`, `m`, `g`, `t` are powers of
/// 1000. A trailing `B` alone means bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number = number.replace('_', "");
    let scale: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "KiB" | "kib" | "KIB" => 1 << 10,
        "M" | "MiB" | "mib" | "MIB" => 1 << 20,
        "G" | "GiB" | "gib" | "GIB" => 1 << 30,
        "T" | "TiB" | "tib" | "TIB" => 1 << 40,
        "k" | "KB" | "kB" | "kb" => 1_000,
        "m" | "MB" | "mb" => 1_000_000,
        "g" | "GB" | "gb" => 1_000_000_000,
        "t" | "TB" | "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (bytes, or K/M/G/T, KiB/MiB/GiB/TiB, KB/MB/GB/TB)"
            ));
        }
    };
    let bytes = if let Ok(whole) = number.parse::<u64>() {
        whole.checked_mul(scale)
    } else {
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a byte count (e.g. 4GiB, 512MiB, 2G, 1000000)"))?;
        let bytes = value * scale as f64;
        (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
    };
    match bytes {
        None => Err(format!("{s:?} is too large")),
        Some(0) => Err("the KV cache budget must be at least 1 byte".into()),
        Some(b) => Ok(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded() {
        let parse = count(1, 64);
        assert_eq!(parse("64"), Ok(64));
        for bad in ["0", "65", "-1", "1e3", "18446744073709551616", "x"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn byte_counts_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("3k"), Ok(3_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("25.6k"), Ok(25_600));
        assert_eq!(parse_bytes(" 100 B "), Ok(100));
        assert_eq!(parse_bytes("1_000_000"), Ok(1_000_000));
        for bad in [
            "",
            "GiB",
            "4 parsecs",
            "-1G",
            "0",
            "0GiB",
            "99999999999T",
            "1.2.3G",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
    }
}
