//! Tests of the mock upstream itself, driven by a plain hyper client.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::support::upstream::{COMPLETION_TOKENS, Gate, MockUpstream, PROMPT_TOKENS, Reply};

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send<C: Connect + Clone + Send + Sync + 'static>(
    client: &Client<C, Full<Bytes>>,
    method: Method,
    url: String,
    body: Value,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let body = if body.is_null() { Bytes::new() } else { body.to_string().into() };
    let request = Request::builder().method(method).uri(url);
    client.request(request.body(Full::new(body)).expect("request")).await
}

async fn post(url: String, body: Value) -> Response<Incoming> {
    send(&client(), Method::POST, url, body).await.expect("mock upstream answers")
}

async fn text(response: Response<Incoming>) -> String {
    let body = response.into_body().collect().await.expect("whole body").to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 body")
}

async fn json_body(response: Response<Incoming>) -> Value {
    serde_json::from_str(&text(response).await).expect("JSON body")
}

/// The JSON payloads of an SSE body, checking its framing and the closing `[DONE]`.
fn sse_events(body: &str) -> Vec<Value> {
    let frames: Vec<&str> =
        body.strip_suffix("\n\n").expect("frames end in a blank line").split("\n\n").collect();
    let (done, events) = frames.split_last().expect("at least one frame");
    assert_eq!(*done, "data: [DONE]");
    let event =
        |f: &&str| serde_json::from_str(f.strip_prefix("data: ").expect("data frame")).expect("JSON event");
    events.iter().map(event).collect()
}

fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

#[tokio::test]
async fn queue_pops_in_order_then_repeats_the_last_reply() {
    let up = MockUpstream::new()
        .reply(Reply::rate_limited(Duration::from_millis(1500)))
        .reply(Reply::json(200, json!({"n": 2})).header("x-extra", "yes"))
        .expect_calls(3)
        .start()
        .await;
    let url = format!("{}/chat/completions", up.base_url());

    let first = post(url.clone(), json!({"model": "m"})).await;
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.headers()["retry-after"], "2");
    assert_eq!(first.headers()["retry-after-ms"], "1500");
    assert_eq!(first.headers()["x-request-id"], "upstream-1");
    assert_eq!(json_body(first).await["error"]["code"], "rate_limit_exceeded");
    for n in 2..=3 {
        let again = post(url.clone(), json!({"model": "m"})).await;
        assert_eq!(again.headers()["x-extra"], "yes");
        assert_eq!(again.headers()["x-request-id"], format!("upstream-{n}"));
        assert_eq!(json_body(again).await, json!({"n": 2}));
    }
    assert_eq!(up.last_request().uri, "/v1/chat/completions");
    assert_eq!(up.last_request().json()["model"], "m");
}

#[tokio::test]
async fn unscripted_requests_get_openai_answers() {
    let up = MockUpstream::new().route("/v1/echo", Reply::echo()).start().await;
    let base = up.base_url();

    let chat =
        json_body(post(format!("{base}/chat/completions"), json!({"model": "gpt-x", "messages": []})).await)
            .await;
    assert_eq!((chat["object"].as_str(), chat["model"].as_str()), (Some("chat.completion"), Some("gpt-x")));
    assert_eq!(chat["choices"][0]["message"]["content"], "hello");
    assert_eq!(chat["usage"]["total_tokens"], PROMPT_TOKENS + COMPLETION_TOKENS);

    let streamed = json!({"model": "gpt-x", "stream": true, "stream_options": {"include_usage": true}});
    let response = post(format!("{base}/chat/completions"), streamed).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_events(&text(response).await);
    let content: String =
        events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "hello");
    assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[4]["choices"], json!([]));
    assert_eq!(events[4]["usage"]["completion_tokens"], COMPLETION_TOKENS);

    let embeddings =
        json_body(post(format!("{base}/embeddings"), json!({"model": "e", "input": ["a", "b"]})).await).await;
    assert_eq!(embeddings["data"].as_array().map(Vec::len), Some(2));

    let models = send(&client(), Method::GET, format!("{base}/models"), Value::Null).await.expect("models");
    assert_eq!(json_body(models).await["data"].as_array().map(Vec::len), Some(2));

    let echo = json_body(post(format!("{base}/echo?x=1"), json!({"a": 1})).await).await;
    assert_eq!(echo["uri"], "/v1/echo?x=1");
    assert_eq!(echo["headers"]["content-length"], "7");
    assert_eq!(echo["body"], r#"{"a":1}"#);
}

#[tokio::test]
async fn gated_stream_holds_its_tail_until_the_gate_opens() {
    let gate = Gate::new();
    let up = MockUpstream::new().reply(Reply::sse(["one", "two"]).gate_after(1, &gate)).start().await;

    let mut body = post(up.base_url(), Value::Null).await.into_body();
    let first = body.frame().await.expect("a frame").expect("data").into_data().expect("data frame");
    assert_eq!(first, "data: one\n\n");
    assert_eq!(up.open_streams(), 1);
    gate.open();
    let rest = body.collect().await.expect("the rest").to_bytes();
    assert_eq!(rest, "data: two\n\ndata: [DONE]\n\n");
    assert_eq!((up.open_streams(), up.stream_cancellations()), (0, 0));
}

#[tokio::test]
async fn client_leaving_a_stream_is_seen_as_a_cancellation() {
    let gate = Gate::new();
    let up = MockUpstream::new().reply(Reply::sse(["one", "two"]).gate_after(1, &gate)).start().await;

    let mut body = post(up.base_url(), Value::Null).await.into_body();
    body.frame().await.expect("a frame").expect("first chunk");
    drop(body);
    up.wait_for_stream_cancellation().await;
    assert_eq!(up.open_streams(), 0);
}

#[tokio::test]
async fn reset_closes_the_connection_without_an_answer() {
    let up = MockUpstream::new().reply(Reply::reset()).start().await;
    let h2c = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    for client in [client(), h2c] {
        let error = send(&client, Method::POST, up.base_url(), Value::Null).await.expect_err("no answer");
        assert_eq!(io_kind(&error), Some(io::ErrorKind::ConnectionReset), "{error:?}");
    }
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server_and_its_streams() {
    let gate = Gate::new();
    let up = MockUpstream::new().reply(Reply::sse(["one", "two"]).gate_after(1, &gate)).start().await;
    let url = up.base_url();
    let mut body = post(url.clone(), Value::Null).await.into_body();
    body.frame().await.expect("a frame").expect("first chunk");
    drop(up);
    assert!(body.collect().await.is_err(), "the stream was cut");
    let error = send(&client(), Method::GET, url, Value::Null).await.expect_err("no server");
    assert!(error.is_connect(), "{error:?}");
}

#[tokio::test]
async fn reset_after_cuts_a_stream_short() {
    let up = MockUpstream::new().reply(Reply::sse(["a", "b", "c"]).reset_after(2)).start().await;
    let mut body = post(up.base_url(), Value::Null).await.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().expect("data")),
            Some(Err(error)) => break error,
            None => panic!("the stream ended cleanly"),
        }
    };
    assert_eq!(received, b"data: a\n\ndata: b\n\n");
    assert_eq!(io_kind(&error), Some(io::ErrorKind::UnexpectedEof), "{error:?}");
    assert_eq!(up.stream_cancellations(), 0);
}

#[tokio::test(start_paused = true)]
async fn delay_holds_the_response_head() {
    let up = MockUpstream::new().reply(Reply::openai().delay(Duration::from_secs(60))).start().await;
    let request = post(format!("{}/models", up.base_url()), Value::Null);
    assert!(tokio::time::timeout(Duration::from_secs(30), request).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn every_paces_the_chunks() {
    let up = MockUpstream::new().reply(Reply::sse(["a", "b"]).every(Duration::from_secs(5))).start().await;
    let start = tokio::time::Instant::now();
    let body = text(post(up.base_url(), Value::Null).await).await;
    assert_eq!(body, "data: a\n\ndata: b\n\ndata: [DONE]\n\n");
    assert!(start.elapsed() >= Duration::from_secs(10), "two gaps of 5s");
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_and_h2c_works() {
    let up = MockUpstream::new().reply(Reply::echo()).start().await;
    let client = client();
    for _ in 0..3 {
        let response = send(&client, Method::GET, up.base_url(), Value::Null).await.expect("answer");
        assert_eq!(json_body(response).await["version"], "HTTP/1.1");
    }
    assert_eq!(up.connections(), 1);

    let h2c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    send(&h2c, Method::GET, up.base_url(), Value::Null).await.expect("h2c answer");
    assert_eq!(up.last_request().version, Version::HTTP_2);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn tls_is_trusted_through_the_generated_ca() {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let up = MockUpstream::new().tls().reply(Reply::echo()).start().await;
    assert!(up.base_url().starts_with("https://localhost:"));
    assert_eq!(std::fs::read_to_string(up.ca_file()).expect("CA file"), up.ca_pem());

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(up.ca_file()).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA accepted");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = Client::builder(TokioExecutor::new()).build(https);
    let echo =
        json_body(send(&client, Method::GET, up.base_url(), Value::Null).await.expect("https answer")).await;
    assert_eq!(echo["version"], "HTTP/2.0");
}
