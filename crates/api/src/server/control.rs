//! The control routes an RL loop drives between training steps, in SGLang's shapes: replace the
//! weights from a checkpoint on disk (`POST /update_weights_from_disk`), pause and resume
//! generation (`POST /pause_generation`, `POST /continue_generation`). Served only with
//! [`ServerConfig::control`] set (`infermux serve --enable-control-routes`), behind the admin
//! key (`auth.rs`); a model path must resolve (symlinks followed) inside the allowed folder.
//! `GET /get_weight_version` reads only and is always served.
//!
//! Replies are SGLang's `{"success", "message", ...}`; a failure also carries OpenAI's `error`
//! object, with the status that fits (400 for a bad path or a checkpoint of another model, 409
//! while another update waits).
//!
//! [`ServerConfig::control`]: super::ServerConfig::control

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use infermux_core::backend::WeightUpdateError;
use infermux_core::engine::{PauseMode, UpdateMode, WeightUpdate};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::convert::blocking;
use super::error::ApiError;
use super::routes::{Body, Shared, parse_body};

/// The routes that need the admin key.
const CONTROL_ROUTES: [&str; 6] = [
    "/update_weights_from_disk",
    "/pause_generation",
    "/continue_generation",
    "/flush_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
];

/// Whether `path` is a control route (the admin key guards it).
pub(crate) fn is_control_route(path: &str) -> bool {
    CONTROL_ROUTES.contains(&path.trim_end_matches('/'))
}

/// How the control routes are set up.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The key the control routes need as `Authorization: Bearer KEY`.
    pub admin_key: String,
    /// Model paths must lie inside this folder once symlinks are resolved.
    pub allowed_model_dir: PathBuf,
}

/// The control routes, to merge when they are enabled.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/update_weights_from_disk", post(update_weights_from_disk))
        .route("/pause_generation", post(pause_generation))
        .route("/continue_generation", post(continue_generation))
        .route("/flush_cache", get(flush_cache).post(flush_cache))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
}

/// vLLM's `LoadLoRAAdapterRequest` / `UnloadLoRAAdapterRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraBody {
    lora_name: String,
    #[serde(default)]
    lora_path: Option<String>,
    /// vLLM's name for a numeric id; accepted and ignored (ids are the engine's).
    #[serde(default)]
    lora_int_id: Option<Value>,
    /// vLLM's in-place reload; refused (unload, then load).
    #[serde(default)]
    load_inplace: bool,
}

/// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`: reads the PEFT folder (inside
/// `--allowed-model-dir`) into the default model's engine; requests then name it as `model`.
async fn load_lora_adapter(State(state): Shared, body: Body) -> Response {
    let result = async {
        let body: LoraBody = parse_body(&state, body).await?;
        let Some(control) = &state.control else {
            return Err(ApiError::no_route("/v1/load_lora_adapter"));
        };
        if body.load_inplace {
            return Err(ApiError::invalid(
                "load_inplace",
                "load_inplace is not supported: unload the adapter, then load it",
            ));
        }
        let _ = body.lora_int_id;
        if state.models.iter().any(|m| m.name == body.lora_name) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("{:?} is the name of a served model", body.lora_name),
            ));
        }
        let Some(given) = body.lora_path.clone() else {
            return Err(ApiError::invalid("lora_path", "`lora_path` is required"));
        };
        let allowed = control.allowed_model_dir.clone();
        let path = blocking(move || resolve_model_path(&given, &allowed))
            .await?
            .map_err(|e| e.renamed(&[("model_path", "lora_path")]))?;
        let client = state.default_model().client.clone();
        let name = body.lora_name.clone();
        let info = blocking(move || client.load_lora(&name, &path).wait())
            .await?
            .map_err(|e| ApiError::from_adapter(&e))?;
        Ok(json!({
            "success": true,
            "message": format!("Success: LoRA adapter '{}' added successfully.", info.name),
            "lora_name": info.name,
            "version": info.version,
            "rank": info.rank,
            "target_modules": info.targets,
            "num_params": info.num_params,
        }))
    }
    .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        Err(error) => failure(error),
    }
}

/// `POST /v1/unload_lora_adapter` `{"lora_name"}`: new requests on it fail (404), running
/// ones finish on it.
async fn unload_lora_adapter(State(state): Shared, body: Body) -> Response {
    let result = async {
        let body: LoraBody = parse_body(&state, body).await?;
        let client = state.default_model().client.clone();
        let info = client
            .unload_lora(&body.lora_name)
            .await
            .map_err(|e| ApiError::from_adapter(&e))?;
        Ok::<_, ApiError>(json!({
            "success": true,
            "message": format!("Success: LoRA adapter '{}' removed successfully.", info.name),
            "lora_name": info.name,
        }))
    }
    .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        Err(error) => failure(error),
    }
}

/// The read-only route, served always.
pub(crate) fn version_routes() -> Router<Arc<AppState>> {
    Router::new().route("/get_weight_version", get(get_weight_version))
}

/// SGLang's `UpdateWeightFromDiskReqInput`: the fields it defines are accepted; those with no
/// meaning here (`load_format` other than auto, `is_async`) are refused, the cache switches
/// are no-ops (a swap always flushes the prefix cache and frees all KV).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    model_path: String,
    #[serde(default)]
    load_format: Option<String>,
    #[serde(default)]
    abort_all_requests: bool,
    #[serde(default)]
    weight_version: Option<String>,
    #[serde(default)]
    keep_pause: bool,
    #[serde(default)]
    is_async: bool,
    #[serde(default)]
    flush_cache: Option<bool>,
    #[serde(default)]
    torch_empty_cache: Option<bool>,
    #[serde(default)]
    token_step: Option<Value>,
}

/// A failure in SGLang's shape with OpenAI's `error` next to it.
fn failure(error: ApiError) -> Response {
    let mut body = serde_json::to_value(&error.body).unwrap_or_else(|_| json!({}));
    if let Some(map) = body.as_object_mut() {
        map.insert("success".into(), json!(false));
        map.insert("message".into(), json!(error.body.error.message));
    }
    let mut response = (error.status, Json(body)).into_response();
    if let Some(secs) = error.retry_after {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
    }
    response
}

/// Resolves `given` (absolute, or relative to `allowed`) to a folder inside `allowed`: no `..`
/// component, and inside once every symlink is followed.
fn resolve_model_path(given: &str, allowed: &Path) -> Result<PathBuf, ApiError> {
    let invalid = |message: String| ApiError::invalid("model_path", message);
    if given.trim().is_empty() {
        return Err(invalid("`model_path` is empty".into()));
    }
    let path = Path::new(given);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!(
            "`model_path` {given:?} contains `..`; give a folder inside --allowed-model-dir"
        )));
    }
    let allowed = allowed.canonicalize().map_err(|e| {
        invalid(format!(
            "the allowed model folder {} cannot be resolved: {e}",
            allowed.display()
        ))
    })?;
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        allowed.join(path)
    };
    let resolved = joined
        .canonicalize()
        .map_err(|e| invalid(format!("`model_path` {given:?} cannot be opened: {e}")))?;
    if !resolved.starts_with(&allowed) {
        return Err(invalid(format!(
            "`model_path` {given:?} resolves to {}, outside the allowed model folder {} \
             (symlinks are followed)",
            resolved.display(),
            allowed.display()
        )));
    }
    if !resolved.is_dir() {
        return Err(invalid(format!(
            "`model_path` {given:?} is not a folder (give a Hugging Face checkpoint folder)"
        )));
    }
    // The files a loader opens (config, shards, index, the ONNX graph) must not lead out
    // either.
    for folder in [resolved.clone(), resolved.join("onnx")] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let target = path.canonicalize().map_err(|e| {
                invalid(format!(
                    "`model_path` {given:?}: {} cannot be opened: {e}",
                    path.display()
                ))
            })?;
            if !target.starts_with(&allowed) {
                return Err(invalid(format!(
                    "`model_path` {given:?}: {} resolves to {}, outside the allowed model \
                     folder {} (symlinks are followed)",
                    path.display(),
                    target.display(),
                    allowed.display()
                )));
            }
        }
    }
    Ok(resolved)
}

/// The reply status and error of a failed update.
fn update_error(err: &WeightUpdateError) -> ApiError {
    let message = err.to_string();
    match err {
        WeightUpdateError::InProgress | WeightUpdateError::Superseded => {
            ApiError::status(StatusCode::CONFLICT, message)
        }
        // Reading tensors whose headers passed the checks failed: out of memory, a runtime
        // error, data that changed under us — the server's side.
        WeightUpdateError::Panicked(_)
        | WeightUpdateError::Load { .. }
        | WeightUpdateError::ForeignStage => ApiError::internal(message),
        WeightUpdateError::Shutdown => ApiError::status(StatusCode::SERVICE_UNAVAILABLE, message),
        WeightUpdateError::Unsupported => ApiError::bad_request(message),
        WeightUpdateError::Model(_) | WeightUpdateError::Mismatch { .. } => {
            ApiError::invalid("model_path", message)
        }
    }
}

/// `POST /update_weights_from_disk`: swaps the default model's weights for the checkpoint at
/// `model_path`; drains running requests (or aborts them with `abort_all_requests`) first.
async fn update_weights_from_disk(State(state): Shared, body: Body) -> Response {
    match update(&state, body).await {
        Ok(reply) => Json(reply).into_response(),
        Err(error) => failure(error),
    }
}

async fn update(state: &Arc<AppState>, body: Body) -> Result<Value, ApiError> {
    let body: UpdateBody = parse_body(state, body).await?;
    let Some(control) = &state.control else {
        return Err(ApiError::no_route("/update_weights_from_disk"));
    };
    if let Some(format) = body.load_format.as_deref()
        && format != "auto"
        && format != "safetensors"
    {
        return Err(ApiError::invalid(
            "load_format",
            format!("load_format {format:?} is not supported; use \"auto\" (safetensors)"),
        ));
    }
    if body.is_async {
        return Err(ApiError::invalid(
            "is_async",
            "is_async is not supported: the reply comes once the new weights serve",
        ));
    }
    let _ = (body.flush_cache, body.torch_empty_cache, body.token_step);
    let allowed = control.allowed_model_dir.clone();
    let given = body.model_path.clone();
    let path = blocking(move || resolve_model_path(&given, &allowed)).await??;
    let mode = if body.abort_all_requests {
        UpdateMode::Abort
    } else {
        UpdateMode::Drain
    };
    let update = WeightUpdate {
        path,
        mode,
        weight_version: body.weight_version,
        keep_paused: body.keep_pause,
    };
    let client = state.default_model().client.clone();
    // The checkpoint's config and headers are read before the engine is asked: on the blocking
    // pool, they are files.
    let pending = blocking(move || client.update_weights(update)).await?;
    let report = pending.await.map_err(|e| update_error(&e))?;
    Ok(json!({
        "success": true,
        "message": format!(
            "weights of {} now serve as version {}",
            body.model_path, report.weight_version
        ),
        "num_paused_requests": report.held_requests,
        "weight_version": report.weight_version,
        "drained_requests": report.drained_requests,
        "aborted_requests": report.aborted_requests,
        "load_seconds": report.load_seconds,
    }))
}

/// SGLang's `PauseGenerationReqInput`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default)]
    mode: Option<String>,
}

/// `POST /pause_generation`: `mode` `in_place` (default; running requests keep their state
/// and wait) or `abort` (they end with 503 `aborted`). SGLang's `retract` is refused.
async fn pause_generation(State(state): Shared, body: Body) -> Response {
    let result = async {
        let body: PauseBody = parse_optional_body(&state, body).await?;
        let mode = match body.mode.as_deref() {
            None | Some("in_place") => PauseMode::InPlace,
            Some("abort") => PauseMode::Abort,
            Some(other) => {
                return Err(ApiError::invalid(
                    "mode",
                    format!("mode {other:?} is not supported; use \"in_place\" or \"abort\""),
                ));
            }
        };
        let mut reports = Vec::new();
        for model in &state.models {
            reports.push(model.client.pause_generation(mode).await?);
        }
        Ok(json!({
            "success": true,
            "message": "generation paused",
            "paused_requests": reports.iter().map(|r| r.paused_requests).sum::<usize>(),
            "aborted_requests": reports.iter().map(|r| r.aborted_requests).sum::<usize>(),
        }))
    }
    .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        Err(error) => failure(error),
    }
}

/// `POST /continue_generation`: resumes every model's engine.
async fn continue_generation(State(state): Shared, body: Body) -> Response {
    let result = async {
        let _: PauseBody = parse_optional_body(&state, body).await?;
        for model in &state.models {
            model.client.continue_generation().await?;
        }
        Ok(json!({ "success": true, "message": "generation continues" }))
    }
    .await;
    match result {
        Ok(reply) => Json(reply).into_response(),
        Err(error) => failure(error),
    }
}

/// SGLang's `/flush_cache`: drops every cached prefix of every served model (running requests
/// keep theirs).
async fn flush_cache(State(state): Shared) -> Response {
    let mut flushed = 0;
    for model in &state.models {
        match model.client.flush_prefix_cache().await {
            Ok(n) => flushed += n,
            Err(error) => return failure(error.into()),
        }
    }
    Json(json!({
        "success": true,
        "message": format!("Cache flushed: {flushed} cached prefixes dropped."),
        "flushed_prefixes": flushed,
    }))
    .into_response()
}

/// A JSON body that may be empty (SGLang's clients post nothing to these routes).
async fn parse_optional_body<T: serde::de::DeserializeOwned + Default + Send + 'static>(
    state: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    match &body {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        _ => parse_body(state, body).await,
    }
}

/// `GET /get_weight_version`: the default model's weight version (`"0"` before any update).
async fn get_weight_version(State(state): Shared) -> Response {
    let client = &state.default_model().client;
    Json(json!({
        "weight_version": client.weight_version(),
        "weight_updates": client.engine().weight_updates(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_stay_inside_the_allowed_folder() {
        let root = std::env::temp_dir().join(format!("infermux-control-{}", std::process::id()));
        let allowed = root.join("allowed");
        let outside = root.join("outside");
        std::fs::create_dir_all(allowed.join("step-1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();

        let inside = resolve_model_path("step-1", &allowed).unwrap();
        assert!(inside.ends_with("step-1"));
        let absolute = allowed.join("step-1");
        assert_eq!(
            resolve_model_path(absolute.to_str().unwrap(), &allowed).unwrap(),
            inside
        );
        for bad in ["step-1/../step-1", "../outside", "", "missing"] {
            let err = resolve_model_path(bad, &allowed).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(err.body.error.param.as_deref(), Some("model_path"), "{bad}");
        }
        let err = resolve_model_path(outside.to_str().unwrap(), &allowed).unwrap_err();
        assert!(err.body.error.message.contains("outside"), "{err:?}");
        #[cfg(unix)]
        {
            let err = resolve_model_path("escape", &allowed).unwrap_err();
            assert!(err.body.error.message.contains("outside"), "{err:?}");
            // A file inside a folder inside may not lead out either.
            std::fs::write(outside.join("model.safetensors"), b"x").unwrap();
            std::fs::create_dir_all(allowed.join("step-2")).unwrap();
            std::os::unix::fs::symlink(
                outside.join("model.safetensors"),
                allowed.join("step-2/model.safetensors"),
            )
            .unwrap();
            let err = resolve_model_path("step-2", &allowed).unwrap_err();
            assert!(
                err.body.error.message.contains("model.safetensors"),
                "{err:?}"
            );
            assert!(err.body.error.message.contains("outside"), "{err:?}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
