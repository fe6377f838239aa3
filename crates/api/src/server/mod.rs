//! The HTTP server behind `infermux serve` (feature `server`): OpenAI-compatible
//! `/v1/completions` and `/v1/chat/completions` (streaming as server-sent events), the native
//! `/v1/sample` and `/v1/compute_logprobs` ([`crate::wire`] shapes), `/v1/models`, `/health`
//! (plus the liveness, readiness and info routes routers read, see `info`) and Prometheus
//! `/metrics`, with admission control (bounded concurrency and queue, 429 with
//! `Retry-After`), body-size and time limits. Every error is a [`crate::wire::ErrorBody`].
//!
//! Embed it in your own tokio service with [`router`], or run it with [`serve`] / [`spawn`]:
//!
//! ```no_run
//! use infermux::ServiceClient;
//! use infermux::server::{self, ServerConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ServiceClient::new().create_sampling_client("models/SmolLM2-135M-Instruct")?;
//! let app = server::router(client, &ServerConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! server::serve(listener, app, server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```
//!
//! Dropping a request — the client closing its connection or an SSE stream — drops the engine
//! future or stream, which cancels the request and frees its KV slots.

mod auth;
mod conn;
mod control;
mod convert;
mod error;
mod fireworks;
mod info;
mod limits;
mod metrics;
pub mod openai;
mod panic;
mod routes;
mod sse;
mod tinker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use infermux_core::EngineStats;

pub use control::ControlConfig;
pub use error::{ApiError, parse_json};
pub use limits::Limits;

use crate::SamplingClient;
use limits::Admission;

/// How a server is set up.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Request limits.
    pub limits: Limits,
    /// The name clients use in `model` (default: the client's base model, its folder name).
    pub served_model_name: Option<String>,
    /// The key every route but the health, liveness, readiness and metrics ones needs, as
    /// `Authorization: Bearer KEY` or `X-API-Key: KEY` (401 otherwise); `None`: no key.
    pub api_key: Option<String>,
    /// The control routes (weight updates from disk, pause and continue); `None`: not served.
    pub control: Option<ControlConfig>,
}

/// One model a server answers for (or a LoRA adapter of the first, resolved per request).
#[derive(Debug, Clone)]
pub(crate) struct ServedModel {
    pub(crate) name: String,
    pub(crate) client: SamplingClient,
    pub(crate) created: u64,
}

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) models: Vec<ServedModel>,
    pub(crate) admission: Admission,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) limits: Limits,
    /// Set when the control routes are served.
    pub(crate) control: Option<ControlConfig>,
    /// Held by the running `/health_generate` probe (they run one at a time).
    pub(crate) probe: tokio::sync::Mutex<()>,
}

impl AppState {
    /// The model named `name`: a served model, or a LoRA adapter loaded into the first (as
    /// vLLM: an adapter's name is a `model`); without a name, the first model (404 for an
    /// unknown name, listing both).
    pub(crate) fn model(&self, name: Option<&str>) -> Result<ServedModel, ApiError> {
        let Some(name) = name else {
            return Ok(self.default_model().clone());
        };
        if let Some(m) = self.models.iter().find(|m| m.name == name) {
            return Ok(m.clone());
        }
        let base = self.default_model();
        match base.client.with_lora(name) {
            Ok(client) => Ok(ServedModel {
                name: name.to_string(),
                client,
                created: base.created,
            }),
            Err(_) => {
                let served: Vec<String> = self
                    .models
                    .iter()
                    .map(|m| m.name.clone())
                    .chain(base.client.loras().into_iter().map(|a| a.name))
                    .collect();
                Err(ApiError::unknown_model(name, &served))
            }
        }
    }

    /// The first served model (the native endpoints use it).
    pub(crate) fn default_model(&self) -> &ServedModel {
        &self.models[0]
    }

    /// Each model's engine stats (`None` where the engine is gone): the snapshot each engine
    /// publishes, read without waiting for its thread (so also during a long prefill).
    pub(crate) fn engine_stats(&self) -> Vec<(String, Option<EngineStats>)> {
        self.models
            .iter()
            .map(|m| (m.name.clone(), m.client.engine().stats().ok()))
            .collect()
    }
}

/// The server's routes over one model, ready to serve or to nest in a larger axum app.
pub fn router(client: SamplingClient, config: &ServerConfig) -> Router {
    build(one_model(client, config), config).0
}

/// The served name of `client` under `config`, with it.
fn one_model(client: SamplingClient, config: &ServerConfig) -> Vec<(String, SamplingClient)> {
    let name = config
        .served_model_name
        .clone()
        .unwrap_or_else(|| client.get_base_model());
    vec![(name, client)]
}

/// The server's routes over several models, chosen by the requests' `model` field (the native
/// endpoints and the control routes use the first; `config.served_model_name` is not used).
/// Panics if `models` is empty.
pub fn router_for_models(models: Vec<(String, SamplingClient)>, config: &ServerConfig) -> Router {
    build(models, config).0
}

/// The routes and the metrics they count replies in.
fn build(
    models: Vec<(String, SamplingClient)>,
    config: &ServerConfig,
) -> (Router, Arc<metrics::Metrics>) {
    assert!(!models.is_empty(), "a server needs at least one model");
    let limits = &config.limits;
    let keys = Arc::new(auth::Keys {
        api_key: config.api_key.clone(),
        admin_key: config.control.as_ref().map(|c| c.admin_key.clone()),
    });
    let created = convert::unix_now();
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(AppState {
        models: models
            .into_iter()
            .map(|(name, client)| ServedModel {
                name,
                client,
                created,
            })
            .collect(),
        admission: Admission::new(limits),
        metrics: metrics.clone(),
        limits: *limits,
        control: config.control.clone(),
        probe: tokio::sync::Mutex::new(()),
    });
    let mut router = Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/sample", post(routes::sample))
        .route("/v1/compute_logprobs", post(routes::compute_logprobs))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model))
        .route("/health", get(routes::health))
        .route("/health/live", get(info::live))
        .route("/ping", get(info::live))
        .route("/health/ready", get(info::ready))
        .route("/health_generate", get(info::health_generate))
        .route("/server_info", get(info::server_info))
        .route("/get_server_info", get(info::server_info))
        .route("/model_info", get(info::model_info))
        .route("/get_model_info", get(info::model_info))
        .route("/metrics", get(routes::metrics))
        .merge(fireworks::routes())
        .merge(tinker::routes())
        .merge(control::version_routes());
    if config.control.is_some() {
        router = router.merge(control::routes());
    }
    let router = router
        .method_not_allowed_fallback(routes::method_not_allowed)
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            limits.max_body_bytes,
            routes::refuse_declared_oversize,
        ))
        // Keys before anything reads the body; replies counted and shaped like any other.
        .layer(axum::middleware::from_fn_with_state(keys, auth::check))
        .layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            routes::finish_reply,
        ))
        .with_state(state);
    (router, metrics)
}

/// Serves `app` on `listener` until `shutdown` resolves (then finishes open requests).
/// Requests hyper refuses before routing (malformed, headers too large) get the JSON error
/// body too; [`serve_model`] also counts them in `/metrics`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(conn::JsonErrorListener::new(listener, None), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `client` as [`router`] sets it up, on `listener`, until `shutdown` resolves.
pub async fn serve_model(
    listener: tokio::net::TcpListener,
    client: SamplingClient,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (app, metrics) = build(one_model(client, config), config);
    axum::serve(conn::JsonErrorListener::new(listener, Some(metrics)), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// A server running on its own thread and tokio runtime (for synchronous programs and tests).
/// Dropping it shuts the server down.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ServerHandle {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, finishes open requests and waits for the thread.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Binds `addr` (e.g. `127.0.0.1:0`) and serves `client` on a new thread with its own runtime.
pub fn spawn(
    client: SamplingClient,
    config: &ServerConfig,
    addr: &str,
) -> std::io::Result<ServerHandle> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("infermux-http")
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let local = listener.local_addr()?;
    let config = config.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("infermux-server".into())
        .spawn(move || {
            runtime.block_on(serve_model(listener, client, &config, async {
                let _ = stopped.await;
            }))
        })?;
    Ok(ServerHandle {
        addr: local,
        stop: Some(stop),
        thread: Some(thread),
    })
}
