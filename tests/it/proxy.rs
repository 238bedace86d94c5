//! Relaying: bodies, paths, headers, credentials, request ids, routing, pooling.

use serde_json::{Value, json};

use crate::support::{
    gateway::{TestGateway, config_for, http},
    raw::RawUpstream,
    upstream::{MockUpstream, Reply},
};

#[tokio::test]
async fn request_bodies_reach_the_upstream_byte_identical() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    // Odd spacing, key order and escapes must survive untouched.
    let body = "{ \"model\" :\"gpt-4o-mini\",\n\t\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9llo\"}] ,\"temperature\":0.70 }";

    let response = gateway.post_raw("/v1/chat/completions", body).await;

    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json answer");
    assert_eq!(answer["object"], "chat.completion");
    let seen = upstream.last_request();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.uri, "/v1/chat/completions");
    assert_eq!(seen.method, "POST");
}

#[tokio::test]
async fn paths_go_under_the_base_url_with_their_query() {
    let upstream = MockUpstream::new().reply(Reply::echo()).start().await;
    let base = format!("http://{}/openai/deployments/chat/", upstream.addr());
    let gateway = TestGateway::start(&config_for(&base, "")).await;

    let response = http()
        .get(gateway.url("/v1/files/file-1/content?api-version=2024-10-21&limit=2"))
        .bearer_auth("sk-caller")
        .send()
        .await
        .expect("gateway answers");

    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last_request().uri,
        "/openai/deployments/chat/files/file-1/content?api-version=2024-10-21&limit=2"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_end_to_end_ones_kept() {
    let upstream = MockUpstream::new()
        .reply(Reply::openai().header("x-upstream-custom", "kept").header("keep-alive", "timeout=5"))
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "trailers")
        .header("openai-organization", "org-42")
        .header("x-custom", "yes")
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .expect("gateway answers");

    assert_eq!(response.headers()["x-upstream-custom"], "kept");
    assert!(response.headers().get("keep-alive").is_none());
    let seen = upstream.last_request();
    for dropped in ["x-drop-me", "proxy-authorization", "te", "connection"] {
        assert!(seen.header(dropped).is_none(), "{dropped} reached the upstream");
    }
    assert_eq!(seen.header("openai-organization"), Some("org-42"));
    assert_eq!(seen.header("x-custom"), Some("yes"));
    assert_eq!(seen.header("host"), Some(upstream.addr().to_string().as_str()));
}

#[tokio::test]
async fn passthrough_forwards_the_callers_key_unless_the_upstream_has_its_own() {
    let own = MockUpstream::new().start().await;
    let keyed = MockUpstream::new().start().await;
    let config = format!(
        r#"
[server]
admin_listen = ""

[[upstreams]]
name = "own"
base_url = "{}"
models = ["gpt-*"]

[[upstreams]]
name = "keyed"
base_url = "{}"
api_key = "sk-upstream"
models = ["llama-*"]
"#,
        own.base_url(),
        keyed.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    for model in ["gpt-4o", "llama-3"] {
        let response = gateway.chat(model, false).await;
        assert_eq!(response.status(), 200, "{model}");
    }

    assert_eq!(own.last_request().header("authorization"), Some("Bearer sk-caller"));
    assert_eq!(keyed.last_request().header("authorization"), Some("Bearer sk-upstream"));
}

#[tokio::test]
async fn keys_mode_never_forwards_the_gateway_key() {
    let keyed = MockUpstream::new().start().await;
    let keyless = MockUpstream::new().start().await;
    let config = format!(
        r#"
[server]
admin_listen = ""

[auth]
mode = "keys"

[[keys]]
id = "team-a"
key = "gw-team-a"

[[upstreams]]
name = "keyed"
base_url = "{}"
api_key = "sk-upstream"
models = ["gpt-*"]

[[upstreams]]
name = "vllm"
base_url = "{}"
models = ["meta-llama/*"]
"#,
        keyed.base_url(),
        keyless.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    for model in ["gpt-4o", "meta-llama/Llama-3.1-8B"] {
        let response = http()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("gw-team-a")
            .header("api-key", "gw-team-a")
            .json(&json!({"model": model, "messages": []}))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(response.status(), 200, "{model}");
    }

    assert_eq!(keyed.last_request().header("authorization"), Some("Bearer sk-upstream"));
    assert!(keyed.last_request().header("api-key").is_none());
    let to_vllm = keyless.last_request();
    assert!(to_vllm.header("authorization").is_none(), "gateway key leaked upstream");
    assert!(to_vllm.header("api-key").is_none(), "gateway key leaked upstream");
}

#[tokio::test]
async fn request_ids_are_kept_or_made_and_sent_both_ways() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let ask = |id: Option<&'static str>| {
        let mut request = http()
            .post(gateway.url("/v1/embeddings"))
            .bearer_auth("sk-caller")
            .json(&json!({"model": "text-embedding-3-small", "input": "hi"}));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };

    let kept = ask(Some("trace-123")).await.expect("gateway answers");
    assert_eq!(kept.headers()["x-request-id"], "trace-123");
    assert_eq!(upstream.last_request().header("x-request-id"), Some("trace-123"));
    let upstream_id = kept.headers()["x-upstream-request-id"].to_str().expect("text");
    assert!(upstream_id.starts_with("upstream-"), "{upstream_id}");

    let made = ask(None).await.expect("gateway answers");
    let id = made.headers()["x-request-id"].to_str().expect("text").to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(upstream.last_request().header("x-request-id"), Some(id.as_str()));
}

#[tokio::test]
async fn server_timing_splits_gateway_and_upstream_time() {
    let upstream =
        MockUpstream::new().reply(Reply::openai().header("server-timing", "model;dur=12.5")).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", false).await;

    let timing = response.headers()["server-timing"].to_str().expect("text").to_owned();
    let entries: Vec<&str> = timing.split(", ").collect();
    assert_eq!(entries.len(), 3, "{timing}");
    assert!(entries[0].starts_with("spillway;dur="), "{timing}");
    assert!(entries[1].starts_with("upstream;dur="), "{timing}");
    assert_eq!(entries[2], "model;dur=12.5");

    let refused = http().post(gateway.url("/v1/chat/completions")).body("{}").send().await.expect("answer");
    let timing = refused.headers()["server-timing"].to_str().expect("text");
    assert!(timing.starts_with("spillway;dur=") && !timing.contains("upstream"), "{timing}");
}

#[tokio::test]
async fn models_route_by_glob_and_modelless_requests_go_to_the_first_upstream() {
    let first = MockUpstream::new().start().await;
    let second = MockUpstream::new().start().await;
    let config = format!(
        r#"
[server]
admin_listen = ""

[[upstreams]]
name = "openai"
base_url = "{}"
models = ["gpt-*", "text-embedding-*"]

[[upstreams]]
name = "local"
base_url = "{}"
models = ["meta-llama/*", "qwen*"]
"#,
        first.base_url(),
        second.base_url()
    );
    let gateway = TestGateway::start(&config).await;

    assert_eq!(gateway.chat("qwen2.5-7b", false).await.status(), 200);
    assert_eq!(gateway.chat("meta-llama/Llama-3.1-8B", false).await.status(), 200);
    assert_eq!(second.calls(), 2);
    assert_eq!(first.calls(), 0);

    let models = http().get(gateway.url("/v1/models")).bearer_auth("sk-caller").send().await.expect("answer");
    assert_eq!(models.status(), 200);
    assert_eq!(first.calls(), 1);
    assert_eq!(first.last_request().uri, "/v1/models");
}

#[tokio::test]
async fn non_json_bodies_stream_through_unparsed() {
    let upstream = MockUpstream::new().reply(Reply::echo()).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        binary.chunks(65_536).map(|c| Ok(c.to_vec())).collect();

    let response = http()
        .post(gateway.url("/v1/files"))
        .bearer_auth("sk-caller")
        .header("content-type", "multipart/form-data; boundary=xyz")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .expect("gateway answers");

    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last_request().body, binary);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    for _ in 0..5 {
        let response = http()
            .post(gateway.url("/v1/embeddings"))
            .bearer_auth("sk-caller")
            .json(&json!({"model": "text-embedding-3-small", "input": "hi"}))
            .send()
            .await
            .expect("gateway answers");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }

    assert_eq!(upstream.calls(), 5);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn clients_may_speak_h2_with_prior_knowledge() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");

    let response = client
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("sk-caller")
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .expect("gateway answers");

    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last_request().version, http::Version::HTTP_11);
}

#[tokio::test]
async fn upstream_errors_come_back_unchanged() {
    let upstream = MockUpstream::new()
        .reply(
            Reply::error(400, "invalid_request_error", "context_length_exceeded", "too long")
                .header("x-extra", "1"),
        )
        .start()
        .await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", false).await;

    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-extra"], "1");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

const UPSTREAM_KEY: &str = "sk-upstream-secret-0123456789";

#[tokio::test]
async fn an_upstream_key_echoed_in_an_error_body_is_masked() {
    let upstream = MockUpstream::new().reply(Reply::echo().status(401)).reply(Reply::echo()).start().await;
    let gateway =
        TestGateway::start(&config_for(&upstream.base_url(), &format!("api_key = \"{UPSTREAM_KEY}\""))).await;

    let failed = gateway.chat("gpt-4o", false).await;
    assert_eq!(failed.status(), 401);
    let body = failed.text().await.expect("the whole error body");
    assert!(!body.contains(UPSTREAM_KEY), "{body}");
    assert!(body.contains(r#""authorization":"Bearer [redacted]""#), "{body}");
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );

    // A success is relayed as it came.
    let echoed = gateway.chat("gpt-4o", false).await.text().await.expect("body");
    assert!(echoed.contains(UPSTREAM_KEY), "{echoed}");

    // A caller's own key, forwarded in passthrough mode, is the caller's to see.
    let keyless = MockUpstream::new().reply(Reply::echo().status(401)).start().await;
    let passthrough = TestGateway::start(&config_for(&keyless.base_url(), "")).await;
    let own = passthrough.chat("gpt-4o", false).await.text().await.expect("body");
    assert!(own.contains("Bearer sk-caller"), "{own}");
}

#[tokio::test]
async fn an_upstream_key_split_across_body_frames_is_masked() {
    let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len()).into_bytes();
    let (start, end) = UPSTREAM_KEY.split_at(10);
    let head =
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let first =
        [head.as_bytes(), &chunk(&format!(r#"{{"error":{{"message":"Incorrect API key provided: {start}"#))]
            .concat();
    let second = [chunk(&format!(r#"{end}. Again: {UPSTREAM_KEY}"}}}}"#)), b"0\r\n\r\n".to_vec()].concat();
    let upstream = RawUpstream::start(vec![first, second]).await;
    let gateway =
        TestGateway::start(&config_for(&upstream.base_url(), &format!("api_key = \"{UPSTREAM_KEY}\""))).await;

    let response = gateway.chat("gpt-4o", false).await;

    assert_eq!(response.status(), 401);
    assert_eq!(
        response.text().await.expect("the whole error body"),
        r#"{"error":{"message":"Incorrect API key provided: [redacted]. Again: [redacted]"}}"#
    );
}
