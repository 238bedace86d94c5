//! Hot reload of the real binary: SIGHUP applies a changed limit without a restart,
//! and an invalid file keeps the running config.

use std::time::Duration;

use serde_json::json;

use crate::{
    cli::{Running, spillway},
    support::upstream::MockUpstream,
};

/// The status of one chat completion through the gateway.
async fn chat_status(running: &Running) -> u16 {
    let url = format!("http://{}/v1/chat/completions", running.addr());
    let body = json!({"model": "gpt-4o", "messages": []});
    let sent = reqwest::Client::new().post(url).bearer_auth("sk-caller").json(&body).send();
    sent.await.expect("answer").status().as_u16()
}

/// Whether the gateway refuses a request with 429 within 10 s of asking (a reload of a
/// config with `requests_per_minute = 1` taking effect).
async fn until_limited(running: &Running) -> bool {
    for _ in 0..200 {
        if chat_status(running).await == 429 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn config(base_url: &str, requests_per_minute: u32) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\n[limits.default]\nrequests_per_minute = {requests_per_minute}\n\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{base_url}\"\n\n[cache]\nenabled = false\n"
    )
}

#[tokio::test]
async fn sighup_changes_a_limit_live_and_an_invalid_file_changes_nothing() {
    let upstream = MockUpstream::new().start().await;
    // The gateway reads a symlink to a file in another directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let path = elsewhere.path().join("spillway.toml");
    std::fs::write(&path, config(&upstream.base_url(), 1)).expect("write config");
    let link = dir.path().join("spillway.toml");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let running = Running::start(spillway(dir.path()).args(["--log-format", "json", "--config"]).arg(&link));
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", running.addr());
    let chat = || {
        client.post(&url).bearer_auth("sk-caller").json(&json!({"model": "gpt-4o", "messages": []})).send()
    };

    assert_eq!(chat().await.expect("answer").status(), 200);
    assert_eq!(chat().await.expect("answer").status(), 429);

    std::fs::write(&path, config(&upstream.base_url(), 1000)).expect("rewrite config");
    running.signal("HUP");
    // The reload is asynchronous to this test: poll, bounded, until it shows.
    let mut reloaded = false;
    for _ in 0..100 {
        if chat().await.expect("answer").status() == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new limit never applied");

    std::fs::write(&path, "[server]\nlisten = \"not an address\"\n").expect("break config");
    running.signal("HUP");
    for _ in 0..5 {
        assert_eq!(
            chat().await.expect("answer").status(),
            200,
            "an invalid reload changed the running config"
        );
    }
    assert_eq!(running.terminate(), 0);
}

#[tokio::test]
async fn a_changed_config_file_is_reloaded_without_a_signal() {
    let upstream = MockUpstream::new().start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spillway.toml");
    std::fs::write(&path, config(&upstream.base_url(), 1000)).expect("write config");
    let running = Running::start(spillway(dir.path()).args(["--log-format", "json", "--config"]).arg(&path));
    assert_eq!(chat_status(&running).await, 200);

    // Other files in the directory (a log kept next to the config) are not the config.
    for line in 0..5 {
        std::fs::write(dir.path().join("spillway.log"), format!("line {line}\n")).expect("write a log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reloads =
        running.logs.lock().expect("logs").iter().filter(|line| line.contains("config reloaded")).count();
    assert_eq!(reloads, 0, "a change to another file reloaded the config");

    // An editor's save: write elsewhere, then rename over the file.
    let saved = dir.path().join("spillway.toml.tmp");
    std::fs::write(&saved, config(&upstream.base_url(), 1)).expect("write new config");
    std::fs::rename(&saved, &path).expect("replace config");

    assert!(until_limited(&running).await, "the changed file was never reloaded");
    assert_eq!(running.terminate(), 0);
}

#[tokio::test]
async fn a_configmap_update_is_reloaded() {
    use std::os::unix::fs::symlink;

    let upstream = MockUpstream::new().start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Kubernetes' layout: spillway.toml -> ..data/spillway.toml, ..data -> ..2026_1.
    std::fs::create_dir(dir.path().join("..2026_1")).expect("mkdir");
    std::fs::write(dir.path().join("..2026_1/spillway.toml"), config(&upstream.base_url(), 1000))
        .expect("write");
    symlink("..2026_1", dir.path().join("..data")).expect("symlink ..data");
    symlink("..data/spillway.toml", dir.path().join("spillway.toml")).expect("symlink config");
    let path = dir.path().join("spillway.toml");
    let running = Running::start(spillway(dir.path()).args(["--log-format", "json", "--config"]).arg(&path));
    assert_eq!(chat_status(&running).await, 200);

    // An update: a new timestamped directory, then ..data swapped to it by a rename.
    std::fs::create_dir(dir.path().join("..2026_2")).expect("mkdir");
    std::fs::write(dir.path().join("..2026_2/spillway.toml"), config(&upstream.base_url(), 1))
        .expect("write");
    symlink("..2026_2", dir.path().join("..data_tmp")).expect("symlink ..data_tmp");
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap ..data");

    assert!(until_limited(&running).await, "the ConfigMap update was never reloaded");
    assert_eq!(running.terminate(), 0);
}

#[tokio::test]
async fn a_config_that_links_to_another_file_beside_it_reloads_when_that_file_changes() {
    let upstream = MockUpstream::new().start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("spillway.prod.toml");
    std::fs::write(&target, config(&upstream.base_url(), 1000)).expect("write config");
    let path = dir.path().join("spillway.toml");
    std::os::unix::fs::symlink("spillway.prod.toml", &path).expect("symlink");
    let running = Running::start(spillway(dir.path()).args(["--log-format", "json", "--config"]).arg(&path));
    assert_eq!(chat_status(&running).await, 200);

    std::fs::write(&target, config(&upstream.base_url(), 1)).expect("edit the linked file");
    assert!(until_limited(&running).await, "the linked file's change was never reloaded");
    assert_eq!(running.terminate(), 0);
}
