//! Server-sent events: OpenAI completion and chat chunks from the engine's delta streams.
//!
//! The response body owns the engine streams, the request's concurrency permit and its
//! deadline: when the client goes away the body is dropped, which drops the streams, which
//! cancels the requests and frees their KV slots.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use infermux_core::{EngineError, GenerateStream, StreamUpdate, TokenId};
use serde::Serialize;

use super::AppState;
use super::convert::{chat_logprobs, completion_logprobs, finish_str, generated_logprobs};
use super::error::ApiError;
use super::limits::Permit;
use super::openai::{
    ChatChunk, ChatChunkChoice, ChatDelta, CompletionChoice, CompletionResponse, Usage,
};
use crate::Tokenizer;

/// The last event of every stream.
const DONE: &str = "data: [DONE]\n\n";

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
}

type Tagged = (usize, Result<StreamUpdate, EngineError>);

enum Phase {
    Start,
    Running,
    Done,
}

struct Run {
    spec: StreamSpec,
    streams: SelectAll<BoxStream<'static, Tagged>>,
    prompts: usize,
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
    phase: Phase,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.state.metrics.latency.observe(self.arrived.elapsed());
    }
}

/// An SSE response streaming `streams` (one per prompt, in prompt order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn respond(
    state: Arc<AppState>,
    spec: StreamSpec,
    streams: Vec<GenerateStream>,
    tokenizer: Tokenizer,
    permit: Permit,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Response {
    let prompts = streams.len();
    let choices = prompts * spec.n;
    let run = Run {
        streams: stream::select_all(
            streams
                .into_iter()
                .enumerate()
                .map(|(i, s)| StreamExt::map(s, move |item| (i, item)).boxed()),
        ),
        prompts,
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
        phase: Phase::Start,
    };
    let body = stream::unfold(run, |mut run| async move {
        let bytes = run.next_chunk().await?;
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), run))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `data: {json}\n\n`.
fn event(out: &mut String, value: &impl Serialize) {
    out.push_str("data: ");
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
    out.push_str("\n\n");
}

impl Run {
    async fn next_chunk(&mut self) -> Option<String> {
        match self.phase {
            Phase::Done => None,
            Phase::Start => {
                self.phase = Phase::Running;
                let mut out = String::new();
                if let Flavor::Chat { .. } = self.spec.flavor {
                    for index in 0..self.prompts * self.spec.n {
                        let delta = ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        };
                        self.chat_chunk(&mut out, index, delta, None, None);
                    }
                }
                if out.is_empty() {
                    Box::pin(self.next_chunk()).await
                } else {
                    Some(out)
                }
            }
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
                    None => {
                        self.phase = Phase::Done;
                        let mut out = String::new();
                        if self.spec.include_usage {
                            let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                            self.usage_chunk(&mut out, usage);
                        }
                        out.push_str(DONE);
                        return Some(out);
                    }
                    Some((_, Err(e))) => {
                        return Some(self.finish_with_error(&ApiError::from_engine(&e)));
                    }
                    Some((p, Ok(update))) => {
                        let out = self.render(p, update);
                        if !out.is_empty() {
                            return Some(out);
                        }
                    }
                }
            },
        }
    }

    fn finish_with_error(&mut self, err: &ApiError) -> String {
        self.phase = Phase::Done;
        format!("{}{DONE}", err.sse_event())
    }

    /// The chunks of one engine update of prompt `p`.
    fn render(&mut self, p: usize, update: StreamUpdate) -> String {
        let mut out = String::new();
        let n = self.spec.n;
        if !self.seen_prompt[p] {
            self.seen_prompt[p] = true;
            self.prompt_tokens += update.prompt_len;
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
            self.completion_tokens += s.tokens.len();
            if s.tokens.is_empty() && s.text.is_empty() && s.finish_reason.is_none() {
                continue;
            }
            let finish = finish_str(s.finish_reason);
            match &self.spec.flavor {
                Flavor::Completion { logprobs, .. } => {
                    let lp = logprobs.map(|_| {
                        generated_logprobs(
                            &self.tokenizer,
                            &s.tokens,
                            &s.logprobs,
                            s.top_logprobs.as_deref(),
                            self.sent_chars[index],
                        )
                    });
                    self.sent_chars[index] += s.text.chars().count();
                    self.completion_chunk(&mut out, index, s.text, lp, finish);
                }
                Flavor::Chat { logprobs } => {
                    let lp = logprobs.then(|| {
                        chat_logprobs(
                            &self.tokenizer,
                            &s.tokens,
                            &s.logprobs,
                            s.top_logprobs.as_deref(),
                        )
                    });
                    let delta = ChatDelta {
                        role: None,
                        content: (!s.text.is_empty() || finish.is_none()).then_some(s.text),
                    };
                    self.chat_chunk(&mut out, index, delta, lp, finish);
                }
            }
        }
        out
    }

    /// With `echo`: each choice of prompt `p` first gets the prompt (and its logprobs).
    fn echo(&mut self, out: &mut String, p: usize, update: &StreamUpdate) {
        let Flavor::Completion {
            logprobs,
            echo: Some(prompts),
        } = &self.spec.flavor
        else {
            return;
        };
        let prompt = &prompts[p];
        let lp = logprobs.map(|_| {
            let lps = update.prompt_logprobs.clone().unwrap_or_default();
            completion_logprobs(
                &self.tokenizer,
                &prompt.tokens,
                &lps,
                update.topk_prompt_logprobs.as_deref(),
                0,
            )
        });
        let text = prompt.text.clone();
        for c in 0..self.spec.n {
            let index = p * self.spec.n + c;
            self.sent_chars[index] = text.chars().count();
            self.completion_chunk(out, index, text.clone(), lp.clone(), None);
        }
    }

    fn usage_field(&self) -> Option<Option<Usage>> {
        self.spec.include_usage.then_some(None)
    }

    fn completion_chunk(
        &self,
        out: &mut String,
        index: usize,
        text: String,
        logprobs: Option<super::openai::CompletionLogprobs>,
        finish_reason: Option<&'static str>,
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
                }],
                usage: self.usage_field(),
            },
        );
    }

    fn chat_chunk(
        &self,
        out: &mut String,
        index: usize,
        delta: ChatDelta,
        logprobs: Option<super::openai::ChatLogprobs>,
        finish_reason: Option<&'static str>,
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
                }],
                usage: self.usage_field(),
            },
        );
    }

    /// The last chunk of `include_usage`: no choices, the request's usage.
    fn usage_chunk(&self, out: &mut String, usage: Usage) {
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
                },
            ),
        }
    }
}
