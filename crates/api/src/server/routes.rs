//! The HTTP handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::future::try_join_all;
use infermux_core::ModelInput;

use super::convert::{
    Generation, chat_logprobs, chat_logprobs_count, chat_prompt, completion_logprobs,
    completion_prompts, finish_str, generate, generated_logprobs, request_id, sampling_params,
    unix_now,
};
use super::error::{ApiError, parse_json};
use super::openai::{
    ChatChoice, ChatMessageOut, ChatRequest, ChatResponse, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage,
};
use super::sse::{self, EchoPrompt, Flavor, StreamSpec};
use super::{AppState, ServedModel};
use crate::wire::{ComputeLogprobsRequest, ComputeLogprobsResponse, SampleRequest};

type Shared = State<Arc<AppState>>;
type Body = Result<Bytes, BytesRejection>;

/// The body's bytes, or 413/400.
fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.limits.max_body_bytes)
        } else {
            ApiError::bad_request(rejection.body_text())
        }
    })
}

fn reply<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    match completions_inner(state, body, arrived).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    state: Arc<AppState>,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let deadline = state.admission.deadline();
    let req: CompletionRequest = parse_json(&body_bytes(&state, body)?)?;
    let served = state.model(req.model.as_deref())?;
    let client = served.client.clone();
    let tokenizer = client.get_tokenizer();
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
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
    if echo && let Some(k) = req.logprobs {
        params.prompt_logprobs = Some(k);
    }
    if stream && params.samples_drawn() > params.n {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` > `n` cannot stream",
        ));
    }
    let prompts = completion_prompts(&tokenizer, req.prompt)?;
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
        };
        return start_stream(
            &state,
            &client,
            spec,
            prompts.into_iter().map(|p| p.tokens).collect(),
            params,
            arrived,
            deadline,
        )
        .await;
    }
    let work = try_join_all(prompts.iter().map(|p| {
        generate(
            &client,
            p.tokens.clone(),
            params.clone(),
            arrived,
            &state.metrics,
        )
    }));
    let gens = state.admission.run(deadline, work).await;
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
            choices.push(CompletionChoice {
                index: p * n + c,
                text,
                logprobs: lp,
                finish_reason: finish,
            });
        }
    }
    let completion: usize = if echo_only {
        0
    } else {
        gens.iter().map(Generation::completion_tokens).sum()
    };
    let usage = Usage::new(gens.iter().map(|g| g.prompt_len).sum(), completion);
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: served.name.clone(),
        choices,
        usage: Some(Some(usage)),
    })
    .into_response())
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

/// Admits a streaming request and starts its engine streams.
async fn start_stream(
    state: &Arc<AppState>,
    client: &crate::SamplingClient,
    spec: StreamSpec,
    prompts: Vec<Vec<infermux_core::TokenId>>,
    mut params: infermux_core::SamplingParams,
    arrived: Instant,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, ApiError> {
    let permit = state
        .admission
        .within(deadline, state.admission.admit())
        .await?;
    params.output_kind = infermux_core::OutputKind::Delta;
    let streams = prompts
        .into_iter()
        .map(|p| client.sample_stream(ModelInput::from_ints(p), params.clone()))
        .collect();
    Ok(sse::respond(
        state.clone(),
        spec,
        streams,
        client.get_tokenizer(),
        permit,
        arrived,
        deadline,
    ))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    match chat_inner(state, body, arrived).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    state: Arc<AppState>,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let deadline = state.admission.deadline();
    let req: ChatRequest = parse_json(&body_bytes(&state, body)?)?;
    let served = state.model(req.model.as_deref())?;
    let client = served.client.clone();
    let tokenizer = client.get_tokenizer();
    let knobs = req.knobs();
    let mut params = sampling_params(&knobs, req.max_completion_tokens.or(req.max_tokens))?;
    params.logprobs = chat_logprobs_count(req.logprobs, req.top_logprobs)?;
    let want_logprobs = params.logprobs.is_some();
    let prompt = chat_prompt(
        &tokenizer,
        &req.messages,
        req.add_generation_prompt.unwrap_or(true),
    )?;
    let id = request_id("chatcmpl");
    let created = unix_now();
    let n = params.n;
    if knobs.stream.unwrap_or(false) {
        let spec = StreamSpec {
            id,
            created,
            model: served.name.clone(),
            n,
            include_usage: include_usage(&knobs),
            flavor: Flavor::Chat {
                logprobs: want_logprobs,
            },
        };
        return start_stream(
            &state,
            &client,
            spec,
            vec![prompt],
            params,
            arrived,
            deadline,
        )
        .await;
    }
    let work = generate(&client, prompt, params, arrived, &state.metrics);
    let g = observe(&state, arrived, state.admission.run(deadline, work).await)?;
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
        })
        .collect();
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model: served.name.clone(),
        choices,
        usage: Usage::new(g.prompt_len, g.completion_tokens()),
    })
    .into_response())
}

/// `POST /v1/sample` (wire::SampleRequest → SampleResponse).
pub(crate) async fn sample(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let result = async {
        let deadline = state.admission.deadline();
        let req: SampleRequest = parse_json(&body_bytes(&state, body)?)?;
        let client = state.default_model().client.clone();
        let work = async {
            client
                .sample(
                    req.prompt,
                    req.num_samples,
                    req.sampling_params,
                    req.include_prompt_logprobs,
                    req.topk_prompt_logprobs,
                )
                .await
                .map_err(ApiError::from)
        };
        observe(&state, arrived, state.admission.run(deadline, work).await)
    }
    .await;
    reply(result)
}

/// `POST /v1/compute_logprobs` (wire::ComputeLogprobsRequest → ComputeLogprobsResponse).
pub(crate) async fn compute_logprobs(State(state): Shared, body: Body) -> Response {
    let arrived = Instant::now();
    let result = async {
        let deadline = state.admission.deadline();
        let req: ComputeLogprobsRequest = parse_json(&body_bytes(&state, body)?)?;
        let client = state.default_model().client.clone();
        let work = async {
            let logprobs = client.compute_logprobs(req.prompt).await?;
            Ok(ComputeLogprobsResponse { logprobs })
        };
        observe(&state, arrived, state.admission.run(deadline, work).await)
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
    Json(ModelList {
        object: "list",
        data: state.models.iter().map(card).collect(),
    })
    .into_response()
}

/// `GET /v1/models/{id}`.
pub(crate) async fn model(State(state): Shared, Path(id): Path<String>) -> Response {
    reply(state.model(Some(&id)).map(card))
}

/// `GET /health`: 200 while every engine answers, 503 otherwise.
pub(crate) async fn health(State(state): Shared) -> Response {
    let stats = state.engine_stats().await;
    if stats.iter().all(|(_, s)| s.is_some()) {
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
    let stats = state.engine_stats().await;
    let snapshot = super::metrics::Snapshot {
        engines: stats.iter().map(|(name, s)| (name.as_str(), *s)).collect(),
        in_flight: state.admission.in_flight(),
        queued: state.admission.queued(),
        capacity: state.admission.capacity(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
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

/// Counts every reply by route and status.
pub(crate) async fn count_replies(State(state): Shared, request: Request, next: Next) -> Response {
    let route = match request.uri().path() {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/sample" => "/v1/sample",
        "/v1/compute_logprobs" => "/v1/compute_logprobs",
        "/health" => "/health",
        "/metrics" => "/metrics",
        p if p.starts_with("/v1/models") => "/v1/models",
        _ => "other",
    };
    let response = next.run(request).await;
    state.metrics.count_reply(route, response.status().as_u16());
    response
}
