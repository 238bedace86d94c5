//! Soak bench: the release binary under a long, mixed load, its memory, descriptors
//! and tasks sampled as it goes, to show they stay flat once warm.
//!
//! The gateway runs as its own process (so its figures are its own), in front of a
//! small mock upstream in this process. `WORKERS` clients loop over a fixed mix:
//! cache misses and hits, full streams and replayed ones, clients that go away after
//! the first chunk, slow readers, a key held to 60 requests a minute (gateway 429s),
//! malformed requests; the upstream answers one request in 25 with a 429, which the
//! gateway retries. Every `SAMPLE` the bench reads the gateway's RSS and open
//! descriptors from `/proc` and its live tokio tasks from `/metrics`, and at the end
//! writes the samples as CSV (`target/soak.csv`) and a plot (`docs/soak.svg`).
//!
//! `cargo bench --bench soak` (env: `SOAK_MINUTES`, default 30; `SOAK_WORKERS`, default
//! 16). Bounded: the load stops after `SOAK_MINUTES`, the gateway is killed on the way
//! out, and everything stays on 127.0.0.1.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, time::Instant};

const SAMPLE: Duration = Duration::from_secs(10);
/// Samples before this are the warm-up; flatness is judged after it.
const WARM_UP: Duration = Duration::from_secs(300);
/// Stream chunks the mock sends, and the gap between them.
const STREAM_CHUNKS: usize = 20;
const CHUNK_GAP: Duration = Duration::from_millis(5);

/// One sample of the gateway process.
struct Sample {
    at: Duration,
    rss_bytes: u64,
    fds: u64,
    tasks: u64,
    requests: u64,
}

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: do nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let minutes = env_or("SOAK_MINUTES", 30);
    let workers = env_or("SOAK_WORKERS", 16);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(soak(Duration::from_secs(minutes * 60), workers as usize));
}

async fn soak(duration: Duration, workers: usize) {
    let mock = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
    let mock_addr = mock.local_addr().expect("mock addr");
    tokio::spawn(serve_mock(mock));
    let mut gateway = Gateway::start(&format!("http://{mock_addr}/v1"));
    let base = format!("http://{}", gateway.listen);
    let admin = format!("http://{}/metrics", gateway.admin);
    println!("soak: {workers} workers for {duration:?} against {base} (pid {})", gateway.pid());

    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop = started + duration;
    let client = reqwest::Client::builder().pool_max_idle_per_host(workers).build().expect("client");
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let (client, base, done) = (client.clone(), base.clone(), done.clone());
        load.spawn(async move {
            let mut turn = worker as u64;
            while Instant::now() < stop {
                one_request(&client, &base, turn).await;
                done.fetch_add(1, Relaxed);
                turn += 1;
                // Keeps the load well under what two shared cores can take.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    let mut samples = Vec::new();
    let mut next = started;
    while next <= stop {
        tokio::time::sleep_until(next).await;
        let sample = Sample {
            at: started.elapsed(),
            rss_bytes: gateway.resident_bytes(),
            fds: gateway.open_fds(),
            tasks: live_tasks(&client, &admin).await,
            requests: done.load(Relaxed),
        };
        println!(
            "{:>6.1} min  rss {:>7.1} MiB  fds {:>5}  tasks {:>5}  requests {:>9}",
            sample.at.as_secs_f64() / 60.0,
            sample.rss_bytes as f64 / 1048576.0,
            sample.fds,
            sample.tasks,
            sample.requests
        );
        samples.push(sample);
        next += SAMPLE;
    }
    while load.join_next().await.is_some() {}
    gateway.stop();
    report(&samples);
}

/// One request of the mix; which one is decided by `turn`.
async fn one_request(client: &reqwest::Client, base: &str, turn: u64) {
    let chat = format!("{base}/v1/chat/completions");
    let body = |text: String, stream: bool| serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "stream": stream});
    let send = |key: &str, body: serde_json::Value| client.post(&chat).bearer_auth(key).json(&body).send();
    let result = match turn % 20 {
        // A miss: a body never seen before.
        0..=7 => drain(send("sk-soak", body(format!("miss {turn}"), false)).await).await,
        // A hit: one of 50 bodies, stored after its first call.
        8..=10 => drain(send("sk-soak", body(format!("hit {}", turn % 50), false)).await).await,
        // A stream, read whole; one in four is one of 20 replayed ones.
        11..=14 => drain(send("sk-soak", body(format!("stream {turn}"), true)).await).await,
        15 => drain(send("sk-soak", body(format!("replayed {}", turn % 20), true)).await).await,
        // A client that goes away after the first chunk.
        16 => match send("sk-soak", body(format!("abort {turn}"), true)).await {
            Ok(response) => {
                let _ = response.bytes_stream().next().await;
                Ok(())
            }
            Err(error) => Err(error),
        },
        // A slow reader.
        17 => match send("sk-soak", body(format!("slow {turn}"), true)).await {
            Ok(response) => {
                let mut chunks = response.bytes_stream();
                while let Some(Ok(_)) = chunks.next().await {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                Ok(())
            }
            Err(error) => Err(error),
        },
        // A key over its limit: mostly gateway 429s.
        18 => drain(send("sk-limited", body(format!("limited {turn}"), false)).await).await,
        // Malformed: bad JSON, a refused path, a model call without a model.
        _ => match turn % 3 {
            0 => drain(client.post(&chat).bearer_auth("sk-soak").body("{\"model\":").send().await).await,
            1 => drain(client.get(format!("{base}/v1/..%2fadmin")).bearer_auth("sk-soak").send().await).await,
            _ => drain(send("sk-soak", serde_json::json!({"messages": []})).await).await,
        },
    };
    if let Err(error) = result {
        eprintln!("request failed: {error}");
    }
}

async fn drain(response: reqwest::Result<reqwest::Response>) -> reqwest::Result<()> {
    response?.bytes().await.map(drop)
}

async fn live_tasks(client: &reqwest::Client, admin: &str) -> u64 {
    let Ok(response) = client.get(admin).send().await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("spillway_runtime_tasks "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |tasks| tasks as u64)
}

/// The release binary, serving a config of the bench's own, JSON logs drained.
struct Gateway {
    child: Child,
    listen: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(upstream: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("spillway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[auth]
mode = "keys"

[[keys]]
id = "soak"
key = "sk-soak"

[[keys]]
id = "limited"
key = "sk-limited"
requests_per_minute = 60
tokens_per_minute = 100000

[limits.default]
tokens_per_minute = 100000000

[[upstreams]]
name = "mock"
base_url = "{upstream}"

[cache]
enabled = true
max_size = "32MiB"
ttl = "2m"

[retry]
base_delay = "1ms"
max_delay = "10ms"
"#
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["--log-format", "json", "--log-level", "warn,spillway::server=info", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the gateway");
        let stdout = child.stdout.take().expect("stdout");
        let (found, started) = std::sync::mpsc::channel();
        // Reads the startup line, then keeps draining so the gateway never blocks on logs.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("spillway started") {
                    let _ = found.send(line);
                }
            }
        });
        let Ok(line) = started.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway wrote no startup line within 30 s");
        };
        let fields: serde_json::Value = serde_json::from_str(&line).expect("JSON startup line");
        let field = |name: &str| {
            fields[name].as_str().or_else(|| fields["fields"][name].as_str()).unwrap_or_default().to_owned()
        };
        Self { listen: field("listen"), admin: field("admin"), child, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    fn open_fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |dir| dir.count() as u64)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prints how each series moved after the warm-up, and writes the CSV and the plot.
fn report(samples: &[Sample]) {
    let warm: Vec<&Sample> = samples.iter().filter(|sample| sample.at >= WARM_UP).collect();
    let (Some(first), Some(last)) = (warm.first(), warm.last()) else {
        println!("soak: too short to judge (warm-up is {WARM_UP:?})");
        return;
    };
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    let max_rss = warm.iter().map(|sample| sample.rss_bytes).max().unwrap_or(0);
    let minutes = (last.at - first.at).as_secs_f64() / 60.0;
    let rate = (last.requests - first.requests) as f64 / (last.at - first.at).as_secs_f64().max(1.0);
    println!("\nafter the warm-up ({:.0} min, {rate:.0} requests/s):", minutes);
    println!(
        "rss   {:.1} -> {:.1} MiB (max {:.1}), {:+.2} MiB per 10 min",
        mib(first.rss_bytes),
        mib(last.rss_bytes),
        mib(max_rss),
        (mib(last.rss_bytes) - mib(first.rss_bytes)) / minutes.max(1.0) * 10.0
    );
    let range = |values: Vec<u64>| {
        (values.iter().copied().min().unwrap_or(0), values.iter().copied().max().unwrap_or(0))
    };
    let fds = range(warm.iter().map(|sample| sample.fds).collect());
    let tasks = range(warm.iter().map(|sample| sample.tasks).collect());
    println!("fds   {} .. {}   tasks {} .. {}", fds.0, fds.1, tasks.0, tasks.1);

    let mut csv = String::from("seconds,rss_bytes,fds,tasks,requests\n");
    for sample in samples {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            sample.at.as_secs(),
            sample.rss_bytes,
            sample.fds,
            sample.tasks,
            sample.requests
        ));
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let _ = std::fs::write(format!("{root}/target/soak.csv"), csv);
    let _ = std::fs::write(format!("{root}/docs/soak.svg"), plot(samples));
    println!("wrote target/soak.csv and docs/soak.svg");
}

/// Three stacked line charts (RSS, descriptors, tasks) over minutes, as SVG.
fn plot(samples: &[Sample]) -> String {
    type Series = (&'static str, fn(&Sample) -> f64);
    let series: [Series; 3] = [
        ("RSS (MiB)", |sample| sample.rss_bytes as f64 / 1048576.0),
        ("open descriptors", |sample| sample.fds as f64),
        ("tokio tasks", |sample| sample.tasks as f64),
    ];
    let (width, panel, left, top) = (720.0, 160.0, 60.0, 30.0);
    let end = samples.last().map_or(1.0, |sample| sample.at.as_secs_f64().max(1.0));
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        top + 3.0 * (panel + 40.0)
    );
    for (index, (title, value)) in series.iter().enumerate() {
        let y0 = top + index as f64 * (panel + 40.0);
        let high = samples.iter().map(value).fold(1.0_f64, f64::max) * 1.1;
        let x = |at: Duration| left + at.as_secs_f64() / end * (width - left - 20.0);
        let y = |v: f64| y0 + panel - v / high * panel;
        let points: Vec<String> =
            samples.iter().map(|sample| format!("{:.1},{:.1}", x(sample.at), y(value(sample)))).collect();
        svg.push_str(&format!(
            "<text x=\"{left}\" y=\"{:.1}\">{title}</text>\n\
             <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\n\
             <line x1=\"{left}\" y1=\"{y0:.1}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#999\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{high:.0}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.0} min</text>\n\
             <line x1=\"{:.1}\" y1=\"{y0:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ccc\" stroke-dasharray=\"4\"/>\n\
             <polyline fill=\"none\" stroke=\"#2060c0\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            y0 - 6.0,
            y0 + panel,
            width - 20.0,
            y0 + panel,
            y0 + panel,
            left - 4.0,
            y0 + 10.0,
            left - 4.0,
            y0 + panel,
            width - 20.0,
            y0 + panel + 16.0,
            end / 60.0,
            x(WARM_UP),
            x(WARM_UP),
            y0 + panel,
            points.join(" ")
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// The soak's upstream: chat completions as JSON or as a stream of `STREAM_CHUNKS`
/// chunks `CHUNK_GAP` apart, and a 429 (retry at once) for one request in 25. It keeps
/// nothing per request, so it cannot grow over a long run.
async fn serve_mock(listener: TcpListener) {
    let calls = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let calls = calls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let call = calls.fetch_add(1, Relaxed);
                async move {
                    let body =
                        request.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(answer(call, &body))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type MockBody = BoxBody<Bytes, std::convert::Infallible>;

fn answer(call: u64, body: &[u8]) -> http::Response<MockBody> {
    let usage = r#""usage":{"prompt_tokens":9,"completion_tokens":20,"total_tokens":29}"#;
    let response = http::Response::builder();
    if call % 25 == 24 {
        let error = r#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let full = Full::new(Bytes::from_static(error.as_bytes())).boxed();
        return response.status(429).header("retry-after-ms", "0").body(full).expect("429");
    }
    let stream = serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|body| body["stream"] == true);
    if !stream {
        let text = format!(
            r#"{{"id":"chatcmpl-{call}","object":"chat.completion","model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"hello"}},"finish_reason":"stop"}}],{usage}}}"#
        );
        let full = Full::new(Bytes::from(text)).boxed();
        return response.header("content-type", "application/json").body(full).expect("200");
    }
    let chunk = |delta: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-{call}\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
        ))
    };
    let mut frames: Vec<Bytes> = (0..STREAM_CHUNKS).map(|_| chunk(r#"{"content":"tok"}"#, "null")).collect();
    frames.push(chunk("{}", "\"stop\""));
    frames.push(Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-{call}\",\"object\":\"chat.completion.chunk\",\"choices\":[],{usage}}}\n\ndata: [DONE]\n\n"
    )));
    let frames = futures_util::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(CHUNK_GAP).await;
        Ok::<_, std::convert::Infallible>(Frame::data(frame))
    });
    let streamed = BodyExt::boxed(StreamBody::new(frames));
    response.header("content-type", "text/event-stream").body(streamed).expect("stream")
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}
