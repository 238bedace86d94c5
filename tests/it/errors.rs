//! Every error the gateway makes itself: status, OpenAI-shaped body, and no upstream
//! call where none should happen.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    gateway::{TestGateway, config_for, http},
    raw::RawUpstream,
    upstream::{MockUpstream, Reply},
};

/// Checks the OpenAI error shape and returns `(status, code, message)`.
async fn gateway_error(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.expect("error body is JSON");
    let error = &body["error"];
    assert!(error["type"].is_string() && error.get("param").is_some(), "{body}");
    let code = error["code"].as_str().expect("code").to_owned();
    let message = error["message"].as_str().expect("message").to_owned();
    (status, code, message)
}

const KEYS_MODE: &str = r#"
[auth]
mode = "keys"

[[keys]]
id = "search"
key = "gw-search"
models = ["gpt-4o*", "text-embedding-*"]

[[keys]]
id = "batch"
# spillway hash-key <<< gw-batch
key_hash = "sha256:89aa00f76c40e41c905f619a561656de42ebda25e4b23fc25edd0a4d8dfbbf5e"
"#;

#[tokio::test]
async fn invalid_json_is_400() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o\", ")
        .send()
        .await
        .expect("answer");

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (400, "invalid_json"));
    assert!(message.contains("line 1"), "{message}");
}

#[tokio::test]
async fn missing_and_unknown_keys_are_401() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let passthrough = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let keys = TestGateway::start(&config_for(&upstream.base_url(), KEYS_MODE)).await;
    let chat = json!({"model": "gpt-4o", "messages": []});

    let missing =
        http().post(passthrough.url("/v1/chat/completions")).json(&chat).send().await.expect("answer");
    assert_eq!(gateway_error(missing).await.0, 401);
    let missing = http().post(keys.url("/v1/chat/completions")).json(&chat).send().await.expect("answer");
    assert_eq!(gateway_error(missing).await.0, 401);

    let unknown = http()
        .post(keys.url("/v1/chat/completions"))
        .bearer_auth("sk-not-a-gateway-key")
        .json(&chat)
        .send()
        .await
        .expect("answer");
    let (status, code, message) = gateway_error(unknown).await;
    assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
    assert!(!message.contains("sk-not-a-gateway-key"), "the key was echoed: {message}");
}

#[tokio::test]
async fn keys_given_by_hash_are_accepted() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), KEYS_MODE)).await;

    let response = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("gw-batch")
        .json(&json!({"model": "o3", "messages": []}))
        .send()
        .await
        .expect("answer");

    assert_eq!(response.status(), 200);
    assert!(upstream.last_request().header("authorization").is_none());
}

#[tokio::test]
async fn models_outside_a_keys_globs_are_403() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), KEYS_MODE)).await;
    let chat = |model: &'static str| {
        http()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("gw-search")
            .json(&json!({"model": model, "messages": []}))
            .send()
    };

    let (status, code, message) = gateway_error(chat("o3").await.expect("answer")).await;
    assert_eq!((status, code.as_str()), (403, "model_not_allowed"));
    assert!(message.contains("search") && message.contains("o3"), "{message}");
    assert_eq!(upstream.calls(), 0);

    assert_eq!(chat("gpt-4o-mini").await.expect("answer").status(), 200);

    // Another content type does not sidestep the model list.
    let sidestep = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("gw-search")
        .header("content-type", "text/plain")
        .body(r#"{"model":"o3","messages":[]}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(sidestep.status(), 403);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn models_no_upstream_serves_are_404() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let config = config_for(&upstream.base_url(), "models = [\"gpt-*\"]");
    let gateway = TestGateway::start(&config).await;

    let response = gateway.chat("claude-3", false).await;

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (404, "model_not_found"));
    assert!(message.contains("claude-3"), "{message}");
}

#[tokio::test]
async fn a_json_content_type_without_a_body_is_fine_on_get_and_delete() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let models = http()
        .get(gateway.url("/v1/models"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/json")
        .send()
        .await
        .expect("answer");
    assert_eq!(models.status(), 200);
    let deleted = http()
        .delete(gateway.url("/v1/files/file-1"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/json")
        .send()
        .await
        .expect("answer");
    assert_ne!(deleted.status(), 400);
}

#[tokio::test]
async fn paths_outside_v1_are_404() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response =
        http().get(gateway.url("/v2/models")).bearer_auth("sk-caller").send().await.expect("answer");

    assert_eq!(gateway_error(response).await.0, 404);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_declared_or_streamed() {
    let upstream = MockUpstream::new().start().await;
    let config = format!(
        "[server]\nmax_request_body = \"1KiB\"\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;
    let big = format!("{{\"model\":\"gpt-4o\",\"input\":\"{}\"}}", "x".repeat(2048));

    let declared = http()
        .post(gateway.url("/v1/embeddings"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(gateway_error(declared).await.1, "request_too_large");

    // Chunked, no content-length: refused once the limit is passed while reading.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big[..1000].into()), Ok(big[1000..].into())];
    let chunked = http()
        .post(gateway.url("/v1/embeddings"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .expect("answer");
    assert_eq!(gateway_error(chunked).await.0, 413);

    // A streamed upload over the limit is cut off and answered 413 too.
    let upload: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(vec![7u8; 800]), Ok(vec![7u8; 800])];
    let streamed = http()
        .post(gateway.url("/v1/files"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(upload)))
        .send()
        .await
        .expect("answer");
    assert_eq!(gateway_error(streamed).await.0, 413);
    assert!(upstream.requests().iter().all(|request| request.body.len() <= 1024));
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let gateway = TestGateway::start(&config_for(&format!("http://{closed}/v1"), "")).await;

    let response = gateway.chat("gpt-4o", false).await;

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"));
    assert!(message.contains("upstream `mock` refused the connection"), "{message}");
}

#[tokio::test]
async fn an_upstream_reset_is_502() {
    let upstream = MockUpstream::new().reply(Reply::reset()).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", false).await;

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"));
    assert!(message.contains("closed or reset the connection before the response head"), "{message}");
}

#[tokio::test]
async fn a_slow_upstream_is_504_after_the_attempt_timeout() {
    let upstream = MockUpstream::new().reply(Reply::openai().delay(Duration::from_secs(30))).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "timeout = \"300ms\"")).await;

    let started = tokio::time::Instant::now();
    let response = gateway.chat("gpt-4o", false).await;

    let (status, code, _) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_request_deadline_is_504_too() {
    let upstream = MockUpstream::new().reply(Reply::openai().delay(Duration::from_secs(30))).start().await;
    let config = format!(
        "[server]\nrequest_timeout = \"300ms\"\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    let response = gateway.chat("gpt-4o", false).await;

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    assert!(message.contains("deadline"), "{message}");
}

#[tokio::test]
async fn a_connect_that_hangs_is_cut_by_connect_timeout() {
    // A listener that never accepts, with its tiny backlog already full: the kernel
    // drops further SYNs, so a connect hangs (all on loopback).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = socket.local_addr().expect("addr");
    let _listener = socket.listen(0).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(stream);
        }
    }
    let config = config_for(&format!("http://{addr}/v1"), "connect_timeout = \"200ms\"\ntimeout = \"20s\"");
    let gateway = TestGateway::start(&config).await;

    let started = tokio::time::Instant::now();
    let response = gateway.chat("gpt-4o", false).await;

    let (status, code, message) = gateway_error(response).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"), "{message}");
    assert!(message.contains("could not be connected to: connect timed out after 200ms"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// The 502's message for one chat completion through a gateway to `base_url`.
async fn bad_gateway(base_url: &str) -> String {
    let gateway = TestGateway::start(&config_for(base_url, "")).await;
    let (status, code, message) = gateway_error(gateway.chat("gpt-4o", false).await).await;
    assert_eq!((status, code.as_str()), (502, "upstream_error"), "{message}");
    message
}

#[tokio::test]
async fn a_502_says_what_went_wrong() {
    let garbage = RawUpstream::start(vec![b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()]).await;
    let message = bad_gateway(&garbage.base_url()).await;
    assert!(message.contains("sent a response that is not valid HTTP: invalid HTTP version"), "{message}");

    for pieces in [vec![], vec![b"HTTP/1.1 200 OK\r\ncontent-".to_vec()]] {
        let closing = RawUpstream::start(pieces).await;
        let message = bad_gateway(&closing.base_url()).await;
        assert!(message.contains("closed or reset the connection before the response head"), "{message}");
    }

    let plain = MockUpstream::new().expect_calls(0).start().await;
    let message = bad_gateway(&format!("https://{}/v1", plain.addr())).await;
    assert!(message.contains("failed the TLS handshake"), "{message}");

    let message = bad_gateway("http://spillway-test.invalid/v1").await;
    assert!(message.contains("`mock` could not be resolved (DNS)"), "{message}");
}

#[tokio::test]
async fn garbage_from_an_upstream_is_retried_as_before() {
    let garbage = RawUpstream::start(vec![b"garbage\r\n\r\n".to_vec()]).await;
    let retry = "[retry]\nmax_attempts = 2\nbase_delay = \"10ms\"\nmax_delay = \"10ms\"\n";
    let gateway = TestGateway::start(&config_for(&garbage.base_url(), retry)).await;

    let (status, _, _) = gateway_error(gateway.chat("gpt-4o", false).await).await;

    assert_eq!(status, 502);
    assert_eq!(garbage.connections(), 2, "one attempt and one retry");
}

#[tokio::test]
async fn connect_and_trace_are_405_without_reaching_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let credentials = "authorization: Bearer sk-caller\r\nconnection: close\r\n\r\n";
    for line in [
        "CONNECT api.openai.com:443 HTTP/1.1\r\nhost: api.openai.com:443",
        "CONNECT /v1/chat/completions HTTP/1.1\r\nhost: x",
        "TRACE /v1/models HTTP/1.1\r\nhost: x",
    ] {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.expect("connect");
        stream.write_all(format!("{line}\r\n{credentials}").as_bytes()).await.expect("send");
        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await;
        assert!(read.is_ok(), "{line}: the connection stayed open");

        assert!(answer.starts_with("HTTP/1.1 405"), "{line}: {answer}");
        assert!(answer.contains("allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"), "{answer}");
        assert!(answer.contains(r#""code":"method_not_allowed""#), "{answer}");
    }

    // And over HTTP/2 (reqwest speaks h2c with prior knowledge).
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    let trace = h2
        .request(reqwest::Method::TRACE, gateway.url("/v1/models"))
        .bearer_auth("sk-caller")
        .send()
        .await
        .expect("answer");
    assert_eq!(gateway_error(trace).await.1, "method_not_allowed");
}
