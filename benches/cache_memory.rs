//! Cache memory bench: what cached entries and responses being recorded really cost
//! the process, next to what `spillway_cache_bytes` (the entries' weight) says.
//!
//! First the memory store alone: `CACHE_ENTRIES` entries with a two-byte body, each
//! replayed once, put straight into a `MemoryStore`; the resident-set growth per entry
//! beyond its path, headers and body is the fixed cost per entry that
//! `cache::ENTRY_OVERHEAD` charges (the entry, its `Arc`, its buffers' reference
//! counts, moka's bookkeeping).
//!
//! Then the whole gateway, in one process on 127.0.0.1: a small origin answering like
//! OpenAI (a chat completion of ~90 words with OpenAI's usual response headers, or the
//! same answer as a stream of ~30 chunks), the gateway with the cache on and room for
//! every entry, and keep-alive clients sending requests that all differ, so that each
//! one is a miss that is stored. The origin records nothing, so the process grows by
//! what the gateway keeps. After a warm-up it fills the cache with `CACHE_ENTRIES`
//! whole answers, then as many streams, and prints for each kind the resident-set
//! growth per entry, the weight per entry, and their ratio.
//!
//! With `CACHE_LONG_STREAMS=on` (or `off`) it runs instead, with the cache on (off)
//! at the default `max_size` of 256 MiB, `CACHE_CLIENTS` (default 30) clients each
//! reading a different stream of `CACHE_LONG_STREAM_MIB` (default 24) as fast as it
//! comes, and prints the peak growth of the resident set: what recordings in flight
//! cost.
//!
//! `cargo bench --bench cache_memory` (env: `CACHE_ENTRIES`, default 100 000;
//! `CACHE_CLIENTS`, default 16).

#[path = "support/proc_stats.rs"]
#[allow(dead_code)]
mod proc_stats;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use spillway::{
    cache::{
        CacheKey, CacheStore, CachedBody, CachedResponse, ENTRY_OVERHEAD, RequestIdentity, Scope,
        StoredHeaders, memory::MemoryStore,
    },
    limit::BucketKey,
    secret::KeyId,
};
use tokio::net::TcpListener;

/// The release binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODEL: &str = "gpt-4o-mini-2024-07-18";
const ANSWER: &str = "Here is a short summary of the quarterly report for the café team. Revenue \
    grew by 12% over the previous quarter, driven by the new breakfast menu and longer opening \
    hours on weekends. Costs rose by 4%, mostly staff. The ratio of returning customers held at \
    0.70. Next steps: keep the weekend hours, review supplier prices, and survey customers about \
    the lunch menu before the summer.";

type OriginBody = BoxBody<Bytes, Infallible>;

/// The origin's answer to one request: a chat completion, streamed when asked.
async fn answer(request: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    let body = request.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
    let asked = |needle: &str| memchr::memmem::find(&body, needle.as_bytes()).is_some();
    let usage = json!({"prompt_tokens": 24, "completion_tokens": 78, "total_tokens": 102});
    let id = format!("chatcmpl-{:016x}", fastrand::u64(..));
    let builder = Response::builder()
        .header("openai-model", MODEL)
        .header("openai-organization", "user-abcdefghijklmnopqrstuvwx")
        .header("openai-processing-ms", "412")
        .header("openai-version", "2020-10-01")
        .header("x-ratelimit-limit-requests", "10000")
        .header("x-ratelimit-limit-tokens", "10000000")
        .header("x-ratelimit-remaining-requests", "9999")
        .header("x-ratelimit-remaining-tokens", "9999975")
        .header("x-ratelimit-reset-requests", "6ms")
        .header("x-ratelimit-reset-tokens", "0s")
        .header("x-request-id", format!("req_{:032x}", fastrand::u128(..)))
        .header("strict-transport-security", "max-age=31536000; includeSubDomains; preload")
        .header("cf-cache-status", "DYNAMIC")
        .header("cf-ray", format!("{:016x}-AMS", fastrand::u64(..)))
        .header("alt-svc", "h3=\":443\"; ma=86400");
    let response = if asked("\"user\":\"long-stream\"") {
        // A stream of about LONG_STREAM_MIB MiB, in events of 8 KiB of text each.
        let text = "lorem ipsum ".repeat(8 * 1024 / 12);
        let event = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]});
        let event = Bytes::from(format!("data: {event}\n\n"));
        let count = long_stream_mib() * 1024 * 1024 / event.len() as u64;
        let frames = (0..count)
            .map(move |_| event.clone())
            .chain([Bytes::from_static(b"data: [DONE]\n\n")])
            .map(|frame| Ok(Frame::data(frame)));
        builder
            .header("content-type", "text/event-stream; charset=utf-8")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
    } else if asked("\"stream\":true") {
        let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
            let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
            json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL,
                "system_fingerprint": "fp_0ba0d124f1", "choices": [choice]})
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), json!(null))];
        let words: Vec<&str> = ANSWER.split_inclusive(' ').collect();
        events.extend(words.chunks(3).map(|words| chunk(json!({"content": words.concat()}), json!(null))));
        events.push(chunk(json!({}), json!("stop")));
        if asked("\"include_usage\":true") {
            let mut last = chunk(json!({}), json!(null));
            (last["choices"], last["usage"]) = (json!([]), usage);
            events.push(last);
        }
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = events
            .iter()
            .map(|event| format!("data: {event}\n\n"))
            .chain(["data: [DONE]\n\n".to_owned()])
            .map(|frame| Ok(Frame::data(Bytes::from(frame))))
            .collect();
        builder
            .header("content-type", "text/event-stream; charset=utf-8")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
    } else {
        let body = json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": MODEL,
            "system_fingerprint": "fp_0ba0d124f1", "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER, "refusal": null},
                "logprobs": null, "finish_reason": "stop"}],
        });
        builder
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())).boxed())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the origin");
    let addr = listener.local_addr().expect("origin address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer)),
            );
        }
    });
    addr
}

/// A gateway in front of `origin`, with this `[cache]` section.
async fn gateway(origin: SocketAddr, cache: &str) -> String {
    let config = format!(
        "[server]\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"origin\"\nbase_url = \"http://{origin}/v1\"\n\
         [cache]\n{cache}\n"
    );
    let config = spillway::config::load_str(&config, "bench.toml", |_| None, &Default::default())
        .expect("bench config");
    let runtime = Arc::new(spillway::runtime::Runtime::new(config).expect("runtime"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the gateway");
    let addr = listener.local_addr().expect("gateway address");
    tokio::spawn(spillway::server::serve(listener, runtime, std::future::pending()));
    format!("http://{addr}/v1/chat/completions")
}

/// Sends `count` different requests (numbered from `first`) over `clients` keep-alive
/// connections; each answer is read to its end. Returns how many were not a 200.
async fn fill(url: &str, first: u64, count: u64, clients: u64, stream: bool) -> u64 {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let url: http::Uri = url.parse().expect("url");
    let tasks: Vec<_> = (0..clients)
        .map(|lane| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut failed = 0;
                for n in (first + lane..first + count).step_by(clients as usize) {
                    let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 256,
                        "messages": [{"role": "user", "content": format!("Summarise report {n} for the café team.")}]});
                    let request = Request::post(url.clone())
                        .header("content-type", "application/json")
                        .header("authorization", "Bearer sk-bench")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .expect("request");
                    let ok = match client.request(request).await {
                        Ok(response) if response.status() == 200 => response.into_body().collect().await.is_ok(),
                        _ => false,
                    };
                    failed += u64::from(!ok);
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.expect("client task");
    }
    failed
}

/// Fills a memory store with `entries` small entries, each replayed once; prints the
/// resident-set growth per entry beyond its variable-length parts.
async fn store_alone(entries: u64) {
    let mut upstream = HeaderMap::new();
    upstream.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    upstream.insert("openai-model", HeaderValue::from_static(MODEL));
    upstream.insert("openai-version", HeaderValue::from_static("2020-10-01"));
    let headers = StoredHeaders::copy_from(&upstream);
    // One key id for all, as the gateway's key table shares it.
    let scope = Scope::Key(BucketKey::Configured(KeyId::new("team-search")));
    let identity = |n: u64| RequestIdentity {
        scope: scope.clone(),
        account: None,
        method: Method::POST,
        path: "/v1/chat/completions".into(),
        stream: false,
        body_len: n as usize,
    };
    let store = MemoryStore::new(1 << 40, u32::MAX);
    let before = proc_stats::resident_bytes().unwrap_or(0);
    let mut variable = 0;
    for n in 0..entries {
        let key = CacheKey::new(&identity(n), n.to_string().as_bytes());
        let entry = CachedResponse {
            identity: identity(n),
            status: StatusCode::OK,
            // Copied per entry, as the cache stage does.
            headers: StoredHeaders::from_block(Bytes::copy_from_slice(headers.block())).expect("a block"),
            body: CachedBody::Full(Bytes::copy_from_slice(b"{}")),
            ttl: Duration::from_secs(3600),
        };
        variable += entry.weight() - ENTRY_OVERHEAD;
        let _ = store.put(key, Arc::new(entry)).await;
        if let Ok(Some(hit)) = store.get(&key).await {
            drop((hit.headers.to_map(), hit.body.bytes().clone()));
        }
    }
    let stored = store.entry_count().await;
    let grown = proc_stats::resident_bytes().unwrap_or(0).saturating_sub(before);
    println!(
        "memory store alone, {stored} entries: {} B resident per entry beyond its path, headers and body \
         (ENTRY_OVERHEAD charges {ENTRY_OVERHEAD} B; the entry itself is {} B)",
        grown.saturating_sub(variable as u64) / stored.max(1),
        std::mem::size_of::<CachedResponse>(),
    );
}

fn long_stream_mib() -> u64 {
    env_or("CACHE_LONG_STREAM_MIB", 24)
}

/// `streams` clients each read a different long stream through `url` at once, frame by
/// frame, keeping nothing. Returns the peak growth of the resident set meanwhile.
async fn long_streams(url: &str, streams: u64) -> u64 {
    let before = proc_stats::resident_bytes().unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        // A thread of its own, so that sampling never waits behind the busy runtime.
        #[allow(clippy::disallowed_methods, reason = "sleeps on its own thread, not a runtime worker")]
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(proc_stats::resident_bytes().unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url: http::Uri = url.parse().expect("url");
    let readers: Vec<_> = (0..streams)
        .map(|n| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let body = json!({"model": "gpt-4o-mini", "stream": true, "user": "long-stream",
                    "messages": [{"role": "user", "content": format!("Write long text number {n}.")}]});
                let request = Request::post(url)
                    .header("content-type", "application/json")
                    .header("authorization", "Bearer sk-bench")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                let Ok(response) = client.request(request).await else { return 0 };
                let mut body = response.into_body();
                let mut read = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                }
                read
            })
        })
        .collect();
    let mut read = 0;
    for reader in readers {
        read += reader.await.expect("reader task");
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    println!("  read {} MiB in all", read >> 20);
    peak.load(Ordering::Relaxed).saturating_sub(before)
}

/// The `spillway_cache_bytes` gauge.
fn cache_bytes(metrics: &PrometheusHandle) -> u64 {
    let text = metrics.render();
    let line = text.lines().find(|line| line.starts_with("spillway_cache_bytes "));
    line.and_then(|line| line.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        as u64
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        // Long streams in flight, one setting per process so that neither inherits the
        // other's memory.
        if let Ok(cache) = std::env::var("CACHE_LONG_STREAMS") {
            let streams = env_or("CACHE_CLIENTS", 30);
            let section = match cache.as_str() {
                "off" => "enabled = false",
                _ => "enabled = true",
            };
            let metrics = spillway::metrics::install().expect("the only recorder");
            let url = gateway(origin().await, section).await;
            println!(
                "{streams} concurrent streams of {} MiB each, cache {cache} (max_size 256MiB)",
                long_stream_mib()
            );
            let peak = long_streams(&url, streams).await;
            println!(
                "  peak resident set growth {} MiB; cache holds {} MiB after",
                peak >> 20,
                cache_bytes(&metrics) >> 20
            );
            return;
        }
        entries().await;
    });
}

/// Small entries: the memory store alone, then through the gateway.
async fn entries() {
    let entries = env_or("CACHE_ENTRIES", 100_000).max(1);
    let clients = env_or("CACHE_CLIENTS", 16).max(1);
    store_alone(entries).await;
    let metrics = spillway::metrics::install().expect("the only recorder");
    let url = gateway(origin().await, "enabled = true\nmax_size = \"8GiB\"").await;
    // Warm connections, pools and the allocator with a few entries of each kind.
    let warm = (entries / 20).max(100);
    fill(&url, 0, warm, clients, false).await;
    fill(&url, 0, warm, clients, true).await;

    println!(
        "{entries} entries of each kind, {clients} clients, mimalloc; growth of the resident set \
         vs growth of spillway_cache_bytes"
    );
    let mut start = warm;
    for (kind, stream) in [("whole answers", false), ("streams", true)] {
        let (rss_before, weight_before) = (proc_stats::resident_bytes().unwrap_or(0), cache_bytes(&metrics));
        let failed = fill(&url, start, entries, clients, stream).await;
        start += entries;
        let (rss_after, weight_after) = (proc_stats::resident_bytes().unwrap_or(0), cache_bytes(&metrics));
        let rss = rss_after.saturating_sub(rss_before) as f64 / entries as f64;
        let weight = weight_after.saturating_sub(weight_before) as f64 / entries as f64;
        println!(
            "{kind:<14} {rss:>8.0} B resident per entry   {weight:>6.0} B weight per entry   \
             ratio {:>5.2}   (resident set {} MiB, cache weight {} MiB, {failed} failed)",
            rss / weight.max(1.0),
            rss_after >> 20,
            weight_after >> 20,
        );
    }
}
