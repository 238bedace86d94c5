//! Upstream resilience: jittered retries that honour retry-after, failover, and the
//! limits of retrying (deadline, streams already under way).

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::support::{
    gateway::{TestGateway, config_for, http},
    upstream::{MockUpstream, Reply},
};

/// Short backoff so tests stay fast; the upstream's own retry-after still rules.
const RETRY: &str = "[retry]\nmax_attempts = 3\nbase_delay = \"10ms\"\nmax_delay = \"50ms\"\n";

#[tokio::test]
async fn a_429_is_retried_after_the_wait_the_upstream_asked_for() {
    let upstream = MockUpstream::new()
        .reply(Reply::rate_limited(Duration::from_millis(100)))
        .reply(Reply::rate_limited(Duration::from_millis(100)))
        .reply(Reply::openai())
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RETRY)).await;
    let body = r#"{"model":"gpt-4o",  "messages":[{"role":"user","content":"hi"}]}"#;

    let started = tokio::time::Instant::now();
    let response = gateway.post_raw("/v1/chat/completions", body).await;

    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|request| request.body == body.as_bytes()), "bodies differ between attempts");
}

#[tokio::test]
async fn a_503_then_200_is_a_200() {
    let upstream = MockUpstream::new().reply(Reply::server_error(503)).reply(Reply::openai()).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RETRY)).await;

    assert_eq!(gateway.chat("gpt-4o", false).await.status(), 200);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_persistent_500_comes_back_as_the_upstream_sent_it() {
    let upstream =
        MockUpstream::new().reply(Reply::server_error(500).header("x-upstream", "yes")).start().await;
    let retry = "[retry]\nmax_attempts = 2\nbase_delay = \"10ms\"\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), retry)).await;

    let response = gateway.chat("gpt-4o", false).await;

    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["x-upstream"], "yes");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_wait_past_the_deadline_returns_the_upstream_answer_at_once() {
    let upstream = MockUpstream::new().reply(Reply::rate_limited(Duration::from_secs(30))).start().await;
    let config = format!(
        "[server]\nadmin_listen = \"\"\nrequest_timeout = \"2s\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n\n{RETRY}[cache]\nenabled = false\n",
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    let started = tokio::time::Instant::now();
    let response = gateway.chat("gpt-4o", false).await;

    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after-ms"], "30000");
    assert!(started.elapsed() < Duration::from_secs(1), "slept: {:?}", started.elapsed());
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_refused_connection_fails_over_to_another_upstream() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let healthy = MockUpstream::new().start().await;
    let config = format!(
        r#"
[server]
admin_listen = ""

[[upstreams]]
name = "down"
base_url = "http://{closed}/v1"

[[upstreams]]
name = "up"
base_url = "{}"

{RETRY}
[cache]
enabled = false
"#,
        healthy.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    assert_eq!(gateway.chat("gpt-4o", false).await.status(), 200);
    assert_eq!(healthy.calls(), 1);
}

#[tokio::test]
async fn every_attempt_failing_gives_502_for_resets_and_504_for_timeouts() {
    let resetting = MockUpstream::new().reply(Reply::reset()).start().await;
    let gateway = TestGateway::start(&config_for(&resetting.base_url(), RETRY)).await;
    assert_eq!(gateway.chat("gpt-4o", false).await.status(), 502);
    assert_eq!(resetting.calls(), 3);

    let slow = MockUpstream::new().reply(Reply::openai().delay(Duration::from_secs(30))).start().await;
    let with_timeout = format!("timeout = \"100ms\"\n{RETRY}");
    let gateway = TestGateway::start(&config_for(&slow.base_url(), &with_timeout)).await;
    let response = gateway.chat("gpt-4o", false).await;
    assert_eq!(response.status(), 504);
    slow.wait_for_calls(3).await;
}

#[tokio::test]
async fn a_stream_that_fails_after_its_first_chunk_is_not_retried() {
    let upstream = MockUpstream::new().reply(Reply::openai().reset_after(1)).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RETRY)).await;

    let response = gateway.chat("gpt-4o", true).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut failed = false;
    while let Some(piece) = body.next().await {
        failed |= piece.is_err();
    }

    assert!(failed, "the client must see the cut");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn streamed_uploads_are_sent_once() {
    let upstream = MockUpstream::new().reply(Reply::server_error(503)).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RETRY)).await;

    let response = http()
        .post(gateway.url("/v1/files"))
        .bearer_auth("sk-caller")
        .header("content-type", "application/octet-stream")
        .body(vec![1u8; 1024])
        .send()
        .await
        .expect("answer");

    assert_eq!(response.status(), 503);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn the_retry_budget_refuses_retries_beyond_its_share() {
    let upstream =
        MockUpstream::new().reply(Reply::server_error(503).delay(Duration::from_millis(200))).start().await;
    // No share of in-flight requests may retry, except one at a time (`min_retries`).
    let retry = "[retry]\nmax_attempts = 3\nbase_delay = \"10ms\"\nmax_delay = \"20ms\"\nbudget_percent = 0\nmin_retries = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), retry)).await;

    let (first, second) = tokio::join!(gateway.chat("gpt-4o", false), gateway.chat("gpt-4o", false));

    assert_eq!((first.status().as_u16(), second.status().as_u16()), (503, 503));
    // One request used its three attempts; the other was refused a retry and answered
    // with its first attempt's 503 at once.
    assert_eq!(upstream.calls(), 4);
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_retry_loop() {
    // Each 503 asks for 300 ms: the second attempt could come only after the client left.
    let upstream = MockUpstream::new()
        .reply(Reply::server_error(503).retry_after(Duration::from_millis(300)))
        .start()
        .await;
    let retry = "[retry]\nmax_attempts = 10\nbase_delay = \"1ms\"\nmax_delay = \"1ms\"\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), retry)).await;

    let gone = tokio::time::timeout(Duration::from_millis(100), gateway.chat("gpt-4o", false)).await;
    assert!(gone.is_err(), "the client gave up first");
    upstream.wait_for_calls(1).await;

    // Left alone, the loop would make an attempt every 300 ms: watch for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(upstream.calls(), 1, "attempts went on after the client left");
}
