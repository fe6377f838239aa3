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
    #[arg(long, requires = "prompt")]
    pub chat: bool,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    /// Print `{"logprobs": [null, ...]}` (the default output is one line per token).
    #[arg(long)]
    pub json: bool,
}
