//! Fireworks' `POST /inference/v1/completions`, as `fireworks-ai`'s `DeploymentSampler` (and
//! the cookbook's warm-up probe) use it: token-id (or text) prompts, `raw_output` with the
//! prompt and completion token ids, `logprobs` as a boolean with a separate `top_logprobs`,
//! each token's raw `logprob` and the `sampling_logprob` under the distribution actually
//! sampled from, `echo` / `echo_last`, and `perf_metrics` in the final chunk.
//!
//! Differences from `/v1/completions` that the SDK relies on:
//! - an unknown `model` is 400, never 404 (the SDK reads 404 as "deployment not ready" and
//!   retries for about 50 s); `accounts/<account>/deployments/<name>` and
//!   `accounts/<account>/models/<name>` name the served model `<name>`;
//! - every `logprob` is a number: the echoed first prompt token, which has no distribution,
//!   gets `0.0` (and itself as its only top alternative); echoed prompt tokens carry
//!   `sampling_logprob: null`, as nothing was sampled there;
//! - with `echo`, `raw_output.completion_token_ids` is the echoed prompt ids followed by the
//!   completion's, aligned with `logprobs.content`;
//! - a full server is 429 with `Retry-After` before any byte of the stream (admission in
//!   `limits.rs`); an error after the stream started is a chunk `{"error": {…, "status_code"}}`
//!   the SDK retries when the status is transient.
//!
//! Fields accepted and ignored, with why: `prompt_cache_key` (the prefix cache matches token
//! ids whatever the key; results do not depend on it), `user`, `raw_output: false`, `perf_metrics_in_response:
//! false`, `return_token_ids` (the ids are in `raw_output`, which the SDK always asks for).
//! Fields accepted only at their no-op value: `include_routing_matrix: false` (the served
//! models are dense), `images: []` (text models), `top_sampling_logprobs: 0`. Any other field
//! is a 400 naming it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use futures_util::stream;
use infermux_core::{GenerateStream, LogprobsMode, OutputKind, StreamUpdate, TokenId};
use serde::{Deserialize, Serialize};

use super::convert::{
    OPENAI_MAX_TOP_LOGPROBS, blocking, check_prompts, check_sequences, completion_prompts,
    request_id, sampling_params, submit_stream, token_text, unix_now,
};
use super::error::ApiError;
use super::limits::Permit;
use super::metrics::{Metrics, ModelSeries, Tracked};
use super::openai::{Knobs, PromptInput, StopInput, Usage};
use super::routes::parse_body;
use super::{AppState, ServedModel};
use crate::Tokenizer;

/// The route's path.
const PATH: &str = "/inference/v1/completions";

/// The Fireworks routes, to merge into the server's router.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new().route(PATH, post(completions).fallback(method_not_allowed))
}

/// A wrong method on the route: 405 in the error shape, with `Allow: POST`.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut response =
        ApiError::method_not_allowed(method.as_str(), uri.path(), Some("POST")).into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// `logprobs`: Fireworks' boolean, or the legacy count of top alternatives.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum LogprobsField {
    Flag(bool),
    Count(usize),
}

/// Body of `POST /inference/v1/completions` (Fireworks' names; see the module doc for the
/// fields accepted and ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FireworksRequest {
    /// The served model, or `accounts/<account>/deployments/<name>`.
    #[serde(default)]
    model: Option<String>,
    /// One prompt: token ids or text.
    prompt: PromptInput,
    #[serde(default)]
    n: Option<usize>,
    /// Tokens to generate per choice (default 16).
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// `0` (or below) is off.
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<BTreeMap<String, f32>>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<StopInput>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    min_tokens: Option<usize>,
    #[serde(default)]
    stream: Option<bool>,
    /// `true` (or a count of top alternatives): per-token logprobs in `logprobs.content`.
    #[serde(default)]
    logprobs: Option<LogprobsField>,
    /// Top alternatives per token, with `logprobs: true` (at most 20).
    #[serde(default)]
    top_logprobs: Option<usize>,
    /// Echo the prompt before the completion (text, token ids and, with `logprobs`, logprobs).
    #[serde(default)]
    echo: Option<bool>,
    /// Echo only the prompt's last this many tokens.
    #[serde(default)]
    echo_last: Option<usize>,
    /// `raw_output` on each choice's final chunk: prompt and completion token ids.
    #[serde(default)]
    raw_output: Option<bool>,
    /// `perf_metrics` on the final chunk.
    #[serde(default)]
    perf_metrics_in_response: Option<bool>,
    /// Ignored: the prefix cache matches token ids, whatever the key.
    #[serde(default)]
    #[allow(dead_code)]
    prompt_cache_key: Option<String>,
    /// Ignored.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    /// Ignored: the ids are in `raw_output`.
    #[serde(default)]
    #[allow(dead_code)]
    return_token_ids: Option<bool>,
    /// Only `false`: dense models have no routing matrices.
    #[serde(default)]
    include_routing_matrix: Option<bool>,
    /// Only empty: text models.
    #[serde(default)]
    images: Option<Vec<serde_json::Value>>,
    /// Only 0: no published top-K sampling distribution.
    #[serde(default)]
    top_sampling_logprobs: Option<usize>,
}

impl FireworksRequest {
    /// The shared sampling fields, as the OpenAI routes take them.
    fn knobs(&self) -> Knobs {
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
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            stream: self.stream,
            ..Knobs::default()
        }
    }

    /// Top alternatives per token when logprobs are asked for, `None` when not.
    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = match (self.logprobs, self.top_logprobs) {
            (None | Some(LogprobsField::Flag(false)), Some(k)) if k > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            (None | Some(LogprobsField::Flag(false)), _) => return Ok(None),
            (Some(LogprobsField::Flag(true)), k) => k.unwrap_or(0),
            (Some(LogprobsField::Count(c)), k) => k.unwrap_or(c),
        };
        if top > OPENAI_MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be at most {OPENAI_MAX_TOP_LOGPROBS}, got {top}"),
            ));
        }
        Ok(Some(top))
    }

    /// Refuses the features this server does not have, naming the field.
    fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.include_routing_matrix == Some(true) {
            return Err(ApiError::invalid(
                "include_routing_matrix",
                "`include_routing_matrix: true` is not supported: the served models are dense (no MoE routing)",
            ));
        }
        if self.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(ApiError::invalid(
                "images",
                "`images` are not supported: the served models take text only",
            ));
        }
        if self.top_sampling_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid(
                "top_sampling_logprobs",
                "`top_sampling_logprobs` is not supported (each token's `sampling_logprob` is)",
            ));
        }
        if self.echo_last.is_some() && self.echo == Some(false) {
            return Err(ApiError::invalid(
                "echo_last",
                "`echo_last` echoes the prompt's tail; it conflicts with `echo: false`",
            ));
        }
        Ok(())
    }
}

/// The served model a Fireworks `model` names: the served name itself, or the last segment
/// of `accounts/<account>/deployments/<name>` (or `.../models/<name>`); unknown is 400.
fn served_model<'a>(state: &'a AppState, name: Option<&str>) -> Result<&'a ServedModel, ApiError> {
    let Some(name) = name else {
        return Ok(state.default_model());
    };
    let alias = name.strip_prefix("accounts/").and_then(|rest| {
        let (_, kind_and_name) = rest.split_once('/')?;
        let (kind, short) = kind_and_name.split_once('/')?;
        matches!(kind, "deployments" | "models").then_some(short)
    });
    state
        .models
        .iter()
        .find(|m| m.name == name)
        .or_else(|| alias.and_then(|a| state.models.iter().find(|m| m.name == a)))
        .ok_or_else(|| {
            let served: Vec<String> = state.models.iter().map(|m| m.name.clone()).collect();
            let mut e = ApiError::unknown_model(name, &served);
            e.status = StatusCode::BAD_REQUEST;
            e
        })
}

/// `POST /inference/v1/completions`.
async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let deadline = state.admission.deadline();
    let inner = handle(state.clone(), body, arrived, deadline);
    let mut response = match state.admission.within(deadline, inner).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    // The SDK sends one id per logical request, kept across retries; echo it for the logs.
    if let Some(id) = headers.get("x-request-id") {
        response.headers_mut().insert("x-request-id", id.clone());
    }
    response
}

async fn handle(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let req: FireworksRequest = parse_body(&state, body).await?;
    let served = served_model(&state, req.model.as_deref())?;
    req.check_unsupported()?;
    let top = req.logprobs()?;
    let client = served.client.clone();
    let tokenizer = client.get_tokenizer();
    let knobs = req.knobs();
    let mut params = sampling_params(&knobs, Some(req.max_tokens.unwrap_or(16)))?;
    let echo = req.echo.unwrap_or(false) || req.echo_last.is_some();
    params.logprobs = top;
    if echo {
        params.prompt_logprobs = top;
    }
    params.logprobs_mode = LogprobsMode::RawAndProcessed;
    params.output_kind = OutputKind::Delta;
    let n = params.n;
    check_sequences(1, n, state.limits.max_sequences_per_request, "n")?;
    if req.prompt.count() != 1 {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "this route takes one prompt per request, got {}",
                req.prompt.count()
            ),
        ));
    }
    let prompt = {
        let tokenizer = tokenizer.clone();
        let input = req.prompt;
        blocking(move || completion_prompts(&tokenizer, input, false)).await??
    };
    check_prompts(&prompt, client.engine().info().vocab_size)?;
    let prompt = prompt.into_iter().next().expect("checked: one prompt");
    let echo_from = echo.then(|| {
        let len = prompt.tokens.len();
        len - req.echo_last.unwrap_or(len).min(len)
    });
    let permit = state.admission.admit(n).await?;
    let queued = arrived.elapsed();
    let stream = submit_stream(&client, prompt.tokens.clone(), params).await?;
    let echo_text = echo_from.map(|from| match (&prompt.text, from) {
        (Some(text), 0) => text.clone(),
        _ => tokenizer
            .decode(&prompt.tokens[from..], false)
            .unwrap_or_default(),
    });
    let render = Render {
        id: request_id("cmpl"),
        created: unix_now(),
        model: served.name.clone(),
        tokenizer,
        echo_text,
        prompt: prompt.tokens,
        echo_from,
        top,
        raw_output: req.raw_output.unwrap_or(false),
        perf_metrics: req.perf_metrics_in_response.unwrap_or(false),
        choices: (0..n).map(|_| ChoiceState::default()).collect(),
        prompt_len: 0,
        weight_version: String::new(),
        cached_prompt_tokens: 0,
        started: false,
        observer: Observer::new(&state, &served.name, n, arrived, queued),
    };
    let run = Run {
        stream,
        render,
        _permit: permit,
        deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
        state: state.clone(),
        done: false,
    };
    if req.stream.unwrap_or(false) {
        Ok(run.into_sse(state.limits.sse_keep_alive))
    } else {
        run.collect().await.map(|r| axum::Json(r).into_response())
    }
}

/// One chunk (or, unstreamed, the whole reply) in Fireworks' `text_completion` shape.
#[derive(Debug, Serialize)]
struct Chunk {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    perf_metrics: Option<BTreeMap<&'static str, String>>,
    /// The weight version the reply was computed with (SGLang's name, what
    /// `/get_weight_version` answers).
    weight_version: String,
}

#[derive(Debug, Serialize)]
struct Choice {
    index: usize,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_output: Option<RawOutput>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Logprobs {
    content: Vec<TokenLogprob>,
}

/// One token's entry in `logprobs.content`.
#[derive(Debug, Clone, Serialize)]
struct TokenLogprob {
    token: String,
    token_id: TokenId,
    /// The model's raw logprob (`0.0` for an echoed first prompt token).
    logprob: f32,
    /// Under the processed distribution sampled from; `null` for echoed prompt tokens.
    sampling_logprob: Option<f32>,
    bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
struct TopLogprob {
    token: String,
    token_id: TokenId,
    logprob: f32,
    bytes: Vec<u8>,
}

/// `raw_output`: the token ids behind the text.
#[derive(Debug, Serialize)]
struct RawOutput {
    prompt_token_ids: Vec<TokenId>,
    /// With echo: the echoed prompt ids, then the completion's.
    completion_token_ids: Vec<TokenId>,
    /// The completion's text (without the echo).
    completion: String,
}

/// What one choice has produced so far.
#[derive(Debug, Default)]
struct ChoiceState {
    tokens: Vec<TokenId>,
    text: String,
    finished: bool,
}

/// Turns a request's engine updates into Fireworks chunks.
struct Render {
    id: String,
    created: u64,
    model: String,
    tokenizer: Tokenizer,
    prompt: Vec<TokenId>,
    /// With echo: the first prompt position echoed.
    echo_from: Option<usize>,
    echo_text: Option<String>,
    /// Top alternatives per token when logprobs were asked for.
    top: Option<usize>,
    raw_output: bool,
    perf_metrics: bool,
    choices: Vec<ChoiceState>,
    prompt_len: usize,
    /// From the first update: the weight version and the prompt tokens from the prefix cache.
    weight_version: String,
    cached_prompt_tokens: usize,
    started: bool,
    observer: Observer,
}

impl Render {
    fn entry(
        &self,
        id: TokenId,
        logprob: f32,
        sampling: Option<f32>,
        top: &[(TokenId, f32)],
    ) -> TokenLogprob {
        let k = self.top.unwrap_or(0);
        TokenLogprob {
            token: token_text(&self.tokenizer, id),
            token_id: id,
            logprob,
            sampling_logprob: sampling,
            bytes: self.tokenizer.token_bytes(id),
            top_logprobs: top
                .iter()
                .take(k)
                .map(|&(alt, lp)| TopLogprob {
                    token: token_text(&self.tokenizer, alt),
                    token_id: alt,
                    logprob: lp,
                    bytes: self.tokenizer.token_bytes(alt),
                })
                .collect(),
        }
    }

    fn choice(&self, index: usize, text: String, logprobs: Option<Logprobs>) -> Choice {
        Choice {
            index,
            text,
            logprobs,
            finish_reason: None,
            raw_output: None,
        }
    }

    /// The echoed prompt's chunk choices (one per choice), on the first update.
    fn echo(&self, update: &StreamUpdate) -> Vec<Choice> {
        let (Some(from), Some(text)) = (self.echo_from, &self.echo_text) else {
            return Vec::new();
        };
        let logprobs = self.top.map(|_| {
            let lps = update.prompt_logprobs.as_deref().unwrap_or_default();
            let tops = update.topk_prompt_logprobs.as_deref();
            let content = (from..self.prompt.len())
                .map(|i| {
                    let id = self.prompt[i];
                    let lp = lps.get(i).copied().flatten();
                    let top = tops.and_then(|t| t.get(i)).and_then(Option::as_ref);
                    match (lp, top) {
                        (Some(lp), Some(top)) => self.entry(id, lp, None, top),
                        (Some(lp), None) => self.entry(id, lp, None, &[]),
                        // The first prompt token has no distribution: 0.0, itself its only
                        // alternative (the SDK wants numbers everywhere and drops this row).
                        (None, _) => {
                            let own = [(id, 0.0)];
                            self.entry(
                                id,
                                0.0,
                                None,
                                if self.top.is_some_and(|k| k > 0) {
                                    &own
                                } else {
                                    &[]
                                },
                            )
                        }
                    }
                })
                .collect();
            Logprobs { content }
        });
        (0..self.choices.len())
            .map(|c| self.choice(c, text.clone(), logprobs.clone()))
            .collect()
    }

    /// The chunks of one engine update.
    fn update(&mut self, update: StreamUpdate) -> Vec<Chunk> {
        let mut choices = Vec::new();
        if !self.started {
            self.started = true;
            self.prompt_len = update.prompt_len;
            self.weight_version.clone_from(&update.weight_version);
            self.cached_prompt_tokens = update.cached_prompt_tokens;
            choices.extend(self.echo(&update));
        }
        for s in &update.sequences {
            if self.choices.get(s.index).is_none_or(|c| c.finished) {
                continue;
            }
            self.observer.tokens(s.index, s.tokens.len());
            if !s.tokens.is_empty() || !s.text.is_empty() {
                let logprobs = self.top.map(|_| {
                    let processed = s.processed_logprobs.as_deref().unwrap_or_default();
                    let tops = s.top_logprobs.as_deref().unwrap_or_default();
                    let content = s
                        .tokens
                        .iter()
                        .enumerate()
                        .map(|(i, &id)| {
                            let lp = s.logprobs.get(i).copied().unwrap_or(f32::NAN);
                            let top = tops.get(i).map_or(&[][..], Vec::as_slice);
                            self.entry(id, lp, processed.get(i).copied(), top)
                        })
                        .collect();
                    Logprobs { content }
                });
                choices.push(self.choice(s.index, s.text.clone(), logprobs));
            }
            let state = &mut self.choices[s.index];
            state.tokens.extend_from_slice(&s.tokens);
            state.text.push_str(&s.text);
            if let Some(reason) = s.finish_reason {
                state.finished = true;
                let reason = reason.as_openai_str();
                self.observer.finished(reason);
                let raw_output = self.raw_output.then(|| {
                    let state = &self.choices[s.index];
                    let echoed = self.echo_from.map_or(&[][..], |from| &self.prompt[from..]);
                    RawOutput {
                        prompt_token_ids: self.prompt.clone(),
                        completion_token_ids: echoed.iter().chain(&state.tokens).copied().collect(),
                        completion: state.text.clone(),
                    }
                });
                choices.push(Choice {
                    finish_reason: Some(reason),
                    raw_output,
                    ..self.choice(s.index, String::new(), None)
                });
            }
        }
        let mut chunks = vec![self.chunk(choices)];
        if update.finished {
            let last = chunks.last_mut().expect("one chunk");
            let completion = self.choices.iter().map(|c| c.tokens.len()).sum();
            last.usage = Some(Usage::new(
                self.prompt_len,
                completion,
                self.cached_prompt_tokens,
            ));
            last.perf_metrics = self.perf_metrics.then(|| {
                self.observer
                    .perf_metrics(self.prompt_len, self.cached_prompt_tokens)
            });
            self.observer.end();
        }
        chunks.retain(|c| !c.choices.is_empty() || c.usage.is_some());
        chunks
    }

    fn chunk(&self, choices: Vec<Choice>) -> Chunk {
        Chunk {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            perf_metrics: None,
            weight_version: self.weight_version.clone(),
        }
    }
}

/// The request's server metrics (the same series `/v1/completions` feeds) and the timings
/// of its `perf_metrics`.
struct Observer {
    metrics: Metrics,
    series: ModelSeries,
    tracked: Option<Tracked>,
    arrived: Instant,
    /// Arrival to admission: the time spent in the server's queue before the engine.
    queued: Duration,
    first_token: Option<Duration>,
    last_token: Vec<Option<Instant>>,
    in_flight: usize,
}

impl Observer {
    fn new(state: &AppState, model: &str, n: usize, arrived: Instant, queued: Duration) -> Self {
        let series = state.metrics.model_series(model);
        Self {
            metrics: state.metrics.for_model(model),
            tracked: Some(series.track(n)),
            series,
            arrived,
            queued,
            first_token: None,
            last_token: vec![None; n],
            in_flight: state.admission.in_flight(),
        }
    }

    /// Choice `index` produced `count` tokens now.
    fn tokens(&mut self, index: usize, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        if self.first_token.is_none() {
            let ttft = now - self.arrived;
            self.first_token = Some(ttft);
            self.metrics.ttft.observe(ttft);
            self.series.first_token(ttft);
        }
        if let Some(before) = self.last_token.get_mut(index).and_then(|t| t.replace(now)) {
            self.series.token_gap(now - before);
        }
    }

    fn finished(&mut self, reason: &str) {
        self.series.finished(reason);
        if let Some(t) = &mut self.tracked {
            t.choice_finished();
        }
    }

    fn end(&mut self) {
        if let Some(t) = self.tracked.take() {
            t.end(true, self.arrived.elapsed());
        }
    }

    /// Fireworks' `perf_metrics`: seconds as strings. `prefill-queue-duration` is the wait
    /// for admission (the server's queue, where load waits under its limits).
    fn perf_metrics(&self, prompt_len: usize, cached: usize) -> BTreeMap<&'static str, String> {
        let secs = |d: Duration| format!("{:.6}", d.as_secs_f64());
        let mut m = BTreeMap::new();
        m.insert("prefill-queue-duration", secs(self.queued));
        m.insert("num-concurrent-requests", self.in_flight.to_string());
        m.insert("prompt-tokens", prompt_len.to_string());
        m.insert("cached-prompt-tokens", cached.to_string());
        if let Some(ttft) = self.first_token {
            m.insert("server-time-to-first-token", secs(ttft));
        }
        m.insert("server-processing-time", secs(self.arrived.elapsed()));
        m
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.metrics.latency.observe(self.arrived.elapsed());
    }
}

/// An admitted request running in the engine.
struct Run {
    stream: GenerateStream,
    render: Render,
    _permit: Permit,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    state: Arc<AppState>,
    done: bool,
}

/// The chunk that reports an error inside a stream: Fireworks' `error` with its status, which
/// the SDK retries when it is transient.
#[derive(Serialize)]
struct StreamError<'a> {
    error: StreamErrorDetail<'a>,
}

#[derive(Serialize)]
struct StreamErrorDetail<'a> {
    #[serde(flatten)]
    detail: &'a crate::wire::ErrorDetail,
    status_code: u16,
}

impl Run {
    /// The next chunks, `Err` for a failure (engine error, deadline), `None` at the end.
    async fn next(&mut self) -> Option<Result<Vec<Chunk>, ApiError>> {
        loop {
            if self.done {
                return None;
            }
            let deadline = async {
                match self.deadline.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            let item = tokio::select! {
                item = StreamExt::next(&mut self.stream) => item,
                () = deadline => {
                    self.done = true;
                    return Some(Err(self.state.admission.timeout_error()));
                }
            };
            match item {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(ApiError::from_engine(&e)));
                }
                Some(Ok(update)) => {
                    let finished = update.finished;
                    let chunks = self.render.update(update);
                    self.done = finished;
                    if !chunks.is_empty() {
                        return Some(Ok(chunks));
                    }
                }
            }
        }
    }

    /// The reply as server-sent events, ending with `[DONE]`.
    fn into_sse(self, keep_alive: Option<Duration>) -> Response {
        let events = stream::unfold(Some(self), |run| async move {
            let mut run = run?;
            let data: Vec<String> = match run.next().await {
                Some(Ok(chunks)) => chunks
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect(),
                Some(Err(e)) => {
                    let body = StreamError {
                        error: StreamErrorDetail {
                            detail: &e.body.error,
                            status_code: e.status.as_u16(),
                        },
                    };
                    let data = vec![serde_json::to_string(&body).unwrap_or_default()];
                    return Some((data, None));
                }
                None => return Some((vec!["[DONE]".to_string()], None)),
            };
            Some((data, Some(run)))
        })
        .flat_map(stream::iter);
        super::sse::sse_reply(events, keep_alive)
    }

    /// The whole reply as one JSON object: each choice's chunks joined.
    async fn collect(mut self) -> Result<Chunk, ApiError> {
        let mut choices: Vec<Choice> = (0..self.render.choices.len())
            .map(|c| self.render.choice(c, String::new(), None))
            .collect();
        let mut out = self.render.chunk(Vec::new());
        while let Some(chunks) = self.next().await {
            for chunk in chunks? {
                for part in chunk.choices {
                    let Some(c) = choices.get_mut(part.index) else {
                        continue;
                    };
                    c.text.push_str(&part.text);
                    if let Some(lp) = part.logprobs {
                        c.logprobs
                            .get_or_insert_with(Logprobs::default)
                            .content
                            .extend(lp.content);
                    }
                    if part.finish_reason.is_some() {
                        c.finish_reason = part.finish_reason;
                        c.raw_output = part.raw_output;
                    }
                }
                if chunk.usage.is_some() {
                    out.usage = chunk.usage;
                    out.perf_metrics = chunk.perf_metrics;
                }
                out.weight_version = chunk.weight_version;
            }
        }
        if self.render.top.is_some() {
            for c in &mut choices {
                c.logprobs.get_or_insert_with(Logprobs::default);
            }
        }
        out.choices = choices;
        Ok(out)
    }
}
