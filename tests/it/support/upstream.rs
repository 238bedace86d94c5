//! An in-process, scriptable mock of an OpenAI-compatible upstream.
//!
//! Tests start it on `127.0.0.1:0`, point the gateway at [`MockHandle::base_url`] and
//! read back what the upstream saw:
//!
//! ```ignore
//! let gate = Gate::new();
//! let up = MockUpstream::new()
//!     .reply(Reply::rate_limited(Duration::from_secs(1)))
//!     .reply(Reply::sse([json!({"choices": []})]).gate_after(1, &gate))
//!     .start()
//!     .await;
//! // ... send a request through the gateway to up.base_url() ...
//! up.wait_for_calls(2).await;
//! assert_eq!(up.requests()[0].body, up.requests()[1].body);
//! ```
//!
//! Replies come from, in order: a per-path [`MockUpstream::route`], the queue of
//! [`MockUpstream::reply`] (each request pops one; the last one repeats), and otherwise
//! OpenAI-like answers ([`Reply::openai`]) good enough for a real OpenAI client. Every
//! response carries `x-request-id: upstream-<n>`, `n` counting requests from 1.
//! Dropping the handle stops the server and every connection.

// Not every test uses every helper.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// `usage.prompt_tokens` of the built-in answers.
pub const PROMPT_TOKENS: u64 = 9;
/// `usage.completion_tokens` of the built-in answers (`"hello"`, streamed as `"hel"`, `"lo"`).
pub const COMPLETION_TOKENS: u64 = 2;
/// How long the `wait_for_*` helpers wait before failing the test. It is tokio time: under
/// a paused clock it runs out as soon as nothing else is due first.
pub const WAIT: Duration = Duration::from_secs(10);
const CREATED: u64 = 1_700_000_000;

type Body = BoxBody<Bytes, io::Error>;

/// One request as the mock received it, recorded once its whole body was read.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query only, whatever the protocol.
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The value of header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("upstream request body is not JSON")
    }
}

/// Holds a stream back until the test calls [`Gate::open`].
#[derive(Clone, Debug)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Lets every stream waiting on this gate go on.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

/// One scripted answer. Build with a constructor, refine with the chained methods.
#[derive(Clone, Debug)]
pub struct Reply {
    kind: Kind,
    status: StatusCode,
    headers: HeaderMap,
    delay: Duration,
    every: Duration,
    gate: Option<(usize, Gate)>,
    reset_after: Option<usize>,
}

#[derive(Clone, Debug)]
enum Kind {
    OpenAi,
    Body(Content),
    Echo,
    Reset,
}

#[derive(Clone, Debug)]
enum Content {
    Full(Bytes),
    Stream(Vec<Bytes>),
}

impl Reply {
    fn new(status: u16, kind: Kind) -> Self {
        Reply {
            kind,
            status: StatusCode::from_u16(status).expect("invalid status code"),
            headers: HeaderMap::new(),
            delay: Duration::ZERO,
            every: Duration::ZERO,
            gate: None,
            reset_after: None,
        }
    }

    /// The built-in OpenAI-like answer for the request (what unscripted requests get).
    pub fn openai() -> Self {
        Self::new(200, Kind::OpenAi)
    }

    /// `status` with a JSON body.
    pub fn json(status: u16, body: Value) -> Self {
        Self::new(status, Kind::Body(Content::Full(body.to_string().into())))
            .header("content-type", "application/json")
    }

    /// `status` with these exact body bytes and no content-type.
    pub fn bytes(status: u16, body: impl Into<Bytes>) -> Self {
        Self::new(status, Kind::Body(Content::Full(body.into())))
    }

    /// `status` with an OpenAI-shaped error body.
    pub fn error(status: u16, kind: &str, code: &str, message: &str) -> Self {
        let error = json!({"message": message, "type": kind, "param": null, "code": code});
        Self::json(status, json!({ "error": error }))
    }

    /// OpenAI's 429, asking to retry after `wait` (`retry-after` and `retry-after-ms`).
    pub fn rate_limited(wait: Duration) -> Self {
        let message = "Rate limit reached for requests";
        Self::error(429, "requests", "rate_limit_exceeded", message).retry_after(wait)
    }

    /// An OpenAI-shaped 5xx (500, 502, 503, ...).
    pub fn server_error(status: u16) -> Self {
        let message = "The server had an error while processing your request.";
        Self::error(status, "server_error", "server_error", message)
    }

    /// A `text/event-stream` of `data: <event>` frames, then `data: [DONE]`.
    /// Events may be `serde_json::Value`s or strings.
    pub fn sse<E: ToString>(events: impl IntoIterator<Item = E>) -> Self {
        Self::sse_raw(sse_frames(events))
    }

    /// A `text/event-stream` of exactly these chunks, one body frame each, unframed.
    pub fn sse_raw<C: Into<Bytes>>(chunks: impl IntoIterator<Item = C>) -> Self {
        let chunks = chunks.into_iter().map(Into::into).collect();
        Self::new(200, Kind::Body(Content::Stream(chunks))).header("content-type", "text/event-stream")
    }

    /// Answers with the request it received, as JSON: `method`, `uri`, `version`,
    /// `headers` (a string, or an array when repeated), `body` (text or null), `body_hex`.
    pub fn echo() -> Self {
        Self::new(200, Kind::Echo).header("content-type", "application/json")
    }

    /// Instead of answering, closes the connection with a TCP RST (`SO_LINGER` 0), ending
    /// every HTTP/2 stream on it too.
    pub fn reset() -> Self {
        Self::new(200, Kind::Reset)
    }

    /// Answers with this status instead (an echo at 401, say).
    pub fn status(mut self, status: u16) -> Self {
        self.status = StatusCode::from_u16(status).expect("invalid status code");
        self
    }

    /// Adds (or replaces) a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name).expect("invalid header name");
        let value = HeaderValue::try_from(value).expect("invalid header value");
        self.headers.insert(name, value);
        self
    }

    /// Sets `retry-after` (whole seconds, rounded up) and `retry-after-ms`.
    pub fn retry_after(self, wait: Duration) -> Self {
        let secs = wait.as_millis().div_ceil(1000).to_string();
        self.header("retry-after", &secs).header("retry-after-ms", &wait.as_millis().to_string())
    }

    /// Waits this long before answering (or resetting).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// For streams (including built-in ones): waits this long between chunks.
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// For streams: sends `sent` chunks, then waits for `gate` before the rest (or, when
    /// `sent` is the number of chunks, before ending the body).
    pub fn gate_after(mut self, sent: usize, gate: &Gate) -> Self {
        self.gate = Some((sent, gate.clone()));
        self
    }

    /// For streams: sends `sent` chunks, then aborts the body instead of sending the rest or
    /// ending it (HTTP/1.1: the connection closes without the last chunk; HTTP/2: the stream
    /// is reset).
    pub fn reset_after(mut self, sent: usize) -> Self {
        self.reset_after = Some(sent);
        self
    }
}

/// Builder of a mock upstream; see the module docs.
#[derive(Default)]
pub struct MockUpstream {
    tls: bool,
    queue: VecDeque<Reply>,
    routes: HashMap<String, Reply>,
    every: Option<(usize, Reply)>,
    expect_calls: Option<usize>,
}

impl MockUpstream {
    /// A cleartext mock (HTTP/1.1 and h2c with prior knowledge) with no script.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves HTTPS (h2 and HTTP/1.1 by ALPN) with a leaf certificate for `localhost` and
    /// `127.0.0.1`, signed by a CA made at start ([`MockHandle::ca_pem`]).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Queues a reply: each request takes the next one, and the last one repeats.
    pub fn reply(mut self, reply: Reply) -> Self {
        self.queue.push_back(reply);
        self
    }

    /// Answers every request to `path` (no query) with `reply`, before the queue.
    pub fn route(mut self, path: &str, reply: Reply) -> Self {
        self.routes.insert(path.into(), reply);
        self
    }

    /// Answers every `n`th request with `reply`, before routes and the queue (a
    /// steady failure rate for load tests).
    pub fn every(mut self, n: usize, reply: Reply) -> Self {
        self.every = Some((n.max(1), reply));
        self
    }

    /// Fails the test, when the handle is dropped, unless exactly `n` requests came.
    pub fn expect_calls(mut self, n: usize) -> Self {
        self.expect_calls = Some(n);
        self
    }

    /// Binds `127.0.0.1:0` and serves until the handle is dropped.
    pub async fn start(self) -> MockHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let (acceptor, ca) = match self.tls {
            true => {
                let certs = super::certs::TestCerts::generate();
                (Some(TlsAcceptor::from(certs.server_config())), Some(certs))
            }
            false => (None, None),
        };
        let shared = Arc::new(Shared {
            script: Mutex::new((self.queue, self.routes)),
            every: self.every,
            ..Shared::default()
        });
        let server = tokio::spawn(serve(listener, acceptor, shared.clone()));
        MockHandle { addr, ca, shared, server, expect_calls: self.expect_calls }
    }
}

/// A running mock upstream. Dropping it stops the server.
pub struct MockHandle {
    addr: SocketAddr,
    ca: Option<super::certs::TestCerts>,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    expect_calls: Option<usize>,
}

impl MockHandle {
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, or `https://localhost:PORT/v1` with TLS.
    pub fn base_url(&self) -> String {
        match self.ca {
            None => format!("http://{}/v1", self.addr),
            Some(_) => format!("https://localhost:{}/v1", self.addr.port()),
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// The last request received.
    pub fn last_request(&self) -> Recorded {
        self.requests().pop().expect("the mock upstream received no request")
    }

    /// How many requests were received (and recorded) so far.
    pub fn calls(&self) -> usize {
        self.shared.requests.lock().expect("requests lock").len()
    }

    /// How many TCP connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(SeqCst)
    }

    /// Streamed replies still being sent.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(SeqCst)
    }

    /// Streamed replies whose client went away before the stream's end.
    pub fn stream_cancellations(&self) -> usize {
        self.shared.cancellations.load(SeqCst)
    }

    /// Adds a reply to the queue after start.
    pub fn enqueue(&self, reply: Reply) {
        self.shared.script.lock().expect("script lock").0.push_back(reply);
    }

    /// The CA that signed the TLS certificate, PEM-encoded.
    pub fn ca_pem(&self) -> &str {
        &self.ca.as_ref().expect("ca_pem() needs MockUpstream::tls()").ca_pem
    }

    /// A temporary file holding [`MockHandle::ca_pem`], removed with the handle.
    pub fn ca_file(&self) -> PathBuf {
        self.ca.as_ref().expect("ca_file() needs MockUpstream::tls()").ca_file()
    }

    /// Waits until `n` requests were received; panics after [`WAIT`].
    pub async fn wait_for_calls(&self, n: usize) {
        self.wait_until(&format!("{n} calls"), |h| h.calls() >= n).await;
    }

    /// Waits until a client went away from a streamed reply; panics after [`WAIT`].
    pub async fn wait_for_stream_cancellation(&self) {
        self.wait_until("a stream cancellation", |h| h.stream_cancellations() > 0).await;
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let waiting = async {
            loop {
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(self) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(WAIT, waiting).await.is_err() {
            panic!("mock upstream: no {what} after {WAIT:?} ({})", self.summary());
        }
    }

    fn summary(&self) -> String {
        let (calls, conns) = (self.calls(), self.connections());
        let (open, cancelled) = (self.open_streams(), self.stream_cancellations());
        format!("calls {calls}, connections {conns}, open streams {open}, cancelled {cancelled}")
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(n) = self.expect_calls
            && !std::thread::panicking()
        {
            assert_eq!(self.calls(), n, "mock upstream: expected {n} calls ({})", self.summary());
        }
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<(VecDeque<Reply>, HashMap<String, Reply>)>,
    every: Option<(usize, Reply)>,
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    open_streams: AtomicUsize,
    cancellations: AtomicUsize,
    changed: Notify,
}

impl Shared {
    /// Records a request; returns its number (from 1) and the reply it gets.
    fn record(&self, request: Recorded) -> (usize, Reply) {
        let calls = self.requests.lock().expect("requests lock").len() + 1;
        let reply = match &self.every {
            Some((n, reply)) if calls.is_multiple_of(*n) => Some(reply.clone()),
            _ => None,
        };
        let reply = reply.unwrap_or_else(|| {
            let mut script = self.script.lock().expect("script lock");
            let (queue, routes) = &mut *script;
            match routes.get(request.uri.path()) {
                Some(reply) => reply.clone(),
                None if queue.len() > 1 => queue.pop_front().expect("queue is not empty"),
                None => queue.front().cloned().unwrap_or_else(Reply::openai),
            }
        });
        let mut requests = self.requests.lock().expect("requests lock");
        requests.push(request);
        let n = requests.len();
        drop(requests);
        self.changed.notify_waiters();
        (n, reply)
    }

    fn bump(&self, counter: &AtomicUsize, up: bool) {
        let _ = if up { counter.fetch_add(1, SeqCst) } else { counter.fetch_sub(1, SeqCst) };
        self.changed.notify_waiters();
    }
}

async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    // Connection tasks live in the set, so aborting this task ends them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        shared.bump(&shared.connections, true);
        connections.spawn(connection(tcp, tls.clone(), shared.clone()));
        while connections.try_join_next().is_some() {}
    }
}

/// What a reply needs to reset its connection: a second descriptor of the socket (to set
/// `SO_LINGER` 0, so that closing it sends a TCP RST) and a signal to close it now.
struct Conn {
    socket: TcpSocket,
    reset: watch::Sender<bool>,
}

impl Conn {
    /// Resets the connection, then fails the request. HTTP/2 runs requests in tasks of their
    /// own: failing before the connection is gone would send an RST_STREAM first.
    async fn reset(&self) -> io::Error {
        if let Err(e) = self.socket.set_zero_linger() {
            return e;
        }
        self.reset.send_replace(true);
        self.reset.closed().await;
        io::Error::new(io::ErrorKind::ConnectionReset, "scripted reset")
    }
}

async fn connection(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let Ok(std) = tcp.into_std() else { return };
    let (Ok(twin), Ok(tcp)) = (std.try_clone(), TcpStream::from_std(std)) else { return };
    let (reset, mut resetting) = watch::channel(false);
    let conn = Arc::new(Conn { socket: TcpSocket::from_std_stream(twin), reset });
    let svc_conn = conn.clone();
    let service = hyper::service::service_fn(move |req| handle(shared.clone(), svc_conn.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    let serving = async {
        let _ = match tls {
            None => builder.serve_connection(TokioIo::new(tcp), service).await,
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                Err(e) => Err(e.into()),
            },
        };
    };
    tokio::select! {
        () = serving => {}
        _ = resetting.wait_for(|reset| *reset) => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    request: Request<Incoming>,
) -> io::Result<Response<Body>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let uri = parts.uri.path_and_query().map_or("/".into(), |pq| pq.as_str().to_owned());
    let request = Recorded {
        method: parts.method,
        uri: uri.parse().expect("path and query parse as a URI"),
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let (n, reply) = shared.record(request.clone());
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let (status, content) = match &reply.kind {
        Kind::Reset => return Err(conn.reset().await),
        Kind::OpenAi => openai(&request, n),
        Kind::Body(content) => (reply.status, content.clone()),
        Kind::Echo => (reply.status, Content::Full(echo(&request).to_string().into())),
    };
    let content_type = match &content {
        Content::Full(_) => "application/json",
        Content::Stream(_) => "text/event-stream",
    };
    let mut response = Response::new(match content {
        Content::Full(body) => Full::new(body).map_err(|e: Infallible| match e {}).boxed(),
        Content::Stream(chunks) => stream(chunks, reply.clone(), shared),
    });
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if matches!(reply.kind, Kind::OpenAi) {
        headers.insert("content-type", HeaderValue::from_static(content_type));
    }
    headers.extend(reply.headers);
    let id = HeaderValue::try_from(format!("upstream-{n}")).expect("request id is a header value");
    headers.entry("x-request-id").or_insert(id);
    Ok(response)
}

/// A body fed chunk by chunk by a task that paces it and notices the client leaving.
fn stream(chunks: Vec<Bytes>, reply: Reply, shared: Arc<Shared>) -> Body {
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
    shared.bump(&shared.open_streams, true);
    tokio::spawn(async move {
        let sending = async {
            // `None` is the body's end, which a gate or a reset can also hold back.
            for (i, chunk) in chunks.into_iter().map(Some).chain([None]).enumerate() {
                if let Some((at, gate)) = &reply.gate
                    && *at == i
                {
                    gate.wait().await;
                }
                if reply.reset_after == Some(i) {
                    let reset = io::Error::new(io::ErrorKind::ConnectionReset, "scripted reset");
                    return tx.send(Err(reset)).await.is_ok();
                }
                let Some(chunk) = chunk else { return true };
                if i > 0 && !reply.every.is_zero() {
                    tokio::time::sleep(reply.every).await;
                }
                if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                    return false;
                }
            }
            true
        };
        let finished = tokio::select! {
            finished = sending => finished,
            () = tx.closed() => false,
        };
        if !finished {
            shared.bump(&shared.cancellations, true);
        }
        shared.bump(&shared.open_streams, false);
    });
    StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))).boxed()
}

fn sse_frames<E: ToString>(events: impl IntoIterator<Item = E>) -> Vec<Bytes> {
    let events = events.into_iter().map(|e| e.to_string());
    events.chain(["[DONE]".into()]).map(|e| format!("data: {e}\n\n").into()).collect()
}

fn echo(request: &Recorded) -> Value {
    let mut headers = serde_json::Map::new();
    for name in request.headers.keys() {
        let text = |v: &HeaderValue| Value::from(String::from_utf8_lossy(v.as_bytes()));
        let mut values: Vec<Value> = request.headers.get_all(name).iter().map(text).collect();
        let value = if values.len() == 1 { values.remove(0) } else { Value::Array(values) };
        headers.insert(name.as_str().into(), value);
    }
    json!({
        "method": request.method.as_str(),
        "uri": request.uri.to_string(),
        "version": format!("{:?}", request.version),
        "headers": headers,
        "body": std::str::from_utf8(&request.body).ok(),
        "body_hex": hex::encode(&request.body),
    })
}

/// The built-in answers: what OpenAI would say, shortened.
fn openai(request: &Recorded, n: usize) -> (StatusCode, Content) {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini");
    let usage = json!({
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    });
    let full = |v: Value| (StatusCode::OK, Content::Full(v.to_string().into()));
    let chat = "/v1/chat/completions";
    match (request.method.as_str(), request.uri.path()) {
        ("POST", path) if path == chat && body["stream"] == true => {
            let id = format!("chatcmpl-upstream-{n}");
            let chunk = |delta: Value, finish: Value| {
                let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
                json!({"id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model, "choices": [choice]})
            };
            let mut events = vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
            ];
            if body["stream_options"]["include_usage"] == true {
                events.iter_mut().for_each(|e| e["usage"] = Value::Null);
                let mut last = chunk(Value::Null, Value::Null);
                (last["choices"], last["usage"]) = (json!([]), usage);
                events.push(last);
            }
            (StatusCode::OK, Content::Stream(sse_frames(events)))
        }
        ("POST", path) if path == chat => full(json!({
            "id": format!("chatcmpl-upstream-{n}"), "object": "chat.completion", "created": CREATED,
            "model": model, "system_fingerprint": null, "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": null},
                "logprobs": null, "finish_reason": "stop"}],
        })),
        ("POST", "/v1/completions") => full(json!({
            "id": format!("cmpl-upstream-{n}"), "object": "text_completion", "created": CREATED,
            "model": model, "usage": usage,
            "choices": [{"index": 0, "text": "hello", "logprobs": null, "finish_reason": "stop"}],
        })),
        ("POST", "/v1/embeddings") => {
            let inputs = match &body["input"] {
                Value::Array(items) if items.first().is_some_and(|i| !i.is_number()) => items.len(),
                _ => 1,
            };
            let vector = |i: usize| [i as f64 / 8.0, 0.5, -0.25];
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": vector(i)}))
                .collect();
            let usage = json!({"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS});
            full(json!({"object": "list", "data": data, "model": model, "usage": usage}))
        }
        ("GET", "/v1/models") => full(json!({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "openai"},
            {"id": "text-embedding-3-small", "object": "model", "created": CREATED, "owned_by": "openai"},
        ]})),
        (method, path) => {
            let message = format!("Unknown request URL: {method} {path}");
            let error = json!({"message": message, "type": "invalid_request_error", "param": null, "code": "unknown_url"});
            let (_, body) = full(json!({ "error": error }));
            (StatusCode::NOT_FOUND, body)
        }
    }
}
