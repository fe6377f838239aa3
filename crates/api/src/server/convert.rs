//! From OpenAI requests to engine calls and back: sampling parameters, prompts, collected
//! generations and logprob objects.

use std::time::Instant;

use futures_util::StreamExt;
use infermux_core::{
    EngineError, FinishReason, GenerateStream, GuidedDecodingParams, LogprobsMode, ModelInput,
    OutputKind, SamplingParams, TokenId, TopLogprobs, ValidationError,
};

use super::error::ApiError;
use super::metrics::Metrics;
use super::openai::{
    ChatLogprobs, ChatMessageIn, ChatRequest, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs,
    Knobs, MessageContent, PromptInput, PromptLogprob, PromptLogprobsOut, PromptPosition, TopMap,
};
use crate::{ChatMessage, SamplingClient, Tokenizer};

/// Most top alternatives chat `top_logprobs` and completions `logprobs` may ask for (OpenAI's
/// chat limit, vLLM's default `max_logprobs`).
pub(crate) const OPENAI_MAX_TOP_LOGPROBS: usize = 20;

/// Preparations running at once: enough that a few slow grammar compiles do not hold up a
/// plain request, few enough that a flood of big bodies cannot crowd the engine thread off
/// the cores (tokio's blocking pool alone would run up to 512).
fn preparation_places() -> &'static tokio::sync::Semaphore {
    static PLACES: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PLACES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        tokio::sync::Semaphore::new((4 * cores).max(8))
    })
}

/// Runs `f` on tokio's blocking pool, at most [`preparation_places`] at once: request
/// preparation (tokenizing, chat templates, stop and grammar compilation, up to the grammar
/// engine's compile limit) must not stall the async workers that serve every other
/// connection.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _place = preparation_places()
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        if e.is_panic() {
            ApiError::internal("preparing the request panicked")
        } else {
            ApiError::internal("the server is shutting down")
        }
    })
}

/// Submits one prompt as an engine stream, prepared off the async workers; a request the
/// engine refuses at submit (validation, KV budget, shutdown) is the error, before any output.
pub(crate) async fn submit_stream(
    client: &SamplingClient,
    prompt: Vec<TokenId>,
    params: SamplingParams,
) -> Result<GenerateStream, ApiError> {
    let client = client.clone();
    let mut stream =
        blocking(move || client.sample_stream(ModelInput::from_ints(prompt), params)).await?;
    match stream.take_rejection() {
        Some(err) => Err(ApiError::from_engine(&err)),
        None => Ok(stream),
    }
}

/// The checks the engine would make of each prompt that do not depend on the request's
/// parameters (empty, token ids past the vocabulary), made for all prompts before any is
/// submitted, so that a request whose later prompts are submitted later still fails up front.
pub(crate) fn check_prompts(prompts: &[Prompt], vocab_size: usize) -> Result<(), ApiError> {
    for p in prompts {
        if p.tokens.is_empty() {
            return Err(EngineError::from(ValidationError::EmptyPrompt).into());
        }
        if let Some((position, &token)) = p
            .tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab_size)
        {
            let err = ValidationError::TokenOutOfRange {
                token,
                position,
                vocab_size,
            };
            return Err(EngineError::from(err).into());
        }
    }
    Ok(())
}

/// The order to submit `prompts` in: the longest first (if it fits the context and the KV
/// budget, every other does, so those rejections come before any output), then the rest in
/// their order.
pub(crate) fn submission_order(prompts: &[Prompt]) -> Vec<usize> {
    let Some(longest) =
        (0..prompts.len()).max_by_key(|&i| (prompts[i].tokens.len(), std::cmp::Reverse(i)))
    else {
        return Vec::new();
    };
    std::iter::once(longest)
        .chain((0..prompts.len()).filter(|&i| i != longest))
        .collect()
}

/// Prompts of one request kept in the engine at once: half of the engine's sequence slots
/// (at least one prompt), so a later request finds free slots and enters the engine at once.
pub(crate) fn prompt_window(max_num_seqs: usize, samples: usize) -> usize {
    ((max_num_seqs / 2).max(1) / samples.max(1)).max(1)
}

/// Rejects a request of `prompts` × `samples` sequences past `cap` (naming `prompt` when the
/// prompt count alone exceeds it, else `samples_field`).
pub(crate) fn check_sequences(
    prompts: usize,
    samples: usize,
    cap: usize,
    samples_field: &str,
) -> Result<(), ApiError> {
    if prompts > cap {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {cap} prompts per request (--max-sequences-per-request), got {prompts}"
            ),
        ));
    }
    match prompts.checked_mul(samples) {
        Some(total) if total <= cap => Ok(()),
        total => Err(ApiError::invalid(
            samples_field,
            format!(
                "{prompts} prompt(s) × {samples} samples = {} sequences, more than the {cap} per request (--max-sequences-per-request)",
                total.map_or_else(|| "too many".to_string(), |t| t.to_string())
            ),
        )),
    }
}

/// The engine parameters of a request's shared fields; `max_tokens` as resolved by the caller.
pub(crate) fn sampling_params(
    k: &Knobs,
    max_tokens: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let logit_bias = match &k.logit_bias {
        None => None,
        Some(map) => Some(
            map.iter()
                .map(|(id, bias)| {
                    id.trim()
                        .parse::<TokenId>()
                        .map(|id| (id, *bias))
                        .map_err(|_| {
                            ApiError::invalid(
                                "logit_bias",
                                format!("invalid `logit_bias`: key {id:?} is not a token id"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    if k.return_hidden_states == Some(true) {
        return Err(ApiError::invalid(
            "return_hidden_states",
            "`return_hidden_states: true` is not supported: replies carry no hidden states",
        ));
    }
    if let Some(p) = k.priority.filter(|p| *p != 0) {
        return Err(ApiError::invalid(
            "priority",
            format!("`priority` {p} is not supported: the scheduler is FIFO (only 0 is accepted)"),
        ));
    }
    let include_stop = match (k.include_stop_str_in_output, k.no_stop_trim) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "no_stop_trim",
                "`no_stop_trim` and `include_stop_str_in_output` mean the same and disagree",
            ));
        }
        (a, b) => a.or(b).unwrap_or(false),
    };
    Ok(SamplingParams {
        n: k.n.unwrap_or(1),
        temperature: k.temperature.unwrap_or(d.temperature),
        top_p: k.top_p.unwrap_or(d.top_p),
        top_k: k.top_k.unwrap_or(d.top_k),
        min_p: k.min_p.unwrap_or(d.min_p),
        repetition_penalty: k.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: k.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: k.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias,
        seed: k.seed,
        stop: k.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        stop_token_ids: k.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: k.ignore_eos.unwrap_or(false),
        min_tokens: k.min_tokens.unwrap_or(0),
        max_tokens,
        skip_special_tokens: k.skip_special_tokens.unwrap_or(true),
        include_stop_str_in_output: include_stop,
        spaces_between_special_tokens: k
            .spaces_between_special_tokens
            .unwrap_or(d.spaces_between_special_tokens),
        allowed_token_ids: k.allowed_token_ids.clone(),
        bad_words: k.bad_words.clone().unwrap_or_default(),
        truncate_prompt_tokens: k.truncate_prompt_tokens,
        guided_decoding: guided(k)?,
        logprobs_mode: logprobs_mode(k.logprobs_mode.as_deref())?,
        ..d
    })
}

/// vLLM's `logprobs_mode` names as the engine's mode: `raw_logprobs` (the default) or
/// `processed_logprobs`; the logits modes are refused (replies carry logprobs only).
fn logprobs_mode(mode: Option<&str>) -> Result<LogprobsMode, ApiError> {
    match mode {
        None | Some("raw_logprobs") => Ok(LogprobsMode::Raw),
        Some("processed_logprobs") => Ok(LogprobsMode::RawAndProcessed),
        Some(m @ ("raw_logits" | "processed_logits")) => Err(ApiError::invalid(
            "logprobs_mode",
            format!(
                "`logprobs_mode` {m:?} is unsupported: replies carry logprobs, not logits (raw_logprobs or processed_logprobs)"
            ),
        )),
        Some(other) => Err(ApiError::invalid(
            "logprobs_mode",
            format!("unknown `logprobs_mode` {other:?} (raw_logprobs or processed_logprobs)"),
        )),
    }
}

/// Refuses top alternatives under `processed_logprobs`: the engine reports the processed
/// logprob of each sampled token only, not a processed top-k.
pub(crate) fn check_processed_top(params: &SamplingParams) -> Result<(), ApiError> {
    match params.logprobs {
        Some(k) if k > 0 && params.logprobs_mode == LogprobsMode::RawAndProcessed => {
            Err(ApiError::invalid(
                "logprobs_mode",
                format!(
                    "`logprobs_mode: processed_logprobs` gives each sampled token's processed logprob; top alternatives ({k} asked) exist only for raw_logprobs"
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// vLLM's `prompt_logprobs`: top alternatives per prompt position, 0 to
/// [`OPENAI_MAX_TOP_LOGPROBS`]; not with `stream` (as vLLM: stream chunks have no place for
/// them).
pub(crate) fn prompt_logprobs_count(
    k: Option<i64>,
    stream: bool,
) -> Result<Option<usize>, ApiError> {
    let Some(k) = k else {
        return Ok(None);
    };
    let max = OPENAI_MAX_TOP_LOGPROBS as i64;
    if !(0..=max).contains(&k) {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            format!("`prompt_logprobs` must be between 0 and {max}, got {k}"),
        ));
    }
    if stream {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            "`prompt_logprobs` are not available when `stream` is true",
        ));
    }
    Ok(Some(k as usize))
}

/// The prompt tokens the engine ran: the last `prompt_len` (after `truncate_prompt_tokens`).
pub(crate) fn engine_prompt(tokens: &[TokenId], prompt_len: usize) -> &[TokenId] {
    &tokens[tokens.len().saturating_sub(prompt_len)..]
}

/// vLLM's `-9999.0` for a logprob JSON cannot hold.
fn clamp_logprob(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

/// vLLM's `prompt_logprobs` of `tokens` (the prompt the engine ran) from the engine's prompt
/// logprobs and top alternatives: per position the token itself (its rank its place in the
/// alternatives when there, else unknown: the engine returns no full ordering), then the best
/// `k` alternatives ranked 1..k.
pub(crate) fn prompt_logprobs_out(
    tokenizer: &Tokenizer,
    tokens: &[TokenId],
    logprobs: &[Option<f32>],
    top: Option<&[Option<TopLogprobs>]>,
    k: usize,
) -> PromptLogprobsOut {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let lp = logprobs.get(i).copied().flatten()?;
            let alts = top
                .and_then(|t| t.get(i))
                .and_then(Option::as_ref)
                .map_or(&[][..], Vec::as_slice);
            let rank = alts.iter().position(|&(alt, _)| alt == id).map(|p| p + 1);
            let entry = |id: TokenId, logprob: f32, rank: Option<usize>| {
                let decoded_token = token_text(tokenizer, id);
                let logprob = clamp_logprob(logprob);
                (
                    id,
                    PromptLogprob {
                        logprob,
                        rank,
                        decoded_token,
                    },
                )
            };
            let mut position = vec![entry(id, lp, rank)];
            position.extend(
                alts.iter()
                    .take(k)
                    .enumerate()
                    .filter(|&(_, &(alt, _))| alt != id)
                    .map(|(r, &(alt, alt_lp))| entry(alt, alt_lp, Some(r + 1))),
            );
            Some(PromptPosition(position))
        })
        .collect()
}

/// The version every generation ran under, `None` when they differ (a many-prompt request
/// whose later prompts entered the engine after a weight update).
pub(crate) fn common_version<'a>(mut versions: impl Iterator<Item = &'a str>) -> Option<String> {
    let first = versions.next()?;
    versions.all(|v| v == first).then(|| first.to_string())
}

/// The guided-decoding constraint of `response_format` or vLLM's `guided_*` fields.
fn guided(k: &Knobs) -> Result<Option<GuidedDecodingParams>, ApiError> {
    let mut g = GuidedDecodingParams::default();
    if let Some(format) = &k.response_format {
        match format.kind.as_str() {
            "text" => {}
            "json_object" => g.json_object = Some(true),
            "json_schema" => {
                let schema = format
                    .json_schema
                    .as_ref()
                    .and_then(|j| j.schema.clone())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "response_format.json_schema.schema",
                            "`response_format` of type json_schema needs `json_schema.schema`",
                        )
                    })?;
                g.json = Some(schema);
            }
            other => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!(
                        "unsupported `response_format.type` {other:?} (text, json_object or json_schema)"
                    ),
                ));
            }
        }
    }
    if let Some(schema) = &k.guided_json {
        g.json = Some(schema.clone());
    }
    g.regex.clone_from(&k.guided_regex);
    g.choice.clone_from(&k.guided_choice);
    g.grammar.clone_from(&k.guided_grammar);
    let any = g.json.is_some()
        || g.json_object.is_some()
        || g.regex.is_some()
        || g.choice.is_some()
        || g.grammar.is_some();
    Ok(any.then_some(g))
}

/// A prompt: its token ids and, when it came as text, that text.
pub(crate) struct Prompt {
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) text: Option<String>,
}

/// The prompts of a completions request, tokenized.
/// `add_special_tokens` lets the tokenizer add its BOS/EOS template to text prompts.
pub(crate) fn completion_prompts(
    tokenizer: &Tokenizer,
    input: PromptInput,
    add_special_tokens: bool,
) -> Result<Vec<Prompt>, ApiError> {
    let encode = |text: String| -> Result<Prompt, ApiError> {
        let tokens = tokenizer
            .encode(&text, add_special_tokens)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        Ok(Prompt {
            tokens,
            text: Some(text),
        })
    };
    let ids = |tokens: Vec<TokenId>| Prompt { tokens, text: None };
    let prompts = match input {
        PromptInput::Text(t) => vec![encode(t)?],
        PromptInput::Tokens(t) => vec![ids(t)],
        PromptInput::Texts(ts) => ts.into_iter().map(encode).collect::<Result<_, _>>()?,
        PromptInput::TokenLists(ls) => ls.into_iter().map(ids).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` must hold at least one prompt",
        ));
    }
    Ok(prompts)
}

/// How a chat request's messages become its prompt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChatRender {
    /// Open the assistant's turn after the messages.
    pub(crate) add_generation_prompt: bool,
    /// Continue the final assistant message: render without a generation prompt and cut
    /// what the template writes after that message's text (its end-of-turn), as vLLM does.
    pub(crate) continue_final_message: bool,
    /// Let the tokenizer add its BOS/EOS template (chat templates usually write them).
    pub(crate) add_special_tokens: bool,
}

impl ChatRender {
    /// The render options of `req`; `continue_final_message` excludes an explicit
    /// `add_generation_prompt: true`.
    pub(crate) fn of(req: &ChatRequest) -> Result<Self, ApiError> {
        let continue_final_message = req.continue_final_message.unwrap_or(false);
        if continue_final_message && req.add_generation_prompt == Some(true) {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` and `add_generation_prompt` cannot both be true",
            ));
        }
        Ok(Self {
            add_generation_prompt: !continue_final_message
                && req.add_generation_prompt.unwrap_or(true),
            continue_final_message,
            add_special_tokens: req.add_special_tokens.unwrap_or(false),
        })
    }
}

/// The chat template applied to `messages`, tokenized.
pub(crate) fn chat_prompt(
    tokenizer: &Tokenizer,
    messages: &[ChatMessageIn],
    render: ChatRender,
) -> Result<Vec<TokenId>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut conversation = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content"),
                                format!(
                                    "unsupported content part {kind:?}: only text parts are supported"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        conversation.push(ChatMessage::new(m.role.clone(), content));
    }
    let mut rendered = tokenizer
        .apply_chat_template(&conversation, render.add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if render.continue_final_message {
        let last = conversation.last().expect("checked non-empty above");
        if last.role != "assistant" || last.content.is_empty() {
            return Err(ApiError::invalid(
                "continue_final_message",
                "`continue_final_message` needs a final assistant message with text",
            ));
        }
        let Some(at) = rendered.rfind(last.content.as_str()) else {
            return Err(ApiError::invalid(
                "continue_final_message",
                "the chat template does not write the final message's text verbatim",
            ));
        };
        rendered.truncate(at + last.content.len());
    }
    tokenizer
        .encode(&rendered, render.add_special_tokens)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// Chat `logprobs`/`top_logprobs` as the engine's `logprobs` count.
pub(crate) fn chat_logprobs_count(
    logprobs: Option<bool>,
    top: Option<usize>,
) -> Result<Option<usize>, ApiError> {
    match (logprobs.unwrap_or(false), top) {
        (_, Some(k)) if k > OPENAI_MAX_TOP_LOGPROBS => Err(ApiError::invalid(
            "top_logprobs",
            format!("`top_logprobs` must be at most {OPENAI_MAX_TOP_LOGPROBS}, got {k}"),
        )),
        (false, Some(k)) if k > 0 => Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        )),
        (true, k) => Ok(Some(k.unwrap_or(0))),
        (false, _) => Ok(None),
    }
}

/// One finished choice.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChoiceOut {
    pub(crate) tokens: Vec<TokenId>,
    /// Raw logprobs, or the processed ones under `LogprobsMode::RawAndProcessed` (what the
    /// request's `logprobs_mode` shows).
    pub(crate) logprobs: Vec<f32>,
    pub(crate) top: Option<Vec<TopLogprobs>>,
    pub(crate) text: String,
    pub(crate) finish: Option<FinishReason>,
}

/// The finished generation of one prompt.
#[derive(Debug, Clone, Default)]
pub(crate) struct Generation {
    pub(crate) prompt_len: usize,
    pub(crate) choices: Vec<ChoiceOut>,
    pub(crate) prompt_logprobs: Option<Vec<Option<f32>>>,
    pub(crate) topk_prompt: Option<Vec<Option<TopLogprobs>>>,
    /// The weight version it ran under.
    pub(crate) weight_version: String,
    /// Its prompt tokens served from the prefix cache.
    pub(crate) cached_prompt_tokens: usize,
}

/// The logprobs a reply shows for sampled tokens: the processed ones when the request asked
/// for `processed_logprobs` (and the engine sent them), else the raw ones.
pub(crate) fn shown_logprobs(raw: Vec<f32>, processed: Option<Vec<f32>>) -> Vec<f32> {
    processed.unwrap_or(raw)
}

impl Generation {
    /// Tokens generated over all choices.
    pub(crate) fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens.len()).sum()
    }
}

/// Runs one prompt to completion. Streams deltas from the engine (so the time to the first
/// token is measured), or, with `best_of > n`, waits for the final output.
pub(crate) async fn generate(
    client: &SamplingClient,
    prompt: Vec<TokenId>,
    mut params: SamplingParams,
    arrived: Instant,
    metrics: &Metrics,
) -> Result<Generation, ApiError> {
    let n = params.n;
    let prompt_len = params
        .truncate_prompt_tokens
        .map_or(prompt.len(), |k| k.min(prompt.len()));
    if params.samples_drawn() > n {
        let c = client.clone();
        let reply =
            blocking(move || c.sample(ModelInput::from_ints(prompt), n, params, false, 0)).await?;
        let r = reply.await?;
        metrics.ttft.observe(arrived.elapsed());
        return Ok(Generation {
            prompt_len,
            choices: r
                .sequences
                .into_iter()
                .map(|s| ChoiceOut {
                    tokens: s.tokens,
                    logprobs: shown_logprobs(s.logprobs.unwrap_or_default(), s.processed_logprobs),
                    top: s.top_logprobs,
                    text: s.text.unwrap_or_default(),
                    finish: Some(s.finish_reason),
                })
                .collect(),
            prompt_logprobs: r.prompt_logprobs,
            topk_prompt: r.topk_prompt_logprobs,
            weight_version: r.policy_version,
            cached_prompt_tokens: r.prompt_cache_hit_tokens,
        });
    }
    params.output_kind = OutputKind::Delta;
    let mut stream = submit_stream(client, prompt, params).await?;
    let mut out = Generation {
        prompt_len,
        choices: vec![ChoiceOut::default(); n],
        ..Generation::default()
    };
    let mut first = true;
    while let Some(update) = StreamExt::next(&mut stream).await {
        let update = update?;
        out.prompt_len = update.prompt_len;
        out.weight_version = update.weight_version;
        out.cached_prompt_tokens = update.cached_prompt_tokens;
        if update.prompt_logprobs.is_some() {
            out.prompt_logprobs = update.prompt_logprobs;
        }
        if update.topk_prompt_logprobs.is_some() {
            out.topk_prompt = update.topk_prompt_logprobs;
        }
        for s in update.sequences {
            if first && !s.tokens.is_empty() {
                first = false;
                metrics.ttft.observe(arrived.elapsed());
            }
            let Some(c) = out.choices.get_mut(s.index) else {
                continue;
            };
            c.tokens.extend(s.tokens);
            c.logprobs
                .extend(shown_logprobs(s.logprobs, s.processed_logprobs));
            if let Some(top) = s.top_logprobs {
                c.top.get_or_insert_with(Vec::new).extend(top);
            }
            c.text.push_str(&s.text);
            if s.finish_reason.is_some() {
                c.finish = s.finish_reason;
            }
        }
        if update.finished {
            break;
        }
    }
    Ok(out)
}

/// The text of one token (special tokens spelled out).
pub(crate) fn token_text(tokenizer: &Tokenizer, id: TokenId) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn top_map(tokenizer: &Tokenizer, top: &TopLogprobs, k: usize) -> TopMap {
    TopMap(
        top.iter()
            .take(k)
            .map(|(id, lp)| (token_text(tokenizer, *id), *lp))
            .collect(),
    )
}

/// Completions `logprobs` of `tokens` with at most `k` top alternatives per token (the
/// engine may have sent more for `prompt_logprobs`), offsets starting at `offset` characters.
pub(crate) fn completion_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[TokenId],
    logprobs: &[Option<f32>],
    top: Option<&[Option<TopLogprobs>]>,
    k: usize,
    offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for (i, &id) in tokens.iter().enumerate() {
        let text = token_text(tokenizer, id);
        out.text_offset.push(at);
        at += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(logprobs.get(i).copied().flatten());
        out.top_logprobs.push(
            top.and_then(|t| t.get(i))
                .and_then(Option::as_ref)
                .map(|t| top_map(tokenizer, t, k)),
        );
    }
    out
}

/// Completions `logprobs` of generated tokens.
pub(crate) fn generated_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[TokenId],
    logprobs: &[f32],
    top: Option<&[TopLogprobs]>,
    offset: usize,
) -> CompletionLogprobs {
    let lps: Vec<Option<f32>> = logprobs.iter().copied().map(Some).collect();
    let top: Option<Vec<Option<TopLogprobs>>> = top.map(|t| t.iter().cloned().map(Some).collect());
    completion_logprobs(tokenizer, tokens, &lps, top.as_deref(), usize::MAX, offset)
}

/// Chat `logprobs` of generated tokens.
pub(crate) fn chat_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[TokenId],
    logprobs: &[f32],
    top: Option<&[TopLogprobs]>,
) -> ChatLogprobs {
    let content = tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| ChatTokenLogprob {
            bytes: tokenizer.token_bytes(id),
            token: token_text(tokenizer, id),
            logprob: logprobs.get(i).copied().unwrap_or(f32::NAN),
            top_logprobs: top
                .and_then(|t| t.get(i))
                .map(|alts| {
                    alts.iter()
                        .map(|(alt, lp)| ChatTopLogprob {
                            bytes: tokenizer.token_bytes(*alt),
                            token: token_text(tokenizer, *alt),
                            logprob: *lp,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    ChatLogprobs { content }
}

/// OpenAI's `finish_reason`.
pub(crate) fn finish_str(f: Option<FinishReason>) -> Option<&'static str> {
    f.map(FinishReason::as_openai_str)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh request id with `prefix` (`cmpl`, `chatcmpl`).
pub(crate) fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{:08x}{n:06x}", nanos ^ (std::process::id() << 8))
}
