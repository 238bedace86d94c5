//! The checks of array-of-table entries, `[[keys]]` and `[[upstreams]]`: required
//! fields, unique ids and names, key hashing, and upstream URLs.

use std::{collections::HashMap, ops::Range};

use http::Uri;
use toml::Spanned;

use super::Checker;
use crate::{
    config::{
        KeyConfig, LimitSpec, UpstreamConfig,
        raw::{RawKey, RawUpstream},
    },
    secret::{KeyHash, KeyId},
};

// === impl Checker: entries ===

impl Checker<'_> {
    pub(super) fn keys(&mut self, raw: &[Spanned<RawKey>], defaults: &LimitSpec) -> Option<Vec<KeyConfig>> {
        let (mut ids, mut hashes) = (HashMap::new(), HashMap::new());
        let keys: Vec<_> = raw.iter().map(|entry| self.key(entry, defaults, &mut ids, &mut hashes)).collect();
        keys.into_iter().collect()
    }

    /// One `[[keys]]` entry; `ids` and `hashes` hold the entries before it.
    fn key(
        &mut self,
        entry: &Spanned<RawKey>,
        defaults: &LimitSpec,
        ids: &mut HashMap<String, Range<usize>>,
        hashes: &mut HashMap<KeyHash, String>,
    ) -> Option<KeyConfig> {
        let key = entry.get_ref();
        let id = match &key.id {
            None => self.fail(
                entry,
                "[[keys]] entry is missing `id`",
                "every key needs an `id` for logs and metrics",
            ),
            Some(id) if id.get_ref().trim().is_empty() => self.fail(id, "key `id` must not be empty", ""),
            Some(id) => self.unique(ids, id, "key id"),
        };
        // Names the entry in messages, even when its `id` is not acceptable.
        let name = key.id.as_ref().map_or("this key".to_owned(), |id| format!("key `{}`", id.get_ref()));
        let hash = match (&key.key, &key.key_hash) {
            (Some(_), Some(hash)) => {
                self.fail(hash, format!("{name} sets both `key` and `key_hash`"), "keep one of them")
            }
            (None, None) => self.fail(
                entry,
                format!("{name} needs `key` or `key_hash`"),
                "`spillway hash-key` prints a key_hash",
            ),
            (Some(plain), None) if plain.get_ref().0.expose().is_empty() => {
                self.fail(plain, format!("`key` of {name} is empty"), "")
            }
            (Some(plain), None) if plain.get_ref().0.expose().trim() != plain.get_ref().0.expose() => {
                let message = format!("`key` of {name} has leading or trailing whitespace");
                self.fail(plain, message, "presented keys are trimmed, so it could never match")
            }
            (Some(plain), None) => Some((KeyHash::of(plain.get_ref().0.expose().as_bytes()), plain.span())),
            (None, Some(hash)) => match KeyHash::parse(hash.get_ref().trim()) {
                Some(parsed) => Some((parsed, hash.span())),
                None => self.fail(
                    hash,
                    format!("`key_hash` of {name} must be \"sha256:\" followed by 64 hex digits"),
                    "`spillway hash-key` prints one",
                ),
            },
        };
        let hash = hash.and_then(|(hash, span)| match hashes.get(&hash) {
            Some(first) => {
                let message = format!("{name} is the same key as {first}");
                self.fail(&Spanned::new(span, ()), message, "each key must be unique")
            }
            None => {
                hashes.insert(hash, name.clone());
                Some(hash)
            }
        });
        let limits = self.limits(&key.limits(), defaults);
        let models = match &key.models {
            None => Some(None),
            Some(models) => self.globs("models", models).map(Some),
        };
        Some(KeyConfig { id: KeyId::new(&id?), hash: hash?, limits: limits?, models: models? })
    }

    /// `value` if no earlier entry used it; `seen` maps earlier values to their spans.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, Range<usize>>,
        value: &Spanned<String>,
        what: &str,
    ) -> Option<String> {
        let text = value.get_ref();
        match seen.get(text) {
            Some(first) => {
                let (line, col) = self.locator.position(first.clone());
                self.fail(
                    value,
                    format!("duplicate {what} `{text}`"),
                    &format!("first defined at {line}:{col}"),
                )
            }
            None => {
                seen.insert(text.clone(), value.span());
                Some(text.clone())
            }
        }
    }

    pub(super) fn upstreams(
        &mut self,
        raw: &Spanned<Vec<Spanned<RawUpstream>>>,
    ) -> Option<Vec<UpstreamConfig>> {
        if raw.get_ref().is_empty() {
            return self.fail(raw, "`upstreams` is empty", "leave it out to use the default OpenAI upstream");
        }
        let mut names = HashMap::new();
        let upstreams: Vec<_> = raw.get_ref().iter().map(|entry| self.upstream(entry, &mut names)).collect();
        upstreams.into_iter().collect()
    }

    /// One `[[upstreams]]` entry; `names` holds the entries before it.
    fn upstream(
        &mut self,
        entry: &Spanned<RawUpstream>,
        names: &mut HashMap<String, Range<usize>>,
    ) -> Option<UpstreamConfig> {
        let upstream = entry.get_ref();
        let name = match &upstream.name {
            None => self.fail(entry, "[[upstreams]] entry is missing `name`", ""),
            Some(name) if name.get_ref().trim().is_empty() => {
                self.fail(name, "upstream `name` must not be empty", "")
            }
            Some(name) => self.unique(names, name, "upstream name"),
        };
        let base_url = match &upstream.base_url {
            None => self.fail(entry, "[[upstreams]] entry is missing `base_url`", ""),
            Some(url) => self.base_url(url),
        };
        let models = self.globs("models", &upstream.models);
        let weight = self.count("weight", &upstream.weight);
        let connect_timeout = self.duration("connect_timeout", &upstream.connect_timeout, false, super::DAY);
        let timeout = self.duration("timeout", &upstream.timeout, false, super::WEEK);
        let ca_file = match &upstream.ca_file {
            None => Some(None),
            Some(path) => self.file("ca_file", path).map(Some),
        };
        // `api_key = ""` (e.g. from `${OPENAI_API_KEY:-}`) means no key.
        let api_key = upstream.api_key.as_ref().filter(|key| !key.get_ref().0.expose().is_empty());
        if let (Some(key), Some(name)) = (api_key, &name)
            && !key.get_ref().0.expose().bytes().all(|b| b.is_ascii_graphic())
        {
            let message =
                format!("`api_key` of upstream `{name}` has characters an http header cannot carry");
            self.report(key, message, "spaces, control characters and non-ascii are not allowed");
        }
        let organization = self.header_text("organization", upstream.organization.as_ref());
        let project = self.header_text("project", upstream.project.as_ref());
        Some(UpstreamConfig {
            name: name?,
            base_url: base_url?,
            api_key: api_key.map(|key| key.get_ref().0.clone()),
            models: models?,
            weight: weight?,
            connect_timeout: connect_timeout?,
            timeout: timeout?,
            ca_file: ca_file?,
            organization: organization?,
            project: project?,
            forward_caller_org: upstream.forward_caller_org,
        })
    }

    /// A value sent upstream as a header as it is written; empty means none.
    fn header_text(&mut self, field: &str, value: Option<&Spanned<String>>) -> Option<Option<String>> {
        let Some(value) = value.filter(|value| !value.get_ref().is_empty()) else { return Some(None) };
        if !value.get_ref().bytes().all(|byte| byte.is_ascii_graphic()) {
            let message = format!("`{field}` has characters an http header cannot carry");
            return self.fail(value, message, "spaces, control characters and non-ascii are not allowed");
        }
        Some(Some(value.get_ref().clone()))
    }

    fn base_url(&mut self, value: &Spanned<String>) -> Option<Uri> {
        match parse_base_url(value.get_ref()) {
            Ok(uri) => Some(uri),
            Err(message) => self.fail(value, message, ""),
        }
    }
}

/// Parses an upstream `base_url` (also `--upstream`): an absolute http or https URL
/// without credentials, query or fragment, trailing slashes dropped. The error is a
/// lower-case message, naming the value unless it may hold a credential.
pub fn parse_base_url(text: &str) -> Result<Uri, String> {
    let trimmed = text.trim().trim_end_matches('/');
    let uri = trimmed.parse::<Uri>().ok().filter(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some_and(|host| !host.is_empty())
    });
    match uri {
        None => Err(format!("not an absolute http or https url: {text:?}")),
        Some(uri) if uri.authority().is_some_and(|authority| authority.as_str().contains('@')) => {
            Err("a base url must not contain user:password@; put the credential in `api_key`".to_owned())
        }
        Some(uri) if uri.query().is_some() || trimmed.contains('#') => {
            // Not echoed: a query may carry a credential.
            Err("a base url must not have a query or fragment".to_owned())
        }
        Some(uri) => Ok(uri),
    }
}
