//! The gateway under test, in-process on 127.0.0.1:0, configured from a TOML string
//! exactly as an operator would write it.

use std::{net::SocketAddr, sync::Arc};

use spillway::{config, runtime::Runtime};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub struct TestGateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway from `toml` (no `${VAR}` is set in tests' environment).
    pub async fn start(toml: &str) -> Self {
        let config = load(toml);
        Self::start_runtime(Arc::new(Runtime::new(config).expect("runtime builds"))).await
    }

    /// Starts a gateway on a runtime the test built (e.g. to probe its Redis link first).
    pub async fn start_runtime(runtime: Arc<Runtime>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            spillway::server::serve(listener, runtime, shutdown).await.expect("gateway serves");
        });
        Self { addr, stop: Some(stop), task: Some(task) }
    }

    /// `http://127.0.0.1:PORT/v1`, the base URL an SDK is given.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST path` with a JSON body, as caller `sk-caller`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        http().post(self.url(path)).bearer_auth("sk-caller").json(body).send().await.expect("gateway answers")
    }

    /// `POST path` with these exact JSON body bytes, as caller `sk-caller`.
    pub async fn post_raw(&self, path: &str, body: &'static str) -> reqwest::Response {
        let request =
            http().post(self.url(path)).bearer_auth("sk-caller").header("content-type", "application/json");
        request.body(body).send().await.expect("gateway answers")
    }

    /// A chat completion for `model` (streamed with `stream`), as caller `sk-caller`.
    pub async fn chat(&self, model: &str, stream: bool) -> reqwest::Response {
        let body = serde_json::json!({"model": model, "messages": [], "stream": stream});
        self.post_json("/v1/chat/completions", &body).await
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("gateway task ends cleanly");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Parses and validates a config written in a test.
pub fn load(toml: &str) -> config::Config {
    config::load_str(toml, "test.toml", |_| None, &config::Overrides::default())
        .unwrap_or_else(|diagnostics| panic!("test config is invalid:\n{diagnostics}"))
}

/// A config with one upstream at `base_url` serving every model, plus `extra` TOML.
/// The cache is off and every request makes one attempt unless `extra` has a
/// `[cache]` or `[retry]` table, so that tests of other stages see each request reach
/// the upstream exactly once.
pub fn config_for(base_url: &str, extra: &str) -> String {
    let mut defaults = String::new();
    if !extra.contains("[cache]") {
        defaults.push_str("\n[cache]\nenabled = false\n");
    }
    if !extra.contains("[retry]") {
        defaults.push_str("\n[retry]\nmax_attempts = 1\n");
    }
    let cache = defaults;
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""

[[upstreams]]
name = "mock"
base_url = "{base_url}"
{extra}
{cache}"#
    )
}

/// Sends `request` exactly as written on a new connection to `addr` (HTTP clients
/// normalise what tests must send raw) and returns all the server sent until it
/// closed the connection, which it must do within 10 s.
pub async fn exchange(addr: impl tokio::net::ToSocketAddrs, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A plain HTTP/1.1 client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().build().expect("reqwest client")
}
