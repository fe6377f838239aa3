//! The HTTP handlers.
//!
//! Each generation handler parses and prepares its request (JSON, tokenizing, chat template)
//! on tokio's blocking pool, checks what it can before admission (the fields, the sequence cap,
//! each prompt's token ids), is admitted by its weight in sequences, then submits its prompts
//! (the engine compiles stops and grammars at submit, also on the blocking pool) at most a
//! window at a time, and only then starts a reply: a request the engine refuses gets the same
//! status and body streamed or not.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream;
use infermux_core::{SamplingParams, TokenId};

use super::convert::{
    ChatRender, Generation, OPENAI_MAX_TOP_LOGPROBS, Prompt, blocking, chat_logprobs,
    chat_logprobs_count, chat_prompt, check_processed_top, check_prompts, check_sequences,
    common_version, completion_logprobs, completion_prompts, engine_prompt, finish_str, generate,
    generated_logprobs, prompt_logprobs_count, prompt_logprobs_out, prompt_window, request_id,
    sampling_params, submission_order, submit_stream, unix_now,
};
use super::error::{ApiError, parse_json};
use super::metrics::{Metrics, ModelSeries};
use super::openai::{
    ChatChoice, ChatMessageOut, ChatRequest, ChatResponse, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage,
};
use super::sse::{self, EchoPrompt, Flavor, StreamSpec, Submitter};
use super::{AppState, ServedModel};
use crate::wire::{ComputeLogprobsRequest, ComputeLogprobsResponse, SampleRequest};

pub(crate) type Shared = State<Arc<AppState>>;
pub(crate) type Body = Result<Bytes, BytesRejection>;

/// The body's bytes, or 413/400.
pub(crate) fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.limits.max_body_bytes)
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })
}

/// The body parsed as `T`, off the async workers (a body may be megabytes of JSON).
pub(crate) async fn parse_body<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = body_bytes(state, body)?;
    blocking(move || parse_json(&bytes)).await?
}

fn reply<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The field that names the samples of a request: `best_of` when it draws more than `n`.
fn samples_field(params: &SamplingParams, n_field: &'static str) -> &'static str {
    if params.samples_drawn() > params.n {
        "best_of"
    } else {
        n_field
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let deadline = state.admission.deadline();
    let inner = completions_inner(state.clone(), body, arrived, deadline);
    match state.admission.within(deadline, inner).await {
        Ok(response) => response,
        Err(e) => e
            .renamed(&[("topk_prompt_logprobs", "logprobs")])
            .into_response(),
    }
}

async fn completions_inner(
    state: Arc<AppState>,
    body: Body,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&state, body).await?;
    let served = state.model(req.model.as_deref())?;
    let client = served.client.clone();
    let tokenizer = client.get_tokenizer();
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if let Some(k) = req.logprobs
        && k > OPENAI_MAX_TOP_LOGPROBS
    {
        return Err(ApiError::invalid(
            "logprobs",
            format!("`logprobs` must be at most {OPENAI_MAX_TOP_LOGPROBS}, got {k}"),
        ));
    }
    let knobs = req.knobs();
    let stream = knobs.stream.unwrap_or(false);
    let echo = req.echo.unwrap_or(false);
    // `echo` with `max_tokens: 0` scores the prompt: generate one token and drop it.
    let echo_only = echo && req.max_tokens == Some(0);
    let max_tokens = if echo_only {
        Some(1)
    } else {
        Some(req.max_tokens.unwrap_or(16))
    };
    let mut params = sampling_params(&knobs, max_tokens)?;
    params.best_of = req.best_of;
    params.logprobs = req.logprobs;
    check_processed_top(&params)?;
    let prompt_logprobs = prompt_logprobs_count(knobs.prompt_logprobs, stream)?;
    let return_token_ids = knobs.return_token_ids.unwrap_or(false);
    // One engine pass serves both the echo's logprobs and vLLM's `prompt_logprobs`.
    let echo_top = req.logprobs.filter(|_| echo);
    params.prompt_logprobs = match (echo_top, prompt_logprobs) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if stream && params.samples_drawn() > params.n {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` > `n` cannot stream",
        ));
    }
    let samples = params.samples_drawn();
    check_sequences(
        req.prompt.count(),
        samples,
        state.limits.max_sequences_per_request,
        samples_field(&params, "n"),
    )?;
    let prompts = {
        let tokenizer = tokenizer.clone();
        let input = req.prompt;
        let add_special = knobs.add_special_tokens.unwrap_or(false);
        blocking(move || completion_prompts(&tokenizer, input, add_special)).await??
    };
    check_prompts(&prompts, client.engine().info().vocab_size)?;
    let window = prompt_window(client.engine().config().max_num_seqs, samples);
    let weight = prompts.len().min(window).saturating_mul(samples);
    let order = submission_order(&prompts);
    let id = request_id("cmpl");
    let created = unix_now();
    let n = params.n;
    if stream && !echo_only {
        let echo = echo.then(|| {
            prompts
                .iter()
                .map(|p| EchoPrompt {
                    text: p
                        .text
                        .clone()
                        .unwrap_or_else(|| tokenizer.decode(&p.tokens, false).unwrap_or_default()),
                    tokens: p.tokens.clone(),
                })
                .collect()
        });
        let spec = StreamSpec {
            id,
            created,
            model: served.name.clone(),
            n,
            include_usage: include_usage(&knobs),
            flavor: Flavor::Completion {
                logprobs: req.logprobs,
                echo,
            },
            return_token_ids,
            prompt_tokens: if return_token_ids {
                prompts.iter().map(|p| p.tokens.clone()).collect()
            } else {
                Vec::new()
            },
        };
        let queue = order
            .iter()
            .map(|&i| (i, prompts[i].tokens.clone()))
            .collect();
        return start_stream(
            &state, &client, spec, queue, window, params, weight, arrived, deadline,
        )
        .await;
    }
    let work = run_windowed(
        &state,
        &served.name,
        &client,
        &prompts,
        order,
        window,
        &params,
        arrived,
    );
    let gens = state.admission.run(deadline, weight, work).await;
    let gens = observe(&state, arrived, gens)?;
    let mut choices = Vec::with_capacity(gens.len() * n);
    for (p, g) in gens.iter().enumerate() {
        let prompt = &prompts[p];
        let prompt_text = || {
            prompt
                .text
                .clone()
                .unwrap_or_else(|| tokenizer.decode(&prompt.tokens, false).unwrap_or_default())
        };
        let ran = engine_prompt(&prompt.tokens, g.prompt_len);
        let prompt_lps = prompt_logprobs.map(|k| {
            prompt_logprobs_out(
                &tokenizer,
                ran,
                g.prompt_logprobs.as_deref().unwrap_or_default(),
                g.topk_prompt.as_deref(),
                k,
            )
        });
        for (c, choice) in g.choices.iter().enumerate() {
            let mut text = String::new();
            let mut lp = req.logprobs.map(|_| CompletionLogprobs::default());
            if echo {
                text = prompt_text();
                if let Some(lp) = &mut lp {
                    *lp = completion_logprobs(
                        &tokenizer,
                        &prompt.tokens,
                        g.prompt_logprobs.as_deref().unwrap_or_default(),
                        g.topk_prompt.as_deref(),
                        req.logprobs.unwrap_or(0),
                        0,
                    );
                }
            }
            let mut finish = finish_str(choice.finish);
            if echo_only {
                finish = Some("length");
            } else {
                if let Some(lp) = &mut lp {
                    lp.extend(generated_logprobs(
                        &tokenizer,
                        &choice.tokens,
                        &choice.logprobs,
                        choice.top.as_deref(),
                        text.chars().count(),
                    ));
                }
                text.push_str(&choice.text);
            }
            let completion_ids = if echo_only {
                &[][..]
            } else {
                &choice.tokens[..]
            };
            choices.push(CompletionChoice {
                index: p * n + c,
                text,
                logprobs: lp,
                finish_reason: finish,
                token_ids: return_token_ids.then(|| completion_ids.to_vec()),
                prompt_logprobs: prompt_lps.clone(),
                prompt_token_ids: return_token_ids.then(|| ran.to_vec()),
                weight_version: g.weight_version.clone(),
            });
        }
    }
    let completion: usize = if echo_only {
        0
    } else {
        gens.iter().map(Generation::completion_tokens).sum()
    };
    let usage = Usage::new(
        gens.iter().map(|g| g.prompt_len).sum(),
        completion,
        gens.iter().map(|g| g.cached_prompt_tokens).sum(),
    );
    let series = state.metrics.model_series(&served.name);
    for c in &choices {
        if let Some(reason) = c.finish_reason {
            series.finished(reason);
        }
    }
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: served.name.clone(),
        choices,
        usage: Some(Some(usage)),
        weight_version: common_version(gens.iter().map(|g| g.weight_version.as_str())),
    })
    .into_response())
}

/// Generates every prompt, at most `window` of them in the engine at once (the next one is
/// submitted as one finishes), in `order`; the generations come back in prompt order.
#[allow(clippy::too_many_arguments)]
async fn run_windowed(
    state: &AppState,
    model: &str,
    client: &crate::SamplingClient,
    prompts: &[Prompt],
    order: Vec<usize>,
    window: usize,
    params: &SamplingParams,
    arrived: Instant,
) -> Result<Vec<Generation>, ApiError> {
    let mut gens: Vec<Option<Generation>> = vec![None; prompts.len()];
    let metrics = state.metrics.for_model(model);
    let series = state.metrics.model_series(model);
    let mut running = stream::iter(order)
        .map(|i| {
            let tokens = prompts[i].tokens.clone();
            let params = params.clone();
            let (metrics, series) = (&metrics, &series);
            async move {
                generate_observed(client, tokens, params, arrived, metrics, series)
                    .await
                    .map(|g| (i, g))
            }
        })
        .buffer_unordered(window.max(1));
    while let Some(done) = running.next().await {
        let (i, g) = done?;
        gens[i] = Some(g);
    }
    Ok(gens.into_iter().map(Option::unwrap_or_default).collect())
}

/// [`generate`] with vLLM's per-prompt observations: time to first token (through `metrics`,
/// a [`Metrics::for_model`] handle), end-to-end latency, and its choices counted as `abort`
/// if the request is dropped before it ends. Unstreamed replies observe no inter-token
/// latency: the generation they get back carries no per-token timing.
async fn generate_observed(
    client: &crate::SamplingClient,
    prompt: Vec<TokenId>,
    params: SamplingParams,
    arrived: Instant,
    metrics: &Metrics,
    series: &ModelSeries,
) -> Result<Generation, ApiError> {
    let tracked = series.track(params.n);
    let g = generate(client, prompt, params, arrived, metrics).await;
    tracked.end(g.is_ok(), arrived.elapsed());
    g
}

fn include_usage(knobs: &super::openai::Knobs) -> bool {
    knobs
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

/// Records the latency of an admitted request (not of one rejected by admission control).
fn observe<T>(state: &AppState, arrived: Instant, r: Result<T, ApiError>) -> Result<T, ApiError> {
    if !matches!(&r, Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS) {
        state.metrics.latency.observe(arrived.elapsed());
    }
    r
}

/// Admits a streaming request, submits its first window of prompts (the first alone, so a
/// request the engine refuses fails before any other is submitted) and, when the engine took
/// them all, starts the SSE reply; a refusal is the reply instead, with its status.
#[allow(clippy::too_many_arguments)]
async fn start_stream(
    state: &Arc<AppState>,
    client: &crate::SamplingClient,
    spec: StreamSpec,
    mut queue: VecDeque<(usize, Vec<TokenId>)>,
    window: usize,
    mut params: SamplingParams,
    weight: usize,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let permit = state
        .admission
        .within(deadline, state.admission.admit(weight))
        .await?;
    params.output_kind = infermux_core::OutputKind::Delta;
    let mut streams = Vec::with_capacity(window.min(queue.len()));
    if let Some((i, tokens)) = queue.pop_front() {
        streams.push((i, submit_stream(client, tokens, params.clone()).await?));
    }
    let rest: Vec<_> = std::iter::from_fn(|| queue.pop_front())
        .take(window.saturating_sub(1))
        .collect();
    let started = futures_util::future::try_join_all(rest.into_iter().map(|(i, tokens)| {
        let params = params.clone();
        async move { Ok::<_, ApiError>((i, submit_stream(client, tokens, params).await?)) }
    }))
    .await?;
    streams.extend(started);
    let submitter = Submitter {
        client: client.clone(),
        params,
        queue,
    };
    Ok(sse::respond(
        state.clone(),
        spec,
        streams,
        submitter,
        client.get_tokenizer(),
        permit,
        arrived,
        deadline,
    ))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let deadline = state.admission.deadline();
    let inner = chat_inner(state.clone(), body, arrived, deadline);
    match state.admission.within(deadline, inner).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    body: Body,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&state, body).await?;
    let served = state.model(req.model.as_deref())?;
    let client = served.client.clone();
    let tokenizer = client.get_tokenizer();
    let knobs = req.knobs();
    let mut params = sampling_params(&knobs, req.max_completion_tokens.or(req.max_tokens))?;
    params.logprobs = chat_logprobs_count(req.logprobs, req.top_logprobs)?;
    check_processed_top(&params)?;
    let stream = knobs.stream.unwrap_or(false);
    let prompt_logprobs = prompt_logprobs_count(knobs.prompt_logprobs, stream)?;
    params.prompt_logprobs = prompt_logprobs;
    let return_token_ids = knobs.return_token_ids.unwrap_or(false);
    let want_logprobs = params.logprobs.is_some();
    let samples = params.samples_drawn();
    check_sequences(1, samples, state.limits.max_sequences_per_request, "n")?;
    let render = ChatRender::of(&req)?;
    let prompt = {
        let tokenizer = tokenizer.clone();
        let messages = req.messages;
        blocking(move || chat_prompt(&tokenizer, &messages, render)).await??
    };
    let id = request_id("chatcmpl");
    let created = unix_now();
    let n = params.n;
    if stream {
        let spec = StreamSpec {
            id,
            created,
            model: served.name.clone(),
            n,
            include_usage: include_usage(&knobs),
            flavor: Flavor::Chat {
                logprobs: want_logprobs,
            },
            return_token_ids,
            prompt_tokens: if return_token_ids {
                vec![prompt.clone()]
            } else {
                Vec::new()
            },
        };
        return start_stream(
            &state,
            &client,
            spec,
            VecDeque::from([(0, prompt)]),
            1,
            params,
            samples,
            arrived,
            deadline,
        )
        .await;
    }
    let metrics = state.metrics.for_model(&served.name);
    let series = state.metrics.model_series(&served.name);
    let work = generate_observed(&client, prompt.clone(), params, arrived, &metrics, &series);
    let g = observe(
        &state,
        arrived,
        state.admission.run(deadline, samples, work).await,
    )?;
    let choices = g
        .choices
        .iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            message: ChatMessageOut {
                role: "assistant",
                content: c.text.clone(),
            },
            logprobs: want_logprobs
                .then(|| chat_logprobs(&tokenizer, &c.tokens, &c.logprobs, c.top.as_deref())),
            finish_reason: finish_str(c.finish),
            token_ids: return_token_ids.then(|| c.tokens.clone()),
        })
        .collect::<Vec<_>>();
    let ran = engine_prompt(&prompt, g.prompt_len);
    for c in &choices {
        if let Some(reason) = c.finish_reason {
            series.finished(reason);
        }
    }
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model: served.name.clone(),
        choices,
        usage: Usage::new(g.prompt_len, g.completion_tokens(), g.cached_prompt_tokens),
        prompt_logprobs: prompt_logprobs.map(|k| {
            prompt_logprobs_out(
                &tokenizer,
                ran,
                g.prompt_logprobs.as_deref().unwrap_or_default(),
                g.topk_prompt.as_deref(),
                k,
            )
        }),
        prompt_token_ids: return_token_ids.then(|| ran.to_vec()),
        weight_version: g.weight_version.clone(),
    })
    .into_response())
}

/// `POST /v1/sample` (wire::SampleRequest → SampleResponse).
pub(crate) async fn sample(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let result = async {
        let deadline = state.admission.deadline();
        let bytes = body_bytes(&state, body)?;
        let (req, conflict) = blocking(move || {
            parse_json::<SampleRequest>(&bytes).map(|req| {
                let conflict = req.conflicting_n(&bytes);
                (req, conflict)
            })
        })
        .await??;
        if let Some(n) = conflict {
            return Err(ApiError::invalid(
                "sampling_params.n",
                format!(
                    "`sampling_params.n` ({n}) differs from `num_samples` ({}); `num_samples` is the sample count: leave `n` out or make them equal",
                    req.num_samples
                ),
            ));
        }
        let params = SamplingParams {
            n: req.num_samples,
            ..req.sampling_params
        };
        let samples = params.samples_drawn();
        check_sequences(
            1,
            samples,
            state.limits.max_sequences_per_request,
            samples_field(&params, "num_samples"),
        )?;
        let served = state.model(req.model.as_deref())?;
        let client = served.client.clone();
        let series = state.metrics.model_series(&served.name);
        let work = async {
            let (prompt, n) = (req.prompt, req.num_samples);
            let (include, topk) = (req.include_prompt_logprobs, req.topk_prompt_logprobs);
            let tracked = series.track(n);
            let pending =
                blocking(move || client.sample(prompt, n, params, include, topk)).await?;
            let r = pending.await.map_err(ApiError::from);
            tracked.end(r.is_ok(), arrived.elapsed());
            if let Ok(r) = &r {
                for s in &r.sequences {
                    series.finished(s.finish_reason.as_openai_str());
                }
            }
            r
        };
        observe(
            &state,
            arrived,
            state.admission.run(deadline, samples, work).await,
        )
    }
    .await;
    reply(result)
}

/// `POST /v1/compute_logprobs` (wire::ComputeLogprobsRequest → ComputeLogprobsResponse).
pub(crate) async fn compute_logprobs(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let result = async {
        let deadline = state.admission.deadline();
        let req: ComputeLogprobsRequest = parse_body(&state, body).await?;
        let client = state.model(req.model.as_deref())?.client.clone();
        let work = async {
            let pending = blocking(move || client.score(req.prompt)).await?;
            let scored = pending.await?;
            Ok(ComputeLogprobsResponse {
                logprobs: scored.logprobs,
                policy_version: scored.policy_version,
                prompt_cache_hit_tokens: scored.prompt_cache_hit_tokens,
            })
        };
        observe(
            &state,
            arrived,
            state.admission.run(deadline, 1, work).await,
        )
    }
    .await;
    reply(result)
}

fn card(m: &ServedModel) -> ModelCard {
    ModelCard {
        id: m.name.clone(),
        object: "model",
        created: m.created,
        owned_by: "infermux",
        max_model_len: m.client.engine().info().max_context,
    }
}

/// `GET /v1/models`.
pub(crate) async fn models(State(state): Shared) -> Response {
    let base = state.default_model();
    let adapters = base.client.loras().into_iter().map(|a| ModelCard {
        id: a.name,
        ..card(base)
    });
    Json(ModelList {
        object: "list",
        data: state.models.iter().map(card).chain(adapters).collect(),
    })
    .into_response()
}

/// `GET /v1/models/{id}` (the id percent-decoded; an undecodable one is a 400).
pub(crate) async fn model(State(state): Shared, request: Request) -> Response {
    let raw = request
        .uri()
        .path()
        .strip_prefix("/v1/models/")
        .unwrap_or_default();
    let id = match percent_decode(raw) {
        Some(id) => id,
        None => {
            return ApiError::invalid("model", format!("the model id {raw:?} is not valid UTF-8"))
                .into_response();
        }
    };
    reply(state.model(Some(&id)).map(|m| card(&m)))
}

/// `%XX` escapes of a path segment decoded; `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /health`: 200 while every engine is up, 503 otherwise. It reads the engines' published
/// stats ([`infermux_core::Engine::stats`] does not wait for the engine thread), so it answers
/// at once during a long prefill.
pub(crate) async fn health(State(state): Shared) -> Response {
    if state.engine_stats().iter().all(|(_, s)| s.is_some()) {
        Json(serde_json::json!({ "status": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "engine unavailable" })),
        )
            .into_response()
    }
}

/// `GET /metrics`: Prometheus text.
pub(crate) async fn metrics(State(state): Shared) -> Response {
    let stats = state.engine_stats();
    let snapshot = super::metrics::Snapshot {
        engines: stats.iter().map(|(name, s)| (name.as_str(), *s)).collect(),
        in_flight: state.admission.in_flight(),
        places_in_use: state.admission.places_in_use(),
        queued: state.admission.queued(),
        capacity: state.admission.capacity(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&snapshot),
    )
        .into_response()
}

/// Unknown routes: 404 in the error shape.
pub(crate) async fn not_found(request: Request) -> Response {
    ApiError::no_route(request.uri().path()).into_response()
}

/// A wrong method on a known route: 405 in the error shape (the router adds `Allow`).
pub(crate) async fn method_not_allowed(request: Request) -> Response {
    let allowed = match request.uri().path() {
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/sample"
        | "/v1/compute_logprobs"
        | "/update_weights_from_disk"
        | "/pause_generation"
        | "/continue_generation" => "POST",
        "/flush_cache" => "GET, POST",
        "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => "POST",
        _ => "GET",
    };
    let mut response = ApiError::method_not_allowed(
        request.method().as_str(),
        request.uri().path(),
        Some(allowed),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// The route label of a path in `infermux_http_requests_total`.
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/sample" => "/v1/sample",
        "/v1/compute_logprobs" => "/v1/compute_logprobs",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/inference/v1/completions" => "/inference/v1/completions",
        "/update_weights_from_disk" => "/update_weights_from_disk",
        "/pause_generation" => "/pause_generation",
        "/continue_generation" => "/continue_generation",
        "/flush_cache" => "/flush_cache",
        "/v1/load_lora_adapter" => "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter" => "/v1/unload_lora_adapter",
        "/get_weight_version" => "/get_weight_version",
        p if p.starts_with("/v1/models") => "/v1/models",
        "/api/v1/asample" => "/api/v1/asample",
        p if p.starts_with("/api/v1/") => "/api/v1",
        _ => "other",
    }
}

/// The outermost layer: a handler that panics answers 500 in the error shape; an error reply
/// some layer left without a JSON body (the router's 405, an extractor's rejection) gets one;
/// every reply is counted by route and status.
pub(crate) async fn finish_reply(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = match super::panic::CatchPanic::new(next.run(request)).await {
        Ok(response) => response,
        Err(message) => {
            ApiError::internal(format!("the request handler panicked: {message}")).into_response()
        }
    };
    let response = json_error_body(response, &method, &path);
    metrics.count_reply(route, response.status().as_u16());
    response
}

/// 413 at once for a body whose declared `Content-Length` is over the limit, before any of it
/// is read (otherwise the body extractor waits for bytes a lying client never sends).
pub(crate) async fn refuse_declared_oversize(
    State(max_body_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > max_body_bytes as u64 => {
            ApiError::too_large(max_body_bytes).into_response()
        }
        _ => next.run(request).await,
    }
}

/// An error status without a JSON body becomes the same status with an OpenAI error body
/// (headers such as `Allow` kept).
fn json_error_body(response: Response, method: &axum::http::Method, path: &str) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let error = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        ApiError::method_not_allowed(method.as_str(), path, allowed.as_deref())
    } else {
        ApiError::status(
            status,
            format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("error")
            ),
        )
    };
    let fresh = error.into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, fresh.into_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use std::io::{Read, Write};

    /// Sends `raw` to `addr` and reads the reply to its end (off the runtime's workers).
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let raw = raw.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            conn.write_all(&raw).unwrap();
            let mut out = Vec::new();
            let _ = conn.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap()
    }

    fn error_json(reply: &str) -> serde_json::Value {
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {reply}"))
    }

    #[tokio::test]
    async fn panics_wrong_methods_and_protocol_errors_answer_in_the_error_shape() {
        let metrics = Arc::new(Metrics::default());
        let app = axum::Router::new()
            .route(
                "/boom",
                post(|| async {
                    if true {
                        panic!("handler bug");
                    }
                    "unreachable"
                }),
            )
            .route("/ok", get(|| async { "fine" }))
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                metrics.clone(),
                finish_reply,
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = super::super::conn::JsonErrorListener::new(listener, Some(metrics.clone()));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let reply = exchange(
            addr,
            b"POST /boom HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 500"), "{reply}");
        let v = error_json(&reply);
        assert_eq!(v["error"]["type"], "server_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("handler bug")
        );

        let reply = exchange(
            addr,
            b"DELETE /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert!(
            reply.to_ascii_lowercase().contains("\r\nallow: get"),
            "{reply}"
        );
        assert_eq!(error_json(&reply)["error"]["code"], "method_not_allowed");

        let reply = exchange(addr, b"NOT A REQUEST\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert_eq!(error_json(&reply)["error"]["type"], "invalid_request_error");

        let mut huge = b"GET /ok HTTP/1.1\r\nhost: x\r\n".to_vec();
        for i in 0..200 {
            huge.extend(format!("x-h{i}: v\r\n").bytes());
        }
        huge.extend(b"\r\n");
        let reply = exchange(addr, &huge).await;
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
        assert_eq!(
            error_json(&reply)["error"]["code"],
            "request_header_fields_too_large"
        );

        let text = metrics.render(&super::super::metrics::Snapshot {
            engines: Vec::new(),
            in_flight: 0,
            places_in_use: 0,
            queued: 0,
            capacity: 1,
        });
        for series in [
            "infermux_http_requests_total{route=\"other\",status=\"500\"} 1",
            "infermux_http_requests_total{route=\"other\",status=\"405\"} 1",
            "infermux_http_requests_total{route=\"other\",status=\"400\"} 1",
            "infermux_http_requests_total{route=\"other\",status=\"431\"} 1",
        ] {
            assert!(text.contains(series), "no {series} in\n{text}");
        }
    }
}
