//! The wire format of a cache entry in Redis: a compact, versioned binary encoding of
//! a whole [`CachedResponse`], written into one buffer and read back without copying
//! the body (frames and header values are slices of the value Redis returned).
//!
//! Decoding is total: any value that is not exactly one well-formed entry of this
//! version (another magic or version, a truncated or padded value, an invalid method,
//! status, header or key hash) decodes to `None`, which the store reports as a miss.
//! Lengths read from a value are checked against the bytes left before anything is
//! sliced or allocated. Whether an entry answers a request (its identity) is still
//! decided by the cache stage.
//!
//! # Layout (version 1)
//!
//! Integers are big-endian; `field` is a `u32` length, then that many bytes.
//!
//! ```text
//! magic "SPWC" · version u8 = 1
//! scope tag u8: 0 global | 1 configured key id (field, UTF-8) | 2 presented key hash (field, "sha256:<hex>")
//! method (field) · path and query (field, UTF-8) · stream u8 (0|1) · body_len u64
//! status u16 · ttl in milliseconds u64
//! header count u32, then per header: name (field) · value (field)
//! body tag u8: 0 full (field) | 1 events: frame count u32, then each frame (field)
//! ```
//!
//! Only key ids and key hashes are written for the scope, never a key; headers named
//! `authorization` or `proxy-authorization`, or marked sensitive, are never written
//! (the cache stage keeps none anyway).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

use crate::{
    cache::{CachedBody, CachedResponse, RequestIdentity, Scope},
    limit::BucketKey,
    secret::{KeyHash, KeyId},
};

/// Marks a value as a spillway cache entry.
const MAGIC: &[u8; 4] = b"SPWC";
/// Bump on any change of the layout: values of another version are misses.
const VERSION: u8 = 1;

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
    put_field(&mut buffer, identity.method.as_str().as_bytes())?;
    put_field(&mut buffer, identity.path.as_bytes())?;
    buffer.put_u8(u8::from(identity.stream));
    buffer.put_u64(u64::try_from(identity.body_len).ok()?);

    buffer.put_u16(entry.status.as_u16());
    buffer.put_u64(u64::try_from(entry.ttl.as_millis()).unwrap_or(u64::MAX));

    let headers = || entry.headers.iter().filter(|(name, value)| storable(name, value));
    buffer.put_u32(u32::try_from(headers().count()).ok()?);
    for (name, value) in headers() {
        put_field(&mut buffer, name.as_str().as_bytes())?;
        put_field(&mut buffer, value.as_bytes())?;
    }

    match &entry.body {
        CachedBody::Full(bytes) => {
            buffer.put_u8(BODY_FULL);
            put_field(&mut buffer, bytes)?;
        }
        CachedBody::Events(frames) => {
            buffer.put_u8(BODY_EVENTS);
            buffer.put_u32(u32::try_from(frames.len()).ok()?);
            for frame in frames {
                put_field(&mut buffer, frame)?;
            }
        }
    }
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
    let method = Method::from_bytes(&reader.field()?).ok()?;
    let path = reader.text(|path| Some(path.to_owned()))?;
    let stream = match reader.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let body_len = usize::try_from(reader.u64()?).ok()?;
    let identity = RequestIdentity { scope, method, path, stream, body_len };

    let status = StatusCode::from_u16(reader.u16()?).ok()?;
    let ttl = Duration::from_millis(reader.u64()?);

    let header_count = reader.count()?;
    let mut headers = HeaderMap::try_with_capacity(header_count).ok()?;
    for _ in 0..header_count {
        let name = HeaderName::from_bytes(&reader.field()?).ok()?;
        let value = HeaderValue::from_maybe_shared(reader.field()?).ok()?;
        if !storable(&name, &value) {
            return None;
        }
        headers.try_append(name, value).ok()?;
    }

    let body = match reader.u8()? {
        BODY_FULL => CachedBody::Full(reader.field()?),
        BODY_EVENTS => {
            let frame_count = reader.count()?;
            let mut frames = Vec::with_capacity(frame_count);
            for _ in 0..frame_count {
                frames.push(reader.field()?);
            }
            CachedBody::Events(frames)
        }
        _ => return None,
    };
    // A value with bytes after the entry is not one this version wrote.
    if reader.0.has_remaining() {
        return None;
    }
    Some(CachedResponse { identity, status, headers, body, ttl })
}

/// Whether a header may be written to Redis: never credentials.
fn storable(name: &HeaderName, value: &HeaderValue) -> bool {
    name != header::AUTHORIZATION && name != header::PROXY_AUTHORIZATION && !value.is_sensitive()
}

/// About the encoded size of `entry`, so that the buffer is allocated once.
fn encoded_len_hint(entry: &CachedResponse) -> usize {
    let headers: usize =
        entry.headers.iter().map(|(name, value)| 8 + name.as_str().len() + value.len()).sum();
    let body = match &entry.body {
        CachedBody::Full(bytes) => 4 + bytes.len(),
        CachedBody::Events(frames) => 4 + frames.iter().map(|frame| 4 + frame.len()).sum::<usize>(),
    };
    // Magic, version, tags, fixed-size fields and the scope (at most a key hash's text).
    let fixed = 64 + KEY_HASH_TEXT_LEN;
    fixed + entry.identity.method.as_str().len() + entry.identity.path.len() + headers + body
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

    /// A count of items that each take at least 4 bytes: more than the bytes left
    /// allow is malformed (and is never used to allocate).
    fn count(&mut self) -> Option<usize> {
        let count = usize::try_from(self.u32()?).ok()?;
        (count <= self.0.remaining() / 4).then_some(count)
    }
}
