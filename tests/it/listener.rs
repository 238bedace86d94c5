//! Protection of the listener itself: slow heads, oversized heads, too many
//! connections.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{
    self,
    gateway::{TestGateway, exchange},
    upstream::MockUpstream,
};

fn server(settings: &str, base_url: &str) -> String {
    format!(
        "[server]\nadmin_listen = \"\"\n{settings}\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{base_url}\"\n\n[cache]\nenabled = false\n"
    )
}

/// Reads until the server closes the connection (bounded), returning what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_head_that_never_finishes_is_cut_after_header_read_timeout() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&server("header_read_timeout = \"300ms\"", &upstream.base_url())).await;

    let mut slow = TcpStream::connect(gateway.addr).await.expect("connect");
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n").await.expect("half a head");
    let started = tokio::time::Instant::now();
    read_until_closed(&mut slow).await;

    assert!(started.elapsed() >= Duration::from_millis(250), "closed before the timeout");
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&server("max_header_size = \"16KiB\"", &upstream.base_url())).await;

    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let big = "a".repeat(32 * 1024);
    let request = format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = read_until_closed(&mut stream).await;

    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_on_arrival() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&server("max_connections = 2", &upstream.base_url())).await;

    let first = TcpStream::connect(gateway.addr).await.expect("connect");
    let _second = TcpStream::connect(gateway.addr).await.expect("connect");
    // Let the accept loop take both before the third arrives.
    let mut third = TcpStream::connect(gateway.addr).await.expect("the kernel accepts");
    assert_eq!(read_until_closed(&mut third).await, "", "the third connection got an answer");

    drop(first);
    let mut admitted = None;
    for _ in 0..50 {
        let response =
            reqwest::Client::new().get(gateway.url("/v1/models")).bearer_auth("sk-caller").send().await;
        if let Ok(response) = response {
            admitted = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(admitted.map(|status| status.as_u16()), Some(200), "a freed slot was not reused");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_header_read_timeout() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&server("header_read_timeout = \"300ms\"", &upstream.base_url())).await;

    let mut idle = TcpStream::connect(gateway.addr).await.expect("connect");
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\r\n")
        .await
        .expect("a whole request");
    let started = tokio::time::Instant::now();
    let answer = read_until_closed(&mut idle).await;

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before going idle");
}

/// An h2c connection (prior knowledge) and a task that ends when the server closes it.
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>, tokio::task::JoinHandle<()>)
{
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    (sender, tokio::spawn(async move { drop(connection.await) }))
}

fn models_request(authority: std::net::SocketAddr) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(format!("http://{authority}/v1/models"))
        .header("authorization", "Bearer sk-caller")
        .body(http_body_util::Empty::new())
        .expect("request")
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_idle_timeout_but_a_slow_stream_is_not() {
    use http_body_util::BodyExt;

    let upstream = MockUpstream::new()
        .route("/v1/models", support::upstream::Reply::sse(["a", "b"]).every(Duration::from_millis(500)))
        .start()
        .await;
    let gateway = TestGateway::start(&server("idle_timeout = \"300ms\"", &upstream.base_url())).await;
    let (mut sender, closed) = h2_connection(gateway.addr).await;

    // Chunks 500 ms apart, each gap longer than idle_timeout: in flight all along.
    let started = tokio::time::Instant::now();
    let response = sender.send_request(models_request(gateway.addr)).await.expect("response head");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.expect("the whole stream").to_bytes();
    assert!(started.elapsed() >= Duration::from_millis(1000), "the stream was not slow");
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"), "{body:?}");
    // No GOAWAY was sent during the stream: the connection takes another request.
    let again = sender.send_request(models_request(gateway.addr)).await.expect("a second request");
    again.into_body().collect().await.expect("second body");

    // Idle from here: closed after idle_timeout, not before.
    let idle_since = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), closed).await.expect("closed when idle").expect("task");
    assert!(idle_since.elapsed() >= Duration::from_millis(250), "closed before idle_timeout");
}

#[tokio::test]
async fn idle_timeout_is_checked_in_the_config() {
    let error = spillway::config::load_str(
        "[server]\nidle_timeout = \"0s\"\n",
        "t.toml",
        |_| None,
        &Default::default(),
    )
    .expect_err("zero is refused");
    assert!(
        error.to_string().contains("t.toml:2:16: error: `idle_timeout` must be longer than 0"),
        "{error}"
    );
}

/// A connection that has sent `head_and_part` and sends nothing more.
async fn stalled(gateway: &TestGateway, head_and_part: &str) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(head_and_part.as_bytes()).await.expect("a head and part of a body");
    stream
}

/// A connection that sends `head`, then one body byte every 100 ms while it can.
async fn trickling(gateway: &TestGateway, head: &str) -> TcpStream {
    let stream = stalled(gateway, head).await;
    let std = stream.into_std().expect("std stream");
    let writer = TcpStream::from_std(std.try_clone().expect("clone")).expect("writer");
    tokio::spawn(async move {
        let mut writer = writer;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b"x").await.is_err() {
                return;
            }
        }
    });
    TcpStream::from_std(std).expect("reader")
}

fn assert_408(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert!(answer.contains("content-type: application/json"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

const JSON_HEAD: &str = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\
    content-type: application/json\r\ncontent-length: 100\r\n\r\n";
const UPLOAD_HEAD: &str = "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\
    content-type: multipart/form-data; boundary=b\r\ncontent-length: 100\r\n\r\n";

#[tokio::test]
async fn a_body_that_stops_arriving_is_408_and_its_connection_closed() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&server("body_read_timeout = \"300ms\"", &upstream.base_url())).await;

    for head in [JSON_HEAD, UPLOAD_HEAD] {
        let mut stream = stalled(&gateway, &format!("{head}--b\r\n")).await;
        let started = tokio::time::Instant::now();
        let answer = read_until_closed(&mut stream).await;

        assert_408(&answer);
        assert!(answer.contains("body_read_timeout"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(250), "cut before body_read_timeout");
    }
}

#[tokio::test]
async fn a_body_still_arriving_at_the_request_deadline_is_408() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&server("request_timeout = \"600ms\"", &upstream.base_url())).await;

    // A byte every 100 ms: never a gap as long as body_read_timeout (60 s).
    for head in [JSON_HEAD, UPLOAD_HEAD] {
        let started = tokio::time::Instant::now();
        let mut stream = trickling(&gateway, head).await;
        let answer = read_until_closed(&mut stream).await;

        assert_408(&answer);
        assert!(answer.contains("request_timeout)"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(550), "cut before request_timeout");
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&server("header_read_timeout = \"300ms\"", &upstream.base_url())).await;

    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(gateway.addr).await.expect("connect");
    read_until_closed(&mut silent).await;
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before header_read_timeout");

    // h2c: a preface and settings, but no request.
    let started = tokio::time::Instant::now();
    let (_sender, closed) = h2_connection(gateway.addr).await;
    tokio::time::timeout(Duration::from_secs(10), closed).await.expect("h2c closed").expect("task");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before header_read_timeout");
}

#[tokio::test]
async fn ambiguous_lengths_and_host_headers_are_400() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&server("", &upstream.base_url())).await;
    let chat = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\
        content-type: application/json\r\n";
    let models = "GET /v1/models HTTP/1.1\r\nauthorization: Bearer sk-caller\r\nconnection: close\r\n";

    // No `connection: close` on these: the gateway closes by itself.
    let both = format!("{chat}content-length: 40\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n");
    let both_reversed = format!("{chat}transfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\n");
    let no_host = format!("{models}\r\n");
    let two_hosts = format!("{models}host: a\r\nhost: b\r\n\r\n");
    for request in [&both, &both_reversed, &no_host, &two_hosts] {
        let answer = exchange(gateway.addr, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request}\n=> {answer}");
        assert!(answer.contains(r#""code":"invalid_request""#), "{answer}");
    }
    assert_eq!(upstream.calls(), 0);

    // Behind a good request on the same connection, and after a chunked body that
    // looks like a head with both headers.
    let good = "GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\r\n";
    let fake = "GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    let upload = format!(
        "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\n\
        content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n\
        {:x}\r\n{fake}\r\n0\r\n\r\n",
        fake.len()
    );
    let answer = exchange(gateway.addr, &format!("{good}{upload}{both}")).await;
    let statuses: Vec<&str> =
        answer.match_indices("HTTP/1.1 ").map(|(at, _)| &answer[at + 9..at + 12]).collect();
    assert_eq!(statuses, ["200", "404", "400"], "{answer}");
    assert_eq!(upstream.calls(), 2);

    // HTTP/1.0 needs no host.
    let old =
        exchange(gateway.addr, "GET /v1/models HTTP/1.0\r\nauthorization: Bearer sk-caller\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200"), "{old}");
}
