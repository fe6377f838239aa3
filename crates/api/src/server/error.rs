//! Error replies: every failure becomes a [`wire::ErrorBody`] with the status that fits it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infermux_core::{EngineError, GuidedError, ValidationError};

use crate::Error;
use crate::wire::{ErrorBody, ErrorDetail};

/// An error reply: status, OpenAI-shaped body and, for overload, a `Retry-After` hint.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ErrorBody,
    /// Seconds the client should wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: String, param: Option<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message,
                    kind: kind.into(),
                    param,
                    code: None,
                },
            },
            retry_after: None,
        }
    }

    fn with_code(mut self, code: &str) -> Self {
        self.body.error.code = Some(code.into());
        self
    }

    /// 400: the request field `param` is invalid.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            Some(param.into()),
        )
    }

    /// 400 without a field to blame (e.g. a body that is not JSON).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
            None,
        )
    }

    /// 404: no served model has this name.
    pub fn unknown_model(name: &str, served: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{name}` does not exist; this server serves: {}",
                served.join(", ")
            ),
            Some("model".into()),
        )
        .with_code("model_not_found")
    }

    /// 404: no such route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route for {path}"),
            None,
        )
        .with_code("not_found")
    }

    /// 413: the body exceeds `--max-body-bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body exceeds the limit of {limit} bytes"),
            None,
        )
        .with_code("request_too_large")
    }

    /// 429: every concurrency slot and queue place is taken; retry later.
    pub fn overloaded() -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded_error",
            "the server is at its concurrency and queue limits; retry later".into(),
            None,
        )
        .with_code("overloaded");
        e.retry_after = Some(1);
        e
    }

    /// 504: the request ran past `--request-timeout-secs`.
    pub fn timeout(secs: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("the request did not finish within {secs} s"),
            None,
        )
        .with_code("request_timeout")
    }

    /// An error reply of `status` without a field to blame (what hyper, the router or a panic
    /// left without a body): `invalid_request_error` for 4xx, `server_error` for 5xx.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let code = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace([' ', '-'], "_");
        Self::new(status, kind, message.into(), None).with_code(&code)
    }

    /// 405: `method` is not served on `path`.
    pub fn method_not_allowed(method: &str, path: &str, allowed: Option<&str>) -> Self {
        let allowed = allowed.map_or_else(String::new, |a| format!(" (allowed: {a})"));
        Self::status(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}{allowed}"),
        )
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message.into(),
            None,
        )
    }

    /// Maps an API error: validation → 400 naming the field, engine failures → 500.
    pub fn from_api(err: &Error) -> Self {
        match err {
            Error::Engine(e) => Self::from_engine(e),
            Error::Tokenizer(msg) => Self::bad_request(format!("tokenizer: {msg}")),
            Error::Registry(_) => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                err.to_string(),
                Some("model".into()),
            )
            .with_code("model_not_found"),
            Error::Adapter(e) => Self::from_adapter(e),
            Error::Model(_) | Error::Backend { .. } | Error::Remote(_) => {
                Self::internal(err.to_string())
            }
        }
    }

    /// Maps a LoRA adapter error: an unknown name → 404, a bad name, folder or adapter (or
    /// one this backend cannot run) → 400 naming `lora_name` or `lora_path`, a backend that
    /// failed taking the tensors → 500, a stopped engine → 503.
    pub fn from_adapter(err: &infermux_core::AdapterError) -> Self {
        use infermux_core::AdapterError as A;
        let message = err.to_string();
        match err {
            A::NotFound(_) => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                message,
                Some("lora_name".into()),
            )
            .with_code("model_not_found"),
            A::AlreadyLoaded(_) | A::InvalidName { .. } | A::TooMany { .. } => {
                Self::invalid("lora_name", message)
            }
            A::BackendUnsupported
            | A::Model(_)
            | A::Unsupported { .. }
            | A::UnknownTarget { .. }
            | A::Mismatch { .. } => Self::invalid("lora_path", message),
            A::Shutdown => Self::status(StatusCode::SERVICE_UNAVAILABLE, message),
            A::Load { .. } => Self::internal(message),
        }
    }

    /// Maps an engine error (see [`ApiError::from_api`]).
    pub fn from_engine(err: &EngineError) -> Self {
        match err {
            EngineError::Invalid(v) => Self::invalid(param_of(v), v.to_string()),
            // A grammar past the grammar engine's limits (found while decoding) is the client's.
            EngineError::Guided(GuidedError::Invalid { .. }) => {
                Self::invalid("guided_decoding", err.to_string())
            }
            // Ended by an operator's command (a weight update or pause that aborts): the request
            // itself was fine and may be sent again, here or to another replica.
            EngineError::Aborted { .. } => {
                let mut e = Self::status(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
                    .with_code("aborted");
                e.retry_after = Some(1);
                e
            }
            _ => Self::internal(err.to_string()),
        }
    }

    /// The error with its `param` renamed where a route spells a core field differently
    /// (completions' `logprobs` with `echo` is the core's `topk_prompt_logprobs`).
    pub(crate) fn renamed(mut self, renames: &[(&str, &str)]) -> Self {
        if let Some(param) = &mut self.body.error.param
            && let Some((_, to)) = renames.iter().find(|(from, _)| param == from)
        {
            *param = (*to).to_string();
        }
        self
    }

    /// The SSE event that reports this error inside a stream.
    pub fn sse_event(&self) -> String {
        format!(
            "data: {}\n\n",
            serde_json::to_string(&self.body).unwrap_or_default()
        )
    }
}

/// The request field a validation error is about.
fn param_of(err: &ValidationError) -> &'static str {
    match err {
        ValidationError::InvalidField { field, .. } => field,
        // Scoring asks for no completion: the prompt alone is too long.
        ValidationError::ContextOverflow { max_tokens: 0, .. } => "prompt",
        ValidationError::ContextOverflow { .. } | ValidationError::KvBudgetExceeded { .. } => {
            "max_tokens"
        }
        ValidationError::EmptyPrompt
        | ValidationError::TokenOutOfRange { .. }
        | ValidationError::UnsupportedChunk { .. } => "prompt",
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self::from_api(&err)
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        Self::from_engine(&err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Parses a JSON body into `T`, naming the offending field on failure (400).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let param = if path == "." || path.is_empty() {
            backticked(&message)
        } else {
            Some(path)
        };
        match param {
            Some(p) => ApiError::invalid(p.clone(), format!("invalid `{p}`: {message}")),
            None => ApiError::bad_request(format!("the body is not valid JSON: {message}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("trailing data after the JSON body: {e}")))?;
    Ok(value)
}

/// The first `` `name` `` in a serde message ("missing field `prompt`", "unknown field `x`").
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        prompt: String,
        temperature: Option<f32>,
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<Body>(br#"{"prompt": "x", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.error.param.as_deref(), Some("temperature"));
        let e = parse_json::<Body>(br#"{"temperature": 1}"#).unwrap_err();
        assert_eq!(e.body.error.param.as_deref(), Some("prompt"));
        let e = parse_json::<Body>(br#"{"prompt": "x", "tempreature": 1}"#).unwrap_err();
        assert_eq!(e.body.error.param.as_deref(), Some("tempreature"));
        let e = parse_json::<Body>(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
