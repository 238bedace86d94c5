//! The response cache from the outside: hits, keys, scopes, controls, streams,
//! coalescing, what is never stored, and the memory bound on responses being
//! recorded.

use std::time::Duration;

use futures_util::{StreamExt, future::join_all};
use serde_json::{Value, json};

use crate::support::{
    gateway::{TestGateway, config_for, http},
    upstream::{Gate, MockUpstream, Reply},
};

const CHAT: &str = "/v1/chat/completions";

/// The cache as configured by default, on.
const CACHE_ON: &str = "[cache]\nenabled = true\n";

fn chat_body() -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0})
}

async fn send(gateway: &TestGateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> (String, String) {
    let mut request = http().post(gateway.url(CHAT)).bearer_auth(key).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("gateway answers");
    assert_eq!(response.status(), 200);
    let cache = response.headers().get("x-spillway-cache").map(|v| v.to_str().unwrap_or_default().to_owned());
    let text = response.text().await.expect("body");
    (cache.unwrap_or_default(), text)
}

#[tokio::test]
async fn a_repeated_request_is_a_hit_and_the_upstream_is_called_once() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    let (first, miss_body) = send(&gateway, "sk-a", &chat_body(), &[]).await;
    let (second, hit_body) = send(&gateway, "sk-a", &chat_body(), &[]).await;

    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(hit_body, miss_body);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_matter() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let spaced = "{ \"temperature\" : 0.0 ,\n \"messages\": [ {\"content\":\"hi\", \"role\":\"user\"} ], \"model\":\"gpt-4o\" }";

    send(&gateway, "sk-a", &chat_body(), &[]).await;
    let response = http()
        .post(gateway.url(CHAT))
        .bearer_auth("sk-a")
        .header("content-type", "application/json")
        .body(spaced)
        .send()
        .await
        .expect("answer");

    assert_eq!(response.headers()["x-spillway-cache"], "hit");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn key_scope_never_serves_one_key_anothers_answer_and_global_shares() {
    let upstream = MockUpstream::new().start().await;
    let per_key = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let global = TestGateway::start(&config_for(&upstream.base_url(), "[cache]\nscope = \"global\"\n")).await;

    send(&per_key, "sk-a", &chat_body(), &[]).await;
    assert_eq!(send(&per_key, "sk-b", &chat_body(), &[]).await.0, "miss");
    assert_eq!(send(&per_key, "sk-a", &chat_body(), &[]).await.0, "hit");

    send(&global, "sk-a", &chat_body(), &[]).await;
    assert_eq!(send(&global, "sk-b", &chat_body(), &[]).await.0, "hit");
}

#[tokio::test]
async fn no_store_bypasses_and_no_cache_refreshes() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[("cache-control", "no-store")]).await.0, "bypass");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss", "no-store wrote an entry");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[("cache-control", "no-store")]).await.0, "bypass");

    let (status, refreshed) = send(&gateway, "sk-a", &chat_body(), &[("cache-control", "no-cache")]).await;
    assert_eq!(status, "miss");
    assert_eq!(upstream.calls(), 4);
    let (status, body) = send(&gateway, "sk-a", &chat_body(), &[]).await;
    assert_eq!((status.as_str(), body), ("hit", refreshed), "no-cache did not refresh the entry");
}

#[tokio::test]
async fn a_per_request_ttl_expires_the_entry() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    send(&gateway, "sk-a", &chat_body(), &[("x-spillway-cache-ttl", "1")]).await;
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "hit");
    // The entry lives one second; a real wait is the only way to see moka's clock move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss");
}

#[tokio::test]
async fn streams_are_replayed_byte_for_byte_and_never_share_with_non_streams() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let mut streamed = chat_body();
    streamed["stream"] = json!(true);

    let (first, live) = send(&gateway, "sk-a", &streamed, &[]).await;
    let (second, replayed) = send(&gateway, "sk-a", &streamed, &[]).await;
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(replayed, live);
    assert!(replayed.ends_with("data: [DONE]\n\n") && !replayed.contains("\"usage\":{"), "{replayed}");

    // A client that asks for usage gets the recorded usage chunk on a hit.
    let mut with_usage = streamed.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let (status, text) = send(&gateway, "sk-a", &with_usage, &[]).await;
    assert_eq!(status, "hit");
    assert!(text.contains("\"usage\":{"), "{text}");

    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn cut_streams_and_errors_are_not_stored() {
    let upstream = MockUpstream::new()
        .reply(Reply::openai().reset_after(2))
        .reply(Reply::server_error(500))
        .reply(Reply::openai())
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let mut streamed = chat_body();
    streamed["stream"] = json!(true);

    let cut =
        http().post(gateway.url(CHAT)).bearer_auth("sk-a").json(&streamed).send().await.expect("answer");
    let mut body = cut.bytes_stream();
    while let Some(Ok(_)) = body.next().await {}
    let failed =
        http().post(gateway.url(CHAT)).bearer_auth("sk-a").json(&chat_body()).send().await.expect("answer");
    assert_eq!(failed.status(), 500);
    failed.bytes().await.expect("body");

    assert_eq!(send(&gateway, "sk-a", &streamed, &[]).await.0, "miss", "a cut stream was stored");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss", "a 500 was stored");
}

#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    // Long enough for all ten to arrive while the first is still waiting.
    let upstream =
        MockUpstream::new().reply(Reply::openai().delay(Duration::from_millis(1000))).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    let body = chat_body();
    let answers = join_all((0..10).map(|_| send(&gateway, "sk-a", &body, &[]))).await;

    assert_eq!(upstream.calls(), 1);
    assert_eq!(answers.iter().filter(|(status, _)| status == "miss").count(), 1);
    assert!(answers.iter().all(|(_, body)| body == &answers[0].1));
}

#[tokio::test]
async fn a_failed_leader_does_not_poison_its_waiters() {
    let upstream = MockUpstream::new()
        .reply(Reply::server_error(503).delay(Duration::from_millis(1000)))
        .reply(Reply::openai())
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let ask = || async {
        let response = http().post(gateway.url(CHAT)).bearer_auth("sk-a").json(&chat_body()).send().await;
        response.expect("answer").status().as_u16()
    };

    let statuses = join_all((0..5).map(|_| ask())).await;

    assert_eq!(statuses.iter().filter(|status| **status == 503).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|status| **status == 200).count(), 4, "{statuses:?}");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "hit");
}

#[tokio::test]
async fn hits_count_as_requests_but_cost_no_tokens() {
    let upstream = MockUpstream::new().start().await;
    let limits = "[limits.default]\nrequests_per_minute = 3\ntokens_per_minute = 60\n[cache]\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), limits)).await;
    let client = http();
    let ask = || client.post(gateway.url(CHAT)).bearer_auth("sk-a").json(&chat_body()).send();
    let tokens = |response: &reqwest::Response| -> i64 {
        response.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap_or_default().parse().unwrap_or(-1)
    };

    let miss = ask().await.expect("answer");
    miss.bytes().await.expect("body");
    let hit = ask().await.expect("answer");
    assert_eq!(hit.headers()["x-spillway-cache"], "hit");
    let after_hit_admission = tokens(&hit);
    hit.bytes().await.expect("body");
    let third = ask().await.expect("answer");
    // The hit's estimate was given back in full: the third request sees the same
    // balance the hit saw before its own estimate was taken (refill may add a token).
    assert!((after_hit_admission..=after_hit_admission + 2).contains(&tokens(&third)), "{}", tokens(&third));
    third.bytes().await.expect("body");

    assert_eq!(ask().await.expect("answer").status(), 429, "hits must count against requests_per_minute");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_disabled_cache_bypasses_everything() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "[cache]\nenabled = false\n")).await;

    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "bypass");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "bypass");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_per_request_ttl_as_large_as_u64_is_served_and_stored() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    let huge = u64::MAX.to_string();
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[("x-spillway-cache-ttl", &huge)]).await.0, "miss");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "hit");
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test]
async fn a_client_ttl_never_outlives_the_configured_one() {
    let upstream = MockUpstream::new().start().await;
    let gateway =
        TestGateway::start(&config_for(&upstream.base_url(), "[cache]\nenabled = true\nttl = \"1s\"\n"))
            .await;

    let century = (100 * 365 * 24 * 3600_u64).to_string();
    send(&gateway, "sk-a", &chat_body(), &[("x-spillway-cache-ttl", &century)]).await;
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "hit");
    // Capped at `cache.ttl`, one second; a real wait is the only way to see moka's clock move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_200_that_is_not_json_is_relayed_but_never_stored() {
    let truncated = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"message":"#;
    let upstream = MockUpstream::new()
        .reply(Reply::bytes(200, truncated).header("content-type", "application/json"))
        .reply(
            Reply::bytes(200, "<html>upstream proxy says hello</html>").header("content-type", "text/html"),
        )
        .reply(Reply::openai())
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;

    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await, ("miss".to_owned(), truncated.to_owned()));
    let (status, html) = send(&gateway, "sk-a", &chat_body(), &[]).await;
    assert_eq!((status.as_str(), html.as_str()), ("miss", "<html>upstream proxy says hello</html>"));
    // The third is a real answer: stored, as ever.
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss");
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "hit");
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test]
async fn a_stream_with_data_that_does_not_parse_is_relayed_but_never_stored() {
    let events = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\n\n",
        "data: [DONE]\n\n",
    ];
    let upstream = MockUpstream::new().reply(Reply::sse_raw(events)).reply(Reply::openai()).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), CACHE_ON)).await;
    let mut streamed = chat_body();
    streamed["stream"] = json!(true);

    assert_eq!(send(&gateway, "sk-a", &streamed, &[]).await, ("miss".to_owned(), events.concat()));
    assert_eq!(send(&gateway, "sk-a", &streamed, &[]).await.0, "miss", "the broken stream was stored");
    assert_eq!(send(&gateway, "sk-a", &streamed, &[]).await.0, "hit");
    assert_eq!(upstream.calls(), 2);
}

/// 64 KiB in all: responses being recorded share a quarter of it (16 KiB), and no
/// entry may take more than an eighth (8 KiB).
const SMALL_CACHE: &str = "[cache]\nenabled = true\nmax_size = \"64KiB\"\n";

/// A chat stream of one chunk of `text`, then `[DONE]` once `gate` opens.
fn held_stream(text: &str, gate: &Gate) -> (Reply, String) {
    let chunk = json!({"id": "c", "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    let events = [format!("data: {chunk}\n\n"), "data: [DONE]\n\n".to_owned()];
    let whole = events.concat();
    (Reply::sse_raw(events).gate_after(1, gate), whole)
}

fn streamed_question(n: usize) -> Value {
    json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": format!("question {n}")}]})
}

#[tokio::test]
async fn recordings_beyond_their_share_of_max_size_are_dropped_at_once_and_still_answered() {
    // Each stream is 7 KB: two fit in the 16 KiB the recordings share, three do not.
    let gate = Gate::new();
    let (reply, whole) = held_stream(&"x".repeat(7000), &gate);
    let upstream = MockUpstream::new().reply(reply).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), SMALL_CACHE)).await;

    // One after the other: each has its first chunk recorded (and relayed) before the
    // next starts, so the first two take the budget.
    let mut open = Vec::new();
    for n in 0..3 {
        let response =
            http().post(gateway.url(CHAT)).bearer_auth("sk-a").json(&streamed_question(n)).send().await;
        let response = response.expect("gateway answers");
        assert_eq!(response.headers()["x-spillway-cache"], "miss");
        let mut body = response.bytes_stream();
        let mut received = Vec::new();
        while !received.ends_with(b"\n\n") {
            received.extend_from_slice(&body.next().await.expect("a first chunk").expect("bytes"));
        }
        open.push((received, body));
    }
    // The third recording was dropped at once, so it is no flight to wait for: the
    // same request goes upstream on its own while the three streams are still held.
    let repeat = tokio::spawn({
        let url = gateway.url(CHAT);
        async move { http().post(url).bearer_auth("sk-a").json(&streamed_question(2)).send().await }
    });
    upstream.wait_for_calls(4).await;
    gate.open();

    for (mut received, mut body) in open {
        while let Some(bytes) = body.next().await {
            received.extend_from_slice(&bytes.expect("bytes"));
        }
        assert_eq!(String::from_utf8(received).expect("text"), whole, "a client lost part of its answer");
    }
    let repeat = repeat.await.expect("task").expect("gateway answers");
    assert_eq!(repeat.headers()["x-spillway-cache"], "miss");
    assert_eq!(repeat.text().await.expect("body"), whole);

    for (n, expected) in [(0, "hit"), (1, "hit"), (2, "miss")] {
        let (status, text) = send(&gateway, "sk-a", &streamed_question(n), &[]).await;
        assert_eq!((status.as_str(), text == whole), (expected, true), "question {n}");
    }
    assert_eq!(upstream.calls(), 5);
}

#[tokio::test]
async fn an_answer_larger_than_an_entry_may_be_is_relayed_whole_but_not_stored() {
    let large = json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0,
        "message": {"role": "assistant", "content": "y".repeat(9000)}, "finish_reason": "stop"}]});
    let upstream = MockUpstream::new().reply(Reply::json(200, large.clone())).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), SMALL_CACHE)).await;

    let (status, text) = send(&gateway, "sk-a", &chat_body(), &[]).await;
    assert_eq!(status, "miss");
    assert_eq!(serde_json::from_str::<Value>(&text).expect("JSON"), large);
    assert_eq!(send(&gateway, "sk-a", &chat_body(), &[]).await.0, "miss");
    assert_eq!(upstream.calls(), 2);
}
