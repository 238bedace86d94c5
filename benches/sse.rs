//! SSE and token-estimate bench: what watching a stream and estimating a prompt cost
//! on the request path.
//!
//! - `relay`: a realistic 200-chunk chat stream (OpenAI's chunk shape, one event per
//!   frame as upstreams write them, then the finish chunk, the usage chunk and
//!   `[DONE]`) through [`StreamWatch`], without and with stripping the usage chunk;
//!   next to it a naive baseline that buffers frames and parses each event into a
//!   `serde_json::Value`.
//! - `estimate`: [`tokens::estimate`] on 4 KiB and 64 KiB chat bodies for gpt-4o
//!   (o200k BPE), and the 64 KiB body for a model without a tokenizer (bytes / 4).
//!
//! `cargo bench --bench sse`

use std::{hint::black_box, time::Duration};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use spillway::openai::{sse::StreamWatch, tokens};

/// The release binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORDS: &[&str] = &[
    " the",
    " gateway",
    " relays",
    " each",
    " chunk",
    " as",
    " it",
    " arrives,",
    " and",
    " counts",
    " tokens",
    " with",
    " OpenAI's",
    " own",
    " encoding;",
    " \"quoted\"",
    " text",
    "\n",
    " naïve",
    " 42",
];

/// A 200-chunk chat stream, one frame per event.
fn chat_stream() -> Vec<Bytes> {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let chunk = json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion.chunk",
            "created": 1_741_570_283, "model": "gpt-4o-2024-08-06", "service_tier": "default",
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null,
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let mut frames = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), json!(null))];
    frames.extend((0..198).map(|i| chunk(json!({"content": WORDS[i % WORDS.len()]}), json!(null))));
    frames.push(chunk(json!({}), json!("stop")));
    let usage = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion.chunk",
        "created": 1_741_570_283, "model": "gpt-4o-2024-08-06", "choices": [],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 198, "total_tokens": 1315},
    });
    frames.push(Bytes::from(format!("data: {usage}\n\n")));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn relay(frames: &[Bytes], strip: bool) -> usize {
    let mut watch = StreamWatch::new(strip, "gpt-4o");
    let mut sent = 0;
    for frame in frames {
        sent += watch.relay(frame.clone()).len();
    }
    sent += watch.finish().map_or(0, |tail| tail.len());
    black_box((watch.usage(), watch.done(), watch.completion_tokens()));
    sent
}

/// Buffer, split at `\n\n`, parse every event whole.
fn naive_relay(frames: &[Bytes]) -> usize {
    let mut buffer = Vec::new();
    let mut usage = None;
    for frame in frames {
        buffer.extend_from_slice(frame);
        while let Some(end) = buffer.windows(2).position(|pair| pair == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            if let Some(data) = event.strip_prefix(b"data: ")
                && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&data[..data.len() - 2])
                && !value["usage"].is_null()
            {
                usage = Some(value["usage"].clone());
            }
        }
    }
    black_box(usage);
    buffer.len()
}

/// A chat body of about `size` bytes: a system prompt and user/assistant turns.
fn chat_body(size: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    let mut length = 0;
    let mut turn = 0;
    while length < size {
        let text: String = (0..60).map(|i| WORDS[(i * 7 + turn * 3) % WORDS.len()]).collect();
        length += text.len() + 40;
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text}));
        turn += 1;
    }
    serde_json::to_vec(&json!({"model": "gpt-4o", "messages": messages, "max_tokens": 512}))
        .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let frames = chat_stream();
    let bytes: usize = frames.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("relay");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("200_chunks/watch", |b| b.iter(|| relay(black_box(&frames), false)));
    group.bench_function("200_chunks/watch_strip", |b| b.iter(|| relay(black_box(&frames), true)));
    group.bench_function("200_chunks/naive_value", |b| b.iter(|| naive_relay(black_box(&frames))));
    group.finish();

    tokens::warm_up();
    let mut group = c.benchmark_group("estimate");
    group.measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    for (model, size) in [("gpt-4o", 4 * 1024), ("gpt-4o", 64 * 1024), ("local-llama", 64 * 1024)] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new(model, format!("{}KiB", size / 1024)), &body, |b, body| {
            b.iter(|| tokens::estimate(model, black_box(body), 256))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
