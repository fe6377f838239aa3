//! Keys: with [`ServerConfig::api_key`] set, every route but the health, liveness, readiness
//! and metrics ones needs the key (`Authorization: Bearer KEY`, as vLLM and OpenAI's SDK send
//! it, or `X-API-Key: KEY`, as Tinker's SDK does): 401 in OpenAI's error shape otherwise. The
//! control routes ([`super::control`]) need the admin key instead (`Authorization: Bearer`),
//! 403 otherwise, whatever the API key. Keys are compared in constant time (their length
//! aside).
//!
//! [`ServerConfig::api_key`]: super::ServerConfig::api_key

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::control;
use super::error::ApiError;

/// The keys a server checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Keys {
    /// Needed on every route but [`open_route`]s.
    pub api_key: Option<String>,
    /// Needed on the control routes (set only when they are served).
    pub admin_key: Option<String>,
}

/// Routes anyone may call: probes and scrapes (SGLang leaves everything under `/health` open,
/// vLLM `/health` and `/metrics`), and Tinker's health check.
fn open_route(path: &str) -> bool {
    path.starts_with("/health") || matches!(path, "/ping" | "/metrics" | "/api/v1/healthz")
}

/// Whether `given` is `expected`, in time independent of where they differ.
fn same_key(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The bearer token of `Authorization` (scheme case-insensitive, as RFC 9110 says).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The `X-API-Key` header.
fn x_api_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-api-key")?.to_str().ok().map(str::trim)
}

/// Checks the request's key for its route before anything else reads it.
pub(crate) async fn check(State(keys): State<Arc<Keys>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let headers = request.headers();
    // With the control routes off, the router answers 404 for them, behind the API key like
    // any route.
    if control::is_control_route(path)
        && let Some(admin) = &keys.admin_key
    {
        if !bearer(headers).is_some_and(|k| same_key(k, admin)) {
            return forbidden(path);
        }
        return next.run(request).await;
    }
    if let Some(expected) = &keys.api_key
        && !open_route(path)
    {
        let ok = [bearer(headers), x_api_key(headers)]
            .into_iter()
            .flatten()
            .any(|k| same_key(k, expected));
        if !ok {
            return unauthorized(bearer(headers).is_some() || x_api_key(headers).is_some());
        }
    }
    next.run(request).await
}

/// 401 in OpenAI's shape (`code: invalid_api_key`), with `WWW-Authenticate: Bearer`.
fn unauthorized(sent_one: bool) -> Response {
    let message = if sent_one {
        "Incorrect API key provided. Send the server's --api-key as `Authorization: Bearer KEY` \
         or `X-API-Key: KEY`."
    } else {
        "Missing API key. Send the server's --api-key as `Authorization: Bearer KEY` or \
         `X-API-Key: KEY`."
    };
    let mut error = ApiError::status(StatusCode::UNAUTHORIZED, message);
    error.body.error.code = Some("invalid_api_key".into());
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// 403: a control route without the admin key.
fn forbidden(path: &str) -> Response {
    let mut error = ApiError::status(
        StatusCode::FORBIDDEN,
        format!(
            "{path} is a control route: it needs the server's --admin-key as \
             `Authorization: Bearer KEY`"
        ),
    );
    error.body.error.code = Some("admin_key_required".into());
    error.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key("sk-abc", "sk-abc"));
        assert!(!same_key("sk-ab", "sk-abc"));
        assert!(!same_key("sk-abd", "sk-abc"));
        assert!(!same_key("", "sk-abc"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  k1 "),
        );
        assert_eq!(bearer(&h), Some("k1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn probes_are_open_and_the_api_is_not() {
        for open in [
            "/health",
            "/health/live",
            "/health/ready",
            "/health_generate",
            "/ping",
        ] {
            assert!(open_route(open), "{open}");
        }
        for closed in [
            "/v1/completions",
            "/server_info",
            "/api/v1/asample",
            "/v1/health",
        ] {
            assert!(!open_route(closed), "{closed}");
        }
    }
}
