//! The validated configuration: what `spillway.toml` means once it has been read,
//! interpolated, parsed and checked.
//!
//! Loading runs `read → interpolate (${VAR}) → toml → RawConfig → Config`. Everything
//! after [`load`] holds only validated values (durations, sizes, compiled globs, key
//! hashes, secrets), so the request path never re-checks a setting. This module does
//! not decide how settings are used; each stage reads the part it owns.

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroU64},
    path::{Path, PathBuf},
    time::Duration,
};

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
pub use validate::parse_base_url;

use self::{diagnostic::Locator, interpolate::OffsetMap};

/// A complete, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, or `None` for the built-in defaults.
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub auth: AuthMode,
    /// `[limits.default]`: limits for passthrough keys and for keys without their own.
    pub default_limits: LimitSpec,
    /// The other `[limits]` settings.
    pub limits: LimitsConfig,
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
    /// A client must send a request's whole head within this (slowloris).
    pub header_read_timeout: Duration,
    /// The longest wait for the next piece of a request body (nginx's
    /// `client_body_timeout`); the whole body is also bound by `request_timeout`.
    pub body_read_timeout: Duration,
    /// Largest request head accepted (HTTP/1.1 buffer, h2 header list).
    pub max_header_size: ByteSize,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: NonZeroU32,
    /// A connection with no request in flight for this long is closed (HTTP/2 too).
    pub idle_timeout: Duration,
    /// Proxies in front of the gateway whose `X-Forwarded-For` / `Forwarded` entries
    /// are believed (counted from the right); the rest of what a client wrote is dropped.
    pub trusted_proxy_hops: u32,
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

/// `[limits]` settings besides `[limits.default]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// How many passthrough keys' buckets the local limiter keeps at most.
    pub max_tracked_keys: NonZeroU64,
    /// The completion allowance added to a request's token estimate when it sets
    /// neither `max_tokens` nor `max_completion_tokens`.
    pub default_completion_tokens: u64,
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
    /// Sent as `openai-organization` / `openai-project` in place of the caller's.
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Whether the caller's own `openai-organization` / `openai-project` may go
    /// upstream next to this upstream's `api_key` (they pick who is billed).
    pub forward_caller_org: bool,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Attempts in total, first one included.
    pub max_attempts: NonZeroU32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub on_status: Vec<http::StatusCode>,
    pub respect_retry_after: bool,
    /// Retries in flight may be at most this share of requests in flight…
    pub budget_percent: u8,
    /// …but this many are always allowed (Envoy's retry budget).
    pub min_retries: NonZeroU32,
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

/// Loads, interpolates, parses and validates the file at `path`, then applies
/// `overrides`. Returns every problem found, not just the first, positioned in the
/// file as written (before `${VAR}` substitution).
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, Diagnostics> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        let message = format!("cannot read config file: {}", error.to_string().to_lowercase());
        Diagnostics::from(Diagnostic::whole_file(&file, message))
    })?;
    let mut config = load_str(&text, &file, |name| std::env::var(name).ok(), overrides)?;
    config.source = Some(path.to_path_buf());
    Ok(config)
}

/// [`load`] for a config already in memory: `file` names it in diagnostics (and its
/// directory is where relative paths are resolved from), `env` answers `${VAR}`.
pub fn load_str(
    text: &str,
    file: &str,
    env: impl Fn(&str) -> Option<String>,
    overrides: &Overrides,
) -> Result<Config, Diagnostics> {
    let (interpolated, unresolved) = interpolate::interpolate(file, text, env);
    let locator = Locator { file, original: text, map: &interpolated.map };
    // An unresolved `${…}` was replaced by nothing; what that alone causes on its line
    // (an empty value, a syntax error) is not reported on top of it.
    let with_unresolved = |mut problems: Vec<Diagnostic>| {
        problems.retain(|problem| !unresolved.iter().any(|var| var.line == problem.line));
        problems.extend(unresolved.iter().cloned());
        Diagnostics::sorted(problems)
    };
    let (raw, problems) = raw::parse(&interpolated.text, &locator).map_err(with_unresolved)?;
    let base_dir = Path::new(file).parent().unwrap_or(Path::new(""));
    match validate::validate(raw, &locator, base_dir) {
        Ok(config) if problems.is_empty() && unresolved.is_empty() => Ok(config.with_overrides(overrides)),
        Ok(_) => Err(with_unresolved(problems)),
        Err(errors) => Err(with_unresolved(problems.into_iter().chain(errors).collect())),
    }
}

/// The built-in defaults (passthrough to OpenAI on 127.0.0.1:8080), with `overrides`.
pub fn defaults(overrides: &Overrides) -> Config {
    let locator = Locator { file: "<defaults>", original: "", map: &OffsetMap::default() };
    match validate::validate(raw::RawConfig::default(), &locator, Path::new("")) {
        Ok(config) => config.with_overrides(overrides),
        // Covered by a test; no config value can reach this.
        Err(errors) => unreachable!("the built-in defaults are invalid: {errors:?}"),
    }
}

impl Config {
    /// Applies flag and environment overrides over the file.
    fn with_overrides(mut self, overrides: &Overrides) -> Self {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(admin_listen) = overrides.admin_listen {
            self.server.admin_listen = admin_listen;
        }
        if let Some(base_url) = &overrides.upstream
            && let Some(mut upstream) = defaults(&Overrides::default()).upstreams.into_iter().next()
        {
            upstream.name = "default".to_owned();
            upstream.base_url = base_url.clone();
            self.upstreams = vec![upstream];
        }
        self
    }
}

#[cfg(test)]
mod tests;
