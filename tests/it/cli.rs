//! The real binary: commands, flags, exit codes, startup and shutdown.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_spillway");

/// The binary with a clean environment (no SPILLWAY_* or RUST_LOG from the caller).
pub fn spillway(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().expect("binary runs");
    let code = output.status.code().expect("exit code");
    (code, String::from_utf8_lossy(&output.stdout).into(), String::from_utf8_lossy(&output.stderr).into())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, stdout, _) = run(spillway(dir.path()).arg("--version"));
    assert_eq!((code, stdout.trim()), (0, concat!("spillway ", env!("CARGO_PKG_VERSION"))));
    let (code, stdout, _) = run(spillway(dir.path()).arg("--help"));
    assert_eq!(code, 0);
    for command in ["serve", "check", "hash-key", "--listen", "--upstream", "--log-format"] {
        assert!(stdout.contains(command), "--help does not mention {command}");
    }
}

#[test]
fn hash_key_trims_one_newline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spillway(dir.path())
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"test\n").expect("write key");
    let output = child.wait_with_output().expect("exits");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
}

#[test]
fn check_accepts_the_shipped_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["spillway.example.toml", "sidecar.toml", "multi-key.toml"] {
        let path = root.join("config").join(name);
        let (code, stdout, stderr) =
            run(spillway(root).env("PLAYGROUND_KEY", "pg-key").arg("check").arg("--config").arg(&path));
        assert_eq!(code, 0, "{name}: {stdout}{stderr}");
    }
    let multi = root.join("config/multi-key.toml");
    let (code, _, stderr) = run(spillway(root).arg("check").arg("--config").arg(&multi));
    assert_eq!(code, 1, "a missing key variable must fail the check");
    assert!(stderr.contains("PLAYGROUND_KEY"), "{stderr}");
}

#[test]
fn check_reports_every_error_with_its_position_and_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "bad.toml",
        r#"[server]
listen = "127.0.0.1:8080"
request_timout = "10s"

[auth]
mode = "keys"

[[keys]]
id = "team"
key = "sk-very-secret-value"
requests_per_minute = 0

[[upstreams]]
name = "openai"
base_url = "ftp://example.com"
api_key = "${MISSING_KEY}"
"#,
    );

    let (code, _, stderr) = run(spillway(dir.path()).arg("check").arg("--config").arg(&path));

    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    assert!(stderr.contains(&format!("{file}:3:1")), "unknown field position:\n{stderr}");
    assert!(stderr.contains("request_timeout"), "did-you-mean hint:\n{stderr}");
    assert!(stderr.contains("MISSING_KEY"), "missing variable:\n{stderr}");
    assert!(stderr.contains(&format!("{file}:11:")), "zero limit position:\n{stderr}");
    assert!(stderr.contains(&format!("{file}:15:")), "bad base_url position:\n{stderr}");
    assert!(!stderr.contains("sk-very-secret-value"), "a key leaked:\n{stderr}");
}

#[test]
fn a_bad_config_exits_1_and_a_taken_port_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(dir.path(), "bad.toml", "[server]\nlisten = \"nowhere\"\n");
    let (code, _, stderr) = run(spillway(dir.path()).arg("--config").arg(&bad));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bad.toml:2:"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (code, _, stderr) =
        run(spillway(dir.path()).args(["serve", "--admin-listen", "", "--listen", &addr.to_string()]));
    assert_eq!(code, 2, "{stderr}");

    let (code, _, stderr) = run(spillway(dir.path()).args(["--listen", "not-an-address"]));
    assert_eq!(code, 1, "{stderr}");
}

/// A running gateway process and its startup line.
pub struct Running {
    /// `None` once waited for; a test that fails before that still kills the process.
    child: Option<Child>,
    pub started: Value,
    /// Every line the process wrote to stdout (its logs), as they arrive.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The directory of a config written by [`Running::serve`], kept while it runs.
    dir: Option<tempfile::TempDir>,
}

impl Running {
    pub fn start(command: &mut Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (found, lines) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("spillway started") {
                    let _ = found.send(line.clone());
                }
                kept.lock().expect("logs lock").push(line);
            }
        });
        let line = lines.recv_timeout(Duration::from_secs(20)).expect("startup line within 20 s");
        let started = serde_json::from_str(&line).expect("JSON log line");
        Self { child: Some(child), started, logs, dir: None }
    }

    /// The binary serving `config` (written to `spillway.toml` in a directory of its
    /// own) with JSON logs.
    pub fn serve(config: &str) -> Self {
        Self::serve_with(config, |_| {})
    }

    /// [`Running::serve`], with `customize` adding arguments or environment first.
    pub fn serve_with(config: &str, customize: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "spillway.toml", config);
        let mut command = spillway(dir.path());
        command.args(["--log-format", "json", "--config"]).arg(&path);
        customize(&mut command);
        let mut running = Self::start(&mut command);
        running.dir = Some(dir);
        running
    }

    /// The listen address from the startup line.
    pub fn addr(&self) -> String {
        self.started["listen"].as_str().unwrap_or_default().to_owned()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map_or(0, Child::id);
        let sent = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
        assert!(sent.expect("kill runs").success());
    }

    pub fn terminate(self) -> i32 {
        self.signal("TERM");
        self.terminate_after_signal()
    }

    /// Waits (up to 10 s) for the process to exit after a signal already sent.
    pub fn terminate_after_signal(mut self) -> i32 {
        let (exited, exit) = std::sync::mpsc::channel();
        let Some(mut child) = self.child.take() else { panic!("the gateway was already waited for") };
        std::thread::spawn(move || {
            let _ = exited.send(child.wait().map(|status| status.code()));
            child
        });
        match exit.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(Some(code))) => code,
            other => panic!("the gateway did not exit cleanly within 10 s of SIGTERM: {other:?}"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn without_a_config_it_runs_on_the_built_in_defaults_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = Running::start(spillway(dir.path()).args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "",
        "--log-format",
        "json",
    ]));

    let started = &running.started;
    assert!(started["listen"].as_str().is_some_and(|addr| addr.starts_with("127.0.0.1:")), "{started}");
    assert_eq!(started["upstreams"], "openai=https://api.openai.com/v1");
    assert_eq!(started["auth"], "Passthrough");
    assert_eq!(running.terminate(), 0);
}

#[test]
fn flags_override_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "spillway.toml", "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"\"\n");
    let running = Running::start(
        spillway(dir.path())
            .env("SPILLWAY_LISTEN", "127.0.0.1:2")
            .env("SPILLWAY_UPSTREAM", "http://127.0.0.1:9/v1")
            .env("SPILLWAY_LOG_FORMAT", "json")
            .args(["--listen", "127.0.0.1:0"]),
    );

    let started = &running.started;
    let listen = started["listen"].as_str().unwrap_or_default();
    assert!(
        listen.starts_with("127.0.0.1:") && listen != "127.0.0.1:1" && listen != "127.0.0.1:2",
        "{started}"
    );
    assert_eq!(started["upstreams"], "default=http://127.0.0.1:9/v1");
    assert_eq!(running.terminate(), 0);
}

#[test]
fn check_refuses_durations_and_sizes_over_their_maximum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "huge.toml",
        "[server]\nrequest_timeout = \"18446744073709551615s\"\nmax_request_body = \"5GiB\"\n\n\
         [cache]\nttl = \"2y\"\n",
    );

    let (code, _, stderr) = run(spillway(dir.path()).arg("check").arg("--config").arg(&path));

    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    for expected in [
        format!(
            "{file}:2:19: error: `request_timeout` is too long: \"18446744073709551615s\"\n  = help: the maximum is \"7d\""
        ),
        format!(
            "{file}:3:20: error: `max_request_body` is too large: \"5GiB\"\n  = help: the maximum is \"4GiB\""
        ),
        format!("{file}:6:7: error: `ttl` is too long: \"2y\"\n  = help: the maximum is \"365d\""),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

/// Every duration and size at its maximum (README, "Bounds"), for an upstream at `{base_url}`.
const AT_MAXIMUM: &str = r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_request_body = "4GiB"
request_timeout = "7d"
shutdown_grace = "7d"
header_read_timeout = "1d"
body_read_timeout = "1d"
max_header_size = "1MiB"
idle_timeout = "1d"

[limits.default]
requests_per_minute = 4294967295
tokens_per_minute = 4294967295
max_concurrent = 4294967295

[[upstreams]]
name = "mock"
base_url = "{base_url}"
connect_timeout = "1d"
timeout = "7d"

[retry]
max_attempts = 4294967295
base_delay = "1d"
max_delay = "1d"
on_status = [503]

[cache]
enabled = true
max_size = "1TiB"
ttl = "365d"
"#;

#[tokio::test]
async fn the_largest_values_check_accepts_serve_requests_without_overflowing() {
    use crate::support::upstream::{MockUpstream, Reply};

    // An upstream that asks for a wait no `Duration` can hold.
    let never = Reply::server_error(503).header("retry-after", "1e300").header("retry-after-ms", "1e300");
    let upstream = MockUpstream::new().route("/v1/embeddings", never).start().await;
    let config = AT_MAXIMUM.replace("{base_url}", &upstream.base_url());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "max.toml", &config);
    let (code, stdout, stderr) = run(spillway(dir.path()).arg("check").arg("--config").arg(&path));
    assert_eq!(code, 0, "{stdout}{stderr}");

    let running = Running::serve(&config);
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", running.addr());
    let chat = |stream: bool| {
        client
            .post(url("/v1/chat/completions"))
            .bearer_auth("sk-max")
            // A request head four times the default limit (and within the mock's own).
            .header("x-padding", "p".repeat(256 * 1024))
            .json(&serde_json::json!({"model": "gpt-4o", "messages": [], "stream": stream}))
            .send()
    };
    for (stream, cache) in [(false, "miss"), (false, "hit"), (true, "miss"), (true, "hit")] {
        let response = chat(stream).await.expect("answer");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-spillway-cache"], cache);
        assert!(response.headers().contains_key("x-ratelimit-remaining-requests"));
        assert!(!response.bytes().await.expect("body").is_empty());
    }
    // The wait asked for is past the deadline: the 503 comes back at once, not retried.
    let response = client
        .post(url("/v1/embeddings"))
        .bearer_auth("sk-max")
        .json(&serde_json::json!({"model": "text-embedding-3-small", "input": "x"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.calls(), 3, "two misses and the one 503");
    assert_eq!(running.terminate(), 0);
}

#[test]
fn pretty_logs_carry_no_colour_codes_off_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        write(dir.path(), "spillway.toml", "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n");
    let mut child = spillway(dir.path())
        .args(["--log-format", "pretty", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (found, line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("spillway started") {
                let _ = found.send(line);
            }
        }
    });
    let line = line.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("startup line within 20 s");
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
}
