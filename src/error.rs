//! Errors the gateway makes itself, and the one table that gives each its status,
//! OpenAI `code` and `type`.
//!
//! Upstream HTTP errors are not here: a 4xx/5xx from a provider is a response and goes
//! back to the caller unchanged. Only what the gateway decides (bad input, auth,
//! routing, limits) and transport failures (unreachable, timed out) are
//! [`GatewayError`]s. Turning one into a response is `pipeline::respond`'s job.
//! Config and startup errors have their own types and never reach the wire.

use http::StatusCode;

use crate::{
    config::ByteSize,
    limit::{LimitKind, RateSnapshot},
    secret::KeyId,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("missing API key: send it as `Authorization: Bearer <key>`")]
    MissingApiKey,
    #[error("invalid API key")]
    UnknownApiKey,
    #[error("key `{key}` may not use model `{}`", shown(model))]
    ModelNotAllowed { key: KeyId, model: String },
    #[error("no upstream serves model `{}`", shown(.0))]
    ModelNotFound(String),
    #[error("unknown path `{}`: spillway serves the OpenAI API under /v1/", shown(.0))]
    UnknownPath(String),
    #[error("path `{}` refused: {reason}", shown(path))]
    InvalidPath { path: String, reason: crate::upstream::path::PathError },
    #[error("missing required parameter: `model`")]
    MissingModel,
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    #[error("request body exceeds the limit of {limit}")]
    RequestTooLarge { limit: ByteSize },
    #[error("request body stopped arriving: nothing for {after:?} (server.body_read_timeout)")]
    BodyStalled { after: std::time::Duration },
    #[error("request body still arriving at the request deadline (server.request_timeout)")]
    BodyPastDeadline,
    #[error("method {0} is not allowed: spillway does not forward CONNECT or TRACE")]
    MethodNotAllowed(http::Method),
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),
    #[error("rate limit reached for {limit} on key `{key}`; retry after {}", crate::pipeline::admit::format_reset(*retry_after))]
    RateLimited { key: KeyId, limit: LimitKind, retry_after: std::time::Duration, snapshot: RateSnapshot },
    #[error(
        "request needs about {needed} tokens but key `{key}` may use at most {capacity} tokens at once; \
         it can never fit: lower max_tokens or shorten the prompt"
    )]
    NeverFits { key: KeyId, needed: u64, capacity: u64, snapshot: RateSnapshot },
    #[error("upstream `{upstream}` {failure}: {detail}")]
    UpstreamFailed { upstream: String, failure: UpstreamFailure, detail: String },
    #[error("upstream `{upstream}` did not answer within {after:?}")]
    UpstreamTimeout { upstream: String, after: std::time::Duration },
    #[error("request deadline (server.request_timeout) reached")]
    DeadlineReached,
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_)
            | Self::ClientBody(_)
            | Self::InvalidPath { .. }
            | Self::MissingModel
            | Self::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            Self::MissingApiKey | Self::UnknownApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            Self::ModelNotFound(_) | Self::UnknownPath(_) => StatusCode::NOT_FOUND,
            Self::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyStalled { .. } | Self::BodyPastDeadline => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited { .. } | Self::NeverFits { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } | Self::DeadlineReached => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.code`; also the metrics label for gateway errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::ClientBody(_) => "invalid_body",
            Self::MissingApiKey | Self::UnknownApiKey => "invalid_api_key",
            Self::ModelNotAllowed { .. } => "model_not_allowed",
            Self::ModelNotFound(_) => "model_not_found",
            Self::UnknownPath(_) => "unknown_url",
            Self::InvalidPath { .. } => "invalid_path",
            Self::MissingModel => "missing_required_parameter",
            Self::RequestTooLarge { .. } => "request_too_large",
            Self::BodyStalled { .. } | Self::BodyPastDeadline => "request_timeout",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::MalformedRequest(_) => "invalid_request",
            Self::RateLimited { .. } | Self::NeverFits { .. } => "rate_limit_exceeded",
            Self::UpstreamFailed { .. } => "upstream_error",
            Self::UpstreamTimeout { .. } | Self::DeadlineReached => "upstream_timeout",
            Self::Internal(_) => "internal_error",
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidJson(_)
            | Self::ClientBody(_)
            | Self::ModelNotFound(_)
            | Self::UnknownPath(_)
            | Self::InvalidPath { .. }
            | Self::MissingModel
            | Self::RequestTooLarge { .. }
            | Self::BodyStalled { .. }
            | Self::BodyPastDeadline
            | Self::MethodNotAllowed(_)
            | Self::MalformedRequest(_) => "invalid_request_error",
            Self::MissingApiKey | Self::UnknownApiKey => "authentication_error",
            Self::RateLimited { limit, .. } => limit.as_str(),
            Self::NeverFits { .. } => LimitKind::Tokens.as_str(),
            Self::ModelNotAllowed { .. } => "permission_error",
            Self::UpstreamFailed { .. } | Self::UpstreamTimeout { .. } | Self::DeadlineReached => {
                "upstream_error"
            }
            Self::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.param`: the request parameter at fault, where there is one.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::MissingModel => Some("model"),
            _ => None,
        }
    }

    /// How loudly the access log reports it: caller mistakes are not our errors.
    pub fn level(&self) -> tracing::Level {
        match self {
            Self::Internal(_) => tracing::Level::ERROR,
            Self::UpstreamFailed { .. } | Self::UpstreamTimeout { .. } | Self::DeadlineReached => {
                tracing::Level::WARN
            }
            _ => tracing::Level::INFO,
        }
    }
}

/// What went wrong on the way to an upstream's response head, as the 502's message
/// says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Nothing listens on its port.
    Refused,
    /// Its host name did not resolve.
    Dns,
    /// The TLS handshake failed (untrusted certificate, not TLS at all, ...).
    Tls,
    /// Any other connect failure (`connect_timeout`, no route, ...).
    Connect,
    /// The connection was closed or reset before a whole response head arrived.
    Closed,
    /// What came back is not HTTP.
    InvalidResponse,
    /// Anything else after the connection was made.
    Other,
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Refused => "refused the connection",
            Self::Dns => "could not be resolved (DNS)",
            Self::Tls => "failed the TLS handshake",
            Self::Connect => "could not be connected to",
            Self::Closed => "closed or reset the connection before the response head",
            Self::InvalidResponse => "sent a response that is not valid HTTP",
            Self::Other => "failed",
        })
    }
}

/// A client-chosen string in an error message: an error echoes what it refers to
/// without echoing a megabyte.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    clip(text, 200)
}

/// `text`, or its first `max` bytes (cut on a character boundary) marked with `…` and
/// the whole length: how client-chosen text appears in messages and log lines.
pub(crate) fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let end = text.floor_char_boundary(max);
    std::borrow::Cow::Owned(format!("{}…({} bytes)", &text[..end], text.len()))
}

/// Why the gateway could not start (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot start: {0}")]
    Other(String),
}
