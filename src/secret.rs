//! Types for credentials and the names that stand in for them.
//!
//! A [`Secret`] never prints its contents (`Debug` and `Display` are redacted), a
//! [`KeyHash`] is the SHA-256 of a key, and a [`KeyId`] is the only form of a caller's
//! identity that may appear in logs, metrics, Redis keys and error bodies.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A value that must never be printed: provider keys, gateway keys, Redis passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself, for the one place that must send it somewhere.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// SHA-256 of a key, as configured with `key_hash = "sha256:…"` or computed from a
/// presented key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a key as presented by a caller (or given in config).
    pub fn of(key: &[u8]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// Parses `sha256:` followed by 64 hex digits (either case).
    pub fn parse(text: &str) -> Option<Self> {
        let hex_digits = text.strip_prefix("sha256:")?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Compares in constant time.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The digest itself (cache keys hash it).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex digits: the `key` label of a passthrough key.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for KeyHash {
    /// `sha256:` + lowercase hex, the form `spillway hash-key` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", self.short())
    }
}

/// The name of a caller key in logs and metrics: a configured `id`, or the first 8 hex
/// digits of a passthrough key's hash. Never a key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId {
    name: std::sync::Arc<str>,
    /// A presented key's hash prefix: any caller can make new ones.
    presented: bool,
}

impl KeyId {
    /// A configured `id`.
    pub fn new(id: &str) -> Self {
        Self { name: id.into(), presented: false }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether this names a presented passthrough key, not a configured one.
    pub fn is_presented(&self) -> bool {
        self.presented
    }
}

impl From<&KeyHash> for KeyId {
    fn from(hash: &KeyHash) -> Self {
        Self { name: hash.short().into(), presented: true }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_through_its_text_form() {
        let hash = KeyHash::of(b"test");
        assert_eq!(
            hash.to_string(),
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert!(KeyHash::parse(&hash.to_string()).is_some_and(|h| h.ct_eq(&hash)));
        assert_eq!(hash.short(), "9f86d081");
    }

    #[test]
    fn bad_hashes_are_refused() {
        assert!(KeyHash::parse("9f86d0").is_none());
        assert!(KeyHash::parse("sha256:zz").is_none());
        assert!(KeyHash::parse("sha256:9f86d0").is_none());
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("sk-live".to_string());
        assert_eq!(format!("{secret:?} {secret}"), "Secret(***) ***");
    }
}
