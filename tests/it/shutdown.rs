//! The real binary under SIGTERM with a stream open, and what its logs never say.

use futures_util::StreamExt;
use serde_json::json;

use crate::{
    cli::Running,
    support::upstream::{Gate, MockUpstream, Reply},
};

#[tokio::test]
async fn sigterm_drains_an_open_stream_then_exits_0_and_no_key_is_ever_logged() {
    let gate = Gate::new();
    let upstream = MockUpstream::new().reply(Reply::openai().gate_after(1, &gate)).start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"20s\"\n\n\
         [auth]\nmode = \"keys\"\n\n[[keys]]\nid = \"team\"\nkey = \"gw-secret-team-key\"\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\napi_key = \"sk-secret-upstream-key\"\n",
        upstream.base_url()
    );
    let running = Running::serve_with(&config, |command| {
        command.args(["--log-level", "debug"]);
    });
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", running.addr());

    let refused = client.post(&url).bearer_auth("gw-wrong-key").json(&json!({"model": "m"})).send().await;
    assert_eq!(refused.expect("answer").status(), 401);
    let stream = client
        .post(&url)
        .bearer_auth("gw-secret-team-key")
        .json(&json!({"model": "gpt-4o", "messages": [], "stream": true}))
        .send()
        .await
        .expect("stream opens");
    let mut body = stream.bytes_stream();
    body.next().await.expect("a chunk").expect("no error");

    running.signal("TERM");
    // Readiness turns 503 while the stream is still open.
    let mut draining = false;
    for _ in 0..100 {
        let ready = client.get(format!("http://{admin}/readyz")).send().await.expect("admin answers");
        if ready.status() == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(draining, "/readyz never turned 503");

    gate.open();
    let mut rest = Vec::new();
    while let Some(piece) = body.next().await {
        rest.extend_from_slice(&piece.expect("the open stream finishes cleanly"));
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    let logs = running.logs.clone();
    assert_eq!(running.terminate_after_signal(), 0);

    let logs = logs.lock().expect("logs").join("\n");
    assert!(logs.contains("\"status\":401"), "the refused request was not logged:\n{logs}");
    for secret in ["gw-secret-team-key", "gw-wrong-key", "sk-secret-upstream-key"] {
        assert!(!logs.contains(secret), "{secret} appeared in the logs:\n{logs}");
    }
}
