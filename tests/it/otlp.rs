//! OTLP trace export (cargo feature `otlp`), on the real binary: a request's span
//! reaches the collector, in the caller's trace, and is flushed on SIGTERM.

use serde_json::json;

use crate::{
    cli::Running,
    support::upstream::{MockUpstream, Reply},
};

// Two threads: the mock collector answers while the test blocks waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_span_is_exported_in_the_callers_trace() {
    let upstream = MockUpstream::new().start().await;
    let collector = MockUpstream::new().route("/v1/traces", Reply::bytes(200, "")).start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let endpoint = format!("http://{}", collector.addr());
    let running = Running::serve_with(&config, |command| {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    });

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", running.addr()))
        .bearer_auth("sk-otlp-secret")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("body");
    assert_eq!(running.terminate(), 0);

    let exports = collector.requests();
    let export =
        exports.iter().find(|request| request.uri.path() == "/v1/traces").expect("spans were exported");
    assert_eq!(export.header("content-type"), Some("application/x-protobuf"));
    let contains = |needle: &[u8]| export.body.windows(needle.len()).any(|window| window == needle);
    assert!(contains(&hex::decode(trace_id).expect("hex")), "the span is not in the caller's trace");
    // The resource attribute as protobuf: KeyValue { key: "service.name", value:
    // AnyValue { string_value: "spillway" } }.
    assert!(contains(b"\x0a\x0cservice.name\x12\x0a\x0a\x08spillway"), "no service name: {:?}", export.body);
    assert!(contains(b"request"), "span name missing");
    assert!(!contains(b"sk-otlp-secret"), "a key was exported");
}

// Two threads: the silent collector keeps accepting while the test blocks on the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_does_not_hold_up_the_exit() {
    let upstream = MockUpstream::new().start().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let running = Running::serve_with(&config, |command| {
        command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    });
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", running.addr()))
        .bearer_auth("sk-otlp")
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);

    let started = tokio::time::Instant::now();
    assert_eq!(running.terminate(), 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(6), "exit took {:?}", started.elapsed());
}
