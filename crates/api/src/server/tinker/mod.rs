//! Tinker's REST protocol (`/api/v1/...`), the subset the official `tinker` SDK's
//! `ServiceClient` → `create_sampling_client` → `sample` / `compute_logprobs` path calls, over
//! this server's models: sessions, sampling sessions, `asample` returning a future that
//! `retrieve_future` long-polls (the result is Tinker's protobuf `SampleResponse`, see
//! [`proto`]), heartbeats, client config, capabilities, telemetry (accepted and dropped unread:
//! it may carry keys). Results are the in-process [`crate::SamplingClient::sample`]'s.
//! Every other `/api/v1/` route answers 404 `{"detail": …}`, a wrong method 405 (never 5xx,
//! which the SDK retries for minutes). `asample` goes through the server's admission: full, it
//! answers 429 with `Retry-After` and the SDK resends the same `seq_id` a second later.
//! `tests/tinker_sdk.rs` drives all of it with the SDK itself.

mod futures;
mod proto;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use axum::{Extension, Json, Router};
use infermux_core::{ModelInput, SamplingParams, TokenId};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::convert::{blocking, check_sequences, request_id};
use super::error::ApiError;
use super::{AppState, ServedModel};
use futures::{Completer, Futures, Outcome, Refused, Registered};

/// How long `retrieve_future` holds a request for a running future before `try_again` (under
/// the SDK's 45 s read timeout; the SDK re-polls at once).
const LONG_POLL: Duration = Duration::from_secs(25);
/// Most sampling sessions remembered (the oldest forgotten first).
const MAX_SAMPLERS: usize = 65_536;
/// Longest session id, model name or path a client may give (they are stored and repeated in
/// every future and sample id).
const MAX_NAME_BYTES: usize = 256;

/// The Tinker routes, to merge into the server's router.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/client/config", post_only(client_config))
        .route("/api/v1/client/dynamic_config", post_only(dynamic_config))
        .route("/api/v1/create_session", post_only(create_session))
        .route("/api/v1/session_heartbeat", post_only(session_heartbeat))
        .route("/api/v1/sessions/{id}/finish", post_only(finish_session))
        .route(
            "/api/v1/create_sampling_session",
            post_only(create_sampling_session),
        )
        .route("/api/v1/samplers/{id}", get_only(get_sampler))
        .route("/api/v1/asample", post_only(asample))
        .route("/api/v1/retrieve_future", post_only(retrieve_future))
        .route("/api/v1/cancel_future", post_only(cancel_future))
        .route("/api/v1/get_server_capabilities", get_only(capabilities))
        .route("/api/v1/healthz", get_only(healthz))
        .route("/api/v1/telemetry", post_only(telemetry))
        .route("/api/v1", any(not_supported))
        .route("/api/v1/", any(not_supported))
        .route("/api/v1/{*rest}", any(not_supported))
        .layer(Extension(Arc::new(Tinker::default())))
}

/// `POST` to `handler`; any other method 405 in Tinker's shape.
fn post_only<H, T>(handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    post(handler).fallback(|m: Method, uri: Uri| async move { wrong_method(&m, &uri, "POST") })
}

/// `GET` (and `HEAD`) to `handler`; any other method 405 in Tinker's shape.
fn get_only<H, T>(handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    get(handler).fallback(|m: Method, uri: Uri| async move { wrong_method(&m, &uri, "GET") })
}

/// 405 `{"detail": …}` with `Allow`.
fn wrong_method(method: &Method, uri: &Uri, allowed: &'static str) -> Response {
    let mut r = detail(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} is not allowed on {} (allowed: {allowed})",
            uri.path()
        ),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}

/// The protocol's state: sampling sessions and futures.
#[derive(Debug, Default)]
struct Tinker {
    samplers: Mutex<Samplers>,
    futures: Arc<Futures>,
}

#[derive(Debug, Default)]
struct Samplers {
    by_id: HashMap<String, Sampler>,
    order: VecDeque<String>,
}

/// A sampling session: which served model or loaded adapter it samples (by name, resolved
/// per request, so an adapter unloaded meanwhile fails the sample), as the client named it.
#[derive(Debug, Clone)]
struct Sampler {
    model: String,
    base_model: String,
    model_path: Option<String>,
}

impl Tinker {
    fn sampler(&self, id: &str) -> Option<Sampler> {
        self.samplers.lock().ok()?.by_id.get(id).cloned()
    }

    fn add_sampler(&self, id: String, sampler: Sampler) {
        let Ok(mut s) = self.samplers.lock() else {
            return;
        };
        if s.by_id.insert(id.clone(), sampler).is_none() {
            s.order.push_back(id);
        }
        while s.order.len() > MAX_SAMPLERS {
            if let Some(old) = s.order.pop_front() {
                s.by_id.remove(&old);
            }
        }
    }
}

type Shared = State<Arc<AppState>>;
type Ext = Extension<Arc<Tinker>>;
type Body = Result<Bytes, BytesRejection>;

/// Tinker's error shape, `{"detail": …}`, with `status`.
fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": message.into() }))).into_response()
}

/// An [`ApiError`] in Tinker's shape (status and `Retry-After` kept).
fn from_api(e: ApiError) -> Response {
    let mut r = detail(e.status, e.body.error.message);
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// A request refused before any work: its status and Tinker's `detail`.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    detail: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        detail(self.status, self.detail)
    }
}

/// The JSON body as `T`; errors are 400 (413 past the size limit) naming what was wrong.
fn parse<T: DeserializeOwned>(body: Body) -> Result<T, Refusal> {
    let bytes = body.map_err(|r| Refusal {
        status: r.status(),
        detail: r.body_text(),
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| Refusal {
        status: StatusCode::BAD_REQUEST,
        detail: if e.inner().is_data() {
            format!("invalid request body at `{}`: {}", e.path(), e.inner())
        } else {
            format!("the request body is not JSON: {}", e.inner())
        },
    })
}

/// `POST /api/v1/client/config`: every optional protocol feature off (no JWT, no batched
/// retrieval, no session joining); the SDK's own httpx transport.
async fn client_config() -> Response {
    Json(json!({
        "pjwt_auth_enabled": false,
        "use_pyqwest_transport": false,
        "sample_use_retrieve_futures": false,
        "sample_join_sampling_session": false,
        "custom_loss_server_side": false,
    }))
    .into_response()
}

/// `POST /api/v1/client/dynamic_config`.
async fn dynamic_config() -> Response {
    Json(json!({ "refresh_interval_sec": 300, "sample_cancel_enabled": false })).into_response()
}

/// `POST /api/v1/create_session`: a fresh id (sessions hold nothing here).
async fn create_session() -> Response {
    Json(json!({
        "type": "create_session",
        "session_id": request_id("sess"),
        "info_message": null,
    }))
    .into_response()
}

/// `POST /api/v1/session_heartbeat`.
async fn session_heartbeat() -> Response {
    Json(json!({ "type": "session_heartbeat" })).into_response()
}

/// `POST /api/v1/sessions/{id}/finish`.
async fn finish_session() -> Response {
    Json(json!({})).into_response()
}

/// `POST /api/v1/telemetry`: accepted and dropped unread (events may hold request headers,
/// i.e. keys, and stack traces).
async fn telemetry() -> Response {
    Json(json!({ "status": "accepted" })).into_response()
}

/// `GET /api/v1/healthz`.
async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /api/v1/get_server_capabilities`: the served models, sampleable, not trainable.
async fn capabilities(State(state): Shared) -> Response {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "model_name": m.name,
                "max_context_length": m.client.engine().info().max_context,
                "trainable": false,
                "sampleable": true,
            })
        })
        .collect();
    Json(json!({ "supported_models": models })).into_response()
}

/// Any other `/api/v1/` route (training, checkpoints, weights, …).
async fn not_supported(method: Method, uri: Uri) -> Response {
    detail(
        StatusCode::NOT_FOUND,
        format!(
            "{method} {} is not supported by infermux: it serves Tinker's sampling routes only",
            uri.path()
        ),
    )
}

/// Which served model or LoRA adapter `base_model` / `model_path` name: a served name,
/// `org/<served name>` (a Hugging Face id), or a `tinker://` path whose last segment is a
/// served model or an adapter loaded into the first (`--lora-modules`, `/v1/load_lora_adapter`):
/// Tinker's `model_path` of trained weights. Its name, and whether it is an adapter.
fn resolve(
    state: &AppState,
    base_model: Option<&str>,
    model_path: Option<&str>,
) -> Result<(String, bool), String> {
    for (field, value) in [("model_path", model_path), ("base_model", base_model)] {
        if value.is_some_and(|v| v.len() > MAX_NAME_BYTES) {
            return Err(format!("{field} is longer than {MAX_NAME_BYTES} bytes"));
        }
    }
    let served: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
    let short = |name: &str| name.rsplit('/').next().unwrap_or(name).to_string();
    let find = |name: &str| {
        let short = short(name);
        served
            .iter()
            .find(|s| **s == name || **s == short)
            .map(|s| s.to_string())
    };
    match (model_path, base_model) {
        (Some(path), _) => {
            let rest = path
                .strip_prefix("tinker://")
                .ok_or_else(|| format!("model_path {path:?} is not a tinker:// path"))?;
            if let Some(name) = find(rest) {
                return Ok((name, false));
            }
            let adapters: Vec<String> = state
                .default_model()
                .client
                .loras()
                .into_iter()
                .map(|a| a.name)
                .collect();
            let last = short(rest);
            match adapters.iter().find(|a| **a == rest || **a == last) {
                Some(a) => Ok((a.clone(), true)),
                None => Err(format!(
                    "model_path {path:?}: its last segment names neither a served model \
                     ({served:?}) nor a loaded LoRA adapter ({adapters:?}); load the adapter \
                     first (--lora-modules or POST /v1/load_lora_adapter)"
                )),
            }
        }
        (None, Some(name)) => find(name)
            .map(|n| (n, false))
            .ok_or_else(|| format!("base_model {name:?} is not served here (served: {served:?})")),
        (None, None) => Err("one of base_model or model_path is required".into()),
    }
}

#[derive(Deserialize)]
struct CreateSamplingSession {
    session_id: String,
    sampling_session_seq_id: u64,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
}

/// `POST /api/v1/create_sampling_session`.
async fn create_sampling_session(State(state): Shared, Extension(t): Ext, body: Body) -> Response {
    let req: CreateSamplingSession = match parse(body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if req.session_id.len() > MAX_NAME_BYTES {
        return detail(
            StatusCode::BAD_REQUEST,
            format!("session_id is longer than {MAX_NAME_BYTES} bytes"),
        );
    }
    let (model, adapter) =
        match resolve(&state, req.base_model.as_deref(), req.model_path.as_deref()) {
            Ok(m) => m,
            Err(msg) => return detail(StatusCode::BAD_REQUEST, msg),
        };
    let id = format!("{}:sample:{}", req.session_id, req.sampling_session_seq_id);
    // An adapter's session reports the model it adapts (the SDK loads its tokenizer).
    let base_model = req.base_model.unwrap_or_else(|| {
        if adapter {
            state.default_model().name.clone()
        } else {
            model.clone()
        }
    });
    t.add_sampler(
        id.clone(),
        Sampler {
            model,
            base_model,
            model_path: req.model_path,
        },
    );
    Json(json!({ "type": "create_sampling_session", "sampling_session_id": id })).into_response()
}

/// `GET /api/v1/samplers/{id}` (the SDK asks for a `model_path` session's base model).
async fn get_sampler(Extension(t): Ext, Path(id): Path<String>) -> Response {
    match t.sampler(&id) {
        Some(s) => Json(json!({
            "sampler_id": id,
            "base_model": s.base_model,
            "model_path": s.model_path,
        }))
        .into_response(),
        None => detail(StatusCode::NOT_FOUND, format!("no sampling session {id:?}")),
    }
}

/// `asample`'s body (Tinker's `SampleRequest`). Everything the sample needs is read leniently
/// here and checked in [`prepare`], so a bad parameter fails the future with a `user` error
/// naming it rather than the HTTP request.
#[derive(Deserialize)]
struct AsampleBody {
    #[serde(default)]
    num_samples: Value,
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    sampling_params: Value,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
    #[serde(default)]
    sampling_session_id: Option<String>,
    #[serde(default)]
    seq_id: Option<u64>,
    #[serde(default)]
    prompt_logprobs: Option<bool>,
    #[serde(default)]
    topk_prompt_logprobs: Value,
    #[serde(default)]
    topk_sample_logprobs: Value,
    #[serde(default)]
    prompt_alt_tokens_k: Value,
    #[serde(default)]
    target_prompt_logprobs: Value,
    #[serde(default)]
    prompt_logprobs_last_n: Value,
    #[serde(default)]
    record_stability_info: Option<bool>,
}

/// Tinker's `SamplingParams`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TinkerParams {
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    top_p: Option<f32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<TokenId>),
}

/// A sample request ready for the engine.
struct Job {
    prompt: ModelInput,
    n: usize,
    params: SamplingParams,
    include_prompt: bool,
    topk_prompt: usize,
    topk_sampled: usize,
}

fn field<T: DeserializeOwned>(v: Value, name: &str, default: T) -> Result<T, String> {
    if v.is_null() {
        return Ok(default);
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." {
            String::new()
        } else {
            format!(".{at}")
        };
        format!("`{name}{at}`: {}", e.inner())
    })
}

/// Tinker's `SamplingParams` as ours: `top_k = -1` is off in both; `stop: []` turns EOS off
/// too (Tinker's rule), token-id stops are stop tokens.
fn sampling_params(p: TinkerParams) -> SamplingParams {
    let (stop, stop_token_ids, ignore_eos) = match p.stop {
        None => (Vec::new(), Vec::new(), false),
        Some(Stop::Text(s)) => (vec![s], Vec::new(), false),
        Some(Stop::Texts(v)) if v.is_empty() => (Vec::new(), Vec::new(), true),
        Some(Stop::Texts(v)) => (v, Vec::new(), false),
        Some(Stop::Ids(v)) => (Vec::new(), v, false),
    };
    SamplingParams {
        max_tokens: p.max_tokens,
        seed: p.seed,
        temperature: p.temperature.unwrap_or(1.0),
        top_k: p.top_k.unwrap_or(-1),
        top_p: p.top_p.unwrap_or(1.0),
        stop,
        stop_token_ids,
        ignore_eos,
        ..SamplingParams::default()
    }
}

/// The request's fields checked and converted; `Err` names the field.
fn prepare(b: AsampleBody, max_sequences: usize) -> Result<Job, ApiError> {
    let user = |msg: String| ApiError::bad_request(msg);
    let n: usize = field(b.num_samples, "num_samples", 1).map_err(user)?;
    if n == 0 {
        return Err(user("`num_samples` must be at least 1".into()));
    }
    let topk_prompt: usize =
        field(b.topk_prompt_logprobs, "topk_prompt_logprobs", 0).map_err(user)?;
    let topk_sampled: usize =
        field(b.topk_sample_logprobs, "topk_sample_logprobs", 0).map_err(user)?;
    let alt: usize = field(b.prompt_alt_tokens_k, "prompt_alt_tokens_k", 0).map_err(user)?;
    let unsupported = [
        (alt > 0, "prompt_alt_tokens_k"),
        (
            !b.target_prompt_logprobs.is_null(),
            "target_prompt_logprobs",
        ),
        (
            !b.prompt_logprobs_last_n.is_null(),
            "prompt_logprobs_last_n",
        ),
        (
            b.record_stability_info == Some(true),
            "record_stability_info",
        ),
    ];
    if let Some((_, name)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(user(format!("`{name}` is not supported by infermux")));
    }
    let prompt: ModelInput = field(b.prompt, "prompt", ModelInput::default()).map_err(user)?;
    if prompt.chunks.is_empty() {
        return Err(user(
            "`prompt` is required (a ModelInput with chunks)".into(),
        ));
    }
    let params: TinkerParams = if b.sampling_params.is_null() {
        return Err(user("`sampling_params` is required".into()));
    } else {
        field(b.sampling_params, "sampling_params", None)
            .map_err(|e: String| {
                if e.contains("untagged enum Stop") {
                    user("`sampling_params.stop`: must be a string, a list of strings or a list of token ids".into())
                } else {
                    user(e)
                }
            })?
            .ok_or_else(|| user("`sampling_params` is required".into()))?
    };
    let mut params = sampling_params(params);
    params.n = n;
    if topk_sampled > 0 {
        params.logprobs = Some(topk_sampled);
    }
    check_sequences(1, params.samples_drawn(), max_sequences, "num_samples")?;
    Ok(Job {
        prompt,
        n,
        params,
        include_prompt: b.prompt_logprobs.unwrap_or(false),
        topk_prompt,
        topk_sampled,
    })
}

/// A failed future's outcome: the client's fault (4xx) is `user`, anything else `server`.
fn failed(e: &ApiError) -> Outcome {
    Outcome::Failed {
        error: e.body.error.message.clone(),
        category: if e.status.is_client_error() {
            "user"
        } else {
            "server"
        },
    }
}

fn accepted(r: &Registered) -> Response {
    Json(json!({
        "request_id": r.request_id,
        "sample_sequence_ids": r.sequence_ids,
    }))
    .into_response()
}

/// `POST /api/v1/asample`: registers a future and answers its id at once. A resent
/// `(sampling_session_id, seq_id)` gets its existing future; a full server (admission queue or
/// future cap) answers 429 with `Retry-After`.
async fn asample(State(state): Shared, Extension(t): Ext, body: Body) -> Response {
    let arrived = Instant::now();
    let bytes = match body {
        Ok(b) => b,
        Err(r) => return detail(r.status(), r.body_text()),
    };
    let parsed = blocking(move || parse::<AsampleBody>(Ok(bytes))).await;
    let req = match parsed {
        Ok(Ok(r)) => r,
        Ok(Err(r)) => return r.into_response(),
        Err(e) => return from_api(e),
    };
    let (model, key) = match &req.sampling_session_id {
        Some(id) => match t.sampler(id) {
            Some(s) => (s.model, req.seq_id.map(|seq| (id.clone(), seq))),
            None => {
                return detail(
                    StatusCode::NOT_FOUND,
                    format!("no sampling session {id:?} (create it with create_sampling_session)"),
                );
            }
        },
        None => match resolve(&state, req.base_model.as_deref(), req.model_path.as_deref()) {
            Ok((m, _)) => (m, None),
            Err(msg) => return detail(StatusCode::BAD_REQUEST, msg),
        },
    };
    if let Some(key) = &key
        && let Some(r) = t.futures.existing(key)
    {
        return accepted(&r);
    }
    // An adapter's session fails here once the adapter is unloaded.
    let served = match state.model(Some(&model)) {
        Ok(served) => served,
        Err(e) => return from_api(e),
    };
    let limits = &state.limits;
    let cap = 2 * (limits.max_concurrent_requests + limits.max_queue).max(1);
    if !t.futures.has_room(cap) {
        return from_api(ApiError::overloaded());
    }
    // Sample ids for a future that fails at once: never more than a request may ask for (the
    // raw number is the client's).
    let samples_hint = req
        .num_samples
        .as_u64()
        .map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))
        .clamp(1, limits.max_sequences_per_request.max(1));
    let job = prepare(req, limits.max_sequences_per_request);
    let Ok(job) = job else {
        // A bad request still gets its future, failed with a `user` error naming the field.
        let err = job.err().map(|e| failed(&e));
        return match t.futures.register(key, samples_hint, cap) {
            Ok((r, done)) => {
                if let Some(outcome) = err {
                    done.complete(outcome);
                }
                accepted(&r)
            }
            Err(refused) => refusal(refused),
        };
    };
    // Admission: take places now, or join the bounded queue, or 429 when the queue is full.
    let weight = job.params.samples_drawn();
    let deadline = state.admission.deadline();
    let mut admit = Box::pin({
        let state = state.clone();
        async move { state.admission.admit(weight).await }
    });
    let first = std::future::poll_fn(|cx| Poll::Ready(admit.as_mut().poll(cx))).await;
    if let Poll::Ready(Err(e)) = first {
        return from_api(e);
    }
    let (registered, done) = match t.futures.register(key, job.n, cap) {
        Ok(r) => r,
        Err(refused) => return refusal(refused),
    };
    let id = done.id().to_string();
    let task = tokio::spawn(run_job(
        state.clone(),
        served,
        job,
        first,
        admit,
        deadline,
        arrived,
        done,
    ));
    t.futures.set_task(&id, task.abort_handle());
    accepted(&registered)
}

fn refusal(refused: Refused) -> Response {
    match refused {
        Refused::Existing(r) => accepted(&r),
        Refused::Full => from_api(ApiError::overloaded()),
    }
}

/// Samples `job` once admitted (now, or after its turn in the queue), within the server's
/// request deadline, and resolves the future with the protobuf result or the failure.
#[allow(clippy::too_many_arguments)]
async fn run_job<A>(
    state: Arc<AppState>,
    served: ServedModel,
    job: Job,
    first: Poll<Result<super::limits::Permit, ApiError>>,
    admit: std::pin::Pin<Box<A>>,
    deadline: Option<tokio::time::Instant>,
    arrived: Instant,
    done: Completer,
) where
    A: Future<Output = Result<super::limits::Permit, ApiError>> + Send,
{
    let client = served.client.clone();
    let series = state.metrics.model_series(&served.name);
    let (topk_prompt, topk_sampled) = (job.topk_prompt, job.topk_sampled);
    let work = async {
        let _permit = match first {
            Poll::Ready(p) => p?,
            Poll::Pending => admit.await?,
        };
        let tracked = series.track(job.n);
        let pending = blocking(move || {
            client.sample(
                job.prompt,
                job.n,
                job.params,
                job.include_prompt,
                job.topk_prompt,
            )
        })
        .await?;
        let r = pending.await.map_err(ApiError::from);
        tracked.end(r.is_ok(), arrived.elapsed());
        if let Ok(r) = &r {
            for s in &r.sequences {
                series.finished(s.finish_reason.as_openai_str());
            }
        }
        r
    };
    let outcome = match state.admission.within(deadline, work).await {
        Ok(r) => Outcome::Sample(proto::sample_response(&r, topk_prompt, topk_sampled)),
        Err(e) => failed(&e),
    };
    done.complete(outcome);
}

#[derive(Deserialize)]
struct FutureId {
    request_id: String,
}

/// `POST /api/v1/retrieve_future`: the result (protobuf), a failure
/// (`{"error", "category"}`), or `try_again` after holding the request [`LONG_POLL`].
async fn retrieve_future(Extension(t): Ext, body: Body) -> Response {
    let req: FutureId = match parse(body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    match t.futures.wait(&req.request_id, LONG_POLL).await {
        None => detail(
            StatusCode::NOT_FOUND,
            format!("unknown or expired request_id {:?}", req.request_id),
        ),
        Some(None) => Json(json!({
            "type": "try_again",
            "request_id": req.request_id,
            "queue_state": "active",
        }))
        .into_response(),
        Some(Some(outcome)) => match &*outcome {
            Outcome::Sample(bytes) => (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                bytes.clone(),
            )
                .into_response(),
            Outcome::Failed { error, category } => {
                Json(json!({ "error": error, "category": category })).into_response()
            }
        },
    }
}

/// `POST /api/v1/cancel_future`: forgets the future and cancels its engine work.
async fn cancel_future(Extension(t): Ext, body: Body) -> Response {
    let req: FutureId = match parse(body) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if t.futures.cancel(&req.request_id) {
        Json(json!({})).into_response()
    } else {
        detail(
            StatusCode::NOT_FOUND,
            format!("unknown or expired request_id {:?}", req.request_id),
        )
    }
}
