//! Per-key limits seen from the outside: 429s with OpenAI's headers that are true,
//! no upstream call when refused, token estimates settled against real usage, and
//! concurrency slots released however a response ends.
//!
//! Refill timing is tested with a paused clock in `limit::local`; here the rates are
//! high enough that waiting the advertised `retry-after-ms` is short.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{
    gateway::{TestGateway, config_for, http},
    upstream::{COMPLETION_TOKENS, Gate, MockUpstream, PROMPT_TOKENS, Reply},
};

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

fn number(response: &reqwest::Response, name: &str) -> i64 {
    header(response, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {:?}", header(response, name)))
}

async fn error_type(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json error");
    let kind = body["error"]["type"].as_str().unwrap_or_default().to_owned();
    let code = body["error"]["code"].as_str().unwrap_or_default().to_owned();
    (status, kind, code)
}

#[tokio::test]
async fn a_key_gets_its_burst_then_429_then_gets_in_after_retry_after() {
    let upstream = MockUpstream::new().start().await;
    // 60/min refills one request a second; a burst of 3 is the bucket's size.
    let limits = "[limits.default]\nrequests_per_minute = 60\nburst_requests = 3\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    for expected_remaining in [2, 1, 0] {
        let response = gateway.chat("gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        assert_eq!(number(&response, "x-ratelimit-limit-requests"), 60);
        assert_eq!(number(&response, "x-ratelimit-remaining-requests"), expected_remaining);
    }
    let refused = gateway.chat("gpt-4o", false).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(upstream.calls(), 3, "a refused request must not reach the upstream");
    let wait = Duration::from_millis(number(&refused, "retry-after-ms") as u64);
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(number(&refused, "x-ratelimit-remaining-requests"), 0);
    assert!(header(&refused, "x-ratelimit-reset-requests").ends_with('s'));
    assert_eq!(error_type(refused).await, (429, "requests".into(), "rate_limit_exceeded".into()));

    tokio::time::sleep(wait).await;
    assert_eq!(gateway.chat("gpt-4o", false).await.status(), 200);
}

#[tokio::test]
async fn keys_have_independent_buckets() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\nrequests_per_minute = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let chat = |key: &'static str| {
        http()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "gpt-4o", "messages": []}))
            .send()
    };

    assert_eq!(chat("sk-one").await.expect("answer").status(), 200);
    assert_eq!(chat("sk-one").await.expect("answer").status(), 429);
    assert_eq!(chat("sk-two").await.expect("answer").status(), 200);
    assert_eq!(chat("sk-two").await.expect("answer").status(), 429);
}

#[tokio::test]
async fn unlimited_callers_get_no_rate_limit_headers() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\ntokens_per_minute = 100000\n";
    let unlimited = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let tokens_only = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    let response = unlimited.chat("gpt-4o", false).await;
    assert!(response.headers().keys().all(|name| !name.as_str().starts_with("x-ratelimit")));

    let response = tokens_only.chat("gpt-4o", false).await;
    assert_eq!(number(&response, "x-ratelimit-limit-tokens"), 100_000);
    assert!(response.headers().get("x-ratelimit-limit-requests").is_none());
}

#[tokio::test]
async fn a_request_larger_than_the_token_bucket_is_refused_at_once() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let limits = "[limits.default]\ntokens_per_minute = 1000\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
    let response = gateway.post_json("/v1/chat/completions", &body).await;

    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some(), "every gateway 429 carries retry-after");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("never fit"), "{body}");
}

#[tokio::test]
async fn token_estimates_are_settled_against_the_real_usage() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\ntokens_per_minute = 6000\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = http();
    let chat = || {
        let body =
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000});
        client.post(gateway.url("/v1/chat/completions")).bearer_auth("sk-caller").json(&body).send()
    };

    // Admitted on its estimate (prompt + max_tokens): over 1000 tokens are reserved.
    let first = chat().await.expect("answer");
    let after_first = number(&first, "x-ratelimit-remaining-tokens");
    assert!(after_first <= 5000, "{after_first}");
    first.bytes().await.expect("body");

    // The answer used PROMPT + COMPLETION tokens; the rest came back before the next
    // request on the same connection was admitted.
    let second = chat().await.expect("answer");
    let after_second = number(&second, "x-ratelimit-remaining-tokens");
    let used = (PROMPT_TOKENS + COMPLETION_TOKENS) as i64;
    let reserved = 6000 - after_first;
    assert!(after_second >= 6000 - used - reserved, "{after_second}: the first estimate was not refunded");
    assert!(after_second < after_first, "{after_second}");
}

#[tokio::test]
async fn streams_are_settled_from_the_usage_chunk_the_client_never_sees() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\ntokens_per_minute = 6000\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    let response = gateway.chat("gpt-4o", true).await;
    let text = String::from_utf8_lossy(&response.bytes().await.expect("body")).into_owned();

    let sent = upstream.last_request().json();
    assert_eq!(sent["stream_options"]["include_usage"], true, "the gateway asks for usage");
    assert!(!text.contains("\"usage\":{"), "the usage chunk reached a client that did not ask:\n{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // A client that asked keeps its usage chunk, and its body is forwarded unchanged.
    let body =
        json!({"model": "gpt-4o", "messages": [], "stream": true, "stream_options": {"include_usage": true}});
    let asked = gateway.post_json("/v1/chat/completions", &body).await;
    let text = String::from_utf8_lossy(&asked.bytes().await.expect("body")).into_owned();
    assert!(text.contains("\"usage\":{"), "{text}");
    assert_eq!(upstream.last_request().json(), body);
}

#[tokio::test]
async fn concurrency_slots_are_released_when_a_stream_ends_or_its_client_leaves() {
    let gate = Gate::new();
    let upstream = MockUpstream::new().reply(Reply::openai().gate_after(1, &gate)).start().await;
    let limits = "[limits.default]\nmax_concurrent = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    // One open stream holds the only slot.
    let open = gateway.chat("gpt-4o", true).await;
    let mut body = open.bytes_stream();
    body.next().await.expect("a chunk").expect("no error");
    let refused = gateway.chat("gpt-4o", true).await;
    assert_eq!(error_type(refused).await, (429, "concurrency".into(), "rate_limit_exceeded".into()));

    // The client leaves: its slot comes back (released before the upstream side is
    // dropped, so once the upstream saw the cancellation the slot is free).
    drop(body);
    upstream.wait_for_stream_cancellation().await;
    let admitted = gateway.chat("gpt-4o", false).await;
    assert_eq!(admitted.status(), 200, "slot not released after the client left");
    admitted.bytes().await.expect("body");

    // A stream that ends normally gives its slot back too.
    gate.open();
    let finished = gateway.chat("gpt-4o", true).await;
    finished.bytes().await.expect("stream ends");
    assert_eq!(gateway.chat("gpt-4o", false).await.status(), 200);
}

#[tokio::test]
async fn an_upstream_error_refunds_tokens_and_releases_the_slot() {
    let upstream = MockUpstream::new().reply(Reply::server_error(500)).start().await;
    let limits = "[limits.default]\ntokens_per_minute = 6000\nmax_concurrent = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = http();
    let body = json!({"model": "gpt-4o", "messages": [], "max_tokens": 1000});
    let send =
        || client.post(gateway.url("/v1/chat/completions")).bearer_auth("sk-caller").json(&body).send();

    let failed = send().await.expect("answer");
    assert_eq!(failed.status(), 500);
    failed.bytes().await.expect("body");
    let again = send().await.expect("answer");
    assert_eq!(again.status(), 500, "the slot of the failed request was not released");
    // Nothing was spent by the first: only the second's estimate is taken.
    assert!(number(&again, "x-ratelimit-remaining-tokens") > 6000 - 1100 - 50);
}

/// An OpenAI client for `gateway`; `retries` keeps the SDK's own 429 backoff.
fn sdk(gateway: &TestGateway, retries: bool) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config =
        async_openai::config::OpenAIConfig::new().with_api_base(gateway.base_url()).with_api_key("sk-sdk");
    let client = async_openai::Client::with_config(config);
    match retries {
        true => client,
        false => {
            client.with_http_service(async_openai::middleware::ReqwestService::new(reqwest::Client::new()))
        }
    }
}

#[tokio::test]
async fn the_openai_sdk_sees_an_ordinary_429() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\nrequests_per_minute = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = sdk(&gateway, false);
    let request = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});

    let first: Result<Value, _> = client.chat().create_byot(request.clone()).await;
    assert!(first.is_ok(), "{first:?}");
    let second: Result<Value, _> = client.chat().create_byot(request).await;

    match second {
        Err(async_openai::error::OpenAIError::ApiError(api)) => {
            assert_eq!(api.status_code, 429);
            assert_eq!(api.api_error.code.as_deref(), Some("rate_limit_exceeded"));
            assert_eq!(api.api_error.r#type.as_deref(), Some("requests"));
        }
        other => panic!("expected a 429 API error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_openai_sdks_own_backoff_gets_in_after_retry_after() {
    let upstream = MockUpstream::new().start().await;
    // One request per 100 ms: the second call is refused with `retry-after: 1`, which
    // the SDK honours before trying again.
    let limits = "[limits.default]\nrequests_per_minute = 600\nburst_requests = 1\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = sdk(&gateway, true);
    let request = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});

    for _ in 0..2 {
        let answer: Result<Value, _> = client.chat().create_byot(request.clone()).await;
        assert!(answer.is_ok(), "{answer:?}");
    }
    assert_eq!(upstream.calls(), 2, "refused attempts must not reach the upstream");
}

#[tokio::test]
async fn a_stream_is_charged_its_real_usage_when_it_ends() {
    let upstream = MockUpstream::new().start().await;
    // One token a second: refill cannot blur the arithmetic below.
    let limits = "[limits.default]\ntokens_per_minute = 60\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = http();
    let send = |stream: bool| {
        let body = json!({"model": "gpt-4o", "messages": [], "stream": stream});
        client.post(gateway.url("/v1/chat/completions")).bearer_auth("sk-caller").json(&body).send()
    };

    // Admitted on its estimate: 3 tokens (reply priming), no completion allowance.
    let stream = send(true).await.expect("answer");
    assert_eq!(number(&stream, "x-ratelimit-remaining-tokens"), 57);
    stream.bytes().await.expect("stream ends");

    // Settled to the usage chunk's total, 11: 8 more than estimated.
    let next = send(false).await.expect("answer");
    let remaining = number(&next, "x-ratelimit-remaining-tokens");
    let used = (PROMPT_TOKENS + COMPLETION_TOKENS) as i64;
    assert!((60 - used - 3..=60 - used - 3 + 2).contains(&remaining), "{remaining}");
}

#[tokio::test]
async fn a_stripped_stream_with_a_declared_length_still_ends_cleanly() {
    // An upstream that writes its whole stream at once, with a content-length.
    let usage = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}});
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]});
    let text = format!("data: {chunk}\n\ndata: {usage}\n\ndata: [DONE]\n\n");
    let upstream = MockUpstream::new()
        .reply(Reply::bytes(200, text).header("content-type", "text/event-stream"))
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", true).await;
    let body = response.bytes().await.expect("the stream ends cleanly");
    let body = String::from_utf8_lossy(&body);

    assert!(!body.contains("\"usage\":{"), "{body}");
    assert!(body.contains("\"content\":\"hi\"") && body.ends_with("data: [DONE]\n\n"), "{body}");
}

#[tokio::test]
async fn an_absurd_usage_from_the_upstream_is_charged_without_overflowing() {
    let usage = json!({"prompt_tokens": u64::MAX, "completion_tokens": u64::MAX, "total_tokens": u64::MAX});
    let answer = json!({"id": "x", "object": "chat.completion", "choices": [], "usage": usage});
    let upstream = MockUpstream::new().reply(Reply::json(200, answer)).start().await;
    let limits = "[limits.default]\ntokens_per_minute = 6000\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;

    let first = gateway.chat("gpt-4o", false).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("the whole answer arrives");

    // The key owes more than it will ever refill: refused, and the gateway still serves.
    let (status, kind, _) = error_type(gateway.chat("gpt-4o", false).await).await;
    assert_eq!((status, kind.as_str()), (429, "tokens"));
}
