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

/// The distinct values of label `name` across the series of `metric` in a scrape.
fn label_values(scrape: &str, metric: &str, name: &str) -> std::collections::BTreeSet<String> {
    let needle = format!("{name}=\"");
    scrape
        .lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter_map(|line| {
            let value = &line[line.find(&needle)? + needle.len()..];
            Some(value[..value.find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn client_chosen_models_and_keys_cannot_grow_the_metrics_or_the_log_lines() {
    use spillway::metrics::{MAX_MODEL_LEN, MAX_MODELS, MAX_PRESENTED_KEYS, OTHER};

    let upstream = MockUpstream::new().start().await;
    let running = Running::serve(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[cache]\nenabled = false\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\nmodels = [\"gpt-*\"]\n",
        upstream.base_url()
    ));
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", running.addr());
    let send = |key: String, model: String| {
        let request = client.post(&url).bearer_auth(key).json(&json!({"model": model, "messages": []}));
        async move {
            let response = request.send().await.expect("answer");
            let status = response.status().as_u16();
            response.bytes().await.expect("body");
            status
        }
    };

    // Names no upstream serves are refused (404) before any served name: they take no place.
    for n in 0..20 {
        assert_eq!(send("sk-first".into(), format!("unserved-{n}")).await, 404);
    }
    let served = MAX_MODELS + 50;
    for n in 0..served {
        assert_eq!(send("sk-first".into(), format!("gpt-{n}")).await, 200);
    }
    let huge = format!("gpt-{}", "x".repeat(900_000));
    for _ in 0..3 {
        assert_eq!(send("sk-first".into(), huge.clone()).await, 200);
    }
    for n in 0..MAX_PRESENTED_KEYS + 50 {
        assert_eq!(send(format!("sk-random-{n}"), "gpt-0".into()).await, 200);
    }

    let scrape =
        reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape").text().await.expect("text");
    let logs = running.logs.clone();
    assert_eq!(running.terminate(), 0);

    assert!(scrape.len() < 256 * 1024, "/metrics is {} bytes", scrape.len());
    for metric in ["spillway_requests_total", "spillway_tokens_total"] {
        let models = label_values(&scrape, metric, "model");
        let expected: std::collections::BTreeSet<String> =
            (0..MAX_MODELS).map(|n| format!("gpt-{n}")).chain([OTHER.to_owned()]).collect();
        assert_eq!(models, expected, "{metric}");
        let keys = label_values(&scrape, metric, "key");
        assert_eq!(keys.len(), MAX_PRESENTED_KEYS + 1, "{metric}: {keys:?}");
        assert!(keys.contains(OTHER) && keys.contains(&spillway::secret::KeyHash::of(b"sk-first").short()));
    }
    let longest = scrape.lines().flat_map(|line| line.split('"').skip(1).step_by(2)).map(str::len).max();
    assert!(longest.unwrap_or_default() <= MAX_MODEL_LEN, "a label of {longest:?} bytes");
    // Each series is one line: keys × models stay within the caps, not the requests sent.
    let series = scrape.lines().filter(|line| line.starts_with("spillway_requests_total{")).count();
    assert!(series <= 2 * (MAX_MODELS + MAX_PRESENTED_KEYS) + 2, "{series} series");

    let logs = logs.lock().expect("logs").clone();
    let access: Vec<&String> = logs.iter().filter(|line| line.contains("latency_ms")).collect();
    assert_eq!(access.len(), 20 + served + 3 + MAX_PRESENTED_KEYS + 50);
    let longest = logs.iter().map(String::len).max().unwrap_or_default();
    assert!(longest < 4096, "a log line of {longest} bytes");
    assert!(access.iter().any(|line| line.contains("…(900004 bytes)")), "the huge model is cut, not dropped");
}
