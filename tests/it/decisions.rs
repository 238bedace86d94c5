//! A caller cannot sidestep a decision by spelling a request differently: every
//! decision (route, model allowlist, estimate) is made on the path and body the
//! upstream acts on, and the upstream gets exactly that path.

use serde_json::{Value, json};

use crate::support::{
    gateway::{TestGateway, config_for, exchange, http},
    upstream::{MockHandle, MockUpstream},
};

const RESTRICTED_KEY: &str = r#"
[auth]
mode = "keys"

[[keys]]
id = "search"
key = "gw-search"
models = ["gpt-4o*"]
"#;

/// Sends one HTTP/1.1 request as written (HTTP clients normalise paths before they
/// leave) and returns the status and the body parsed as JSON (`Null` if it is not).
async fn raw(gateway: &TestGateway, method: &str, path: &str, key: &str, body: &str) -> (u16, Value) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(gateway.addr, &request).await;
    let status = answer.get(9..12).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_encoded_spelling_of_a_model_endpoint_is_still_allowlisted() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RESTRICTED_KEY)).await;
    let forbidden = r#"{"model":"o3","messages":[]}"#;

    for path in [
        "/v1/%63hat/completions",
        "/v1/chat/%63ompletions",
        "/v1/CHAT/Completions",
        "/%76%31/chat/completions",
    ] {
        let (status, body) = raw(&gateway, "POST", path, "gw-search", forbidden).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "model_not_allowed", "{path}");
    }
    assert_eq!(upstream.calls(), 0);

    let allowed = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let (status, _) = raw(&gateway, "POST", "/v1/%63hat/%63ompletions", "gw-search", allowed).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.last_request().uri, "/v1/chat/completions", "the upstream gets the decided path");
}

#[tokio::test]
async fn the_upstream_gets_the_normal_form_and_the_query_as_sent() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    raw(&gateway, "GET", "/v1/%6Dodels/gpt%2d4o?after=a%2Fb", "sk-caller", "").await;
    assert_eq!(upstream.calls(), 1);
    assert_eq!(upstream.last_request().uri, "/v1/models/gpt-4o?after=a%2Fb");
}

#[tokio::test]
async fn ambiguous_spellings_are_400_and_never_reach_the_upstream() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let chat = r#"{"model":"gpt-4o","messages":[]}"#;

    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/..%2f..%2fadmin",
        "/v1/../admin",
        "/v1/files/%2e%2e/secrets",
        "/v1/files/.%2E/secrets",
        "/v1/./models",
        "/v1//chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions;x=1",
        "/v1/chat%3Bx/completions",
        "/v1/%252e%252e/admin",
        "/v1/chat%5Ccompletions",
        "/v1/chat\\completions",
        "/v1/models%00",
        "/v1/models%zz",
    ] {
        let (status, body) = raw(&gateway, "POST", path, "sk-caller", chat).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_path", "{path}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}");
    }
}

#[tokio::test]
async fn a_model_call_without_a_model_is_400() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let passthrough = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let restricted = TestGateway::start(&config_for(&upstream.base_url(), RESTRICTED_KEY)).await;

    for (gateway, key) in [(&passthrough, "sk-caller"), (&restricted, "gw-search")] {
        for (path, body) in [
            ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}]})),
            ("/v1/chat/completions", json!({"model": null, "messages": []})),
            ("/v1/chat/completions", json!({"model": "", "messages": []})),
            ("/v1/embeddings", json!({"input": "hi"})),
            ("/v1/responses", json!({"input": "hi"})),
        ] {
            let response =
                http().post(gateway.url(path)).bearer_auth(key).json(&body).send().await.expect("answer");
            assert_eq!(response.status(), 400, "{path} {body}");
            let error: Value = response.json().await.expect("JSON error");
            assert_eq!(error["error"]["type"], "invalid_request_error");
            assert_eq!(error["error"]["param"], "model");
            assert_eq!(error["error"]["code"], "missing_required_parameter");
        }
    }
}

#[tokio::test]
async fn a_huge_model_name_is_not_echoed_whole() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RESTRICTED_KEY)).await;
    let model = "o".repeat(100_000);

    let response = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth("gw-search")
        .json(&json!({"model": model, "messages": []}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.expect("JSON error");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(message.len() < 400, "{} bytes", message.len());
}

/// Sends a chat completion through `gateway` as `key`, naming an organization and a
/// project, and returns the ones the upstream received.
async fn billed_as(
    gateway: &TestGateway,
    upstream: &MockHandle,
    key: &str,
) -> (Option<String>, Option<String>) {
    let response = http()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("openai-organization", "org-tenant")
        .header("openai-project", "proj_tenant")
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let seen = upstream.last_request();
    (seen.header("openai-organization").map(str::to_owned), seen.header("openai-project").map(str::to_owned))
}

#[tokio::test]
async fn a_tenant_cannot_choose_who_pays_for_the_operators_key() {
    let upstream = MockUpstream::new().start().await;
    let base = upstream.base_url();
    let keys = r#"
[auth]
mode = "keys"

[[keys]]
id = "search"
key = "gw-search"
"#;
    let with_key = |extra: &str| {
        format!(
            "{keys}\n[[upstreams]]\nname = \"op\"\nbase_url = \"{base}\"\napi_key = \"sk-operator\"\n{extra}"
        )
    };
    let config = |upstream_table: String| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[cache]\nenabled = false\n{upstream_table}"
        )
    };

    let dropped = TestGateway::start(&config(with_key(""))).await;
    assert_eq!(billed_as(&dropped, &upstream, "gw-search").await, (None, None));

    let own =
        TestGateway::start(&config(with_key("organization = \"org-operator\"\nproject = \"proj_operator\"")))
            .await;
    let expected = (Some("org-operator".to_owned()), Some("proj_operator".to_owned()));
    assert_eq!(billed_as(&own, &upstream, "gw-search").await, expected);

    let allowed = TestGateway::start(&config(with_key("forward_caller_org = true"))).await;
    let expected = (Some("org-tenant".to_owned()), Some("proj_tenant".to_owned()));
    assert_eq!(billed_as(&allowed, &upstream, "gw-search").await, expected);

    // Passthrough: the caller's own key goes upstream, and so does its choice.
    let passthrough = TestGateway::start(&config_for(&base, "")).await;
    assert_eq!(billed_as(&passthrough, &upstream, "sk-caller").await, expected);
}

#[tokio::test]
async fn the_upstream_learns_the_peer_address_not_what_the_client_wrote() {
    let upstream = MockUpstream::new().start().await;
    let send = |gateway: &TestGateway| {
        http()
            .get(gateway.url("/v1/models"))
            .bearer_auth("sk-caller")
            .header("x-forwarded-for", "6.6.6.6, 1.2.3.4")
            .header("forwarded", "for=6.6.6.6, for=1.2.3.4")
            .header("x-real-ip", "6.6.6.6")
            .send()
    };

    let direct = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    assert_eq!(send(&direct).await.expect("answer").status(), 200);
    let seen = upstream.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!((seen.header("forwarded"), seen.header("x-real-ip")), (None, None));

    let behind_one = TestGateway::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\ntrusted_proxy_hops = 1\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    ))
    .await;
    assert_eq!(send(&behind_one).await.expect("answer").status(), 200);
    let seen = upstream.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("1.2.3.4, 127.0.0.1"));
    assert_eq!(seen.header("forwarded"), Some("for=1.2.3.4, for=127.0.0.1"));
    assert_eq!(seen.header("x-real-ip"), Some("6.6.6.6"));
}

#[tokio::test]
async fn no_content_type_or_method_override_makes_a_model_call_unread() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RESTRICTED_KEY)).await;
    let forbidden = r#"{"model":"o3","messages":[]}"#;

    for content_type in ["multipart/form-data; boundary=x", "application/octet-stream", "text/plain"] {
        let response = http()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("gw-search")
            .header("content-type", content_type)
            .body(forbidden)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 403, "{content_type}");
    }
    assert_eq!(upstream.calls(), 0);

    // A GET is not read as a model call, so it must not become one upstream.
    let response = http()
        .get(gateway.url("/v1/chat/completions"))
        .bearer_auth("gw-search")
        .header("x-http-method-override", "POST")
        .header("x-http-method", "POST")
        .header("x-method-override", "POST")
        .send()
        .await
        .expect("answer");
    assert_ne!(response.status(), 403, "a GET carries no model to refuse");
    assert_eq!(upstream.calls(), 1);
    let seen = upstream.last_request();
    assert_eq!(seen.method, "GET");
    for name in ["x-http-method-override", "x-http-method", "x-method-override"] {
        assert_eq!(seen.header(name), None, "{name}");
    }
}

#[tokio::test]
async fn a_body_that_names_two_models_is_refused() {
    let upstream = MockUpstream::new().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), RESTRICTED_KEY)).await;

    // Most upstreams read the last `model`; the gateway must not check the first.
    for body in [
        r#"{"model":"gpt-4o-mini","model":"o3","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","mod\u0065l":"o3","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","stream":false,"stream":true,"messages":[]}"#,
    ] {
        let (status, error) = raw(&gateway, "POST", "/v1/chat/completions", "gw-search", body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["error"]["code"], "invalid_json", "{body}");
    }
}

#[tokio::test]
async fn a_passthrough_keys_organization_and_project_are_part_of_its_cache_scope() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "[cache]\nenabled = true\n")).await;
    let ask = |organization: &'static str, project: &'static str| {
        http()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth("sk-caller")
            .header("openai-organization", organization)
            .header("openai-project", project)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let cache =
        |response: reqwest::Response| response.headers()["x-spillway-cache"].to_str().map(str::to_owned);

    assert_eq!(cache(ask("org-a", "proj_1").await.expect("answer")).ok().as_deref(), Some("miss"));
    assert_eq!(cache(ask("org-a", "proj_1").await.expect("answer")).ok().as_deref(), Some("hit"));
    assert_eq!(cache(ask("org-b", "proj_1").await.expect("answer")).ok().as_deref(), Some("miss"));
    assert_eq!(cache(ask("org-a", "proj_2").await.expect("answer")).ok().as_deref(), Some("miss"));
    assert_eq!(upstream.calls(), 3);
}

/// The same refusals from the release-built binary as a user runs it, raw over TCP.
#[tokio::test]
async fn the_binary_refuses_what_the_pipeline_refuses() {
    use crate::cli::Running;

    let upstream = MockUpstream::new().start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nheader_read_timeout = \"1s\"\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    );
    let running = Running::serve(&config);
    let send = |request: String| {
        let addr = running.addr();
        async move { exchange(addr, &request).await }
    };
    let request = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-caller\r\nx-forwarded-for: 6.6.6.6\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };

    let cases = [
        (request("POST", "/v1/chat%2Fcompletions", "{}"), "HTTP/1.1 400", "invalid_path"),
        (
            request("POST", "/v1/chat/completions", r#"{"messages":[]}"#),
            "HTTP/1.1 400",
            "missing_required_parameter",
        ),
        (request("TRACE", "/v1/models", ""), "HTTP/1.1 405", "method_not_allowed"),
        (request("CONNECT", "/v1/models", ""), "HTTP/1.1 405", "method_not_allowed"),
    ];
    for (sent, status, code) in cases {
        let answer = send(sent.clone()).await;
        assert!(answer.starts_with(status) && answer.contains(code), "{sent}\n=> {answer}");
    }
    assert_eq!(upstream.calls(), 0);

    // A connection that never sends a byte is closed after header_read_timeout.
    let silent = send(String::new()).await;
    assert!(silent.is_empty(), "{silent}");

    let answer = send(request("POST", "/v1/%63hat/completions", r#"{"model":"gpt-4o","messages":[]}"#)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = upstream.last_request();
    assert_eq!(
        (seen.uri.path(), seen.header("x-forwarded-for")),
        ("/v1/chat/completions", Some("127.0.0.1"))
    );
    assert_eq!(running.terminate(), 0);
}
