//! `RawConfig` → `Config`: every semantic check, with all problems collected.
//!
//! Each check reports through [`Checker`] and yields `None` for a bad value, so one
//! run finds every error; a section is built only when all of its values are good.
//! Every duration and size has a maximum (below), so that no arithmetic the request
//! path does on a setting (a deadline `Instant`, a backoff, a buffer limit) can
//! overflow.
//! Relative file paths (`ca_file`, `server.tls`) are resolved from the config file's
//! directory and must name a readable file, since `spillway check` is what operators
//! run before deploying. This module does not read the config file or know TOML.

mod entries;
#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroU64},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

/// More proxies than this in front of one gateway is a mistake, not a topology.
const MAX_PROXY_HOPS: u32 = 16;

use globset::{GlobBuilder, GlobSetBuilder};
use http::StatusCode;
use toml::Spanned;

use super::{
    AuthMode, ByteSize, CacheConfig, CacheScope, Config, LimitSpec, LimitsConfig, ModelGlobs, RedisConfig,
    RetryConfig, ServerConfig, TlsFiles,
    diagnostic::{Diagnostic, Locator, did_you_mean},
    raw::{RawCache, RawConfig, RawLimitSpec, RawLimits, RawRedis, RawRetry, RawServer, is_default},
    units::{format_duration, parse_duration},
};

pub use entries::parse_base_url;

// The largest value of each duration and size setting (README, "Bounds"): far beyond
// any sensible deployment, and far below where arithmetic on them overflows. Durations:
// `redis.timeout` (one call a request may wait on) a minute; connection timeouts and
// retry delays a day; a whole request, an upstream attempt and a drain a week; the
// cache's ttl 365 days (humantime's "1y" is 365.25 days).
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
/// `max_header_size`: a request head (HTTP/1.1 buffer, HTTP/2 header list).
const MAX_HEADER_SIZE: ByteSize = ByteSize(1 << 20);
/// `max_request_body`: a JSON body is held in memory whole.
const MAX_REQUEST_BODY: ByteSize = ByteSize(4 << 30);
/// `[cache] max_size`: held in memory.
const MAX_CACHE_SIZE: ByteSize = ByteSize(1 << 40);

/// Checks `raw` and builds the validated [`Config`], or returns every problem.
/// `base_dir` is where relative file paths are resolved from.
pub(crate) fn validate(
    raw: RawConfig,
    locator: &Locator<'_>,
    base_dir: &Path,
) -> Result<Config, Vec<Diagnostic>> {
    let mut c = Checker { locator, base_dir, errors: Vec::new() };
    let server = c.server(&raw.server);
    let auth = c.choice("auth.mode", &raw.auth.mode, &["passthrough", "keys"]);
    let default_limits = c.limits(&raw.limits.default, &LimitSpec::default());
    let limits = c.limits_settings(&raw.limits);
    let keys = c.keys(&raw.keys, &default_limits.unwrap_or_default());
    if auth == Some("keys") && raw.keys.is_empty() {
        let message = "auth.mode = \"keys\" needs at least one [[keys]] entry";
        c.report(&raw.auth.mode, message, "add [[keys]] entries, or use mode = \"passthrough\"");
    }
    let upstreams = c.upstreams(&raw.upstreams);
    let retry = c.retry(&raw.retry);
    let cache = c.cache(&raw.cache);
    let redis = c.redis(&raw.redis);
    let auth = auth.map(|mode| match mode {
        "keys" => AuthMode::Keys,
        _ => AuthMode::Passthrough,
    });
    let config = || {
        Some(Config {
            source: None,
            server: server?,
            auth: auth?,
            default_limits: default_limits?,
            limits: limits?,
            keys: keys?,
            upstreams: upstreams?,
            retry: retry?,
            cache: cache?,
            redis: redis?,
        })
    };
    match config() {
        Some(config) if c.errors.is_empty() => Ok(config),
        _ => Err(c.errors),
    }
}

/// Collects diagnostics while values are checked one by one.
struct Checker<'a> {
    locator: &'a Locator<'a>,
    base_dir: &'a Path,
    errors: Vec<Diagnostic>,
}

// === impl Checker: reporting and single values ===

impl Checker<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        self.locator.error(span, message)
    }

    fn report<T>(&mut self, value: &Spanned<T>, message: impl Into<String>, hint: &str) {
        let mut diagnostic = self.at(value.span(), message);
        diagnostic.hint = (!hint.is_empty()).then(|| hint.to_owned());
        self.errors.push(diagnostic);
    }

    /// Reports, and yields `None` for the bad value.
    fn fail<T, R>(&mut self, value: &Spanned<T>, message: impl Into<String>, hint: &str) -> Option<R> {
        self.report(value, message, hint);
        None
    }

    fn socket(&mut self, value: &Spanned<String>) -> Option<SocketAddr> {
        let parsed = value.get_ref().parse().ok();
        if parsed.is_none() {
            let message = format!("not a valid socket address: {:?}", value.get_ref());
            self.report(value, message, "use IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:8080\"");
        }
        parsed
    }

    /// A duration up to `max`, and longer than 0 unless `zero_ok`.
    fn duration(
        &mut self,
        field: &str,
        value: &Spanned<String>,
        zero_ok: bool,
        max: Duration,
    ) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(duration) if duration > max => {
                let hint = format!("the maximum is \"{}\"", format_duration(max));
                self.fail(value, format!("`{field}` is too long: {:?}", value.get_ref()), &hint)
            }
            Ok(duration) if zero_ok || !duration.is_zero() => Some(duration),
            Ok(_) => self.fail(value, format!("`{field}` must be longer than 0"), ""),
            Err(message) => {
                self.fail(value, message, "write a number and a unit, e.g. \"250ms\", \"30s\", \"10m\"")
            }
        }
    }

    /// A size greater than 0 and up to `max`.
    fn size(&mut self, field: &str, value: &Spanned<String>, max: ByteSize) -> Option<ByteSize> {
        match value.get_ref().parse::<ByteSize>() {
            Ok(size) if size > max => {
                let hint = format!("the maximum is \"{max}\"");
                self.fail(value, format!("`{field}` is too large: {:?}", value.get_ref()), &hint)
            }
            Ok(size) if size.as_u64() > 0 => Some(size),
            Ok(_) => self.fail(value, format!("`{field}` must be greater than 0"), ""),
            Err(message) => {
                self.fail(value, message, "write a number and a unit, e.g. \"16MiB\" or \"10MB\"")
            }
        }
    }

    fn count(&mut self, field: &str, value: &Spanned<i64>) -> Option<NonZeroU32> {
        let number = *value.get_ref();
        match u32::try_from(number).ok().and_then(NonZeroU32::new) {
            Some(count) => Some(count),
            None if number < 1 => self.fail(value, format!("`{field}` must be at least 1, not {number}"), ""),
            None => {
                self.fail(value, format!("`{field}` is too large: {number}"), "the maximum is 4294967295")
            }
        }
    }

    fn choice<'v>(&mut self, field: &str, value: &'v Spanned<String>, options: &[&str]) -> Option<&'v str> {
        let text = value.get_ref().as_str();
        if options.contains(&text) {
            return Some(text);
        }
        let expected = options.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>().join(" or ");
        let hint = did_you_mean(text, options.iter().copied()).unwrap_or(format!("expected {expected}"));
        self.fail(value, format!("not a valid {field}: {text:?}"), &hint)
    }

    /// An existing, readable file, resolved from the config file's directory.
    fn file(&mut self, field: &str, value: &Spanned<String>) -> Option<PathBuf> {
        let written = Path::new(value.get_ref());
        let path = self.base_dir.join(written);
        let problem = match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => "not a file".to_owned(),
            Ok(_) => match std::fs::File::open(&path) {
                Ok(_) => return Some(path),
                Err(error) => lower_io(&error),
            },
            Err(error) => lower_io(&error),
        };
        let hint = if written.is_relative() {
            format!("relative paths are resolved from the config file's directory: {}", path.display())
        } else {
            String::new()
        };
        self.fail(value, format!("cannot read {field} {:?}: {problem}", value.get_ref()), &hint)
    }

    /// Model-name globs; `*` also matches `/`, as in `meta-llama/*`.
    fn globs(&mut self, field: &str, list: &Spanned<Vec<Spanned<String>>>) -> Option<ModelGlobs> {
        if list.get_ref().is_empty() {
            return self.fail(list, format!("`{field}` is empty"), "leave it out to allow every model");
        }
        let mut set = GlobSetBuilder::new();
        let mut ok = true;
        for pattern in list.get_ref() {
            match GlobBuilder::new(pattern.get_ref()).literal_separator(false).build() {
                Ok(glob) => _ = set.add(glob),
                Err(error) => {
                    ok = false;
                    let message = format!("not a valid glob: {:?}: {}", pattern.get_ref(), error.kind());
                    self.report(pattern, message, "");
                }
            }
        }
        let set = set.build().ok().filter(|_| ok)?;
        let patterns = list.get_ref().iter().map(|p| p.get_ref().clone()).collect();
        Some(ModelGlobs { patterns, set })
    }
}

// === impl Checker: sections (`[[keys]]` and `[[upstreams]]` are in `entries`) ===

impl Checker<'_> {
    fn server(&mut self, raw: &RawServer) -> Option<ServerConfig> {
        let listen = self.socket(&raw.listen);
        let admin_listen = match raw.admin_listen.get_ref().as_str() {
            "" => Some(None),
            _ => self.socket(&raw.admin_listen).map(Some),
        };
        // Port 0 asks the system for a free port: two of them never clash.
        if listen.is_some_and(|addr| addr.port() != 0) && admin_listen == Some(listen) {
            let message =
                format!("admin_listen is the same address as listen: {:?}", raw.admin_listen.get_ref());
            self.report(
                &raw.admin_listen,
                message,
                "use another port, or \"\" to disable the admin listener",
            );
        }
        let max_request_body = self.size("max_request_body", &raw.max_request_body, MAX_REQUEST_BODY);
        let request_timeout = self.duration("request_timeout", &raw.request_timeout, false, WEEK);
        let shutdown_grace = self.duration("shutdown_grace", &raw.shutdown_grace, true, WEEK);
        let tls = match &raw.tls {
            None => Some(None),
            Some(tls) => match (&tls.get_ref().cert, &tls.get_ref().key) {
                (Some(cert), Some(key)) => {
                    let (cert, key) = (self.file("tls cert", cert), self.file("tls key", key));
                    Some(Some(TlsFiles { cert: cert?, key: key? }))
                }
                _ => self.fail(tls, "server.tls needs both `cert` and `key`", ""),
            },
        };
        let header_read_timeout = self.duration("header_read_timeout", &raw.header_read_timeout, false, DAY);
        let body_read_timeout = self.duration("body_read_timeout", &raw.body_read_timeout, false, DAY);
        let max_header_size = self.size("max_header_size", &raw.max_header_size, MAX_HEADER_SIZE);
        let max_connections = self.count("max_connections", &raw.max_connections);
        let idle_timeout = self.duration("idle_timeout", &raw.idle_timeout, false, DAY);
        let hops = &raw.trusted_proxy_hops;
        let trusted_proxy_hops =
            match u32::try_from(*hops.get_ref()).ok().filter(|hops| *hops <= MAX_PROXY_HOPS) {
                Some(hops) => Some(hops),
                None => self.fail(hops, format!("`trusted_proxy_hops` must be 0 to {MAX_PROXY_HOPS}"), ""),
            };
        Some(ServerConfig {
            trusted_proxy_hops: trusted_proxy_hops?,
            header_read_timeout: header_read_timeout?,
            body_read_timeout: body_read_timeout?,
            max_header_size: max_header_size?,
            max_connections: max_connections?,
            idle_timeout: idle_timeout?,
            listen: listen?,
            admin_listen: admin_listen?,
            max_request_body: max_request_body?,
            request_timeout: request_timeout?,
            shutdown_grace: shutdown_grace?,
            tls: tls?,
        })
    }

    /// One table of limits. A burst needs a per-minute amount, here or in `fallback`
    /// (`[limits.default]` for a key), and may not exceed it.
    fn limits(&mut self, raw: &RawLimitSpec, fallback: &LimitSpec) -> Option<LimitSpec> {
        let mut get = |field, value: &Option<Spanned<i64>>| match value {
            None => Some(None),
            Some(value) => self.count(field, value).map(Some),
        };
        let [requests_per_minute, tokens_per_minute, max_concurrent, burst_requests, burst_tokens] = [
            get("requests_per_minute", &raw.requests_per_minute),
            get("tokens_per_minute", &raw.tokens_per_minute),
            get("max_concurrent", &raw.max_concurrent),
            get("burst_requests", &raw.burst_requests),
            get("burst_tokens", &raw.burst_tokens),
        ];
        let spec = LimitSpec {
            requests_per_minute: requests_per_minute?,
            tokens_per_minute: tokens_per_minute?,
            max_concurrent: max_concurrent?,
            burst_requests: burst_requests?,
            burst_tokens: burst_tokens?,
        };
        let pairs = [
            (
                "requests",
                &raw.burst_requests,
                spec.burst_requests,
                spec.requests_per_minute.or(fallback.requests_per_minute),
            ),
            (
                "tokens",
                &raw.burst_tokens,
                spec.burst_tokens,
                spec.tokens_per_minute.or(fallback.tokens_per_minute),
            ),
        ];
        let mut ok = true;
        for (kind, raw_burst, burst, amount) in pairs {
            let (Some(at), Some(burst)) = (raw_burst, burst) else { continue };
            match amount {
                None => self.report(
                    at,
                    format!("burst_{kind} needs {kind}_per_minute"),
                    "set it here or in [limits.default]",
                ),
                Some(amount) if burst > amount => self.report(
                    at,
                    format!("burst_{kind} ({burst}) exceeds {kind}_per_minute ({amount})"),
                    "the burst is the bucket's capacity: at most the per-minute amount",
                ),
                Some(_) => continue,
            }
            ok = false;
        }
        ok.then_some(spec)
    }

    /// `[limits]` besides its `default` table.
    fn limits_settings(&mut self, raw: &RawLimits) -> Option<LimitsConfig> {
        let keys = *raw.max_tracked_keys.get_ref();
        let max_tracked_keys = u64::try_from(keys).ok().and_then(NonZeroU64::new);
        if max_tracked_keys.is_none() {
            let message = format!("`max_tracked_keys` must be at least 1, not {keys}");
            self.report(&raw.max_tracked_keys, message, "");
        }
        let tokens = *raw.default_completion_tokens.get_ref();
        let default_completion_tokens = u64::try_from(tokens).ok();
        if default_completion_tokens.is_none() {
            let message = format!("`default_completion_tokens` must be 0 or more, not {tokens}");
            self.report(&raw.default_completion_tokens, message, "");
        }
        Some(LimitsConfig {
            max_tracked_keys: max_tracked_keys?,
            default_completion_tokens: default_completion_tokens?,
        })
    }

    fn retry(&mut self, raw: &RawRetry) -> Option<RetryConfig> {
        let max_attempts = self.count("max_attempts", &raw.max_attempts);
        let base_delay = self.duration("base_delay", &raw.base_delay, true, DAY);
        let max_delay = self.duration("max_delay", &raw.max_delay, true, DAY);
        if let (Some(base), Some(max)) = (base_delay, max_delay)
            && base > max
        {
            let at = if is_default(&raw.base_delay) { &raw.max_delay } else { &raw.base_delay };
            let message = format!(
                "base_delay ({:?}) is longer than max_delay ({:?})",
                raw.base_delay.get_ref(),
                raw.max_delay.get_ref()
            );
            self.report(at, message, "");
        }
        let mut on_status = Vec::new();
        for code in &raw.on_status {
            let status = u16::try_from(*code.get_ref()).ok().filter(|c| (100..=599).contains(c));
            match status.and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(status) => on_status.push(status),
                None => self.report(
                    code,
                    format!("not an http status code: {}", code.get_ref()),
                    "use a code from 100 to 599",
                ),
            }
        }
        let statuses_ok = on_status.len() == raw.on_status.len();
        let budget_percent =
            u8::try_from(*raw.budget_percent.get_ref()).ok().filter(|percent| *percent <= 100);
        if budget_percent.is_none() {
            let message = format!("not a percentage: {}", raw.budget_percent.get_ref());
            self.report(&raw.budget_percent, message, "use a whole number from 0 to 100");
        }
        let min_retries = self.count("min_retries", &raw.min_retries);
        Some(RetryConfig {
            budget_percent: budget_percent?,
            min_retries: min_retries?,
            max_attempts: max_attempts?,
            base_delay: base_delay.filter(|base| max_delay.is_some_and(|max| *base <= max))?,
            max_delay: max_delay?,
            on_status: statuses_ok.then_some(on_status)?,
            respect_retry_after: raw.respect_retry_after,
        })
    }

    fn cache(&mut self, raw: &RawCache) -> Option<CacheConfig> {
        let max_size = self.size("max_size", &raw.max_size, MAX_CACHE_SIZE);
        let ttl = self.duration("ttl", &raw.ttl, false, YEAR);
        let scope = self.choice("cache.scope", &raw.scope, &["key", "global"]).map(|scope| match scope {
            "global" => CacheScope::Global,
            _ => CacheScope::Key,
        });
        let mut paths_ok = true;
        for path in &raw.paths {
            if !path.get_ref().starts_with('/') {
                paths_ok = false;
                let message = format!("cache path must start with \"/\": {:?}", path.get_ref());
                self.report(path, message, "e.g. \"/v1/chat/completions\"");
            }
        }
        Some(CacheConfig {
            enabled: raw.enabled,
            max_size: max_size?,
            ttl: ttl?,
            scope: scope?,
            paths: paths_ok.then(|| raw.paths.iter().map(|p| p.get_ref().clone()).collect())?,
        })
    }

    /// `None` inside when no `url` is set: no Redis.
    fn redis(&mut self, raw: &RawRedis) -> Option<Option<RedisConfig>> {
        let timeout = self.duration("redis timeout", &raw.timeout, false, MINUTE);
        let Some(url) = &raw.url else { return Some(None) };
        let text = url.get_ref().0.expose();
        let rest = text.strip_prefix("redis://").or_else(|| text.strip_prefix("rediss://"));
        if rest.is_none_or(str::is_empty) {
            // The URL may hold a password: it is never echoed.
            return self.fail(
                url,
                "redis `url` must start with redis:// or rediss:// and name a host",
                "e.g. \"redis://127.0.0.1:6379\"",
            );
        }
        Some(Some(RedisConfig {
            url: url.get_ref().0.clone(),
            prefix: raw.prefix.get_ref().clone(),
            timeout: timeout?,
            limits: raw.limits,
            cache: raw.cache,
        }))
    }
}

fn lower_io(error: &std::io::Error) -> String {
    error.to_string().to_lowercase()
}
