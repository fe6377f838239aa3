//! `DeploymentSampler`: Fireworks' training-loop sampler. Tokenizes on the client (the model's
//! tokenizer and chat template), samples through any [`Sampler`] (in-process or remote) and
//! returns [`SampledCompletion`]s with token ids, logprobs and completion metadata, with the
//! `max_seq_len` pre- and post-filters.

use std::sync::Arc;

use infermux_core::{ModelInput, SamplingParams, TokenId};
use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
#[cfg(feature = "remote")]
use crate::error::RemoteError;
use crate::error::{Error, Result};
#[cfg(feature = "remote")]
use crate::remote::RemoteSamplingClient;
use crate::sampler::{Sampler, SamplerFuture};
use crate::sampling_client::SamplingClient;
use crate::tokenizer::Tokenizer;
use crate::types::{SampleResponse, StopReason};

/// What to sample from: a conversation (rendered with the chat template, generation prompt
/// appended), raw text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Chat messages.
    Messages(Vec<ChatMessage>),
    /// Text, tokenized as is (special tokens written in it are recognized; none are added).
    Text(String),
    /// Token ids, sent as they are.
    Tokens(Vec<TokenId>),
}

impl From<Vec<ChatMessage>> for PromptInput {
    fn from(m: Vec<ChatMessage>) -> Self {
        Self::Messages(m)
    }
}

impl From<&[ChatMessage]> for PromptInput {
    fn from(m: &[ChatMessage]) -> Self {
        Self::Messages(m.to_vec())
    }
}

impl From<&str> for PromptInput {
    fn from(t: &str) -> Self {
        Self::Text(t.to_string())
    }
}

impl From<String> for PromptInput {
    fn from(t: String) -> Self {
        Self::Text(t)
    }
}

impl From<Vec<TokenId>> for PromptInput {
    fn from(t: Vec<TokenId>) -> Self {
        Self::Tokens(t)
    }
}

/// The parameters of [`DeploymentSampler::sample_with_tokens`] (Fireworks' names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SampleWithTokensParams {
    /// Completions to draw (sharing one prefill).
    pub n: usize,
    /// Completion budget per sample; `None`: up to the context window.
    pub max_tokens: Option<usize>,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: i32,
    /// Seed: completion `i` draws from an RNG seeded by `(seed, i)`.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Return each completion token's logprob in `inference_logprobs`.
    pub logprobs: bool,
    /// Return training-aligned logprobs: every token of `full_tokens[1..]` given its prefix
    /// (prompt positions 1.., then the completion), `P + C - 1` entries. Implies `logprobs`.
    pub echo: bool,
    /// Drop a prompt of at least this many tokens before sampling (an empty result, no
    /// inference call), and every completion whose prompt + completion exceeds it.
    pub max_seq_len: Option<usize>,
    /// For [`PromptInput::Messages`]: append the assistant turn's opening.
    pub add_generation_prompt: bool,
}

impl Default for SampleWithTokensParams {
    fn default() -> Self {
        Self {
            n: 1,
            max_tokens: Some(16),
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            echo: false,
            max_seq_len: None,
            add_generation_prompt: true,
        }
    }
}

impl SampleWithTokensParams {
    /// The engine's parameters for these.
    pub fn to_sampling_params(&self) -> SamplingParams {
        SamplingParams {
            n: self.n,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..SamplingParams::default()
        }
    }
}

/// One completion of [`DeploymentSampler::sample_with_tokens`] (Fireworks' fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledCompletion {
    /// The decoded completion.
    pub text: String,
    /// Prompt + completion token ids.
    pub full_tokens: Vec<TokenId>,
    /// Number of prompt tokens.
    pub prompt_len: usize,
    /// `stop` (EOS, stop token or stop string) or `length`.
    pub finish_reason: StopReason,
    /// Number of completion tokens.
    pub completion_len: usize,
    /// With `logprobs`: one per completion token. With `echo`: `prompt_len + completion_len - 1`
    /// entries, the logprob of each of `full_tokens[1..]` given the tokens before it.
    pub inference_logprobs: Option<Vec<f32>>,
    /// Whether `inference_logprobs` is training-aligned (`echo`).
    pub logprobs_echoed: bool,
    /// Per-token MoE routing matrices (base64) for router replay; `None` for dense models.
    pub routing_matrices: Option<Vec<String>>,
}

impl SampledCompletion {
    /// The completion's token ids.
    pub fn completion_tokens(&self) -> &[TokenId] {
        &self.full_tokens[self.prompt_len..]
    }
}

/// Fireworks' `DeploymentSampler`: client-side tokenization over any [`Sampler`]. Cheap to
/// clone; `Send + Sync`.
#[derive(Clone)]
pub struct DeploymentSampler {
    sampler: Arc<dyn Sampler>,
    tokenizer: Tokenizer,
    model: String,
}

impl std::fmt::Debug for DeploymentSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentSampler")
            .field("model", &self.model)
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl DeploymentSampler {
    /// Fireworks' constructor: samples from the server at `inference_url` (`http://HOST:PORT`,
    /// `infermux serve`'s native endpoints) with the default retry policy, authenticating with
    /// `api_key` if given. `tokenizer` must be the served model's. Feature `remote`.
    #[cfg(feature = "remote")]
    pub fn new(
        inference_url: &str,
        model: impl Into<String>,
        api_key: Option<&str>,
        tokenizer: Tokenizer,
    ) -> Result<Self, RemoteError> {
        let model = model.into();
        let mut client = RemoteSamplingClient::new(inference_url)?.with_model(model.clone());
        if let Some(key) = api_key {
            client = client.with_api_key(key);
        }
        Ok(Self {
            sampler: Arc::new(client),
            tokenizer,
            model,
        })
    }

    /// Samples through `sampler` (e.g. a configured `RemoteSamplingClient`).
    pub fn with_sampler(sampler: impl Sampler + 'static, tokenizer: Tokenizer) -> Self {
        Self::from_shared(Arc::new(sampler), tokenizer)
    }

    /// Samples through a shared sampler.
    pub fn from_shared(sampler: Arc<dyn Sampler>, tokenizer: Tokenizer) -> Self {
        let model = sampler.get_base_model();
        Self {
            sampler,
            tokenizer,
            model,
        }
    }

    /// Samples in process, with the client's own tokenizer.
    pub fn from_client(client: SamplingClient) -> Self {
        let tokenizer = client.get_tokenizer();
        Self::with_sampler(client, tokenizer)
    }

    /// The sampler underneath.
    pub fn sampler(&self) -> &Arc<dyn Sampler> {
        &self.sampler
    }

    /// The client-side tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model (deployment) name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The prompt's token ids, as [`DeploymentSampler::sample_with_tokens`] sends them.
    pub fn tokenize(
        &self,
        prompt: &PromptInput,
        add_generation_prompt: bool,
    ) -> Result<Vec<TokenId>> {
        match prompt {
            PromptInput::Messages(messages) => {
                let text = self
                    .tokenizer
                    .apply_chat_template(messages, add_generation_prompt)?;
                self.tokenizer.encode(&text, false)
            }
            PromptInput::Text(text) => self.tokenizer.encode(text, false),
            PromptInput::Tokens(ids) => Ok(ids.clone()),
        }
    }

    /// Samples `params.n` completions of `prompt` and returns them with their token ids (see
    /// [`SampledCompletion`]). `.await` it, or `.wait()` from synchronous code.
    ///
    /// With `max_seq_len`: a prompt of `max_seq_len` tokens or more yields an empty list at
    /// once, with no inference call; a completion whose prompt + completion tokens exceed
    /// `max_seq_len` is dropped.
    pub fn sample_with_tokens(
        &self,
        prompt: impl Into<PromptInput>,
        params: &SampleWithTokensParams,
    ) -> SamplerFuture<Vec<SampledCompletion>> {
        let prompt_tokens = match self.tokenize(&prompt.into(), params.add_generation_prompt) {
            Ok(t) => t,
            Err(e) => return SamplerFuture::ready(Err(e)),
        };
        if params
            .max_seq_len
            .is_some_and(|max| prompt_tokens.len() >= max)
        {
            return SamplerFuture::ready(Ok(Vec::new()));
        }
        let echo = params.echo;
        let logprobs = params.logprobs || echo;
        let max_seq_len = params.max_seq_len;
        let reply = self.sampler.sample(
            ModelInput::from_ints(prompt_tokens.clone()),
            params.n,
            params.to_sampling_params(),
            echo,
            0,
        );
        let tokenizer = self.tokenizer.clone();
        SamplerFuture::new(async move {
            let response = reply.await?;
            completions(
                response,
                &prompt_tokens,
                &tokenizer,
                logprobs,
                echo,
                max_seq_len,
            )
        })
    }
}

/// Builds the completions of a reply, applying the post-filter.
fn completions(
    response: SampleResponse,
    prompt: &[TokenId],
    tokenizer: &Tokenizer,
    logprobs: bool,
    echo: bool,
    max_seq_len: Option<usize>,
) -> Result<Vec<SampledCompletion>> {
    let malformed = |what: String| {
        Error::Engine(infermux_core::EngineError::Backend(
            infermux_core::BackendError::Runtime {
                runtime: "sampler",
                message: what,
            },
        ))
    };
    let prompt_logprobs: Vec<f32> = if echo {
        let all = response.prompt_logprobs.as_deref().ok_or_else(|| {
            malformed("echo asked for prompt logprobs; the reply has none".into())
        })?;
        if all.len() != prompt.len() {
            return Err(malformed(format!(
                "{} prompt logprobs for a prompt of {} tokens",
                all.len(),
                prompt.len()
            )));
        }
        all.iter()
            .skip(1)
            .enumerate()
            .map(|(i, lp)| {
                lp.ok_or_else(|| malformed(format!("no logprob for prompt token {}", i + 1)))
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let mut out = Vec::with_capacity(response.sequences.len());
    for seq in response.sequences {
        let completion_len = seq.tokens.len();
        if max_seq_len.is_some_and(|max| prompt.len() + completion_len > max) {
            continue;
        }
        let inference_logprobs = if logprobs {
            let own = seq
                .logprobs
                .ok_or_else(|| malformed("a sampled sequence carries no logprobs".into()))?;
            if own.len() != completion_len {
                return Err(malformed(format!(
                    "{} logprobs for {completion_len} sampled tokens",
                    own.len()
                )));
            }
            Some(if echo {
                let mut all = prompt_logprobs.clone();
                all.extend(own);
                all
            } else {
                own
            })
        } else {
            None
        };
        let text = match seq.text {
            Some(text) => text,
            None => tokenizer.decode(&seq.tokens, true)?,
        };
        let mut full_tokens = Vec::with_capacity(prompt.len() + completion_len);
        full_tokens.extend_from_slice(prompt);
        full_tokens.extend_from_slice(&seq.tokens);
        out.push(SampledCompletion {
            text,
            full_tokens,
            prompt_len: prompt.len(),
            finish_reason: seq.stop_reason,
            completion_len,
            inference_logprobs,
            logprobs_echoed: echo,
            routing_matrices: None,
        });
    }
    Ok(out)
}
