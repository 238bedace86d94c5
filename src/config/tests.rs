//! Whole-pipeline tests of the loader: text in, `Config` or diagnostics out.

use std::time::Duration;

use super::*;

/// A fake environment, so tests never touch the process's.
pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "HOST" => Some("10.0.0.1".into()),
        "TEAM_KEY" => Some("sk-team-secret".into()),
        "REDIS_URL" => Some("http://:hunter2@redis".into()),
        "LONG" => Some("127.0.0.1:9999".into()),
        _ => None,
    }
}

pub(super) fn load(text: &str) -> Result<Config, Diagnostics> {
    load_str(text, "t.toml", env, &Overrides::default())
}

/// The diagnostics of an invalid config, each as `spillway check` prints it.
pub(super) fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(diagnostics) => diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// The first line of the only diagnostic of `text`.
pub(super) fn error(text: &str) -> String {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors[0].lines().next().unwrap_or_default().to_owned()
}

pub(super) fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name)
}

#[test]
fn defaults_are_the_documented_values() {
    let config = defaults(&Overrides::default());
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.server.admin_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(config.server.max_request_body, ByteSize(16 << 20));
    assert_eq!(config.server.request_timeout, Duration::from_secs(600));
    assert_eq!(config.server.body_read_timeout, Duration::from_secs(60));
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(config.server.tls, None);
    assert_eq!(config.auth, AuthMode::Passthrough);
    assert_eq!(config.default_limits, LimitSpec::default());
    assert_eq!(config.limits.max_tracked_keys.get(), 100_000);
    assert_eq!(config.limits.default_completion_tokens, 0);
    assert!(config.keys.is_empty());
    let [openai] = &config.upstreams[..] else { panic!("one default upstream") };
    assert_eq!(openai.name, "openai");
    assert_eq!(openai.base_url, "https://api.openai.com/v1");
    assert!(openai.api_key.is_none() && openai.ca_file.is_none());
    assert_eq!(openai.models.patterns, ["*"]);
    assert!(openai.models.matches("meta-llama/Llama-3"));
    assert_eq!(openai.weight.get(), 1);
    assert_eq!(openai.connect_timeout, Duration::from_secs(5));
    assert_eq!(openai.timeout, Duration::from_secs(120));
    assert_eq!(config.retry.max_attempts.get(), 3);
    assert_eq!(config.retry.base_delay, Duration::from_millis(250));
    assert_eq!(config.retry.max_delay, Duration::from_secs(8));
    assert_eq!(config.retry.on_status, [429, 500, 502, 503, 504]);
    assert!(config.retry.respect_retry_after);
    assert!(config.cache.enabled);
    assert_eq!(config.cache.max_size, ByteSize(256 << 20));
    assert_eq!(config.cache.ttl, Duration::from_secs(3600));
    assert_eq!(config.cache.scope, CacheScope::Key);
    assert_eq!(config.cache.paths, ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]);
    assert!(config.redis.is_none() && config.source.is_none());
}

#[test]
fn an_empty_file_is_the_defaults() {
    let (empty, builtin) = (load("").unwrap(), defaults(&Overrides::default()));
    assert_eq!(format!("{empty:?}"), format!("{builtin:?}"));
}

#[test]
fn the_example_files_load_with_only_their_required_variables_set() {
    // multi-key.toml takes one gateway key from the environment, as production would.
    let env = |name: &str| (name == "PLAYGROUND_KEY").then(|| "pg-key".to_owned());
    for name in ["spillway.example.toml", "sidecar.toml", "multi-key.toml"] {
        let path = example(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.display().to_string();
        if let Err(errors) = load_str(&text, &file, env, &Overrides::default()) {
            panic!("{errors}");
        }
    }
    let multi = load_str(
        &std::fs::read_to_string(example("multi-key.toml")).unwrap(),
        "multi-key.toml",
        env,
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(multi.auth, AuthMode::Keys);
    assert_eq!(multi.keys.len(), 3);
    assert_eq!(multi.upstreams.len(), 2);
    assert!(multi.upstreams[1].models.matches("meta-llama/Llama-3.1-8B-Instruct"));
    assert!(!multi.upstreams[0].models.matches("meta-llama/Llama-3.1-8B-Instruct"));
}

#[test]
fn the_commented_example_matches_the_defaults() {
    let example = load(&std::fs::read_to_string(example("spillway.example.toml")).unwrap()).unwrap();
    let builtin = defaults(&Overrides::default());
    // Everything but `[[keys]]`, which has no default, is written as its default.
    assert_eq!(format!("{:?}", example.server), format!("{:?}", builtin.server));
    assert_eq!(example.auth, builtin.auth);
    assert_eq!(example.default_limits, builtin.default_limits);
    assert_eq!(example.limits, builtin.limits);
    assert_eq!(format!("{:?}", example.upstreams), format!("{:?}", builtin.upstreams));
    assert_eq!(format!("{:?}", example.retry), format!("{:?}", builtin.retry));
    assert_eq!(format!("{:?}", example.cache), format!("{:?}", builtin.cache));
    assert!(example.redis.is_none());
    assert_eq!(example.keys.len(), 1);
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let config = load_path(&example("sidecar.toml"));
    assert_eq!(config.source, Some(example("sidecar.toml")));
    let missing = super::load(Path::new("/nonexistent/spillway.toml"), &Overrides::default());
    let message = missing.unwrap_err().to_string();
    assert!(message.starts_with("/nonexistent/spillway.toml: error: cannot read config file: "), "{message}");
}

fn load_path(path: &Path) -> Config {
    super::load(path, &Overrides::default()).unwrap_or_else(|errors| panic!("{errors}"))
}

#[test]
fn overrides_win_over_the_file() {
    let overrides = Overrides {
        listen: Some("0.0.0.0:9000".parse().unwrap()),
        admin_listen: Some(None),
        upstream: Some("http://127.0.0.1:8000/v1".parse().unwrap()),
    };
    let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"https://a/v1\"\napi_key = \"k\"\n";
    let config = load_str(text, "t.toml", env, &overrides).unwrap();
    assert_eq!(config.server.listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(config.server.admin_listen, None);
    let [upstream] = &config.upstreams[..] else { panic!("one upstream") };
    assert_eq!(
        (upstream.name.as_str(), upstream.base_url.to_string()),
        ("default", "http://127.0.0.1:8000/v1".into())
    );
    assert!(upstream.api_key.is_none() && upstream.models.matches("anything/at-all"));
    assert_eq!(defaults(&overrides).server.listen, "0.0.0.0:9000".parse().unwrap());
}

#[test]
fn missing_variables_point_into_the_original_file() {
    let errors = errors("[server]\nlisten = \"${NOPE}\"\n\n[[upstreams]]\napi_key = \"${KEY2}\"\n");
    assert_eq!(
        errors,
        [
            "t.toml:2:11: error: ${NOPE} is not set\n  = help: set it or use ${NOPE:-…}",
            "t.toml:4:1: error: [[upstreams]] entry is missing `name`",
            "t.toml:4:1: error: [[upstreams]] entry is missing `base_url`",
            "t.toml:5:12: error: ${KEY2} is not set\n  = help: set it or use ${KEY2:-…}",
        ]
    );
}

#[test]
fn positions_after_substitution_map_back() {
    // The substituted value is longer than its reference; the error is below it.
    let text = "[server]\nadmin_listen = \"${LONG}\"\nlisten = \"nope\"\n";
    assert_eq!(error(text), "t.toml:3:10: error: not a valid socket address: \"nope\"");
    // An error inside a substituted value points at its `${`.
    assert_eq!(
        error("[server]\nlisten = ${PORT:-5}\n"),
        "t.toml:2:10: error: invalid type: integer `5`, expected a string"
    );
}

#[test]
fn syntax_errors_are_all_reported_with_positions() {
    let errors = errors("[server\nlisten = \"a\"\nx = = 1\n");
    assert!(errors.len() >= 2, "{errors:#?}");
    assert!(errors[0].starts_with("t.toml:1:8: error: unclosed table"), "{errors:#?}");
    assert!(errors.iter().any(|e| e.starts_with("t.toml:3:")), "{errors:#?}");
}

#[test]
fn type_errors_carry_a_position() {
    assert_eq!(
        error("[server]\nlisten = 5\n"),
        "t.toml:2:10: error: invalid type: integer `5`, expected a string"
    );
    assert_eq!(
        error("[cache]\nenabled = \"yes\"\n"),
        "t.toml:2:11: error: invalid type: string \"yes\", expected a boolean"
    );
}

#[test]
fn every_unknown_field_is_reported_with_a_hint() {
    let text = "\
[server]
listne = \"127.0.0.1:1\"
tls = { cert = \"a\", kye = \"b\" }

[limit.default]
x = 1

[[keys]]
id = \"a\"
key = \"k\"
modles = [\"*\"]

[retry]
zebra = 1
";
    assert_eq!(
        errors(text),
        [
            "t.toml:2:1: error: unknown field `server.listne`\n  = help: did you mean `listen`?",
            // Unknown fields do not hide semantic errors.
            "t.toml:3:7: error: server.tls needs both `cert` and `key`",
            "t.toml:3:21: error: unknown field `server.tls.kye`\n  = help: did you mean `key`?",
            "t.toml:5:2: error: unknown field `limit`\n  = help: did you mean `limits`?",
            "t.toml:11:1: error: unknown field `keys[0].modles`\n  = help: did you mean `models`?",
            "t.toml:14:1: error: unknown field `retry.zebra`\n  = help: expected one of `max_attempts`, \
             `base_delay`, `max_delay`, `on_status`, `respect_retry_after`, `budget_percent`, `min_retries`",
        ]
    );
}

#[test]
fn unknown_fields_in_array_entries_are_found() {
    let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"https://a\"\n[[upstreams]]\nname = \"b\"\n\
                base_url = \"https://b\"\nwieght = 2\n";
    assert_eq!(
        errors(text),
        ["t.toml:7:1: error: unknown field `upstreams[1].wieght`\n  = help: did you mean `weight`?"]
    );
    assert_eq!(
        error("[limits.default]\nrequests_per_minute = \"10\"\n"),
        "t.toml:2:23: error: invalid type: string \"10\", expected an integer"
    );
}
