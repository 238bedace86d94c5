//! TLS on both sides: HTTPS upstreams trusted through `ca_file`, and the gateway's own
//! TLS listener offering h2 and HTTP/1.1 by ALPN.

use serde_json::json;

use crate::support::{
    certs::TestCerts,
    gateway::{TestGateway, config_for},
    upstream::MockUpstream,
};

#[tokio::test]
async fn https_upstreams_are_trusted_through_ca_file() {
    let upstream = MockUpstream::new().tls().start().await;
    let config = config_for(&upstream.base_url(), &format!("ca_file = {:?}", upstream.ca_file()));
    let gateway = TestGateway::start(&config).await;

    for _ in 0..3 {
        let response = gateway.chat("gpt-4o", false).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }

    // HTTP/1.1 by ALPN (the mock offers h2 too), and the pooled connection carried
    // every request.
    assert_eq!(upstream.last_request().version, http::Version::HTTP_11);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn https_upstreams_with_an_unknown_ca_are_refused() {
    let upstream = MockUpstream::new().tls().expect_calls(0).start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = gateway.chat("gpt-4o", false).await;

    assert_eq!(response.status(), 502);
}

#[tokio::test]
async fn the_listener_serves_tls_with_h2_and_http1() {
    let upstream = MockUpstream::new().start().await;
    let certs = TestCerts::generate();
    let config = format!(
        r#"
[server]
admin_listen = ""
tls = {{ cert = {:?}, key = {:?} }}

[[upstreams]]
name = "mock"
base_url = "{}"
"#,
        certs.cert_file(),
        certs.key_file(),
        upstream.base_url()
    );
    let gateway = TestGateway::start(&config).await;
    let url = format!("https://localhost:{}/v1/chat/completions", gateway.addr.port());
    let client = |http1: bool| {
        let builder = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).expect("pem")])
            .resolve("localhost", gateway.addr);
        if http1 { builder.http1_only() } else { builder }.build().expect("client")
    };

    for (http1, version) in [(false, reqwest::Version::HTTP_2), (true, reqwest::Version::HTTP_11)] {
        let response = client(http1)
            .post(&url)
            .bearer_auth("sk-caller")
            .json(&json!({"model": "gpt-4o", "messages": []}))
            .send()
            .await
            .expect("gateway answers over TLS");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }
}
