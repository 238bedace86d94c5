//! Cache key bench: canonical JSON + SHA-256 of a realistic chat request body, next
//! to a naive baseline (parse into a `serde_json::Value`, write it back out, hash),
//! at 4 KiB and 64 KiB. The naive baseline sorts keys too, but rounds numbers
//! through `f64`, which is why the cache does not use it. What an entry costs in
//! memory is `benches/cache_memory.rs`'s.
//!
//! `cargo bench --bench cache_key`

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::Method;
use serde_json::{Value, json};
use spillway::{
    cache::{CacheKey, RequestIdentity, Scope, key::canonical_json},
    limit::BucketKey,
    secret::KeyId,
};

/// The release binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn identity(body_len: usize) -> RequestIdentity {
    RequestIdentity {
        scope: Scope::Key(BucketKey::Configured(KeyId::new("team-search"))),
        account: None,
        method: Method::POST,
        path: "/v1/chat/completions".into(),
        stream: false,
        body_len,
    }
}

/// A chat request as an SDK sends it (compact, in its own field order), grown with
/// conversation turns to about `size` bytes: prose with quotes, newlines and
/// non-ASCII text, a tool schema, and the usual sampling parameters.
fn chat_body(size: usize) -> Vec<u8> {
    let turn = "Summarise the \"quarterly\" report for the café team.\nKeep it short: \
                three bullet points, no more than 20 words each, and mention the 0.70 ratio.";
    let mut messages =
        vec![json!({"role": "system", "content": "You are a careful assistant. Answer in English."})];
    let body = |messages: &Vec<Value>| {
        serde_json::to_vec(&json!({
            "model": "gpt-4o-mini",
            "messages": messages,
            "temperature": 0.70,
            "top_p": 1,
            "max_tokens": 512,
            "stream": false,
            "tools": [{"type": "function", "function": {
                "name": "lookup_report",
                "description": "Fetch a report by quarter",
                "parameters": {"type": "object", "required": ["quarter"],
                    "properties": {"quarter": {"type": "string", "enum": ["Q1", "Q2", "Q3", "Q4"]}}}
            }}],
            "response_format": {"type": "text"},
            "user": "user-1234"
        }))
        .expect("a value serializes")
    };
    while body(&messages).len() < size {
        let role = if messages.len() % 2 == 1 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": format!("{turn} (turn {})", messages.len())}));
    }
    body(&messages)
}

fn key_of(body: &[u8]) -> CacheKey {
    let canonical = canonical_json(body).expect("the bench bodies are JSON");
    CacheKey::new(&identity(canonical.len()), &canonical)
}

fn naive_key_of(body: &[u8]) -> CacheKey {
    let value: Value = serde_json::from_slice(body).expect("the bench bodies are JSON");
    let written = serde_json::to_vec(&value).expect("a value serializes");
    CacheKey::new(&identity(written.len()), &written)
}

fn cache_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_key");
    for size in [4 * 1024, 64 * 1024] {
        let body = chat_body(size);
        let label = format!("{} KiB", size / 1024);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("canonical + sha256", &label), &body, |b, body| {
            b.iter(|| key_of(black_box(body)))
        });
        group.bench_with_input(
            BenchmarkId::new("naive Value round trip + sha256", &label),
            &body,
            |b, body| b.iter(|| naive_key_of(black_box(body))),
        );
        group.bench_with_input(BenchmarkId::new("sha256 only", &label), &body, |b, body| {
            b.iter(|| CacheKey::new(&identity(body.len()), black_box(body)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = cache_key
}
criterion_main!(benches);
