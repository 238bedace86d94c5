//! Server-sent events: relayed as they arrive, and cancelled upstream when the client
//! goes away.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::support::{
    gateway::{TestGateway, config_for},
    upstream::{Gate, MockUpstream, Reply},
};

fn chunk(text: &str) -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    })
}

#[tokio::test]
async fn the_first_chunk_arrives_before_the_upstream_sends_the_last() {
    let gate = Gate::new();
    let upstream =
        MockUpstream::new().reply(Reply::sse([chunk("Hel"), chunk("lo")]).gate_after(1, &gate)).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", true).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();

    // The upstream holds everything after its first chunk until the gate opens: a
    // gateway that buffered would never hand this chunk over.
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("first chunk relayed before the upstream finished")
        .expect("a chunk")
        .expect("no error");
    assert!(String::from_utf8_lossy(&first).contains("Hel"));

    gate.open();
    let mut rest = Vec::new();
    while let Some(piece) = body.next().await {
        rest.extend_from_slice(&piece.expect("no error"));
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("lo") && rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream() {
    let gate = Gate::new();
    let upstream = MockUpstream::new()
        .reply(Reply::sse([chunk("a"), chunk("b"), chunk("c")]).gate_after(1, &gate))
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", true).await;
    let mut body = response.bytes_stream();
    body.next().await.expect("a chunk").expect("no error");
    assert_eq!(upstream.open_streams(), 1);

    drop(body);
    upstream.wait_for_stream_cancellation().await;
    assert_eq!(upstream.open_streams(), 0);
    assert_eq!(upstream.stream_cancellations(), 1);
}

#[tokio::test]
async fn an_upstream_reset_mid_stream_cuts_the_client_stream() {
    let upstream = MockUpstream::new()
        .reply(Reply::sse([chunk("a"), chunk("b"), chunk("c")]).reset_after(1))
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", true).await;
    assert_eq!(response.status(), 200);

    // The client must see an error, not a clean end: a truncated stream is not a
    // complete answer.
    let mut body = response.bytes_stream();
    let mut failed = false;
    while let Some(piece) = body.next().await {
        if piece.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a reset upstream stream ended cleanly at the client");
}

#[tokio::test]
async fn a_stream_stops_at_the_request_deadline() {
    let upstream = MockUpstream::new()
        .reply(Reply::sse((0..100).map(|i| chunk(&i.to_string()))).every(Duration::from_millis(100)))
        .start()
        .await;
    let config = format!(
        "[server]\nrequest_timeout = \"500ms\"\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    let response = gateway.chat("gpt-4o", true).await;
    let mut body = response.bytes_stream();
    let mut ended_with_error = false;
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("bounded")
    {
        if piece.is_err() {
            ended_with_error = true;
            break;
        }
    }
    assert!(ended_with_error, "the stream outlived the request deadline");
    upstream.wait_for_stream_cancellation().await;
}

#[tokio::test]
async fn shutdown_lets_an_open_stream_finish() {
    let gate = Gate::new();
    let upstream = MockUpstream::new()
        .reply(Reply::sse([chunk("still"), chunk(" here")]).gate_after(1, &gate))
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let addr = gateway.addr;
    let response = gateway.chat("gpt-4o", true).await;
    let mut body = response.bytes_stream();
    body.next().await.expect("a chunk").expect("no error");

    let draining = tokio::spawn(gateway.stop());
    // The listener closes at once; the open stream is left to finish.
    let refused = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused).await.expect("listener closed");
    assert!(!draining.is_finished());

    gate.open();
    let mut rest = Vec::new();
    while let Some(piece) = body.next().await {
        rest.extend_from_slice(&piece.expect("the stream finishes cleanly"));
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(10), draining).await.expect("drain ends").expect("clean stop");
}
