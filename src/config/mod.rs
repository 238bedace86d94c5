//! The validated configuration: what `spillway.toml` means once it has been read,
//! interpolated, parsed and checked.
//!
//! Loading runs `read → interpolate (${VAR}) → toml → RawConfig → Config`. Everything
//! after [`load`] holds only validated values (durations, sizes, compiled globs, key
//! hashes, secrets), so the request path never re-checks a setting. This module does
//! not decide how settings are used; each stage reads the part it owns.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use globset::GlobSet;
use http::Uri;

use crate::secret::{KeyHash, KeyId, Secret};

mod diagnostic;
mod interpolate;
mod raw;
mod units;
mod validate;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use units::ByteSize;

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, or `None` for the built-in defaults.
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub auth: AuthMode,
    /// `[limits.default]`: limits for passthrough keys and for keys without their own.
    pub default_limits: LimitSpec,
    pub keys: Vec<KeyConfig>,
    /// Never empty: the built-in default is one passthrough upstream to OpenAI.
    pub upstreams: Vec<UpstreamConfig>,
    pub retry: RetryConfig,
    pub cache: CacheConfig,
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None` when `admin_listen = ""`.
    pub admin_listen: Option<SocketAddr>,
    pub max_request_body: ByteSize,
    /// The whole request, retries and streamed body included.
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Callers send their own provider key; limits apply per presented key's hash.
    Passthrough,
    /// Callers send a gateway key listed in `[[keys]]`; upstreams get their own `api_key`.
    Keys,
}

/// Limits of one key. `None` means "not set here" (falls back to `[limits.default]`,
/// then to unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
    pub max_concurrent: Option<NonZeroU32>,
    pub burst_requests: Option<NonZeroU32>,
    pub burst_tokens: Option<NonZeroU32>,
}

/// One `[[keys]]` entry. The key itself is never kept: a plaintext `key` is hashed at
/// load time.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub id: KeyId,
    pub hash: KeyHash,
    pub limits: LimitSpec,
    /// `None` = every model.
    pub models: Option<ModelGlobs>,
}

/// A compiled list of model-name globs, with the patterns kept for messages.
#[derive(Debug, Clone)]
pub struct ModelGlobs {
    pub patterns: Vec<String>,
    pub set: GlobSet,
}

impl ModelGlobs {
    pub fn matches(&self, model: &str) -> bool {
        self.set.is_match(model)
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Absolute `http` or `https` URL without query; request paths under `/v1` are
    /// appended to its path.
    pub base_url: Uri,
    pub api_key: Option<Secret<String>>,
    pub models: ModelGlobs,
    pub weight: NonZeroU32,
    pub connect_timeout: Duration,
    /// Per attempt, until the response head.
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Attempts in total, first one included.
    pub max_attempts: NonZeroU32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub on_status: Vec<http::StatusCode>,
    pub respect_retry_after: bool,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub max_size: ByteSize,
    pub ttl: Duration,
    pub scope: CacheScope,
    /// Request paths (as the client sends them, e.g. `/v1/chat/completions`).
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Key,
    Global,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// May hold a password: never logged.
    pub url: Secret<String>,
    pub prefix: String,
    pub timeout: Duration,
    pub limits: bool,
    pub cache: bool,
}

/// Overrides from flags and environment, applied over the file (flags win over
/// environment, environment over the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    /// `Some(None)` disables the admin listener (`--admin-listen ""`).
    pub admin_listen: Option<Option<SocketAddr>>,
    /// Replaces `[[upstreams]]` with one passthrough upstream serving every model.
    pub upstream: Option<Uri>,
}

/// Where the configuration comes from when no `--config` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    BuiltinDefaults,
}

/// Loads, interpolates, parses and validates the file at `path`, then applies
/// `overrides`. Returns every problem found, not just the first.
pub fn load(path: &std::path::Path, overrides: &Overrides) -> Result<Config, Diagnostics> {
    todo!()
}

/// The built-in defaults (passthrough to OpenAI on 127.0.0.1:8080), with `overrides`.
pub fn defaults(overrides: &Overrides) -> Config {
    todo!()
}
