//! The Redis value layout: entries come back as they went in, and anything else
//! (truncated, padded, foreign, mutated) is a miss without a panic.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use proptest::prelude::*;

use super::codec::{decode, encode};
use crate::{
    cache::{CachedBody, CachedResponse, RequestIdentity, Scope, StoredHeaders},
    limit::BucketKey,
    secret::{KeyHash, KeyId},
};

fn headers() -> StoredHeaders {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("openai-model", HeaderValue::from_static("gpt-4o-2024-08-06"));
    headers.append("openai-version", HeaderValue::from_static("2020-10-01"));
    headers.append("openai-version", HeaderValue::from_static("second"));
    StoredHeaders::copy_from(&headers)
}

fn entry(scope: Scope, stream: bool, body: CachedBody) -> CachedResponse {
    CachedResponse {
        identity: RequestIdentity {
            scope,
            account: Some("organization=org-1 project=proj_1".into()),
            method: Method::POST,
            path: "/v1/chat/completions?api-version=2024-02-01".into(),
            stream,
            body_len: 87,
        },
        status: StatusCode::OK,
        headers: headers(),
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
    CachedBody::Events(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"hel\"}}]}\n\n\
          data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n",
    ))
}

fn scopes() -> [Scope; 3] {
    [
        Scope::Global,
        Scope::Key(BucketKey::Configured(KeyId::new("team-search"))),
        Scope::Key(BucketKey::Presented(KeyHash::of(b"sk-caller"))),
    ]
}

/// Panics (failing the test) unless `decoded` is `original` field by field.
fn assert_same(decoded: &CachedResponse, original: &CachedResponse) {
    assert_eq!(decoded.identity, original.identity);
    assert_eq!(decoded.status, original.status);
    assert_eq!(decoded.headers, original.headers);
    assert_eq!(decoded.ttl, original.ttl);
    assert_eq!(decoded.body, original.body);
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
fn bodies_and_headers_are_slices_of_the_value_not_copies() {
    let value = encode(&entry(Scope::Global, true, events())).expect("encodable");
    let range = value.as_ptr_range();
    let decoded = decode(value.clone()).expect("decodes");
    assert!(range.contains(&decoded.body.bytes().as_ptr()), "the body was copied");
    assert!(range.contains(&decoded.headers.block().as_ptr()), "the headers were copied");
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
    // Version 1 held a header map and a stream frame by frame: a miss, not a misread.
    let mut other_version = value.to_vec();
    other_version[4] = 1;
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
fn lengths_past_the_end_are_misses() {
    let value = encode(&entry(Scope::Global, false, full())).expect("encodable");
    let body_at = value.len() - full_len() - 4;
    // A body length past the end.
    let mut forged = BytesMut::from(&value[..body_at]);
    forged.put_u32(u32::MAX);
    forged.put_slice(b"short");
    assert!(decode(forged.freeze()).is_none());
    // A header block length past the end.
    let headers_at = body_at - 1 - headers().len() - 4;
    let mut forged = BytesMut::from(&value[..headers_at]);
    forged.put_u32(u32::MAX);
    forged.put_slice(&value[headers_at + 4..]);
    assert!(decode(forged.freeze()).is_none());
}

fn full_len() -> usize {
    full().bytes().len()
}

#[test]
fn a_value_carrying_credentials_is_refused() {
    let planted = entry(Scope::Global, false, full());
    let value = encode(&planted).expect("encodable");
    let headers_at = value.len() - full_len() - 4 - 1 - headers().len() - 4;
    let block = b"content-type:application/json\nauthorization:Bearer sk\n";
    let mut forged = BytesMut::from(&value[..headers_at]);
    forged.put_u32(block.len() as u32);
    forged.put_slice(block);
    forged.put_slice(&value[headers_at + 4 + headers().len()..]);
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
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|body| CachedBody::Events(body.into())),
    ]
}

fn any_entry() -> impl Strategy<Value = CachedResponse> {
    let method =
        prop::sample::select(vec![Method::POST, Method::GET, Method::from_bytes(b"PURGE").expect("a token")]);
    (any_scope(), method, "/v1/[a-z/?=&%]{0,30}", any::<bool>(), any::<u32>(), 100u16..600, any::<u64>())
        .prop_flat_map(|identity| (Just(identity), any_body()))
        .prop_map(|((scope, method, path, stream, body_len, status, ttl_ms), body)| CachedResponse {
            identity: RequestIdentity {
                scope,
                // Both spellings of the account round-trip.
                account: stream.then(|| "organization=org-1".into()),
                method,
                path: path.into(),
                stream,
                body_len: body_len as usize,
            },
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            headers: headers(),
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
        let mut value = if magic { b"SPWC\x02".to_vec() } else { Vec::new() };
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
