//! `/metrics` on the admin port of the real binary, after some traffic.

use serde_json::json;

use crate::{cli::Running, support::upstream::MockUpstream};

#[tokio::test]
async fn metrics_report_requests_limits_attempts_and_overhead_without_keys() {
    let upstream = MockUpstream::new().start().await;
    let running = Running::serve(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[limits.default]\nrequests_per_minute = 1\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    ));
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", running.addr());
    for expected in [200, 429] {
        let response = client
            .post(&url)
            .bearer_auth("sk-metrics-secret")
            .json(&json!({"model": "gpt-4o", "messages": []}))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), expected);
        response.bytes().await.expect("body");
    }

    let scrape = reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape");
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.expect("text");

    let key = spillway::secret::KeyHash::of(b"sk-metrics-secret").short();
    for expected in [
        format!(
            "spillway_requests_total{{key=\"{key}\",model=\"gpt-4o\",upstream=\"mock\",status=\"200\"}} 1"
        ),
        format!("spillway_requests_total{{key=\"{key}\",model=\"gpt-4o\",upstream=\"-\",status=\"429\"}} 1"),
        format!("spillway_rate_limited_total{{key=\"{key}\",limit=\"requests\"}} 1"),
        "spillway_upstream_attempts_total{upstream=\"mock\",outcome=\"response\"} 1".to_owned(),
        "spillway_overhead_seconds_bucket".to_owned(),
        "spillway_request_duration_seconds_bucket".to_owned(),
        "spillway_inflight_requests 0".to_owned(),
        "spillway_cache_lookups_total{result=\"miss\"} 1".to_owned(),
        "spillway_build_info".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected} in:\n{text}");
    }
    assert!(!text.contains("sk-metrics-secret"), "a key leaked into /metrics");
    assert_eq!(running.terminate(), 0);
}

#[tokio::test]
async fn each_request_has_one_access_line_with_its_usage_and_no_key() {
    use crate::support::upstream::{COMPLETION_TOKENS, PROMPT_TOKENS};

    let upstream = MockUpstream::new().start().await;
    let running = Running::serve(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        upstream.base_url()
    ));
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::new();
    for (id, stream) in [("req-plain", false), ("req-stream", true)] {
        let response = client
            .post(format!("http://{}/v1/chat/completions", running.addr()))
            .bearer_auth("sk-access-log-secret")
            .header("x-request-id", id)
            .json(&json!({"model": "gpt-4o", "messages": [], "stream": stream}))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let scrape =
        reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape").text().await.expect("text");
    let logs = running.logs.clone();
    assert_eq!(running.terminate(), 0);

    let logs = logs.lock().expect("logs").clone();
    assert!(logs.iter().all(|line| !line.contains("sk-access-log-secret")), "a key reached the logs");
    for id in ["req-plain", "req-stream"] {
        let lines: Vec<serde_json::Value> = logs
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["span"]["id"] == id && line.get("latency_ms").is_some())
            .collect();
        assert_eq!(lines.len(), 1, "one access line for {id}: {logs:#?}");
        let line = &lines[0];
        let key = spillway::secret::KeyHash::of(b"sk-access-log-secret").short();
        assert_eq!(
            (
                &line["key"],
                &line["model"],
                &line["upstream"],
                &line["status"],
                &line["attempts"],
                &line["cache"]
            ),
            (&json!(key), &json!("gpt-4o"), &json!("mock"), &json!(200), &json!(1), &json!("miss")),
            "{line}"
        );
        assert_eq!(
            (&line["prompt_tokens"], &line["completion_tokens"]),
            (&json!(PROMPT_TOKENS), &json!(COMPLETION_TOKENS))
        );
    }
    // Unlimited callers' usage is counted too.
    let key = spillway::secret::KeyHash::of(b"sk-access-log-secret").short();
    let prompt = format!(
        "spillway_tokens_total{{key=\"{key}\",model=\"gpt-4o\",kind=\"prompt\"}} {}",
        2 * PROMPT_TOKENS
    );
    assert!(scrape.contains(&prompt), "missing {prompt} in:\n{scrape}");
}
