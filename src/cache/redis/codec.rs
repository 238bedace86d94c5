//! The wire format of a cache entry in Redis: a compact, versioned binary encoding of
//! a whole [`CachedResponse`], written into one buffer and read back without copying
//! the body (the body and the header block are slices of the value Redis returned).
//!
//! Decoding is total: any value that is not exactly one well-formed entry of this
//! version (another magic or version, a truncated or padded value, an invalid method,
//! status, header or key hash) decodes to `None`, which the store reports as a miss.
//! Lengths read from a value are checked against the bytes left before anything is
//! sliced or allocated. Whether an entry answers a request (its identity) is still
//! decided by the cache stage.
//!
//! # Layout (version 2)
//!
//! Integers are big-endian; `field` is a `u32` length, then that many bytes.
//!
//! ```text
//! magic "SPWC" · version u8 = 2
//! scope tag u8: 0 global | 1 configured key id (field, UTF-8) | 2 presented key hash (field, "sha256:<hex>")
//! account tag u8: 0 none | 1 organization and project (field, UTF-8)
//! method (field) · path and query (field, UTF-8) · stream u8 (0|1) · body_len u64
//! status u16 · ttl in milliseconds u64
//! headers (field: the `name:value\n` block of [`StoredHeaders`])
//! body tag u8: 0 full | 1 events · body (field)
//! ```
//!
//! Version 1 (an entry holding a header map and a stream's frames one by one) is read
//! as a miss. Only key ids and key hashes are written for the scope, never a key; a
//! header block naming `authorization` or `proxy-authorization` is refused
//! ([`StoredHeaders`] never holds one).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, StatusCode};

use crate::{
    cache::{CachedBody, CachedResponse, RequestIdentity, Scope, StoredHeaders},
    limit::BucketKey,
    secret::{KeyHash, KeyId},
};

/// Marks a value as a spillway cache entry.
const MAGIC: &[u8; 4] = b"SPWC";
/// Bump on any change of the layout: values of another version are misses.
const VERSION: u8 = 2;

const SCOPE_GLOBAL: u8 = 0;
const SCOPE_CONFIGURED: u8 = 1;
const SCOPE_PRESENTED: u8 = 2;

const BODY_FULL: u8 = 0;
const BODY_EVENTS: u8 = 1;

/// `"sha256:"` and 64 hex digits: a presented key's hash in its text form.
const KEY_HASH_TEXT_LEN: usize = 7 + 64;

/// The value stored for `entry`, or `None` if a field is too long for the layout
/// (over 4 GiB) and the entry should not be written.
pub fn encode(entry: &CachedResponse) -> Option<Bytes> {
    let mut buffer = BytesMut::with_capacity(encoded_len_hint(entry));
    buffer.put_slice(MAGIC);
    buffer.put_u8(VERSION);

    let identity = &entry.identity;
    match &identity.scope {
        Scope::Global => buffer.put_u8(SCOPE_GLOBAL),
        Scope::Key(BucketKey::Configured(id)) => {
            buffer.put_u8(SCOPE_CONFIGURED);
            put_field(&mut buffer, id.as_str().as_bytes())?;
        }
        Scope::Key(BucketKey::Presented(hash)) => {
            buffer.put_u8(SCOPE_PRESENTED);
            let mut text = [0u8; KEY_HASH_TEXT_LEN];
            text[..7].copy_from_slice(b"sha256:");
            hex::encode_to_slice(hash.as_bytes(), &mut text[7..]).ok()?;
            put_field(&mut buffer, &text)?;
        }
    }
    match &identity.account {
        None => buffer.put_u8(0),
        Some(account) => {
            buffer.put_u8(1);
            put_field(&mut buffer, account.as_bytes())?;
        }
    }
    put_field(&mut buffer, identity.method.as_str().as_bytes())?;
    put_field(&mut buffer, identity.path.as_bytes())?;
    buffer.put_u8(u8::from(identity.stream));
    buffer.put_u64(u64::try_from(identity.body_len).ok()?);

    buffer.put_u16(entry.status.as_u16());
    buffer.put_u64(u64::try_from(entry.ttl.as_millis()).unwrap_or(u64::MAX));

    put_field(&mut buffer, entry.headers.block())?;
    let (tag, body) = match &entry.body {
        CachedBody::Full(bytes) => (BODY_FULL, bytes),
        CachedBody::Events(bytes) => (BODY_EVENTS, bytes),
    };
    buffer.put_u8(tag);
    put_field(&mut buffer, body)?;
    Some(buffer.freeze())
}

/// The entry held in `value`, or `None` if it is not exactly one well-formed entry of
/// this version. Never panics.
pub fn decode(value: Bytes) -> Option<CachedResponse> {
    let mut reader = Reader(value);
    if reader.take(MAGIC.len())?.as_ref() != MAGIC || reader.u8()? != VERSION {
        return None;
    }

    let scope = match reader.u8()? {
        SCOPE_GLOBAL => Scope::Global,
        SCOPE_CONFIGURED => Scope::Key(BucketKey::Configured(reader.text(|id| Some(KeyId::new(id)))?)),
        SCOPE_PRESENTED => Scope::Key(BucketKey::Presented(reader.text(KeyHash::parse)?)),
        _ => return None,
    };
    let account = match reader.u8()? {
        0 => None,
        1 => Some(reader.text(|account| Some(account.into()))?),
        _ => return None,
    };
    let method = Method::from_bytes(&reader.field()?).ok()?;
    let path = reader.text(|path| Some(path.into()))?;
    let stream = match reader.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let body_len = usize::try_from(reader.u64()?).ok()?;
    let identity = RequestIdentity { scope, account, method, path, stream, body_len };

    let status = StatusCode::from_u16(reader.u16()?).ok()?;
    let ttl = Duration::from_millis(reader.u64()?);

    let headers = StoredHeaders::from_block(reader.field()?)?;
    let body = match reader.u8()? {
        BODY_FULL => CachedBody::Full(reader.field()?),
        BODY_EVENTS => CachedBody::Events(reader.field()?),
        _ => return None,
    };
    // A value with bytes after the entry is not one this version wrote.
    if reader.0.has_remaining() {
        return None;
    }
    Some(CachedResponse { identity, status, headers, body, ttl })
}

/// About the encoded size of `entry`, so that the buffer is allocated once.
fn encoded_len_hint(entry: &CachedResponse) -> usize {
    // Magic, version, tags, fixed-size fields, field lengths and the scope (at most a
    // key hash's text).
    let fixed = 64 + KEY_HASH_TEXT_LEN;
    let identity = &entry.identity;
    fixed
        + identity.method.as_str().len()
        + identity.path.len()
        + entry.headers.len()
        + entry.body.bytes().len()
}

/// Writes `bytes` as a field: its length as a `u32`, then the bytes; `None` if longer
/// than a `u32` counts.
fn put_field(buffer: &mut BytesMut, bytes: &[u8]) -> Option<()> {
    buffer.put_u32(u32::try_from(bytes.len()).ok()?);
    buffer.put_slice(bytes);
    Some(())
}

/// Reads a value front to back; every read checks the bytes left first.
struct Reader(Bytes);

// === impl Reader ===

impl Reader {
    fn u8(&mut self) -> Option<u8> {
        self.0.try_get_u8().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.0.try_get_u16().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.0.try_get_u32().ok()
    }

    fn u64(&mut self) -> Option<u64> {
        self.0.try_get_u64().ok()
    }

    /// The next `len` bytes, as a slice of the value (no copy).
    fn take(&mut self, len: usize) -> Option<Bytes> {
        (len <= self.0.remaining()).then(|| self.0.split_to(len))
    }

    fn field(&mut self) -> Option<Bytes> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    /// A field that must be UTF-8, handed to `read`.
    fn text<T>(&mut self, read: impl FnOnce(&str) -> Option<T>) -> Option<T> {
        let field = self.field()?;
        read(std::str::from_utf8(&field).ok()?)
    }
}
