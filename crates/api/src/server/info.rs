//! What routers and orchestrators ask a replica: liveness (`/health/live`, `/ping`),
//! readiness (`/health/ready`), a generation probe (`/health_generate`, SGLang's), and the
//! server / model facts SGLang's model gateway reads at registration (`/server_info`,
//! `/model_info` and their `/get_*` spellings).
//!
//! The info routes deliberately report no `model_path` / `tokenizer_path`: sglang-router loads a
//! tokenizer from whatever path a worker reports and falls back to downloading it from a model
//! hub; with a served name only it routes on text and never reaches out.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infermux_core::{GenerateRequest, ModelInput, SamplingParams};
use serde_json::json;

use super::ServedModel;
use super::routes::Shared;

/// A busy engine that has not published for this long is stuck inside a step: not ready. One
/// step of the largest prefill chunk takes seconds on a CPU, so this leaves a wide margin.
const STALL_AFTER: Duration = Duration::from_secs(120);
/// How long `/health_generate` waits for its one token.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a model's engine is not ready, if it is not.
fn not_ready(model: &ServedModel) -> Option<String> {
    let engine = model.client.engine();
    let Ok(stats) = engine.stats() else {
        return Some(format!("the engine of `{}` has stopped", model.name));
    };
    let busy = stats.waiting_requests > 0 || stats.running_requests > 0;
    match engine.since_progress() {
        Some(idle) if busy && idle > STALL_AFTER => Some(format!(
            "the engine of `{}` has made no progress for {} s with work queued",
            model.name,
            idle.as_secs()
        )),
        _ => None,
    }
}

/// `GET /health/live` and `/ping`: 200 while the process serves HTTP (a liveness probe that
/// never restarts a replica for being busy).
pub(crate) async fn live() -> Response {
    Json(json!({ "status": "alive" })).into_response()
}

/// `GET /health/ready`: 200 when every model is loaded and its engine answers (thread up, and
/// making progress when it has work); 503 with the reason otherwise.
pub(crate) async fn ready(State(state): Shared) -> Response {
    let reasons: Vec<String> = state.models.iter().filter_map(not_ready).collect();
    if reasons.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reasons": reasons })),
        )
            .into_response()
    }
}

/// `GET /health_generate`: SGLang's deep check: one greedy token from a one-token prompt
/// through each engine's queue, within [`PROBE_TIMEOUT`]; 200 or 503 with the reason (at once
/// for a paused engine). The route is open, so probes run one at a time: concurrent ones wait
/// their turn instead of filling the engine's queue.
pub(crate) async fn health_generate(State(state): Shared) -> Response {
    let Ok(_turn) = tokio::time::timeout(PROBE_TIMEOUT, state.probe.lock()).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "busy", "reasons": ["another generation probe is running"] })),
        )
            .into_response();
    };
    let mut reasons = Vec::new();
    for model in &state.models {
        let engine = model.client.engine();
        if engine.is_paused() {
            reasons.push(format!("`{}`: generation is paused", model.name));
            continue;
        }
        let token = engine.info().eos_token_ids.first().copied().unwrap_or(0);
        let request = GenerateRequest::new(
            ModelInput::from_ints(vec![token]),
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(1)
            },
        );
        match tokio::time::timeout(PROBE_TIMEOUT, engine.generate(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => reasons.push(format!("`{}`: {e}", model.name)),
            Err(_) => reasons.push(format!(
                "`{}`: no token within {} s",
                model.name,
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }
    if reasons.is_empty() {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "generation failed", "reasons": reasons })),
        )
            .into_response()
    }
}

/// `GET /server_info` (and `/get_server_info`): the served name and the limits this replica
/// runs with.
pub(crate) async fn server_info(State(state): Shared) -> Response {
    let model = state.default_model();
    let engine = model.client.engine();
    let config = engine.config();
    let limits = &state.limits;
    Json(json!({
        "served_model_name": model.name,
        "served_model_names": state.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "max_model_len": engine.info().max_context,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "kv_budget_bytes": engine.kv_budget_bytes(),
        "max_concurrent_requests": limits.max_concurrent_requests,
        "tp_size": 1,
        "dp_size": 1,
    }))
    .into_response()
}

/// `GET /model_info` (and `/get_model_info`): facts of the first served model.
pub(crate) async fn model_info(State(state): Shared) -> Response {
    let model = state.default_model();
    let info = model.client.engine().info();
    Json(json!({
        "model": model.name,
        "is_generation": true,
        "max_model_len": info.max_context,
        "vocab_size": info.vocab_size,
        "eos_token_ids": info.eos_token_ids,
        "dtype": info.dtype.to_string(),
        "device": info.device.to_string(),
    }))
    .into_response()
}
