//! Open-streams bench: what each open stream costs the gateway in resident memory.
//!
//! The release binary runs as its own process (so its memory is its own) in front of a
//! slow mock upstream in this process: every chat completion is a stream that sends
//! its first chunk at once and then one a second, for as long as the bench runs. The
//! bench reads the gateway's RSS when it has started and served one request (idle),
//! then opens streams in steps (HTTP/1.1, one connection each, each read as its
//! chunks come), and after each step, once every stream has its first chunk and the
//! gateway has settled, reads the RSS again. It prints, per step, the RSS and the
//! growth per stream since idle and since the step before.
//!
//! The gateway runs with the side-by-side bench's features on (passthrough keys,
//! request and token limits, tokens counted with BPE, no cache): a stream holds a
//! client connection, an upstream connection and the watch on its events.
//!
//! `cargo bench --bench streams` (env: `STREAMS`, the largest step, default 9000;
//! each stream holds two descriptors in the gateway and two in this process, under
//! this machine's 20 000 a process). Bounded: every step waits at most 60 s, the
//! gateway is killed on the way out, and everything stays on 127.0.0.1.

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// How long to wait, at most, for one step's streams to all be open.
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// How long the gateway is given to settle after a step before its RSS is read.
const SETTLE: Duration = Duration::from_secs(3);

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let largest = std::env::var("STREAMS").ok().and_then(|value| value.parse().ok()).unwrap_or(9000_u64);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(streams(largest));
}

async fn streams(largest: u64) {
    let mock = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
    let mock_addr = mock.local_addr().expect("mock addr");
    tokio::spawn(serve_mock(mock));
    let mut gateway = Gateway::start(&format!("http://{mock_addr}/v1"));
    println!("streams: up to {largest} against {} (pid {})", gateway.listen, gateway.pid());

    let first_chunks = Arc::new(AtomicU64::new(0));
    // One stream and its end first, so that idle means warm: tables unpacked, pools made.
    open(&gateway.listen, 1, first_chunks.clone()).await;
    tokio::time::sleep(SETTLE).await;
    let idle = gateway.resident_bytes();
    println!("idle (one stream open): rss {:.1} MiB", mib(idle));

    let mut open_now = 1;
    let mut previous = (1, idle);
    let mut steps = vec![1000, 2000, 4000, 6000, 8000, largest];
    steps.retain(|step| *step <= largest);
    steps.dedup();
    for step in steps {
        open(&gateway.listen, step - open_now, first_chunks.clone()).await;
        open_now = step;
        let deadline = Instant::now() + STEP_DEADLINE;
        while first_chunks.load(Relaxed) < open_now && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(SETTLE).await;
        let rss = gateway.resident_bytes();
        let streaming = first_chunks.load(Relaxed);
        let per_stream =
            |since: (u64, u64)| (rss.saturating_sub(since.1)) as f64 / (step - since.0).max(1) as f64;
        println!(
            "{step:>6} streams ({streaming} with a first chunk)  rss {:>7.1} MiB  {:>6.0} B/stream since idle  {:>6.0} B/stream since the step before  fds {}",
            mib(rss),
            per_stream((1, idle)),
            per_stream(previous),
            gateway.open_fds()
        );
        previous = (step, rss);
    }
    gateway.stop();
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Opens `count` streams, each on its own connection, read for as long as the bench
/// runs; `first_chunks` counts those whose first chunk has come.
async fn open(gateway: &str, count: u64, first_chunks: Arc<AtomicU64>) {
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Write one sentence about reverse proxies."}],"max_tokens":64}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer sk-bench-streams\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..count {
        let Ok(mut stream) = TcpStream::connect(gateway).await else {
            eprintln!("connect failed");
            continue;
        };
        let (request, first_chunks) = (request.clone(), first_chunks.clone());
        tokio::spawn(async move {
            if stream.write_all(request.as_bytes()).await.is_err() {
                return;
            }
            let mut buffer = [0u8; 512];
            let mut counted = false;
            while let Ok(read) = stream.read(&mut buffer).await {
                if read == 0 {
                    return;
                }
                if !counted && buffer[..read].windows(5).any(|window| window == b"data:") {
                    counted = true;
                    first_chunks.fetch_add(1, Relaxed);
                }
            }
        });
    }
}

/// An OpenAI-like upstream whose every answer is a stream: its first chunk at once,
/// then one a second.
async fn serve_mock(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let chunks = futures_util::stream::unfold(0u64, |n| async move {
                    if n > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let chunk = format!(
                        "data: {{\"id\":\"chatcmpl-streams\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{n}\"}},\"finish_reason\":null}}]}}\n\n"
                    );
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), n + 1))
                });
                let mut response = http::Response::new(StreamBody::new(chunks).boxed());
                response
                    .headers_mut()
                    .insert("content-type", http::HeaderValue::from_static("text/event-stream"));
                Ok::<_, Infallible>(response)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The release binary, serving the side-by-side bench's config, logs drained.
struct Gateway {
    child: Child,
    listen: String,
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
admin_listen = ""
max_connections = 20000

[auth]
mode = "passthrough"

[limits.default]
requests_per_minute = 100000000
tokens_per_minute = 4000000000

[[upstreams]]
name = "mock"
base_url = "{upstream}"

[cache]
enabled = false
"#
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["--log-format", "json", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the gateway");
        let stdout = child.stdout.take().expect("stdout");
        let (found, started) = std::sync::mpsc::channel();
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
        let listen = fields["listen"].as_str().unwrap_or_default().to_owned();
        Self { listen, child, _dir: dir }
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
