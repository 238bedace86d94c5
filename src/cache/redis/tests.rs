//! The Redis value layout: entries come back as they went in, and anything else
//! (truncated, padded, foreign, mutated) is a miss without a panic.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use proptest::prelude::*;

use super::codec::{decode, encode};
use crate::{
    cache::{CachedBody, CachedResponse, RequestIdentity, Scope},
    limit::BucketKey,
    secret::{KeyHash, KeyId},
};

fn entry(scope: Scope, stream: bool, body: CachedBody) -> CachedResponse {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("openai-model", HeaderValue::from_static("gpt-4o-2024-08-06"));
    headers.append("openai-version", HeaderValue::from_static("2020-10-01"));
    headers.append("openai-version", HeaderValue::from_static("second"));
    CachedResponse {
        identity: RequestIdentity {
            scope,
            method: Method::POST,
            path: "/v1/chat/completions?api-version=2024-02-01".to_owned(),
            stream,
            body_len: 87,
        },
        status: StatusCode::OK,
        headers,
        body,
        ttl: Duration::from_millis(3_600_123),
    }
}

fn full() -> CachedBody {
    CachedBody::Full(Bytes::from_static(
        br#"{"id":"chatcmpl-1","choices":[{"message":{"content":"hello"}}]}"#,
    ))
}

fn events() -> CachedBody {
    CachedBody::Events(vec![
        Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hel\"}}]}\n\n"),
        Bytes::new(),
        Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DO"),
        Bytes::from_static(b"NE]\n\n"),
    ])
}

fn scopes() -> [Scope; 3] {
    [
        Scope::Global,
        Scope::Key(BucketKey::Configured(KeyId::new("team-search"))),
        Scope::Key(BucketKey::Presented(KeyHash::of(b"sk-caller"))),
    ]
}

/// Panics (failing the test) unless `decoded` is `original` field by field, frame
/// boundaries included.
fn assert_same(decoded: &CachedResponse, original: &CachedResponse) {
    assert_eq!(decoded.identity, original.identity);
    assert_eq!(decoded.status, original.status);
    assert_eq!(decoded.headers, original.headers);
    assert_eq!(decoded.ttl, original.ttl);
    match (&decoded.body, &original.body) {
        (CachedBody::Full(a), CachedBody::Full(b)) => assert_eq!(a, b),
        (CachedBody::Events(a), CachedBody::Events(b)) => assert_eq!(a, b),
        (a, b) => panic!("body kind changed: {a:?} vs {b:?}"),
    }
}

#[test]
fn full_and_streamed_entries_round_trip_in_every_scope() {
    for scope in scopes() {
        for (stream, body) in [(false, full()), (true, events())] {
            let original = entry(scope.clone(), stream, body);
            let value = encode(&original).expect("encodable");
            let decoded = decode(value).expect("decodes");
            assert_same(&decoded, &original);
        }
    }
}

#[test]
fn bodies_are_slices_of_the_value_not_copies() {
    let value = encode(&entry(Scope::Global, true, events())).expect("encodable");
    let range = value.as_ptr() as usize..value.as_ptr() as usize + value.len();
    let decoded = decode(value.clone()).expect("decodes");
    let CachedBody::Events(frames) = &decoded.body else { panic!("events expected") };
    for frame in frames.iter().filter(|frame| !frame.is_empty()) {
        assert!(range.contains(&(frame.as_ptr() as usize)), "a frame was copied");
    }
}

#[test]
fn every_truncation_and_any_trailing_byte_is_a_miss() {
    for body in [full(), events()] {
        let value = encode(&entry(scopes()[2].clone(), false, body)).expect("encodable");
        for len in 0..value.len() {
            assert!(decode(value.slice(..len)).is_none(), "a value cut to {len} bytes decoded");
        }
        let mut padded = BytesMut::from(value.as_ref());
        padded.put_u8(0);
        assert!(decode(padded.freeze()).is_none(), "a padded value decoded");
    }
}

#[test]
fn foreign_values_are_misses() {
    let value = encode(&entry(Scope::Global, false, full())).expect("encodable");
    let mut other_version = value.to_vec();
    other_version[4] = 2;
    let mut other_magic = value.to_vec();
    other_magic[0] = b'X';
    let mut bad_scope = value.to_vec();
    bad_scope[5] = 9;
    for foreign in [
        other_version,
        other_magic,
        bad_scope,
        b"garbage".to_vec(),
        Vec::new(),
        br#"{"status":200,"body":"hello"}"#.to_vec(),
        b"SPWC".to_vec(),
    ] {
        assert!(decode(Bytes::from(foreign.clone())).is_none(), "{foreign:?} decoded");
    }
}

#[test]
fn huge_counts_and_lengths_are_misses() {
    // A well-formed head, then a header count no value this size can hold.
    let value = encode(&entry(Scope::Global, false, full())).expect("encodable");
    let head = &value[..value.len() - 4 - 4 - full_len() - 1];
    let head = &head[..head.len() - header_bytes()];
    for tail in [[0xff_u8; 4], [0x00, 0x01, 0x00, 0x00]] {
        let mut forged = BytesMut::from(head);
        forged.put_slice(&tail);
        forged.put_slice(&[0; 64]);
        assert!(decode(forged.freeze()).is_none());
    }
    // A body length past the end.
    let mut forged = BytesMut::from(&value[..value.len() - full_len() - 4]);
    forged.put_u32(u32::MAX);
    forged.put_slice(b"short");
    assert!(decode(forged.freeze()).is_none());
}

fn full_len() -> usize {
    full().len()
}

/// Bytes the headers of [`entry`] take after their count.
fn header_bytes() -> usize {
    let headers = entry(Scope::Global, false, full()).headers;
    headers.iter().map(|(name, value)| 8 + name.as_str().len() + value.len()).sum()
}

#[test]
fn credentials_are_never_written_and_never_read() {
    let mut original = entry(Scope::Global, false, full());
    original.headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-secret"));
    original.headers.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic c2VjcmV0"));
    let mut sensitive = HeaderValue::from_static("sk-also-secret");
    sensitive.set_sensitive(true);
    original.headers.insert("x-api-key", sensitive);

    let value = encode(&original).expect("encodable");
    let text = String::from_utf8_lossy(&value);
    for secret in ["authorization", "Bearer", "sk-secret", "c2VjcmV0", "x-api-key", "sk-also-secret"] {
        assert!(!text.contains(secret), "{secret} was written");
    }
    let decoded = decode(value).expect("decodes");
    assert_eq!(decoded.headers.len(), 4);

    // A value carrying one (written by something else) is refused.
    let mut planted = entry(Scope::Global, false, full());
    planted.headers.clear();
    let value = encode(&planted).expect("encodable");
    let count_at = value.len() - 4 - 4 - full_len() - 1;
    let mut forged = BytesMut::from(&value[..count_at]);
    forged.put_u32(1);
    forged.put_u32(13);
    forged.put_slice(b"authorization");
    forged.put_u32(9);
    forged.put_slice(b"Bearer sk");
    forged.put_slice(&value[count_at + 4..]);
    assert!(decode(forged.freeze()).is_none());
}

fn any_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        Just(Scope::Global),
        "[a-z0-9/é-]{0,12}".prop_map(|id| Scope::Key(BucketKey::Configured(KeyId::new(&id)))),
        any::<[u8; 8]>().prop_map(|seed| Scope::Key(BucketKey::Presented(KeyHash::of(&seed)))),
    ]
}

fn any_body() -> impl Strategy<Value = CachedBody> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|body| CachedBody::Full(body.into())),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8)
            .prop_map(|frames| CachedBody::Events(frames.into_iter().map(Bytes::from).collect())),
    ]
}

fn any_entry() -> impl Strategy<Value = CachedResponse> {
    let method =
        prop::sample::select(vec![Method::POST, Method::GET, Method::from_bytes(b"PURGE").expect("a token")]);
    (any_scope(), method, "/v1/[a-z/?=&%]{0,30}", any::<bool>(), any::<u32>(), 100u16..600, any::<u64>())
        .prop_flat_map(|identity| (Just(identity), any_body()))
        .prop_map(|((scope, method, path, stream, body_len, status, ttl_ms), body)| CachedResponse {
            identity: RequestIdentity { scope, method, path, stream, body_len: body_len as usize },
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            headers: entry(Scope::Global, false, full()).headers,
            body,
            ttl: Duration::from_millis(ttl_ms),
        })
}

proptest! {
    #[test]
    fn any_entry_round_trips(original in any_entry()) {
        let decoded = decode(encode(&original).expect("encodable")).expect("decodes");
        assert_same(&decoded, &original);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
        let mut value = if magic { b"SPWC\x01".to_vec() } else { Vec::new() };
        value.extend_from_slice(&bytes);
        let _ = decode(Bytes::from(value));
    }

    #[test]
    fn a_damaged_entry_is_a_miss_or_an_entry_never_a_panic(
        original in any_entry(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let value = encode(&original).expect("encodable");
        prop_assert!(decode(value.slice(..cut.index(value.len()))).is_none());
        let mut damaged = value.to_vec();
        let at = flip.index(damaged.len());
        damaged[at] ^= mask;
        let _ = decode(Bytes::from(damaged));
    }
}
