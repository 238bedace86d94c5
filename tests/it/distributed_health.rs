//! Distributed mode's health, on the real binary: `/readyz` and `spillway_redis_up`
//! follow Redis going away and coming back, requests are served all along, and each
//! change of state is logged once.

use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;

use crate::{
    cli::Running,
    support::{redis::RedisServer, upstream::MockUpstream},
};

#[tokio::test]
async fn readyz_and_the_gauge_follow_redis_and_requests_never_wait_for_it() {
    let Some(mut redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [limits.default]\nrequests_per_minute = 1000\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n\n{}",
        upstream.base_url(),
        redis.section("health:")
    );
    let running = Running::serve(&config);
    assert_eq!(running.started["limiter"], "redis");
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let state = || async {
        let ready = reqwest::get(format!("http://{admin}/readyz")).await.expect("readyz");
        assert_eq!(ready.status(), 200, "redis never makes the gateway unready");
        let detail = ready.text().await.expect("readyz body");
        let metrics = reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape");
        let gauge = metrics
            .text()
            .await
            .expect("metrics body")
            .lines()
            .find_map(|line| line.strip_prefix("spillway_redis_up ").map(str::to_owned));
        (detail, gauge)
    };
    let wait_for = |detail: &'static str, gauge: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = state().await;
            if seen.0 == detail && seen.1.as_deref() == Some(gauge) {
                return;
            }
            assert!(Instant::now() < deadline, "wanted {detail} and gauge {gauge}, saw {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", running.addr());
    let chat = || async {
        let started = Instant::now();
        let response = client
            .post(&url)
            .bearer_auth("sk-health-secret")
            .json(&json!({"model": "gpt-4o", "messages": []}))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 200);
        started.elapsed()
    };

    // Probed before the startup line: shared from the first request.
    assert_eq!(state().await, (r#"{"status":"ready","redis":"ok"}"#.to_owned(), Some("1".to_owned())));
    chat().await;

    redis.stop();
    for _ in 0..5 {
        let took = chat().await;
        assert!(took < Duration::from_secs(1), "a request waited {took:?} on a dead Redis");
    }
    wait_for(r#"{"status":"ready","redis":"degraded"}"#, "0").await;

    redis.resume();
    wait_for(r#"{"status":"ready","redis":"ok"}"#, "1").await;
    chat().await;

    let logs = running.logs.lock().expect("logs").clone();
    let count = |needle: &str| logs.iter().filter(|line| line.contains(needle)).count();
    assert_eq!(count("redis is unreachable"), 1, "the outage is logged once:\n{}", logs.join("\n"));
    assert_eq!(count("redis is up"), 2, "up at start and on return:\n{}", logs.join("\n"));
    assert!(logs.iter().all(|line| !line.contains("sk-health-secret")));
    assert_eq!(running.terminate(), 0);
}

#[tokio::test]
async fn rediss_connects_over_tls_to_a_server_signed_by_a_private_ca() {
    use std::process::{Command, Stdio};

    // Only for the skip-or-fail rule: this test runs its own TLS server.
    let Some(_plain) = RedisServer::start() else { return };
    let certs = crate::support::certs::TestCerts::generate();
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let server = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-auth-clients", "no", "--tls-cert-file"])
        .arg(certs.cert_file())
        .arg("--tls-key-file")
        .arg(certs.key_file())
        .arg("--tls-ca-cert-file")
        .arg(certs.ca_file())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let _server = KillOnDrop(server);
    let upstream = MockUpstream::new().start().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n\n\
         [redis]\nurl = \"rediss://localhost:{port}\"\ntimeout = \"1s\"\n",
        upstream.base_url()
    );
    // The server's CA is trusted the usual way for the system roots: SSL_CERT_FILE.
    let running = Running::serve_with(&config, |command| {
        command.env("SSL_CERT_FILE", certs.ca_file());
    });
    let admin = running.started["admin"].as_str().unwrap_or_default().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = reqwest::get(format!("http://{admin}/readyz")).await.expect("readyz");
        let detail = ready.text().await.expect("readyz body");
        if detail == r#"{"status":"ready","redis":"ok"}"# {
            break;
        }
        assert!(Instant::now() < deadline, "never connected over TLS: {detail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running.terminate(), 0);
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_reload_to_another_redis_namespace_is_probed_at_once() {
    let Some(redis) = RedisServer::start() else { return };
    let config = |prefix: &str| {
        crate::support::gateway::load(&crate::support::gateway::config_for(
            "http://127.0.0.1:1",
            &redis.section(prefix),
        ))
    };
    let runtime = spillway::runtime::Runtime::new(config("a:")).expect("runtime builds");
    let Some(first) = runtime.redis.clone() else { panic!("a link for [redis]") };
    first.probe().await;
    assert!(first.is_up());

    let reloaded = runtime.reload(config("b:")).expect("reloads");
    let Some(second) = reloaded.redis.clone() else { panic!("a link for [redis]") };
    assert!(!std::sync::Arc::ptr_eq(&first, &second), "another prefix needs another link");
    // Probed at once, not a probe interval (1 s) later.
    let deadline = Instant::now() + Duration::from_millis(800);
    while !second.is_up() {
        assert!(Instant::now() < deadline, "the new link was not probed at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kept = reloaded.reload(config("b:")).expect("reloads");
    assert!(
        kept.redis.as_ref().is_some_and(|link| std::sync::Arc::ptr_eq(link, &second)),
        "same [redis], same link"
    );
}
