//! The rescue point: a [`GatewayError`] becomes an OpenAI-shaped JSON response.
//!
//! Conversion is pure. The error's `Display` is the message (no key and no internal
//! cause ever appears in it); status, `code` and `type` come from the one table in
//! `error.rs`. The response carries a [`Failure`] extension so `observe` can log the
//! error once, at its level.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, Full};

use super::{GatewayResponse, ResponseBody, admit};
use crate::error::GatewayError;

/// What a 405 names in `allow`: every method but CONNECT and TRACE is relayed.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// What went wrong, for the access log.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: &'static str,
    pub level: tracing::Level,
    pub message: String,
}

/// The response the caller gets for `error`.
pub fn error_response(error: &GatewayError) -> GatewayResponse {
    let message = error.to_string();
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": error.kind(),
            "param": error.param(),
            "code": error.code(),
        }
    });
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    match error {
        GatewayError::RateLimited { retry_after, snapshot, .. } => {
            admit::insert_retry_after(headers, *retry_after);
            admit::insert_ratelimit_headers(headers, snapshot);
        }
        GatewayError::NeverFits { snapshot, .. } => {
            // Every gateway 429 says when to come back; for a request that can never fit
            // that is when the bucket is full, which is as good as it gets.
            let full = snapshot.tokens.map_or(Duration::ZERO, |tokens| tokens.reset);
            admit::insert_retry_after(headers, full.max(Duration::from_secs(1)));
            admit::insert_ratelimit_headers(headers, snapshot);
        }
        GatewayError::MethodNotAllowed(_) => {
            headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        _ => {}
    }
    let detail = match error {
        GatewayError::Internal(source) => format!("{message}: {source}"),
        _ => message,
    };
    response.extensions_mut().insert(Failure { code: error.code(), level: error.level(), message: detail });
    response
}

/// A body that is all there in memory.
pub fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn errors_are_openai_shaped() {
        let response = error_response(&GatewayError::ModelNotFound("gpt-9".into()));
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.map(|body| body.to_bytes());
        let json: serde_json::Value = serde_json::from_slice(&bytes.unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "no upstream serves model `gpt-9`",
                "type": "invalid_request_error",
                "param": null,
                "code": "model_not_found",
            }})
        );
    }
}
