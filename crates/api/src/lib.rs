//! # infermux
//!
//! One API for LLM inference on interchangeable backends (candle, libtorch, ONNX Runtime), with
//! Tinker's `SamplingClient` semantics: exact sampled tokens with their logprobs, and prompt
//! scoring that agrees with them.
//!
//! ```no_run
//! use infermux::{ModelInput, SamplingParams, ServiceClient};
//!
//! let client = ServiceClient::new().create_sampling_client("models/SmolLM2-135M-Instruct")?;
//! let tokenizer = client.get_tokenizer();
//! let prompt = ModelInput::from_ints(tokenizer.encode("The capital of France is", false)?);
//! let params = SamplingParams { max_tokens: Some(20), temperature: 0.7, ..Default::default() };
//! let response = client.sample(prompt, 1, params, false, 0).wait()?;
//! println!("{}", tokenizer.decode(&response.sequences[0].tokens, true)?);
//! # Ok::<(), infermux::Error>(())
//! ```
//!
//! Every call that computes something returns a [`SamplerFuture`]: `.await` it on any
//! executor, or `.wait()` (alias `.result()`) for it from synchronous code. Dropping it cancels
//! the request.
//!
//! ## Features
//!
//! The defaults are what an embedding service needs to run a model in process; everything that
//! talks over the network, and the command-line tool, is opt-in:
//!
//! | feature | default | adds | pulls in |
//! |---|---|---|---|
//! | `candle` | yes | the candle backend (pure Rust, CPU; CUDA with `cuda`) | candle |
//! | `guided` | yes | guided decoding: JSON schema, regex, choice, Lark grammar | llguidance |
//! | `torch` | no | the libtorch backend (runtime from `cargo xtask setup`) | tch |
//! | `onnx` | no | the ONNX Runtime backend (loaded at run time) | ort |
//! | `cuda` | no | CUDA builds of the enabled backends | |
//! | `server` | no | `infermux::server`: the OpenAI-compatible and native HTTP server | axum, tokio |
//! | `remote` | no | `RemoteSamplingClient`, `DeploymentSampler::new`: a server over HTTP | ureq |
//! | `cli` | no | the `infermux` binary (`sample`, `logprobs`, `serve`); implies `server` | clap, anyhow |
//!
//! Run the binary from a checkout with `cargo run -p infermux --features cli -- sample ...`. The
//! crate's own tests and examples enable `cli`, `server` and `remote` themselves.

mod backend_kind;
mod chat;
mod deployment;
mod error;
mod guided;
mod registry;
#[cfg(feature = "remote")]
mod remote;
mod retry;
mod sampler;
mod sampling_client;
#[cfg(feature = "server")]
pub mod server;
mod service;
mod tokenizer;
mod types;
pub mod wire;

pub use backend_kind::{BackendKind, LoadOptions};
pub use chat::{ChatMessage, ChatTemplate};
pub use deployment::{DeploymentSampler, PromptInput, SampleWithTokensParams, SampledCompletion};
pub use error::{Error, RemoteError, Result};
pub use registry::{MODELS_DIR_ENV, ModelLocation, ModelRegistry, RegisteredModel, RegistryError};
#[cfg(feature = "remote")]
pub use remote::RemoteSamplingClient;
pub use retry::{RetryConfig, parse_retry_after};
pub use sampler::{ApiFuture, Sampler, SamplerFuture};
pub use sampling_client::SamplingClient;
pub use service::{ModelSource, ServiceClient};
pub use tokenizer::Tokenizer;
pub use tokenizer::gguf::GgufVocab;
pub use types::{SampleResponse, SampledSequence, ScoreResponse, StopReason};

pub use infermux_core::engine::AdapterInfo;
pub use infermux_core::{
    AdapterError, BeamSearchParams, DType, Device, EngineConfig, EngineError, FinishReason,
    GenerateStream, GuidedDecodingParams, ImageChunk, ImageFormat, LogprobsMode, ModelInput,
    ModelInputChunk, OutputKind, Pending, SamplingParams, SequenceUpdate, StreamUpdate, TokenId,
    TopLogprobs, ValidationError,
};

/// The core crate, for backend implementers and advanced use.
pub use infermux_core as core;

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
