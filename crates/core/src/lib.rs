//! # infermux-core
//!
//! The backend-agnostic half of infermux. One decode step is a pipeline of small parts, each in
//! its own module:
//!
//! 1. **forward** — a [`Backend`] runs a flattened batch of prefill chunks and decode steps from
//!    many sequences and returns logits ([`backend`]); it owns the KV cache, addressed by slot.
//! 2. **processors** — temperature, top-k, top-p and min-p shape the distribution ([`sampling`]).
//! 3. **sample** — a per-sequence RNG seeded from `(seed, sample index)` draws the token, so a
//!    seeded request's output never depends on what it was batched with.
//! 4. **stop** — EOS, stop tokens and length end a sequence ([`engine`]).
//!
//! The [`Engine`] schedules requests (waiting queue, slot pool, token budget, chunked prefill)
//! on its own thread. Nothing here depends on a tensor library, a tokenizer or a wire format.

pub mod backend;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod guided;
pub mod input;
pub mod kv;
pub mod model;
pub mod params;
pub mod sampling;
pub mod text;

/// A token id.
pub type TokenId = u32;

pub use backend::{
    AdapterId, Backend, DType, Device, ForwardBatch, Logits, LogitsWanted, ModelInfo, SeqChunk,
    SlotId,
};
pub use engine::{
    BeamSearchRequest, Engine, EngineConfig, EngineStats, EngineTools, FinishReason,
    GenerateOutput, GenerateRequest, GenerateStream, GeneratedSequence, Pending, PromptLogprobs,
    SequenceUpdate, StopReason, StreamUpdate, TopLogprobs,
};
pub use error::{BackendError, DeviceMissing, EngineError, ModelError, ValidationError};
pub use guided::{
    GuidedDecoder, GuidedDecodingParams, GuidedError, GuidedMode, TokenConstraint, TokenMask,
};
pub use input::{ImageChunk, ImageFormat, ModelInput, ModelInputChunk};
pub use kv::{KvStorage, KvTable, KvUsage};
pub use model::{
    AdapterError, Architecture, Llama, LlamaOps, LoadOps, LoraAdapter, ModelConfig, ModelDir,
};
pub use params::{BeamSearchParams, GenerationConfig, LogprobsMode, OutputKind, SamplingParams};
pub use text::{TextCodec, TextError};
