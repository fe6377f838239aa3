//! `RemoteSamplingClient`: the [`Sampler`] interface over HTTP, against `infermux serve`'s
//! native endpoints (`POST /v1/sample`, `POST /v1/compute_logprobs`, bodies in [`wire`]).
//!
//! Requests run on helper threads with a small blocking HTTP client (plain `http://`, no TLS),
//! so the client works the same from async code (`.await`) and from blocking code (`.wait()`),
//! and never blocks an executor. Failed tries are retried as its [`RetryConfig`] says.
//!
//! Feature `remote` (the `ureq` HTTP client). Its error type, [`RemoteError`], exists without
//! the feature so that [`Error`] is the same enum in every build.

use std::time::Duration;

use infermux_core::{BackendError, EngineError, ModelInput, SamplingParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, RemoteError, Result};
use crate::retry::{RetryConfig, parse_retry_after};
use crate::sampler::{Sampler, SamplerFuture};
use crate::types::SampleResponse;
use crate::wire::{
    self, ComputeLogprobsRequest, ComputeLogprobsResponse, ErrorBody, SampleRequest,
};

/// Largest reply body read (prompt logprobs of long prompts, many samples).
const MAX_REPLY_BYTES: u64 = 256 << 20;

/// Samples from and scores with a model served by `infermux serve`. Cheap to clone, `Send +
/// Sync`: share one across threads and tasks (connections are pooled).
#[derive(Clone)]
pub struct RemoteSamplingClient {
    base_url: String,
    model: String,
    api_key: Option<String>,
    retry: RetryConfig,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RemoteSamplingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSamplingClient")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("retry", &self.retry)
            .finish()
    }
}

impl RemoteSamplingClient {
    /// A client of the server at `base_url` (`http://HOST:PORT`, optionally ending in `/v1`),
    /// with the default [`RetryConfig`] and no request timeout.
    pub fn new(base_url: &str) -> Result<Self, RemoteError> {
        let base_url = normalize_base_url(base_url)?;
        Ok(Self {
            model: base_url.clone(),
            base_url,
            api_key: None,
            retry: RetryConfig::default(),
            agent: agent(None),
        })
    }

    /// Sends `Authorization: Bearer <api_key>` with every request.
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        let key = api_key.into();
        self.api_key = (!key.is_empty()).then_some(key);
        self
    }

    /// The name [`Sampler::get_base_model`] reports (default: the server URL).
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Retries failed tries as `retry` says.
    pub fn with_retry_config(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Fails a try that takes longer than `timeout` (connecting, sending and reading).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(Some(timeout));
        self
    }

    /// The server's base URL (without `/v1`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The retry policy.
    pub fn retry_config(&self) -> &RetryConfig {
        &self.retry
    }

    /// `POST /v1/sample`.
    pub fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> SamplerFuture<SampleResponse> {
        let body = SampleRequest {
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            model: None,
        };
        self.spawn("/v1/sample", body, Ok)
    }

    /// Async form of [`RemoteSamplingClient::sample`].
    pub async fn sample_async(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse> {
        self.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
        )
        .await
    }

    /// `POST /v1/compute_logprobs`: one entry per prompt token, the first `None`.
    pub fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        self.spawn(
            "/v1/compute_logprobs",
            ComputeLogprobsRequest {
                prompt,
                model: None,
            },
            |r: ComputeLogprobsResponse| Ok(r.logprobs),
        )
    }

    /// Async form of [`RemoteSamplingClient::compute_logprobs`].
    pub async fn compute_logprobs_async(&self, prompt: ModelInput) -> Result<Vec<Option<f32>>> {
        self.compute_logprobs(prompt).await
    }

    /// The model name this client reports.
    pub fn get_base_model(&self) -> String {
        self.model.clone()
    }

    /// Runs one call on a helper thread; its future resolves when the thread replies.
    fn spawn<B, R, T>(
        &self,
        path: &'static str,
        body: B,
        convert: fn(R) -> Result<T>,
    ) -> SamplerFuture<T>
    where
        B: Serialize + Send + 'static,
        R: DeserializeOwned + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = flume::bounded::<Result<T>>(1);
        let client = self.clone();
        let spawned = std::thread::Builder::new()
            .name("infermux-remote".into())
            .spawn(move || {
                let out = client
                    .post_json::<B, R>(path, &body, &|| tx.is_disconnected())
                    .map_err(Error::from)
                    .and_then(convert);
                let _ = tx.send(out);
            });
        if let Err(e) = spawned {
            return SamplerFuture::ready(Err(RemoteError::Transport {
                url: format!("{}{path}", self.base_url),
                attempts: 0,
                message: format!("cannot start a request thread: {e}"),
            }
            .into()));
        }
        SamplerFuture::new(async move {
            rx.recv_async().await.unwrap_or_else(|_| {
                Err(Error::Engine(EngineError::Backend(BackendError::Panicked(
                    "the remote request thread ended without a reply".into(),
                ))))
            })
        })
    }

    /// POSTs `body` as JSON and parses the reply, retrying as configured. Blocking.
    fn post_json<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<R, RemoteError> {
        let url = format!("{}{path}", self.base_url);
        let payload = serde_json::to_vec(body).map_err(|e| RemoteError::Decode {
            url: url.clone(),
            message: format!("request does not serialize: {e}"),
        })?;
        let mut attempts = 0u32;
        loop {
            if cancelled() {
                return Err(RemoteError::Cancelled { url });
            }
            attempts += 1;
            let retries_left = attempts <= self.retry.max_retries;
            let mut request = self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json");
            if let Some(key) = &self.api_key {
                request = request.header("authorization", &format!("Bearer {key}"));
            }
            let retry_after = match request.send(&payload[..]) {
                Ok(mut reply) => {
                    let status = reply.status().as_u16();
                    let retry_after = reply
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = reply
                        .body_mut()
                        .with_config()
                        .limit(MAX_REPLY_BYTES)
                        .read_to_string();
                    if (200..300).contains(&status) {
                        let text = text.map_err(|e| RemoteError::Decode {
                            url: url.clone(),
                            message: e.to_string(),
                        })?;
                        return serde_json::from_str(&text).map_err(|e| RemoteError::Decode {
                            url: url.clone(),
                            message: e.to_string(),
                        });
                    }
                    let err = status_error(&url, status, text.unwrap_or_default(), attempts);
                    if !(retries_left && self.retry.is_retryable_status(status)) {
                        return Err(err);
                    }
                    retry_after
                }
                Err(e) => {
                    let retryable = self.retry.retry_connect_errors && is_connect_error(&e);
                    let err = RemoteError::Transport {
                        url: url.clone(),
                        attempts,
                        message: e.to_string(),
                    };
                    if !(retries_left && retryable) {
                        return Err(err);
                    }
                    None
                }
            };
            std::thread::sleep(self.retry.delay(attempts - 1, retry_after));
        }
    }
}

impl Sampler for RemoteSamplingClient {
    fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> SamplerFuture<SampleResponse> {
        RemoteSamplingClient::sample(
            self,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
        )
    }

    fn compute_logprobs(&self, prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        RemoteSamplingClient::compute_logprobs(self, prompt)
    }

    fn get_base_model(&self) -> String {
        RemoteSamplingClient::get_base_model(self)
    }
}

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(timeout)
        .max_idle_connections_per_host(64)
        .no_delay(true)
        .build()
        .into()
}

/// Failures where the request cannot have been served: worth another try.
fn is_connect_error(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_)
    )
}

/// The error of a non-2xx reply, with the server's message when the body is an [`ErrorBody`].
fn status_error(url: &str, status: u16, body: String, attempts: u32) -> RemoteError {
    let (kind, param, message) = match serde_json::from_str::<ErrorBody>(&body) {
        Ok(ErrorBody {
            error:
                wire::ErrorDetail {
                    message,
                    kind,
                    param,
                    ..
                },
        }) => (Some(kind), param, message),
        Err(_) => {
            let mut text: String = body.trim().chars().take(500).collect();
            if text.is_empty() {
                text = "(empty body)".into();
            }
            (None, None, text)
        }
    };
    RemoteError::Status {
        url: url.to_string(),
        status,
        kind,
        param,
        message,
        attempts,
    }
}

/// `http://HOST[:PORT][/prefix][/v1][/]` → `http://HOST[:PORT][/prefix]`.
fn normalize_base_url(url: &str) -> Result<String, RemoteError> {
    let invalid = |reason: &str| RemoteError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = url.trim();
    let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("https://") {
        return Err(invalid(
            "https is not supported by this build's HTTP client (plain http only, e.g. a local \
             `infermux serve` or a TLS-terminating proxy on loopback)",
        ));
    } else {
        return Err(invalid("expected http://HOST:PORT"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("no host"));
    }
    let mut base = trimmed.trim_end_matches('/').to_string();
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped.to_string();
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        for (given, want) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
            ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
            ("http://h:1/inference/v1/", "http://h:1/inference"),
        ] {
            assert_eq!(normalize_base_url(given).unwrap(), want);
        }
        for bad in ["127.0.0.1:8000", "https://x", "http://", "http:///v1"] {
            assert!(
                matches!(normalize_base_url(bad), Err(RemoteError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn error_bodies_are_read() {
        let body = r#"{"error":{"message":"invalid `temperature`: must be >= 0","type":"invalid_request_error","param":"temperature"}}"#;
        let e = status_error("http://x/v1/sample", 400, body.into(), 1);
        assert_eq!(e.status(), Some(400));
        let text = e.to_string();
        assert!(text.contains("HTTP 400 invalid_request_error"), "{text}");
        assert!(text.contains("must be >= 0"), "{text}");
        let e = status_error(
            "http://x/v1/sample",
            502,
            "<html>bad gateway</html>".into(),
            3,
        );
        assert!(e.to_string().contains("bad gateway"), "{e}");
    }
}
