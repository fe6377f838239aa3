//! Typed errors of the core: every message names what was wrong and where.

use crate::backend::SlotId;

/// A request or parameter that cannot be served, found before any compute is spent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A field holds a value outside its documented domain.
    #[error("invalid `{field}`: {reason}")]
    InvalidField {
        /// Name of the offending field, as it is spelled in the public API.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The prompt holds no token.
    #[error("the prompt is empty: at least one token is required")]
    EmptyPrompt,
    /// A prompt token id is not in the model's vocabulary.
    #[error(
        "prompt token {token} at position {position} is out of range (vocabulary size {vocab_size})"
    )]
    TokenOutOfRange {
        /// Offending id.
        token: u32,
        /// Its index in the flattened prompt.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// Prompt plus requested completion do not fit the model's context window.
    #[error(
        "prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {} exceeds the model's context of {max_context} tokens",
        prompt_len.saturating_add(*max_tokens)
    )]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_len: usize,
        /// Requested completion budget.
        max_tokens: usize,
        /// The model's maximum context.
        max_context: usize,
    },
    /// The prompt holds a chunk kind the model cannot consume.
    #[error("chunk {index} is {kind}, which this text-only model cannot consume")]
    UnsupportedChunk {
        /// Index of the chunk in the `ModelInput`.
        index: usize,
        /// The chunk kind, e.g. "an image chunk".
        kind: &'static str,
    },
    /// The request's KV cache reservation exceeds the engine's whole KV budget, so it could
    /// never be admitted, even alone (fewer samples or beams, or a smaller `max_tokens`, fit).
    #[error(
        "the request needs {needed_bytes} bytes of KV cache ({sequences} sequences of up to \
         {positions} positions, plus one growth copy), more than the whole kv budget of \
         {budget_bytes} bytes"
    )]
    KvBudgetExceeded {
        /// Bytes the request would hold against the budget.
        needed_bytes: u64,
        /// The engine's KV budget.
        budget_bytes: u64,
        /// KV slots it needs (samples drawn, `2 × beam_width`, or 1 to score).
        sequences: usize,
        /// Positions each slot may reach, rounded up to the KV granule.
        positions: usize,
    },
}

impl ValidationError {
    /// Shorthand for [`ValidationError::InvalidField`].
    pub fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}

/// A failure inside a backend's numerics or state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// A batch addressed a slot at a position that does not match its cached length.
    #[error("slot {slot:?}: batch starts at position {start_pos} but {cached} tokens are cached")]
    PositionMismatch {
        /// The slot addressed.
        slot: SlotId,
        /// Where the batch said the chunk starts.
        start_pos: usize,
        /// How many tokens the slot holds.
        cached: usize,
    },
    /// A chunk would grow its slot past the model's context window.
    #[error("slot {slot:?}: {needed} positions exceed the context of {max_context}")]
    ContextExceeded {
        /// The slot addressed.
        slot: SlotId,
        /// Positions the slot would hold after the chunk.
        needed: usize,
        /// The model's maximum context.
        max_context: usize,
    },
    /// Growing a slot's KV storage would pass the KV byte budget.
    #[error(
        "slot {slot:?}: KV cache needs {needed_bytes} bytes, over the KV budget of {budget_bytes} bytes"
    )]
    KvBudgetExceeded {
        /// The slot that needed room.
        slot: SlotId,
        /// Bytes all slots would hold after the allocation.
        needed_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// A slot that holds no state was addressed where state was required.
    #[error("slot {0:?} holds no KV state")]
    UnknownSlot(SlotId),
    /// The runtime (candle, libtorch, ONNX Runtime) reported an error.
    #[error("{runtime} error: {message}")]
    Runtime {
        /// Which runtime failed.
        runtime: &'static str,
        /// Its message.
        message: String,
    },
    /// A chunk named a LoRA adapter the backend does not hold.
    #[error("no LoRA adapter {0:?} is loaded in the backend")]
    UnknownAdapter(crate::backend::AdapterId),
    /// The backend panicked; the panic was caught at the engine boundary.
    #[error("backend panicked: {0}")]
    Panicked(String),
    /// The model produced NaN or +inf logits (or a row with no finite value) in a row the
    /// engine would sample from or score; the request fails instead of sampling garbage.
    #[error(
        "slot {slot:?}: the model produced {found} logits at position {position}; \
         the request was failed instead of sampling from them"
    )]
    NonFiniteLogits {
        /// The slot whose row was bad.
        slot: SlotId,
        /// The position (in the slot's sequence) whose logits row was bad.
        position: usize,
        /// What was found: `"NaN"`, `"+inf"`, or `"only -inf"`.
        found: &'static str,
    },
    /// The device asked for cannot be used by this backend here.
    #[error("{runtime} cannot run on {device}: {missing}")]
    DeviceUnavailable {
        /// Which runtime was asked.
        runtime: &'static str,
        /// The device asked for.
        device: crate::backend::Device,
        /// What is missing.
        missing: DeviceMissing,
    },
    /// The model's weights come in a form this backend does not run (a GGUF file's quantized
    /// types on a runtime without kernels for them).
    #[error("{runtime} does not run {what}; {hint}")]
    UnsupportedWeights {
        /// Which runtime was asked.
        runtime: &'static str,
        /// What it was asked to run, e.g. "GGUF tensors of type Q4_1".
        what: String,
        /// Where it does run.
        hint: &'static str,
    },
}

/// What keeps a backend from using a CUDA device, most basic first.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceMissing {
    /// The backend was compiled without its `cuda` feature.
    #[error("this build has no CUDA support (rebuild with the `cuda` feature)")]
    NotCompiled,
    /// The CUDA driver (`libcuda.so.1`) cannot be loaded, fails to start, or is too old.
    #[error("no usable CUDA driver: {0}")]
    Driver(String),
    /// A CUDA runtime library the backend needs cannot be loaded.
    #[error("the CUDA library {library} cannot be loaded: {reason}")]
    Library {
        /// The library's name, e.g. `libcublas.so.13`.
        library: String,
        /// Why, as the loader or runtime said it.
        reason: String,
    },
    /// The driver is there but has no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver sees {count}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// The runtime's own CUDA support is absent or failed to start.
    #[error("CUDA support failed: {0}")]
    Runtime(String),
}

/// A model folder or configuration that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the model needs is absent.
    #[error("model folder {dir}: missing {file}")]
    MissingFile {
        /// The folder searched.
        dir: std::path::PathBuf,
        /// The file that was expected there.
        file: String,
    },
    /// `config.json` names an architecture that infermux does not implement.
    #[error("unsupported architecture {found:?}; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// What config.json said.
        found: String,
        /// What infermux supports.
        supported: &'static [&'static str],
    },
    /// A config field is missing or malformed.
    #[error("{file}: {reason}")]
    InvalidConfig {
        /// The file at fault.
        file: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The path read.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a request submitted to the engine did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The request was rejected before scheduling.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The backend failed while this request was in its batch.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Detokenizing the output failed.
    #[error(transparent)]
    Text(#[from] crate::text::TextError),
    /// The guided-decoding engine failed mid-request.
    #[error(transparent)]
    Guided(#[from] crate::guided::GuidedError),
    /// Engine code outside the backend (a guided-decoding constraint, the sampler, a group's
    /// bookkeeping) panicked while serving this request; the panic was caught, only the
    /// requests involved failed and the engine keeps serving.
    #[error("the engine caught a panic while {stage}: {message}")]
    Panicked {
        /// What the engine was doing, e.g. "computing a guided-decoding mask".
        stage: &'static str,
        /// The panic's message.
        message: String,
    },
    /// The engine thread is gone (shut down or crashed).
    #[error("the engine has shut down")]
    Shutdown,
    /// The request was ended before it completed by a control command (a weight update with
    /// `abort_all_requests`, or a pause that aborts); what it produced so far is dropped.
    #[error("the request was aborted by {by}")]
    Aborted {
        /// The command that aborted it, e.g. "a weight update (abort_all_requests)".
        by: &'static str,
    },
}
