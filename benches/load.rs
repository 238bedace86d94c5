//! Load bench: the same closed-loop load sent straight to a mock upstream and through
//! the gateway, side by side.
//!
//! Everything runs in one process on 127.0.0.1: a mock upstream (the integration tests'
//! own), the gateway on an ephemeral port, and `CLIENTS` keep-alive clients each sending
//! requests back to back for `DURATION`. It prints requests/s and p50/p99 latency for
//! both paths, and their ratio. Bounded: every run stops after `DURATION` per scenario.
//!
//! `cargo bench --bench load` (env: `LOAD_CLIENTS`, `LOAD_SECONDS`; `SPILLWAY_BENCH_REDIS=redis://…`
//! adds the same limits shared through that Redis).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, time::Instant};

#[path = "support/proc_stats.rs"]
#[allow(dead_code)]
mod proc_stats;
// The integration tests' mock upstream, reused as the bench's origin.
#[allow(dead_code)]
#[path = "../tests/it/support/certs.rs"]
mod certs;
#[path = "../tests/it/support/upstream.rs"]
mod upstream;

/// The release binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}"#;

struct Report {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time of the whole process (clients, mock and gateway) during the run.
    cpu: Duration,
}

impl Report {
    fn cpu_per_request(&self) -> Duration {
        self.cpu.checked_div(self.requests.max(1) as u32).unwrap_or_default()
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

/// `clients` keep-alive connections, each sending requests back to back for `duration`.
async fn drive(url: String, clients: usize, duration: Duration) -> Report {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let url: http::Uri = url.parse().expect("url");
    let started = Instant::now();
    let cpu_before = proc_stats::cpu_time();
    let stop = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                while Instant::now() < stop {
                    let request = http::Request::post(url.clone())
                        .header("content-type", "application/json")
                        .header("authorization", "Bearer sk-bench")
                        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                        .expect("request");
                    let sent = Instant::now();
                    match client.request(request).await {
                        Ok(response) if response.status() == 200 => {
                            match response.into_body().collect().await {
                                Ok(_) => latencies.push(sent.elapsed()),
                                Err(_) => errors += 1,
                            }
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut report = Report {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        cpu: Duration::ZERO,
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("client task");
        report.errors += errors;
        report.latencies.extend(latencies);
    }
    report.elapsed = started.elapsed();
    report.cpu = proc_stats::cpu_time().saturating_sub(cpu_before);
    report.requests = report.latencies.len();
    report.latencies.sort_unstable();
    report
}

/// Runs each URL in turn for `rounds` slices of `duration / rounds`, so that drift in
/// the machine's load hits every scenario alike; one merged report per URL.
async fn interleaved(urls: &[&String], concurrency: usize, duration: Duration, rounds: u32) -> Vec<Report> {
    let mut reports: Vec<Report> = urls
        .iter()
        .map(|_| Report {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            cpu: Duration::ZERO,
        })
        .collect();
    for _ in 0..rounds {
        for (url, total) in urls.iter().zip(reports.iter_mut()) {
            let slice = drive((*url).clone(), concurrency, duration / rounds).await;
            total.requests += slice.requests;
            total.errors += slice.errors;
            total.elapsed += slice.elapsed;
            total.cpu += slice.cpu;
            total.latencies.extend(slice.latencies);
        }
    }
    for report in &mut reports {
        report.latencies.sort_unstable();
    }
    reports
}

fn print(name: &str, report: &Report) {
    println!(
        "{name:<16} {:>8.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms   {:>6.1} µs CPU/req   ({} requests, {} errors)",
        report.rps(),
        report.percentile(0.50).as_secs_f64() * 1e3,
        report.percentile(0.99).as_secs_f64() * 1e3,
        report.cpu_per_request().as_secs_f64() * 1e6,
        report.requests,
        report.errors,
    );
}

fn compare(direct: &Report, proxied: &Report) {
    println!(
        "gateway adds     {:>8.2}x throughput   p50 +{:.3} ms   p99 +{:.3} ms   +{:.1} µs CPU/req",
        proxied.rps() / direct.rps(),
        (proxied.percentile(0.50).as_secs_f64() - direct.percentile(0.50).as_secs_f64()) * 1e3,
        (proxied.percentile(0.99).as_secs_f64() - direct.percentile(0.99).as_secs_f64()) * 1e3,
        (proxied.cpu_per_request().as_secs_f64() - direct.cpu_per_request().as_secs_f64()) * 1e6,
    );
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Starts a gateway in front of `mock` with `extra` config, returning its chat URL.
async fn gateway(mock: &upstream::MockHandle, extra: &str) -> String {
    let config = format!(
        "[server]\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n{extra}",
        mock.base_url()
    );
    let config = spillway::config::load_str(&config, "bench.toml", |_| None, &Default::default())
        .expect("bench config");
    let runtime = Arc::new(spillway::runtime::Runtime::new(config).expect("runtime"));
    if let Some(link) = &runtime.redis {
        link.probe().await;
        assert!(link.is_up(), "SPILLWAY_BENCH_REDIS does not answer");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(spillway::server::serve(listener, runtime, std::future::pending()));
    format!("http://{addr}/v1/chat/completions")
}

/// Limits that every request passes, so the cost measured is the limiting itself:
/// requests and tokens buckets, BPE prompt count, settling, a concurrency slot.
const LIMITS: &str = "[limits.default]\nrequests_per_minute = 100000000\ntokens_per_minute = 2000000000\nmax_concurrent = 100000\n[cache]\nenabled = false\n";
/// Every request a miss that reaches the mock.
const NO_CACHE: &str = "[cache]\nenabled = false\n";
/// Every request after the first a hit (the bench sends one body over and over).
const CACHE: &str = "[cache]\nenabled = true\n";

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: do nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let clients = env_or("LOAD_CLIENTS", 64) as usize;
    let duration = Duration::from_secs(env_or("LOAD_SECONDS", 5));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        spillway::openai::tokens::warm_up();
        let mock = upstream::MockUpstream::new().start().await;
        let direct_url = format!("{}/chat/completions", mock.base_url());
        let plain_url = gateway(&mock, NO_CACHE).await;
        let limited_url = gateway(&mock, LIMITS).await;
        let cached_url = gateway(&mock, CACHE).await;
        // The same limits shared through Redis, when SPILLWAY_BENCH_REDIS names one.
        let shared_url = match std::env::var("SPILLWAY_BENCH_REDIS") {
            Ok(redis) => {
                let shared = format!("{LIMITS}[redis]\nurl = \"{redis}\"\nprefix = \"bench:\"\ncache = false\n");
                Some(gateway(&mock, &shared).await)
            }
            Err(_) => None,
        };
        // Warm every path (connections, allocator, the cache entry) before measuring.
        for url in [&direct_url, &plain_url, &limited_url, &cached_url].into_iter().chain(shared_url.as_ref()) {
            drive(url.clone(), clients, Duration::from_millis(500)).await;
        }

        for concurrency in [1, clients] {
            println!("\n{concurrency} keep-alive client(s), {duration:?} each, chat completion JSON, mock answers at once");
            let mut urls = vec![&direct_url, &plain_url, &limited_url, &cached_url];
            urls.extend(shared_url.as_ref());
            let mut reports = interleaved(&urls, concurrency, duration, 5).await.into_iter();
            let mut next = || reports.next().expect("one report per url");
            let (direct, proxied, limited, cached) = (next(), next(), next(), next());
            print("direct to mock", &direct);
            print("through gateway", &proxied);
            print("  + limits on", &limited);
            if let Some(shared) = reports.next() {
                print("  + limits redis", &shared);
                println!(
                    "redis limits     {:>8.1}% throughput vs local limits   p50 +{:.3} ms",
                    (1.0 - shared.rps() / limited.rps()) * 100.0,
                    (shared.percentile(0.50).as_secs_f64() - limited.percentile(0.50).as_secs_f64()) * 1e3,
                );
            }
            print("cache hits", &cached);
            compare(&direct, &proxied);
            println!(
                "limits cost      {:>8.1}% throughput   +{:.1} µs CPU/req",
                (1.0 - limited.rps() / proxied.rps()) * 100.0,
                (limited.cpu_per_request().as_secs_f64() - proxied.cpu_per_request().as_secs_f64()) * 1e6,
            );
            println!(
                "hits vs misses   {:>8.2}x throughput   p50 {:.3} vs {:.3} ms   p99 {:.3} vs {:.3} ms",
                cached.rps() / proxied.rps(),
                cached.percentile(0.50).as_secs_f64() * 1e3,
                proxied.percentile(0.50).as_secs_f64() * 1e3,
                cached.percentile(0.99).as_secs_f64() * 1e3,
                proxied.percentile(0.99).as_secs_f64() * 1e3,
            );
        }

        // One upstream answer in ten is a 429 (retry-after 0): the gateway retries it, so
        // clients see only 200s; what it costs is the extra attempt.
        let flaky = upstream::MockUpstream::new().every(10, upstream::Reply::rate_limited(Duration::ZERO)).start().await;
        let retrying_url = gateway(&flaky, "[cache]\nenabled = false\n[retry]\nbase_delay = \"1ms\"\nmax_delay = \"10ms\"\n").await;
        let plain_to_flaky = gateway(&flaky, "[cache]\nenabled = false\n[retry]\nmax_attempts = 1\n").await;
        drive(retrying_url.clone(), clients, Duration::from_millis(500)).await;
        println!("\n{clients} keep-alive clients, {duration:?}, upstream answers 1 request in 10 with 429");
        let before = flaky.calls();
        let retried = drive(retrying_url.clone(), clients, duration).await;
        let attempts = (flaky.calls() - before) as f64 / retried.requests.max(1) as f64;
        print("with retries", &retried);
        println!("upstream attempts per client request: {attempts:.3} (errors seen by clients: {})", retried.errors);
        let unretried = drive(plain_to_flaky.clone(), clients, duration).await;
        print("no retries", &unretried);
    });
}
