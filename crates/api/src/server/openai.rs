//! OpenAI-compatible request and response shapes (`/v1/completions`, `/v1/chat/completions`),
//! with vLLM's sampling extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, …).

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::TokenId;

/// `prompt`: a string, a list of strings, a token-id list or a list of token-id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<TokenId>),
    /// Several text prompts.
    Texts(Vec<String>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<TokenId>>),
}

impl PromptInput {
    /// How many prompts it holds.
    pub fn count(&self) -> usize {
        match self {
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::Texts(ts) => ts.len(),
            Self::TokenLists(ls) => ls.len(),
        }
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopInput {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the request's usage (every other chunk carries `"usage": null`).
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Accepted for compatibility; usage is only sent at the end.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    /// The format kind.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `json_schema`: `{"name", "schema", "strict"}`.
    #[serde(default)]
    pub json_schema: Option<JsonSchemaFormat>,
}

/// The `json_schema` member of `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (informational).
    #[serde(default)]
    pub name: Option<String>,
    /// The JSON schema the output must validate against.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// Accepted for compatibility: the output always follows the schema exactly.
    #[serde(default)]
    pub strict: Option<bool>,
    /// Informational.
    #[serde(default)]
    pub description: Option<String>,
}

/// The sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    pub model: Option<String>,
    pub n: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<TokenId>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub truncate_prompt_tokens: Option<usize>,
    pub no_stop_trim: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub allowed_token_ids: Option<Vec<TokenId>>,
    pub bad_words: Option<Vec<String>>,
    pub add_special_tokens: Option<bool>,
    pub return_hidden_states: Option<bool>,
    pub priority: Option<i64>,
    pub return_token_ids: Option<bool>,
    pub prompt_logprobs: Option<i64>,
    pub logprobs_mode: Option<String>,
}

/// Declares a request struct with its own fields plus the shared [`Knobs`] fields.
macro_rules! with_knobs {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            /// The served model's name.
            #[serde(default)] pub model: Option<String>,
            /// Choices per prompt.
            #[serde(default)] pub n: Option<usize>,
            #[serde(default)] pub temperature: Option<f32>,
            #[serde(default)] pub top_p: Option<f32>,
            #[serde(default)] pub top_k: Option<i32>,
            #[serde(default)] pub min_p: Option<f32>,
            #[serde(default)] pub repetition_penalty: Option<f32>,
            #[serde(default)] pub presence_penalty: Option<f32>,
            #[serde(default)] pub frequency_penalty: Option<f32>,
            /// Token id (as a string) → bias in [-100, 100].
            #[serde(default)] pub logit_bias: Option<BTreeMap<String, f32>>,
            #[serde(default)] pub seed: Option<u64>,
            #[serde(default)] pub stop: Option<StopInput>,
            #[serde(default)] pub stop_token_ids: Option<Vec<TokenId>>,
            #[serde(default)] pub ignore_eos: Option<bool>,
            #[serde(default)] pub min_tokens: Option<usize>,
            #[serde(default)] pub stream: Option<bool>,
            #[serde(default)] pub stream_options: Option<StreamOptions>,
            #[serde(default)] pub response_format: Option<ResponseFormat>,
            #[serde(default)] pub guided_json: Option<serde_json::Value>,
            #[serde(default)] pub guided_regex: Option<String>,
            #[serde(default)] pub guided_choice: Option<Vec<String>>,
            #[serde(default)] pub guided_grammar: Option<String>,
            #[serde(default)] pub skip_special_tokens: Option<bool>,
            #[serde(default)] pub include_stop_str_in_output: Option<bool>,
            #[serde(default)] pub truncate_prompt_tokens: Option<usize>,
            /// Accepted and ignored.
            #[serde(default)] pub user: Option<String>,
            // vLLM / SGLang extension fields (routers such as sglang-router add some to every
            // body they forward). Honoured where they mean something here, the others
            // accepted at their no-op value; see the README's "Extension fields".
            /// SGLang: keep the matched stop string in the output (`include_stop_str_in_output`).
            #[serde(default)] pub no_stop_trim: Option<bool>,
            /// vLLM: spaces between special tokens when detokenizing (default true).
            #[serde(default)] pub spaces_between_special_tokens: Option<bool>,
            /// vLLM: sample only among these token ids.
            #[serde(default)] pub allowed_token_ids: Option<Vec<TokenId>>,
            /// vLLM: words never to generate.
            #[serde(default)] pub bad_words: Option<Vec<String>>,
            /// vLLM: let the tokenizer add its special tokens (BOS) to text prompts
            /// (default false on both routes here).
            #[serde(default)] pub add_special_tokens: Option<bool>,
            /// SGLang: hidden states in the reply; only `false` is supported.
            #[serde(default)] pub return_hidden_states: Option<bool>,
            /// vLLM: scheduling priority; only 0 (the FIFO scheduler) is supported.
            #[serde(default)] pub priority: Option<i64>,
            /// vLLM / SGLang request ids: accepted and ignored (replies carry their own id).
            #[serde(default)] pub request_id: Option<String>,
            /// SGLang's request id: accepted and ignored.
            #[serde(default)] pub rid: Option<String>,
            /// vLLM: the guided-decoding backend; accepted and ignored (llguidance runs).
            #[serde(default)] pub guided_decoding_backend: Option<String>,
            /// vLLM: the prompt's and each completion's token ids in the reply.
            #[serde(default)] pub return_token_ids: Option<bool>,
            /// vLLM: each prompt token's logprob and rank, with this many top alternatives
            /// (0 to 20; not with `stream`).
            #[serde(default)] pub prompt_logprobs: Option<i64>,
            /// vLLM's names: `raw_logprobs` (default) or `processed_logprobs` (each sampled
            /// token's logprob under the distribution it was drawn from).
            #[serde(default)] pub logprobs_mode: Option<String>,
        }

        impl $name {
            /// The shared sampling fields.
            pub fn knobs(&self) -> Knobs {
                Knobs {
                    model: self.model.clone(),
                    n: self.n,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.clone(),
                    seed: self.seed,
                    stop: self.stop.clone(),
                    stop_token_ids: self.stop_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                    min_tokens: self.min_tokens,
                    stream: self.stream,
                    stream_options: self.stream_options,
                    response_format: self.response_format.clone(),
                    guided_json: self.guided_json.clone(),
                    guided_regex: self.guided_regex.clone(),
                    guided_choice: self.guided_choice.clone(),
                    guided_grammar: self.guided_grammar.clone(),
                    skip_special_tokens: self.skip_special_tokens,
                    include_stop_str_in_output: self.include_stop_str_in_output,
                    truncate_prompt_tokens: self.truncate_prompt_tokens,
                    no_stop_trim: self.no_stop_trim,
                    spaces_between_special_tokens: self.spaces_between_special_tokens,
                    allowed_token_ids: self.allowed_token_ids.clone(),
                    bad_words: self.bad_words.clone(),
                    add_special_tokens: self.add_special_tokens,
                    return_hidden_states: self.return_hidden_states,
                    priority: self.priority,
                    return_token_ids: self.return_token_ids,
                    prompt_logprobs: self.prompt_logprobs,
                    logprobs_mode: self.logprobs_mode.clone(),
                }
            }
        }
    };
}

with_knobs! {
    /// Body of `POST /v1/completions`.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct CompletionRequest {
        /// The prompt(s).
        pub prompt: PromptInput,
        /// Tokens to generate per choice (default 16).
        #[serde(default)]
        pub max_tokens: Option<usize>,
        /// Return this many top alternatives per token (and each token's logprob), at most 20;
        /// alternatives with equal text collapse (see [`TopMap`]).
        #[serde(default)]
        pub logprobs: Option<usize>,
        /// Prepend the prompt to each choice's text (and its logprobs, with `logprobs`).
        #[serde(default)]
        pub echo: Option<bool>,
        /// Sample this many, return the `n` most likely (not with `stream`).
        #[serde(default)]
        pub best_of: Option<usize>,
        /// Not supported; must be absent or empty.
        #[serde(default)]
        pub suffix: Option<String>,
    }
}

/// One chat message of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text, or a list of content parts (only `text` parts are supported).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Accepted and ignored.
    #[serde(default)]
    pub name: Option<String>,
}

/// A message's content.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part (`{"type": "text", "text": "..."}`).
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part kind.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text, for `text` parts.
    #[serde(default)]
    pub text: Option<String>,
}

with_knobs! {
    /// Body of `POST /v1/chat/completions`.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ChatRequest {
        /// The conversation.
        pub messages: Vec<ChatMessageIn>,
        /// Tokens to generate per choice (default: to the end of the context or EOS).
        #[serde(default)]
        pub max_tokens: Option<usize>,
        /// OpenAI's newer name of `max_tokens`.
        #[serde(default)]
        pub max_completion_tokens: Option<usize>,
        /// Return each generated token's logprob.
        #[serde(default)]
        pub logprobs: Option<bool>,
        /// With `logprobs`: this many top alternatives per token (at most 20).
        #[serde(default)]
        pub top_logprobs: Option<usize>,
        /// Open the assistant's turn after the messages (default true).
        #[serde(default)]
        pub add_generation_prompt: Option<bool>,
        /// vLLM / SGLang: continue the final (assistant) message instead of opening a new
        /// turn; excludes `add_generation_prompt: true`.
        #[serde(default)]
        pub continue_final_message: Option<bool>,
        /// SGLang: split reasoning from the answer; accepted and ignored (no reasoning parser
        /// runs, the whole text is `content`).
        #[serde(default)]
        pub separate_reasoning: Option<bool>,
        /// SGLang: stream reasoning separately; accepted and ignored, as `separate_reasoning`.
        #[serde(default)]
        pub stream_reasoning: Option<bool>,
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens (once per prompt, whatever `n`).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache (once per prompt, whatever `n`).
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage of `prompt` and `completion` tokens, `cached` of the prompt tokens from the
    /// prefix cache.
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// One alternative at a prompt position in vLLM's `prompt_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptLogprob {
    /// Its logprob (`-inf` written as vLLM's `-9999.0`).
    pub logprob: f32,
    /// 1-based rank in the whole vocabulary's ordering; `null` for a prompt token outside the
    /// top alternatives the engine returned (see the README's extension fields).
    pub rank: Option<usize>,
    /// The token's text.
    pub decoded_token: String,
}

/// One prompt position of vLLM's `prompt_logprobs`: token id (as a string key) → its
/// [`PromptLogprob`], the prompt's own token first, then the top alternatives best first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptPosition(pub Vec<(TokenId, PromptLogprob)>);

impl Serialize for PromptPosition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (id, entry) in &self.0 {
            map.serialize_entry(&id.to_string(), entry)?;
        }
        map.end()
    }
}

/// vLLM's `prompt_logprobs`: one entry per prompt token, the first `null`.
pub type PromptLogprobsOut = Vec<Option<PromptPosition>>;

/// `(token text, logprob)` pairs serialized as a JSON object in their order (best first).
///
/// OpenAI's completions `top_logprobs` is a text → logprob map, so alternatives that decode to
/// the same text (e.g. two byte-level tokens of one invalid UTF-8 prefix, both `"\u{fffd}"`)
/// collapse into one key: the most probable of them is kept, and fewer than `logprobs` entries
/// may come back. Chat logprobs (a list with `bytes`) keep every alternative.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopMap(pub Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &self.0 {
            if seen.insert(k.as_str()) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// The legacy completions `logprobs` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's logprob (`null` for the first prompt token under `echo`).
    pub token_logprobs: Vec<Option<f32>>,
    /// Top alternatives per token (`null` where there are none).
    pub top_logprobs: Vec<Option<TopMap>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends `other` (whose offsets already count the text before it).
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// One choice of a completion (or a completion chunk).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM `return_token_ids`: the completion's ids (in a chunk: this chunk's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
    /// vLLM `prompt_logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
    /// vLLM `return_token_ids`: the prompt's ids (in a stream: on each choice's first chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// The weight version this choice was computed with (its prompt's).
    pub weight_version: String,
}

/// A completion, or (with `object: "text_completion"` too) one streamed chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Absent in chunks unless `include_usage`; then `null` but in the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// The weight version every choice here was computed with (SGLang's name, what
    /// `/get_weight_version` answers); `null` when the prompts of a many-prompt request ran
    /// under different versions (each choice carries its own).
    pub weight_version: Option<String>,
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One generated token in chat logprobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// A chat choice's `logprobs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

/// One chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM `return_token_ids`: the completion's ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
}

/// A chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM `prompt_logprobs` (on the response, as vLLM's chat does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobsOut>,
    /// vLLM `return_token_ids`: the rendered prompt's ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// The weight version the reply was computed with (SGLang's name).
    pub weight_version: String,
}

/// What a chat chunk adds to a choice.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM `return_token_ids`: this chunk's completion ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<TokenId>>,
}

/// One streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent unless `include_usage`; then `null` but in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// vLLM `return_token_ids`: the prompt's ids, on the role chunks that open the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<TokenId>>,
    /// The weight version this chunk was computed with (SGLang's name).
    pub weight_version: String,
}

/// `GET /v1/models` entries.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The model's context window.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
