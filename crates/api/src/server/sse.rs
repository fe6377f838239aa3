//! Server-sent events: OpenAI completion and chat chunks from the engine's delta streams.
//!
//! The response body owns the engine streams, the request's admission permit and its
//! deadline: when the client goes away the body is dropped, which drops the streams, which
//! cancels the requests and frees their KV slots. A request with more prompts than its window
//! submits the next prompt as one finishes. Keep-alive comments (`:`) go out whenever no event
//! did for the configured interval: while the request waits in the engine's queue, behind a
//! long prefill, or between slow tokens.
//!
//! Metrics: each prompt's first token (vLLM's time to first token), the gap between successive
//! token events of each choice (inter-token latency), each prompt's end (end-to-end latency)
//! and each choice's finish reason; choices still running when the reply ends without an
//! engine error (client gone, deadline) count as `abort`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use infermux_core::{EngineError, GenerateStream, SamplingParams, StreamUpdate, TokenId};
use serde::Serialize;

use super::AppState;
use super::convert::{
    chat_logprobs, common_version, completion_logprobs, engine_prompt, finish_str,
    generated_logprobs, shown_logprobs, submit_stream,
};
use super::error::ApiError;
use super::limits::Permit;
use super::metrics::{ModelSeries, Tracked};
use super::openai::{
    ChatChunk, ChatChunkChoice, ChatDelta, CompletionChoice, CompletionResponse, Usage,
};
use crate::{SamplingClient, Tokenizer};

/// The last event of every stream.
const DONE: &str = "[DONE]";

/// Which chunk shapes a stream emits.
pub(crate) enum Flavor {
    /// `text_completion` chunks; `logprobs`: top alternatives per token; `echo`: the prompts.
    Completion {
        logprobs: Option<usize>,
        echo: Option<Vec<EchoPrompt>>,
    },
    /// `chat.completion.chunk` chunks, with `logprobs` when asked.
    Chat { logprobs: bool },
}

/// A prompt to echo before the generated text.
pub(crate) struct EchoPrompt {
    pub(crate) text: String,
    pub(crate) tokens: Vec<TokenId>,
}

/// What every chunk of one response shares.
pub(crate) struct StreamSpec {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// Choices per prompt.
    pub(crate) n: usize,
    pub(crate) include_usage: bool,
    pub(crate) flavor: Flavor,
    /// vLLM `return_token_ids`: each chunk's completion ids, the prompt's on the first.
    pub(crate) return_token_ids: bool,
    /// With `return_token_ids`: each prompt's ids, by prompt index.
    pub(crate) prompt_tokens: Vec<Vec<TokenId>>,
}

/// The prompts of a request not submitted yet, and how to submit them.
pub(crate) struct Submitter {
    pub(crate) client: SamplingClient,
    pub(crate) params: SamplingParams,
    /// `(prompt index, tokens)`, in submission order.
    pub(crate) queue: VecDeque<(usize, Vec<TokenId>)>,
}

type Tagged = (usize, Result<StreamUpdate, EngineError>);

enum Phase {
    Running,
    Done,
}

struct Run {
    spec: StreamSpec,
    streams: SelectAll<BoxStream<'static, Tagged>>,
    submitter: Submitter,
    tokenizer: Tokenizer,
    state: Arc<AppState>,
    _permit: Permit,
    arrived: Instant,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    prompt_tokens: usize,
    completion_tokens: usize,
    seen_prompt: Vec<bool>,
    /// Characters sent so far per choice (for `text_offset`).
    sent_chars: Vec<usize>,
    first_token: bool,
    /// vLLM series of the served model.
    series: ModelSeries,
    /// Per prompt: whether its first token came (for vLLM's per-prompt time to first token).
    prompt_started: Vec<bool>,
    /// Per submitted, unfinished prompt: counts its unfinished choices as aborted if dropped.
    tracked: Vec<Option<Tracked>>,
    /// Per choice: when its last token event was rendered.
    last_token: Vec<Option<Instant>>,
    /// Per prompt: the weight version its updates carry (once its first came).
    versions: Vec<Option<String>>,
    /// Prompt tokens served from the prefix cache, summed once per prompt.
    cached_tokens: usize,
    /// Per choice: whether its first chunk (which carries the prompt's ids) went out.
    ids_sent: Vec<bool>,
    phase: Phase,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.state.metrics.latency.observe(self.arrived.elapsed());
    }
}

fn tag(i: usize, s: GenerateStream) -> BoxStream<'static, Tagged> {
    StreamExt::map(s, move |item| (i, item)).boxed()
}

/// An SSE response streaming `streams` (tagged with their prompt index) and then the prompts
/// `submitter` still holds, as earlier ones finish.
#[allow(clippy::too_many_arguments)]
pub(crate) fn respond(
    state: Arc<AppState>,
    spec: StreamSpec,
    streams: Vec<(usize, GenerateStream)>,
    submitter: Submitter,
    tokenizer: Tokenizer,
    permit: Permit,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Response {
    let prompts = streams.len() + submitter.queue.len();
    let choices = prompts * spec.n;
    let keep_alive = state.limits.sse_keep_alive;
    let series = state.metrics.model_series(&spec.model);
    let mut tracked: Vec<Option<Tracked>> = (0..prompts).map(|_| None).collect();
    for (i, _) in &streams {
        if let Some(t) = tracked.get_mut(*i) {
            *t = Some(series.track(spec.n));
        }
    }
    let run = Run {
        streams: stream::select_all(streams.into_iter().map(|(i, s)| tag(i, s))),
        submitter,
        spec,
        tokenizer,
        state,
        _permit: permit,
        arrived,
        deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
        prompt_tokens: 0,
        completion_tokens: 0,
        seen_prompt: vec![false; prompts],
        sent_chars: vec![0; choices],
        first_token: true,
        series,
        prompt_started: vec![false; prompts],
        tracked,
        last_token: vec![None; choices],
        versions: vec![None; prompts],
        cached_tokens: 0,
        ids_sent: vec![false; choices],
        phase: Phase::Running,
    };
    let events = stream::unfold(run, |mut run| async move {
        let batch = run.next_chunk().await?;
        Some((stream::iter(batch), run))
    })
    .flatten();
    sse_reply(events, keep_alive)
}

/// An SSE reply of `data` payloads (one event each), with keep-alive comments every
/// `keep_alive` when set and proxy buffering off (`X-Accel-Buffering: no`).
pub(crate) fn sse_reply(
    data: impl futures_util::Stream<Item = String> + Send + 'static,
    keep_alive: Option<std::time::Duration>,
) -> Response {
    let events = data.map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    let mut response = match keep_alive {
        Some(every) => Sse::new(events)
            .keep_alive(KeepAlive::new().interval(every))
            .into_response(),
        None => Sse::new(events).into_response(),
    };
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    debug_assert!(response.headers().contains_key(header::CONTENT_TYPE));
    response
}

/// One event's data: the JSON of `value`.
fn event(out: &mut Vec<String>, value: &impl Serialize) {
    out.push(serde_json::to_string(value).unwrap_or_default());
}

impl Run {
    /// The data of the next events (at least one), or `None` after the last.
    async fn next_chunk(&mut self) -> Option<Vec<String>> {
        match self.phase {
            Phase::Done => None,
            Phase::Running => loop {
                let deadline = async {
                    match self.deadline.as_mut() {
                        Some(sleep) => sleep.await,
                        None => std::future::pending().await,
                    }
                };
                let item = tokio::select! {
                    item = self.streams.next() => item,
                    () = deadline => {
                        let timeout = self.state.admission.timeout_error();
                        return Some(self.finish_with_error(&timeout));
                    }
                };
                match item {
                    None if !self.submitter.queue.is_empty() => {
                        if let Err(e) = self.submit_next().await {
                            return Some(self.finish_with_error(&e));
                        }
                    }
                    None => {
                        self.phase = Phase::Done;
                        let mut out = Vec::new();
                        if self.spec.include_usage {
                            let usage = Usage::new(
                                self.prompt_tokens,
                                self.completion_tokens,
                                self.cached_tokens,
                            );
                            self.usage_chunk(&mut out, usage);
                        }
                        out.push(DONE.to_string());
                        return Some(out);
                    }
                    Some((p, Err(e))) => {
                        if let Some(t) = self.tracked.get_mut(p).and_then(Option::take) {
                            t.end(false, self.arrived.elapsed());
                        }
                        return Some(self.finish_with_error(&ApiError::from_engine(&e)));
                    }
                    Some((p, Ok(update))) => {
                        let finished = update.finished;
                        let mut out = self.render(p, update);
                        if finished && let Err(e) = self.submit_next().await {
                            out.extend(self.finish_with_error(&e));
                            return Some(out);
                        }
                        if !out.is_empty() {
                            return Some(out);
                        }
                    }
                }
            },
        }
    }

    fn finish_with_error(&mut self, err: &ApiError) -> Vec<String> {
        self.phase = Phase::Done;
        vec![
            serde_json::to_string(&err.body).unwrap_or_default(),
            DONE.to_string(),
        ]
    }

    /// Submits the next waiting prompt, if any (a prompt of this request just finished).
    async fn submit_next(&mut self) -> Result<(), ApiError> {
        let Some((i, tokens)) = self.submitter.queue.pop_front() else {
            return Ok(());
        };
        let params = self.submitter.params.clone();
        let stream = submit_stream(&self.submitter.client, tokens, params).await?;
        self.streams.push(tag(i, stream));
        if let Some(t) = self.tracked.get_mut(i) {
            *t = Some(self.series.track(self.spec.n));
        }
        Ok(())
    }

    /// The chunks of one engine update of prompt `p`. A prompt's first update opens its
    /// choices (chat: the role chunks; `echo`: the prompt), so every chunk carries the weight
    /// version the engine reports.
    fn render(&mut self, p: usize, update: StreamUpdate) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.spec.n;
        let now = Instant::now();
        let version = update.weight_version.clone();
        if !self.seen_prompt[p] {
            self.seen_prompt[p] = true;
            self.prompt_tokens += update.prompt_len;
            self.cached_tokens += update.cached_prompt_tokens;
            self.versions[p] = Some(version.clone());
            if let Flavor::Chat { .. } = self.spec.flavor {
                let prompt_ids = self.prompt_ids(p, update.prompt_len);
                for c in 0..n {
                    let delta = ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    };
                    let chunk = ChunkParts {
                        token_ids: None,
                        prompt_token_ids: prompt_ids.clone(),
                        version: &version,
                    };
                    self.chat_chunk(&mut out, p * n + c, delta, None, None, chunk);
                }
            }
            self.echo(&mut out, p, &update);
        }
        for s in update.sequences {
            if s.index >= n {
                continue;
            }
            let index = p * n + s.index;
            if self.first_token && !s.tokens.is_empty() {
                self.first_token = false;
                self.state.metrics.ttft.observe(self.arrived.elapsed());
            }
            if !s.tokens.is_empty() {
                if !self.prompt_started[p] {
                    self.prompt_started[p] = true;
                    self.series.first_token(now - self.arrived);
                }
                if let Some(before) = self.last_token[index].replace(now) {
                    self.series.token_gap(now - before);
                }
            }
            if let Some(reason) = s.finish_reason {
                self.series.finished(reason.as_openai_str());
                if let Some(t) = &mut self.tracked[p] {
                    t.choice_finished();
                }
            }
            self.completion_tokens += s.tokens.len();
            if s.tokens.is_empty() && s.text.is_empty() && s.finish_reason.is_none() {
                continue;
            }
            let finish = finish_str(s.finish_reason);
            let logprobs = shown_logprobs(s.logprobs, s.processed_logprobs);
            let token_ids = self.spec.return_token_ids.then(|| s.tokens.clone());
            match &self.spec.flavor {
                Flavor::Completion { logprobs: top, .. } => {
                    let lp = top.map(|_| {
                        generated_logprobs(
                            &self.tokenizer,
                            &s.tokens,
                            &logprobs,
                            s.top_logprobs.as_deref(),
                            self.sent_chars[index],
                        )
                    });
                    self.sent_chars[index] += s.text.chars().count();
                    let chunk = ChunkParts {
                        token_ids,
                        prompt_token_ids: self.first_ids(p, index, update.prompt_len),
                        version: &version,
                    };
                    self.completion_chunk(&mut out, index, s.text, lp, finish, chunk);
                }
                Flavor::Chat { logprobs: want } => {
                    let lp = want.then(|| {
                        chat_logprobs(
                            &self.tokenizer,
                            &s.tokens,
                            &logprobs,
                            s.top_logprobs.as_deref(),
                        )
                    });
                    let delta = ChatDelta {
                        role: None,
                        content: (!s.text.is_empty() || finish.is_none()).then_some(s.text),
                    };
                    let chunk = ChunkParts {
                        token_ids,
                        prompt_token_ids: None,
                        version: &version,
                    };
                    self.chat_chunk(&mut out, index, delta, lp, finish, chunk);
                }
            }
        }
        if update.finished
            && let Some(t) = self.tracked.get_mut(p).and_then(Option::take)
        {
            t.end(true, now - self.arrived);
        }
        out
    }

    /// With `return_token_ids`: the ids of prompt `p` as the engine ran them.
    fn prompt_ids(&self, p: usize, prompt_len: usize) -> Option<Vec<TokenId>> {
        if !self.spec.return_token_ids {
            return None;
        }
        let tokens = self.spec.prompt_tokens.get(p)?;
        Some(engine_prompt(tokens, prompt_len).to_vec())
    }

    /// The prompt's ids for choice `index`'s first chunk (vLLM's completions place), once.
    fn first_ids(&mut self, p: usize, index: usize, prompt_len: usize) -> Option<Vec<TokenId>> {
        if std::mem::replace(&mut self.ids_sent[index], true) {
            return None;
        }
        self.prompt_ids(p, prompt_len)
    }

    /// With `echo`: each choice of prompt `p` first gets the prompt (and its logprobs).
    fn echo(&mut self, out: &mut Vec<String>, p: usize, update: &StreamUpdate) {
        let Flavor::Completion {
            logprobs,
            echo: Some(prompts),
        } = &self.spec.flavor
        else {
            return;
        };
        let prompt = &prompts[p];
        let lp = logprobs.map(|k| {
            let lps = update.prompt_logprobs.clone().unwrap_or_default();
            completion_logprobs(
                &self.tokenizer,
                &prompt.tokens,
                &lps,
                update.topk_prompt_logprobs.as_deref(),
                k,
                0,
            )
        });
        let text = prompt.text.clone();
        for c in 0..self.spec.n {
            let index = p * self.spec.n + c;
            self.sent_chars[index] = text.chars().count();
            let chunk = ChunkParts {
                token_ids: self.spec.return_token_ids.then(Vec::new),
                prompt_token_ids: self.first_ids(p, index, update.prompt_len),
                version: &update.weight_version,
            };
            self.completion_chunk(out, index, text.clone(), lp.clone(), None, chunk);
        }
    }

    fn usage_field(&self) -> Option<Option<Usage>> {
        self.spec.include_usage.then_some(None)
    }

    fn completion_chunk(
        &self,
        out: &mut Vec<String>,
        index: usize,
        text: String,
        logprobs: Option<super::openai::CompletionLogprobs>,
        finish_reason: Option<&'static str>,
        parts: ChunkParts<'_>,
    ) {
        event(
            out,
            &CompletionResponse {
                id: self.spec.id.clone(),
                object: "text_completion",
                created: self.spec.created,
                model: self.spec.model.clone(),
                choices: vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason,
                    token_ids: parts.token_ids,
                    prompt_logprobs: None,
                    prompt_token_ids: parts.prompt_token_ids,
                    weight_version: parts.version.to_string(),
                }],
                usage: self.usage_field(),
                weight_version: Some(parts.version.to_string()),
            },
        );
    }

    fn chat_chunk(
        &self,
        out: &mut Vec<String>,
        index: usize,
        delta: ChatDelta,
        logprobs: Option<super::openai::ChatLogprobs>,
        finish_reason: Option<&'static str>,
        parts: ChunkParts<'_>,
    ) {
        event(
            out,
            &ChatChunk {
                id: self.spec.id.clone(),
                object: "chat.completion.chunk",
                created: self.spec.created,
                model: self.spec.model.clone(),
                choices: vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason,
                    token_ids: parts.token_ids,
                }],
                usage: self.usage_field(),
                prompt_token_ids: parts.prompt_token_ids,
                weight_version: parts.version.to_string(),
            },
        );
    }

    /// The last chunk of `include_usage`: no choices, the request's usage, and the weight
    /// version all its prompts ran under (`null` for completions whose prompts differ).
    fn usage_chunk(&self, out: &mut Vec<String>, usage: Usage) {
        let version = common_version(self.versions.iter().flatten().map(String::as_str));
        match self.spec.flavor {
            Flavor::Completion { .. } => event(
                out,
                &CompletionResponse {
                    id: self.spec.id.clone(),
                    object: "text_completion",
                    created: self.spec.created,
                    model: self.spec.model.clone(),
                    choices: Vec::new(),
                    usage: Some(Some(usage)),
                    weight_version: version,
                },
            ),
            Flavor::Chat { .. } => event(
                out,
                &ChatChunk {
                    id: self.spec.id.clone(),
                    object: "chat.completion.chunk",
                    created: self.spec.created,
                    model: self.spec.model.clone(),
                    choices: Vec::new(),
                    usage: Some(Some(usage)),
                    prompt_token_ids: None,
                    weight_version: version.unwrap_or_default(),
                },
            ),
        }
    }
}

/// What a chunk adds beyond its text: token ids and the weight version.
struct ChunkParts<'a> {
    token_ids: Option<Vec<TokenId>>,
    prompt_token_ids: Option<Vec<TokenId>>,
    version: &'a str,
}
