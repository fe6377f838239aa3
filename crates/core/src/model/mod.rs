//! The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM), defined once for every backend.
//!
//! 1. [`config`]: a Hugging Face folder's `config.json` read and range-checked into a
//!    [`ModelConfig`] (variant facts, RoPE tables with their scaling), and the folder's files
//!    ([`ModelDir`]); [`checkpoint`]: the safetensors headers, checked against the file sizes
//!    and the config's plan before any backend allocates.
//! 2. [`plan`]: the [`WeightPlan`] — which HF tensors a model needs, their shapes, which of them
//!    fuse into one projection, the tie rule, optional biases and norms.
//! 3. [`llama`]: the forward pass over a flattened batch, generic over [`LlamaOps`]: a small op
//!    set (embedding rows, linear, RMS norm, RoPE, attention against the KV cache, SwiGLU,
//!    residual add, logits rows) that each backend implements with its tensor library.
//!
//! A GGUF file ([`gguf`]) is a model source too: its metadata gives the config, its tensors are
//! listed under their Hugging Face names with their ggml types.
//!
//! A new variant is a change here only; backends see ops, never architectures.

pub mod checkpoint;
pub mod config;
mod fields;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod lora_batch;
pub mod plan;

pub use checkpoint::{Checkpoint, TensorInfo, WeightFormat};
pub use config::{
    Architecture, MAX_POSITIONS, ModelConfig, ModelDir, RopeScaling, SUPPORTED_ARCHITECTURES,
    read_config,
};
pub use llama::{AttentionShape, LayerWeights, Llama, LlamaOps, LlamaWeights, LoadOps};
pub use lora::{AdapterError, LoraAdapter, LoraSite, LoraUpdate};
pub use lora_batch::{AdapterSet, AdapterSetError, BatchAdapters, BatchLora, LoraStack};
pub use plan::{LayerPlan, LinearSpec, TensorSpec, WeightPlan};
