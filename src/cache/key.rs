//! Cache keys: SHA-256 over everything that must match for a stored response to be
//! served (scope, method, path and query, stream flag, canonical JSON body).
//!
//! Every field is written with an unambiguous encoding (a tag for the scope's kind,
//! a length before every variable-length field), so no choice of key id, path and
//! body can produce another request's input to the hash: two different requests
//! collide only if SHA-256 does. The scope is part of the key as a type, never as a
//! string prefix. Deciding *whether* a request is cached, and comparing the stored
//! [`RequestIdentity`] on a hit, belong to the cache stage.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{RequestIdentity, Scope};
use crate::limit::BucketKey;

mod canonical;

pub use canonical::{CanonicalError, MAX_DEPTH, canonical_json};

/// Names and versions the key layout; change it whenever the encoding changes, so
/// that entries written with an older layout (in a shared tier) are never found.
const LAYOUT: &[u8] = b"spillway cache key v2\0";

/// Scope tags: one per kind of namespace.
const SCOPE_GLOBAL: u8 = 0;
const SCOPE_CONFIGURED: u8 = 1;
const SCOPE_PRESENTED: u8 = 2;

/// The SHA-256 naming one cached request. `Debug` shows a short prefix, `Display`
/// the whole digest in lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

// === impl CacheKey ===

impl CacheKey {
    /// The key of a request with this identity and canonical body (the output of
    /// [`canonical_json`]). `identity.body_len` is not hashed: the body's own length
    /// is.
    pub fn new(identity: &RequestIdentity, canonical_body: &[u8]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(LAYOUT);
        match &identity.scope {
            Scope::Global => hasher.update([SCOPE_GLOBAL]),
            Scope::Key(BucketKey::Configured(id)) => {
                hasher.update([SCOPE_CONFIGURED]);
                field(&mut hasher, id.as_str().as_bytes());
            }
            Scope::Key(BucketKey::Presented(hash)) => {
                hasher.update([SCOPE_PRESENTED]);
                hasher.update(hash.as_bytes());
            }
        }
        match &identity.account {
            None => hasher.update([0]),
            Some(account) => {
                hasher.update([1]);
                field(&mut hasher, account.as_bytes());
            }
        }
        field(&mut hasher, identity.method.as_str().as_bytes());
        field(&mut hasher, identity.path.as_bytes());
        hasher.update([u8::from(identity.stream)]);
        field(&mut hasher, canonical_body);
        Self(hasher.finalize().into())
    }

    /// The digest itself.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A variable-length field: its length (8 bytes, big-endian), then its bytes.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({}…)", hex::encode(&self.0[..4]))
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use proptest::prelude::*;

    use super::*;
    use crate::secret::{KeyHash, KeyId};

    const CHAT: &str = "/v1/chat/completions";

    fn key(scope: Scope, method: Method, path: &str, stream: bool, body: &str) -> CacheKey {
        let canonical = canonical_json(body.as_bytes()).expect("valid JSON");
        let identity = RequestIdentity {
            scope,
            account: None,
            method,
            path: path.into(),
            stream,
            body_len: canonical.len(),
        };
        CacheKey::new(&identity, &canonical)
    }

    fn chat(body: &str) -> CacheKey {
        key(Scope::Global, Method::POST, CHAT, false, body)
    }

    fn configured(id: &str) -> Scope {
        Scope::Key(BucketKey::Configured(KeyId::new(id)))
    }

    #[test]
    fn semantically_equal_bodies_share_a_key() {
        let a = chat(r#"{"model":"gpt-4o","temperature":0.7,"messages":[{"role":"user","content":"hi"}]}"#);
        let b = chat(
            "{ \"messages\" : [ {\"content\":\"h\\u0069\", \"role\":\"user\"} ],\n\"temperature\":0.7, \"model\":\"gpt-4o\" }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            chat(r#"{"model":"gpt-4o","temperature":0.7,"messages":[{"role":"user","content":"hi!"}]}"#)
        );
        assert_ne!(chat(r#"{"messages":[1,2]}"#), chat(r#"{"messages":[2,1]}"#), "array order matters");
    }

    #[test]
    fn numbers_are_compared_as_written() {
        let keys: Vec<_> =
            ["1", "1.0", "1e0", "10e-1"].map(|n| chat(&format!(r#"{{"temperature":{n}}}"#))).into();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn stream_method_path_and_query_each_change_the_key() {
        let body = r#"{"model":"gpt-4o"}"#;
        let base = key(Scope::Global, Method::POST, CHAT, false, body);
        assert_ne!(base, key(Scope::Global, Method::POST, CHAT, true, body));
        assert_ne!(base, key(Scope::Global, Method::PUT, CHAT, false, body));
        assert_ne!(base, key(Scope::Global, Method::POST, "/v1/completions", false, body));
        assert_ne!(base, key(Scope::Global, Method::POST, "/v1/chat/completions?x=1", false, body));
        assert_eq!(base, key(Scope::Global, Method::POST, CHAT, false, body));
    }

    #[test]
    fn scopes_never_alias() {
        let hash = KeyHash::of(b"sk-test");
        let body = "{}";
        let keys = [
            key(Scope::Global, Method::POST, CHAT, false, body),
            key(configured(""), Method::POST, CHAT, false, body),
            key(configured("team"), Method::POST, CHAT, false, body),
            key(Scope::Key(BucketKey::Presented(hash)), Method::POST, CHAT, false, body),
            key(configured(&hash.to_string()), Method::POST, CHAT, false, body),
            key(configured(KeyId::from(&hash).as_str()), Method::POST, CHAT, false, body),
            // The id takes part of the path, or the path part of the body.
            key(configured("team/v1"), Method::POST, "/chat/completions", false, body),
            key(configured("team"), Method::POST, "/v1/chat/completions1", false, "2"),
            key(configured("team"), Method::POST, CHAT, false, "12"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn debug_shows_a_prefix_and_display_the_digest() {
        let key = chat("{}");
        let hex = key.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex::encode(key.as_bytes()));
        assert_eq!(format!("{key:?}"), format!("CacheKey({}…)", &hex[..8]));
    }

    /// Requests drawn from tiny alphabets, so that any ambiguity in how fields are
    /// joined would quickly show up as two different requests with one key.
    fn request() -> impl Strategy<Value = (Scope, Method, String, bool, String)> {
        let scope = prop_oneof![
            Just(Scope::Global),
            "[a/{]{0,3}".prop_map(|id| configured(&id)),
            (0u8..3).prop_map(|n| Scope::Key(BucketKey::Presented(KeyHash::of(&[n])))),
        ];
        let method = prop::sample::select(vec![Method::GET, Method::POST]);
        let body = prop::sample::select(vec!["{}", "[]", "1", "\"a\"", "\"a/\"", "{\"a\":1}", "[{}]"]);
        (scope, method, "[a/{?]{0,3}", any::<bool>(), body.prop_map(str::to_owned))
    }

    proptest! {
        #[test]
        fn keys_are_equal_exactly_when_requests_are(a in request(), b in request()) {
            let key_of = |(scope, method, path, stream, body): &(Scope, Method, String, bool, String)| {
                key(scope.clone(), method.clone(), path, *stream, body)
            };
            prop_assert_eq!(key_of(&a) == key_of(&b), a == b);
        }

        #[test]
        fn member_order_and_whitespace_do_not_change_the_key(
            members in prop::collection::btree_map("[a-z_]{1,8}", any::<i32>(), 0..8),
            order in any::<u64>(),
            spaces in prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\t", "\r\n"]), 16),
        ) {
            let mut shuffled: Vec<_> = members.iter().collect();
            if !shuffled.is_empty() {
                let len = shuffled.len();
                shuffled.rotate_left((order as usize) % len);
            }
            if !order.is_multiple_of(2) {
                shuffled.reverse();
            }
            let mut body = String::from(spaces[0]);
            body.push('{');
            for (index, (name, value)) in shuffled.into_iter().enumerate() {
                let space = spaces[(index + 1) % spaces.len()];
                body.push_str(&format!("{}{space}\"{name}\"{space}:{space}{value}{space}", if index > 0 { "," } else { "" }));
            }
            body.push('}');
            body.push_str(spaces[15]);
            let compact = serde_json::to_string(&members).expect("a map serializes");
            prop_assert_eq!(chat(&body), chat(&compact));
        }
    }
}
