//! `RawConfig`: the serde mirror of the TOML file (SPEC §2), before any check, and
//! the parse that produces it.
//!
//! Every default lives here, in the `Default` impls, as the same text a user would
//! write; a default carries an empty span at 0, which marks it as not written in the
//! file. Values that checks point at are `Spanned`, and values checked semantically
//! (numbers, names, durations) are kept loose (`i64`, `String`, optional) so that
//! `validate` can report all of their problems at once instead of serde stopping at
//! the first. Unknown fields are collected with `serde_ignored` in one pass rather
//! than `deny_unknown_fields`, which would stop at the first one.

use std::ops::Range;

use serde::{Deserialize, Deserializer, de};
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::diagnostic::{Diagnostic, Locator, did_you_mean};
use crate::secret::Secret;

/// A value as if written in the file, but with no position: a built-in default.
fn builtin<T>(value: impl Into<T>) -> Spanned<T> {
    Spanned::new(0..0, value.into())
}

/// Whether a value is a built-in default rather than written in the file.
pub(crate) fn is_default<T>(value: &Spanned<T>) -> bool {
    value.span() == (0..0)
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawConfig {
    pub server: RawServer,
    pub auth: RawAuth,
    pub limits: RawLimits,
    pub keys: Vec<Spanned<RawKey>>,
    pub upstreams: Spanned<Vec<Spanned<RawUpstream>>>,
    pub retry: RawRetry,
    pub cache: RawCache,
    pub redis: RawRedis,
}

impl Default for RawConfig {
    fn default() -> Self {
        let openai = RawUpstream {
            name: Some(builtin("openai")),
            base_url: Some(builtin("https://api.openai.com/v1")),
            ..RawUpstream::default()
        };
        Self {
            server: RawServer::default(),
            auth: RawAuth::default(),
            limits: RawLimits::default(),
            keys: Vec::new(),
            upstreams: builtin(vec![builtin(openai)]),
            retry: RawRetry::default(),
            cache: RawCache::default(),
            redis: RawRedis::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawServer {
    pub listen: Spanned<String>,
    pub admin_listen: Spanned<String>,
    pub max_request_body: Spanned<String>,
    pub request_timeout: Spanned<String>,
    pub shutdown_grace: Spanned<String>,
    pub tls: Option<Spanned<RawTls>>,
    pub header_read_timeout: Spanned<String>,
    pub body_read_timeout: Spanned<String>,
    pub max_header_size: Spanned<String>,
    pub max_connections: Spanned<i64>,
    pub idle_timeout: Spanned<String>,
    pub trusted_proxy_hops: Spanned<i64>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: builtin("127.0.0.1:8080"),
            admin_listen: builtin("127.0.0.1:9464"),
            max_request_body: builtin("16MiB"),
            request_timeout: builtin("10m"),
            shutdown_grace: builtin("30s"),
            tls: None,
            header_read_timeout: builtin("30s"),
            body_read_timeout: builtin("60s"),
            max_header_size: builtin("64KiB"),
            max_connections: builtin(10_000),
            idle_timeout: builtin("3m"),
            trusted_proxy_hops: builtin(0),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawAuth {
    pub mode: Spanned<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self { mode: builtin("passthrough") }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawLimits {
    pub default: RawLimitSpec,
    pub max_tracked_keys: Spanned<i64>,
    pub default_completion_tokens: Spanned<i64>,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            default: RawLimitSpec::default(),
            max_tracked_keys: builtin(100_000),
            default_completion_tokens: builtin(0),
        }
    }
}

/// `[limits.default]`, and the same fields of a `[[keys]]` entry. Unset = `None`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawLimitSpec {
    pub requests_per_minute: Option<Spanned<i64>>,
    pub tokens_per_minute: Option<Spanned<i64>>,
    pub max_concurrent: Option<Spanned<i64>>,
    pub burst_requests: Option<Spanned<i64>>,
    pub burst_tokens: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawKey {
    pub id: Option<Spanned<String>>,
    pub key: Option<Spanned<RawSecret>>,
    pub key_hash: Option<Spanned<String>>,
    pub requests_per_minute: Option<Spanned<i64>>,
    pub tokens_per_minute: Option<Spanned<i64>>,
    pub max_concurrent: Option<Spanned<i64>>,
    pub burst_requests: Option<Spanned<i64>>,
    pub burst_tokens: Option<Spanned<i64>>,
    pub models: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RawKey {
    /// The limit fields of this key, in the shape of `[limits.default]`.
    pub fn limits(&self) -> RawLimitSpec {
        RawLimitSpec {
            requests_per_minute: self.requests_per_minute.clone(),
            tokens_per_minute: self.tokens_per_minute.clone(),
            max_concurrent: self.max_concurrent.clone(),
            burst_requests: self.burst_requests.clone(),
            burst_tokens: self.burst_tokens.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawUpstream {
    pub name: Option<Spanned<String>>,
    pub base_url: Option<Spanned<String>>,
    pub api_key: Option<Spanned<RawSecret>>,
    pub models: Spanned<Vec<Spanned<String>>>,
    pub weight: Spanned<i64>,
    pub connect_timeout: Spanned<String>,
    pub timeout: Spanned<String>,
    pub ca_file: Option<Spanned<String>>,
    pub organization: Option<Spanned<String>>,
    pub project: Option<Spanned<String>>,
    pub forward_caller_org: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            name: None,
            base_url: None,
            api_key: None,
            models: builtin(vec![builtin("*")]),
            weight: builtin(1),
            connect_timeout: builtin("5s"),
            timeout: builtin("120s"),
            ca_file: None,
            organization: None,
            project: None,
            forward_caller_org: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawRetry {
    pub max_attempts: Spanned<i64>,
    pub base_delay: Spanned<String>,
    pub max_delay: Spanned<String>,
    pub on_status: Vec<Spanned<i64>>,
    pub respect_retry_after: bool,
    pub budget_percent: Spanned<i64>,
    pub min_retries: Spanned<i64>,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            max_attempts: builtin(3),
            base_delay: builtin("250ms"),
            max_delay: builtin("8s"),
            on_status: [429, 500, 502, 503, 504].map(builtin).into(),
            respect_retry_after: true,
            budget_percent: builtin(20),
            min_retries: builtin(3),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawCache {
    pub enabled: bool,
    pub max_size: Spanned<String>,
    pub ttl: Spanned<String>,
    pub scope: Spanned<String>,
    pub paths: Vec<Spanned<String>>,
}

impl Default for RawCache {
    fn default() -> Self {
        let paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
        Self {
            enabled: true,
            max_size: builtin("256MiB"),
            ttl: builtin("1h"),
            scope: builtin("key"),
            paths: paths.map(builtin).into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RawRedis {
    pub url: Option<Spanned<RawSecret>>,
    pub prefix: Spanned<String>,
    pub timeout: Spanned<String>,
    pub limits: bool,
    pub cache: bool,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self { url: None, prefix: builtin("spillway:"), timeout: builtin("100ms"), limits: true, cache: true }
    }
}

/// A string that must never be printed, from the moment it is read.
#[derive(Debug)]
pub(crate) struct RawSecret(pub Secret<String>);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| Self(Secret::new(text)))
    }
}

/// Parses interpolated TOML. `Ok` carries the config and the unknown fields (which
/// do not stop validation); `Err` carries every syntax error, or the unknown fields
/// found so far and the first type error.
pub(crate) fn parse(
    text: &str,
    locator: &Locator<'_>,
) -> Result<(RawConfig, Vec<Diagnostic>), Vec<Diagnostic>> {
    let at =
        |span: Option<Range<usize>>, message: &str| locator.error(span.unwrap_or(0..0), lower_first(message));
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        return Err(syntax.iter().map(|e| at(e.span(), e.message())).collect());
    }
    let mut unknown = Vec::new();
    let deserializer = toml::de::Deserializer::from(root.clone());
    let parsed = serde_ignored::deserialize(deserializer, |path| unknown.push(segments(&path)));
    let mut diagnostics: Vec<_> =
        unknown.iter().map(|path| unknown_field(root.get_ref(), path, locator)).collect();
    match parsed {
        Ok(raw) => Ok((raw, diagnostics)),
        Err(error) => {
            let message = error.message().replace("expected i64", "expected an integer");
            diagnostics.push(at(error.span(), &message));
            Err(diagnostics)
        }
    }
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The document path of an ignored field, without serde's `Spanned` and `Option`
/// wrappers.
fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Segment::Index(*index)),
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned_private") => {
            out.push(Segment::Key(key.clone()));
        }
        _ => {}
    }
    out
}

fn unknown_field(root: &DeTable<'_>, path: &[Segment], locator: &Locator<'_>) -> Diagnostic {
    let mut shown = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) if shown.is_empty() => shown.push_str(key),
            Segment::Key(key) => shown.push_str(&format!(".{key}")),
            Segment::Index(index) => shown.push_str(&format!("[{index}]")),
        }
    }
    let section: Vec<&str> = path
        .iter()
        .filter_map(|segment| match segment {
            Segment::Key(key) => Some(key.as_str()),
            Segment::Index(_) => None,
        })
        .collect();
    let hint = section.split_last().and_then(|(name, section)| {
        let known = known_fields(section);
        let listed = || known.iter().map(|field| format!("`{field}`")).collect::<Vec<_>>().join(", ");
        did_you_mean(name, known.iter().copied())
            .or_else(|| (!known.is_empty()).then(|| format!("expected one of {}", listed())))
    });
    let span = key_span(root, path).unwrap_or(0..0);
    locator.error(span, format!("unknown field `{shown}`")).with_hint_opt(hint)
}

/// The span of the key that `path` ends in.
fn key_span(table: &DeTable<'_>, path: &[Segment]) -> Option<Range<usize>> {
    let [Segment::Key(name), rest @ ..] = path else {
        return None;
    };
    let (key, mut value) = table.iter().find(|(key, _)| key.get_ref() == name)?;
    let mut rest = rest;
    while let [Segment::Index(index), tail @ ..] = rest {
        let DeValue::Array(items) = value.get_ref() else {
            return None;
        };
        (value, rest) = (items.get(*index)?, tail);
    }
    match value.get_ref() {
        _ if rest.is_empty() => Some(key.span()),
        DeValue::Table(inner) => key_span(inner, rest),
        _ => None,
    }
}

/// The field names of the table at `section` (array indices left out).
fn known_fields(section: &[&str]) -> &'static [&'static str] {
    match section {
        [] => fields::<RawConfig>(),
        ["server"] => fields::<RawServer>(),
        ["server", "tls"] => fields::<RawTls>(),
        ["auth"] => fields::<RawAuth>(),
        ["limits"] => fields::<RawLimits>(),
        ["limits", "default"] => fields::<RawLimitSpec>(),
        ["keys"] => fields::<RawKey>(),
        ["upstreams"] => fields::<RawUpstream>(),
        ["retry"] => fields::<RawRetry>(),
        ["cache"] => fields::<RawCache>(),
        ["redis"] => fields::<RawRedis>(),
        _ => &[],
    }
}

/// The field names serde's derive gives a struct, read by asking it to deserialize
/// from a deserializer that only records them.
fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

fn lower_first(message: &str) -> String {
    let mut chars = message.chars();
    chars.next().map_or_else(String::new, |first| first.to_lowercase().chain(chars).collect())
}
