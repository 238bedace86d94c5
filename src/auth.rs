//! Who is calling: the caller's key, taken from `Authorization: Bearer …` (or Azure's
//! `api-key`), matched against `[[keys]]` by its SHA-256.
//!
//! In `keys` mode an unknown key is refused; in `passthrough` mode any key is accepted
//! and identified by its hash (a listed hash still gets its own id, limits and models).
//! Only hashes are kept: the presented key lives on in the request headers only as
//! long as passthrough needs to forward it.

use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, header};

use crate::{
    config::{AuthMode, KeyConfig, LimitSpec},
    error::GatewayError,
    limit::{BucketKey, Quota},
    secret::{KeyHash, KeyId},
};

/// The `[[keys]]` of one config by hash, each with its resolved limits.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<KeyHash, Arc<KeyEntry>>,
    /// The limits of presented keys that are not listed.
    default_quota: Quota,
}

/// A configured key and the limits that apply to it.
#[derive(Debug)]
pub struct KeyEntry {
    pub config: KeyConfig,
    pub quota: Quota,
}

impl KeyTable {
    pub fn new(keys: &[KeyConfig], default_limits: &LimitSpec) -> Self {
        let by_hash = keys
            .iter()
            .map(|key| {
                let quota = Quota::resolve(Some(&key.limits), default_limits);
                (key.hash, Arc::new(KeyEntry { config: key.clone(), quota }))
            })
            .collect();
        Self { by_hash, default_quota: Quota::resolve(None, default_limits) }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The entry whose hash equals `hash`. The map lookup is on a hash of the
    /// presented key (its timing tells nothing about stored keys); the final equality
    /// check is constant-time.
    fn find(&self, hash: &KeyHash) -> Option<&Arc<KeyEntry>> {
        self.by_hash.get_key_value(hash).filter(|(stored, _)| stored.ct_eq(hash)).map(|(_, entry)| entry)
    }
}

/// The identified caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The configured `id`, or the first 8 hex digits of the hash.
    pub id: KeyId,
    pub hash: KeyHash,
    /// The matching `[[keys]]` entry, if any.
    pub entry: Option<Arc<KeyEntry>>,
    /// The limits that apply to this caller.
    pub quota: Quota,
    /// Passthrough: the caller's key is a provider key, forwarded to upstreams that
    /// have no `api_key` of their own. Never true for a gateway key.
    pub forwards_own_key: bool,
}

impl Caller {
    /// Whether this caller may use `model` (keys without `models` may use any).
    pub fn may_use(&self, model: &str) -> bool {
        self.entry
            .as_ref()
            .and_then(|entry| entry.config.models.as_ref())
            .is_none_or(|globs| globs.matches(model))
    }

    /// Whose buckets this caller's requests count against.
    pub fn bucket(&self) -> BucketKey {
        match &self.entry {
            Some(entry) => BucketKey::Configured(entry.config.id.clone()),
            None => BucketKey::Presented(self.hash),
        }
    }
}

/// Identifies the caller from the request headers.
///
/// `Err(MissingApiKey)` when no key was sent; `Err(UnknownApiKey)` in `keys` mode for a
/// key that is not listed.
pub fn authenticate(headers: &HeaderMap, mode: AuthMode, keys: &KeyTable) -> Result<Caller, GatewayError> {
    let presented = presented_key(headers).ok_or(GatewayError::MissingApiKey)?;
    let hash = KeyHash::of(presented);
    let forwards_own_key = mode == AuthMode::Passthrough;
    match (keys.find(&hash), mode) {
        (Some(entry), _) => Ok(Caller {
            id: entry.config.id.clone(),
            hash,
            quota: entry.quota,
            entry: Some(entry.clone()),
            forwards_own_key,
        }),
        (None, AuthMode::Passthrough) => Ok(Caller {
            id: KeyId::from(&hash),
            hash,
            entry: None,
            quota: keys.default_quota,
            forwards_own_key,
        }),
        (None, AuthMode::Keys) => Err(GatewayError::UnknownApiKey),
    }
}

/// The key as sent: `Authorization: Bearer <key>` (scheme case-insensitive), else
/// `api-key: <key>`. Empty keys count as missing.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|value| {
        let bytes = value.as_bytes();
        let (scheme, rest) = bytes.split_at_checked(7)?;
        scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest.trim_ascii())
    });
    bearer
        .or_else(|| headers.get("api-key").map(|value| value.as_bytes().trim_ascii()))
        .filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn table(id: &str, key: &str) -> KeyTable {
        let key = KeyConfig {
            id: KeyId::new(id),
            hash: KeyHash::of(key.as_bytes()),
            limits: Default::default(),
            models: None,
        };
        KeyTable::new(&[key], &LimitSpec::default())
    }

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn keys_mode_accepts_listed_keys_only() {
        let keys = table("team-a", "sk-a");
        let caller = authenticate(&with("authorization", "Bearer sk-a"), AuthMode::Keys, &keys);
        assert_eq!(caller.map(|c| c.id.to_string()).ok().as_deref(), Some("team-a"));
        let other = authenticate(&with("authorization", "Bearer sk-b"), AuthMode::Keys, &keys);
        assert!(matches!(other, Err(GatewayError::UnknownApiKey)));
    }

    #[test]
    fn passthrough_identifies_by_hash_prefix() {
        let caller =
            authenticate(&with("authorization", "bearer test"), AuthMode::Passthrough, &KeyTable::default());
        assert_eq!(caller.map(|c| c.id.to_string()).ok().as_deref(), Some("9f86d081"));
        let azure = authenticate(&with("api-key", "test"), AuthMode::Passthrough, &KeyTable::default());
        assert!(azure.is_ok());
    }

    #[test]
    fn missing_or_empty_keys_are_refused() {
        for headers in
            [HeaderMap::new(), with("authorization", "Bearer "), with("authorization", "Basic abc")]
        {
            let result = authenticate(&headers, AuthMode::Passthrough, &KeyTable::default());
            assert!(matches!(result, Err(GatewayError::MissingApiKey)), "{headers:?}");
        }
    }
}
