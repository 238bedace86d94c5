//! Cache memory bench: what cached entries really cost the process, next to what
//! `spillway_cache_bytes` (their weight) says they cost.
//!
//! Everything runs in one process on 127.0.0.1: a small origin answering like OpenAI
//! (a chat completion of ~90 words with OpenAI's usual response headers, or the same
//! answer as a stream of ~30 chunks), the gateway with the cache on and room for
//! every entry, and keep-alive clients sending requests that all differ, so that each
//! one is a miss that is stored. The origin records nothing, so the process grows by
//! what the gateway keeps. After a warm-up it fills the cache with `CACHE_ENTRIES`
//! whole answers, then as many streams, and prints for each kind the resident-set
//! growth per entry, the weight per entry, and their ratio.
//!
//! `cargo bench --bench cache_memory` (env: `CACHE_ENTRIES`, default 100 000;
//! `CACHE_CLIENTS`, default 16).

#[path = "support/proc_stats.rs"]
#[allow(dead_code)]
mod proc_stats;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
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
    let response = if asked("\"stream\":true") {
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
        builder.header("content-type", "application/json").body(Full::new(Bytes::from(body.to_string())).boxed())
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

/// A gateway with the cache on and room for every entry, in front of `origin`.
async fn gateway(origin: SocketAddr) -> String {
    let config = format!(
        "[server]\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"origin\"\nbase_url = \"http://{origin}/v1\"\n\
         [cache]\nenabled = true\nmax_size = \"8GiB\"\n"
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

/// The `spillway_cache_bytes` gauge.
fn cache_bytes(metrics: &PrometheusHandle) -> u64 {
    let text = metrics.render();
    let line = text.lines().find(|line| line.starts_with("spillway_cache_bytes "));
    line.and_then(|line| line.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let entries = env_or("CACHE_ENTRIES", 100_000).max(1);
    let clients = env_or("CACHE_CLIENTS", 16).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let metrics = spillway::metrics::install().expect("the only recorder");
        let url = gateway(origin().await).await;
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
    });
}
