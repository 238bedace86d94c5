//! The semantic checks, one section at a time, each with its exact message.

use std::time::Duration;

use crate::{
    config::{
        Overrides, load_str, parse_base_url,
        tests::{env, error, errors, example, load},
    },
    secret::KeyHash,
};

#[test]
fn server_values_are_checked() {
    let at = |body: &str| error(&format!("[server]\n{body}\n"));
    assert_eq!(
        at("listen = \"localhost:80\""),
        "t.toml:2:10: error: not a valid socket address: \"localhost:80\""
    );
    assert_eq!(
        at("admin_listen = \"127.0.0.1:8080\""),
        "t.toml:2:16: error: admin_listen is the same address as listen: \"127.0.0.1:8080\""
    );
    assert_eq!(at("max_request_body = \"lots\""), "t.toml:2:20: error: not a valid size: \"lots\"");
    assert_eq!(
        at("max_request_body = \"0\""),
        "t.toml:2:20: error: `max_request_body` must be greater than 0"
    );
    assert_eq!(
        at("request_timeout = \"ten minutes\""),
        "t.toml:2:19: error: not a valid duration: \"ten minutes\""
    );
    assert_eq!(at("request_timeout = \"0s\""), "t.toml:2:19: error: `request_timeout` must be longer than 0");
    assert_eq!(at("tls = { cert = \"a.pem\" }"), "t.toml:2:7: error: server.tls needs both `cert` and `key`");
    let config = load("[server]\nadmin_listen = \"\"\nshutdown_grace = \"0s\"").unwrap();
    assert_eq!((config.server.admin_listen, config.server.shutdown_grace), (None, Duration::ZERO));
}

#[test]
fn files_must_exist_and_are_resolved_from_the_config_directory() {
    // `Cargo.toml` is next to `config/`, so `../Cargo.toml` from a config there.
    let file = example("x.toml").display().to_string();
    let text = "[server]\ntls = { cert = \"../Cargo.toml\", key = \"../Cargo.toml\" }\n\
                [[upstreams]]\nname = \"a\"\nbase_url = \"https://a\"\nca_file = \"../nope.pem\"\n";
    let errors = load_str(text, &file, env, &Overrides::default()).unwrap_err();
    let [error] = &errors.0[..] else { panic!("{errors}") };
    assert_eq!(
        (error.line, error.col, error.message.as_str()),
        (6, 11, "cannot read ca_file \"../nope.pem\": no such file or directory (os error 2)")
    );
    let fixed = text.replace("../nope.pem", "../Cargo.toml");
    let config = load_str(&fixed, &file, env, &Overrides::default()).unwrap();
    assert_eq!(config.upstreams[0].ca_file, Some(example("../Cargo.toml")));
    assert!(config.server.tls.is_some_and(|tls| tls.cert.is_file()));
    assert!(error_of_dir().contains("not a file"));
}

fn error_of_dir() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    error(&format!("[server]\ntls = {{ cert = {dir:?}, key = \"{dir}/Cargo.toml\" }}"))
}

#[test]
fn auth_mode_is_checked() {
    assert_eq!(
        errors("[auth]\nmode = \"key\"\n"),
        ["t.toml:2:8: error: not a valid auth.mode: \"key\"\n  = help: did you mean `keys`?"]
    );
    let open = errors("[auth]\nmode = \"open\"\n");
    assert!(open[0].ends_with("= help: expected \"passthrough\" or \"keys\""), "{open:?}");
    assert_eq!(
        error("[auth]\nmode = \"keys\"\n"),
        "t.toml:2:8: error: auth.mode = \"keys\" needs at least one [[keys]] entry"
    );
}

#[test]
fn limits_are_positive_and_bursts_fit() {
    let errors = errors(
        "[limits.default]\nrequests_per_minute = 0\ntokens_per_minute = 5000000000\n\
         max_concurrent = -1\nburst_tokens = 10\n",
    );
    assert_eq!(
        errors,
        [
            "t.toml:2:23: error: `requests_per_minute` must be at least 1, not 0",
            "t.toml:3:21: error: `tokens_per_minute` is too large: 5000000000\n  = help: the maximum is 4294967295",
            "t.toml:4:18: error: `max_concurrent` must be at least 1, not -1",
        ]
    );
    assert_eq!(
        error("[limits.default]\nburst_requests = 10\n"),
        "t.toml:2:18: error: burst_requests needs requests_per_minute"
    );
    assert_eq!(
        error("[limits.default]\nrequests_per_minute = 60\nburst_requests = 61\n"),
        "t.toml:3:18: error: burst_requests (61) exceeds requests_per_minute (60)"
    );
    // A key's burst may rely on the default per-minute amount.
    let text =
        "[limits.default]\ntokens_per_minute = 1000\n[[keys]]\nid = \"a\"\nkey = \"k\"\nburst_tokens = 100\n";
    let config = load(text).unwrap();
    assert_eq!(config.keys[0].limits.burst_tokens.map(|b| b.get()), Some(100));
    assert_eq!(config.keys[0].limits.tokens_per_minute, None);
    assert_eq!(config.default_limits.tokens_per_minute.map(|t| t.get()), Some(1000));
}

#[test]
fn limits_settings_are_checked() {
    assert_eq!(
        errors("[limits]\nmax_tracked_keys = 0\ndefault_completion_tokens = -1\n"),
        [
            "t.toml:2:20: error: `max_tracked_keys` must be at least 1, not 0",
            "t.toml:3:29: error: `default_completion_tokens` must be 0 or more, not -1",
        ]
    );
    let text = "[limits]\nmax_tracked_keys = 5000000000\ndefault_completion_tokens = 4096\n\
                [limits.default]\nrequests_per_minute = 60\n";
    let config = load(text).unwrap();
    assert_eq!(config.limits.max_tracked_keys.get(), 5_000_000_000);
    assert_eq!(config.limits.default_completion_tokens, 4096);
    assert_eq!(config.default_limits.requests_per_minute.map(|r| r.get()), Some(60));
    assert_eq!(
        errors("[limits]\nmax_tracked_key = 10\n"),
        [
            "t.toml:2:1: error: unknown field `limits.max_tracked_key`\n  = help: did you mean `max_tracked_keys`?"
        ]
    );
}

#[test]
fn keys_are_checked_and_plaintext_is_hashed_away() {
    let text =
        "[auth]\nmode = \"keys\"\n[[keys]]\nid = \"team\"\nkey = \"${TEAM_KEY}\"\nmodels = [\"gpt-4o*\"]\n";
    let config = load(text).unwrap();
    let key = &config.keys[0];
    assert_eq!(key.id.as_str(), "team");
    assert!(key.hash.ct_eq(&KeyHash::of(b"sk-team-secret")));
    assert!(key.models.as_ref().is_some_and(|m| m.matches("gpt-4o-mini") && !m.matches("gpt-4")));
    assert!(!format!("{config:?}").contains("sk-team-secret"));

    let hash = KeyHash::of(b"sk-team-secret").to_string();
    let text = format!(
        "[[keys]]\nkey = \"a\"\n\
         [[keys]]\nid = \"\"\nkey = \"b\"\n\
         [[keys]]\nid = \"x\"\nkey = \"${{TEAM_KEY}}\"\n\
         [[keys]]\nid = \"x\"\nkey = \"other\"\n\
         [[keys]]\nid = \"y\"\nkey = \"c\"\nkey_hash = \"{hash}\"\n\
         [[keys]]\nid = \"z\"\n\
         [[keys]]\nid = \"w\"\nkey_hash = \"sha256:abc\"\nmodels = [\"[a\"]\n\
         [[keys]]\nid = \"v\"\nkey = \" padded \"\nmodels = []\n"
    );
    let duplicate = format!(
        "[[keys]]\nid = \"a\"\nkey = \"${{TEAM_KEY}}\"\n[[keys]]\nid = \"b\"\nkey_hash = \"{hash}\"\n"
    );
    assert_eq!(
        errors(&duplicate),
        ["t.toml:6:12: error: key `b` is the same key as key `a`\n  = help: each key must be unique"]
    );
    assert_eq!(
        errors(&text),
        [
            "t.toml:1:1: error: [[keys]] entry is missing `id`\n  = help: every key needs an `id` for logs and metrics",
            "t.toml:4:6: error: key `id` must not be empty",
            "t.toml:10:6: error: duplicate key id `x`\n  = help: first defined at 7:6",
            "t.toml:15:12: error: key `y` sets both `key` and `key_hash`\n  = help: keep one of them",
            "t.toml:16:1: error: key `z` needs `key` or `key_hash`\n  = help: `spillway hash-key` prints a key_hash",
            "t.toml:20:12: error: `key_hash` of key `w` must be \"sha256:\" followed by 64 hex digits\n  \
             = help: `spillway hash-key` prints one",
            "t.toml:21:11: error: not a valid glob: \"[a\": unclosed character class; missing ']'",
            "t.toml:24:7: error: `key` of key `v` has leading or trailing whitespace\n  \
             = help: presented keys are trimmed, so it could never match",
            "t.toml:25:10: error: `models` is empty\n  = help: leave it out to allow every model",
        ]
    );
}

#[test]
fn upstreams_are_checked() {
    let text = "\
[[upstreams]]
base_url = \"https://a/v1/\"
[[upstreams]]
name = \"b\"
base_url = \"ftp://b\"
weight = 0
[[upstreams]]
name = \"b\"
base_url = \"https://b/v1?x=1\"
timeout = \"0s\"
connect_timeout = \"soon\"
[[upstreams]]
name = \" \"
base_url = \"https://user:pw@c/v1#top\"
api_key = \"sk bad\"
[[upstreams]]
name = \"e\"
";
    assert_eq!(
        errors(text),
        [
            "t.toml:1:1: error: [[upstreams]] entry is missing `name`",
            "t.toml:5:12: error: not an absolute http or https url: \"ftp://b\"",
            "t.toml:6:10: error: `weight` must be at least 1, not 0",
            "t.toml:8:8: error: duplicate upstream name `b`\n  = help: first defined at 4:8",
            "t.toml:9:12: error: a base url must not have a query or fragment",
            "t.toml:10:11: error: `timeout` must be longer than 0",
            "t.toml:11:19: error: not a valid duration: \"soon\"\n  \
             = help: write a number and a unit, e.g. \"250ms\", \"30s\", \"10m\"",
            "t.toml:13:8: error: upstream `name` must not be empty",
            "t.toml:14:12: error: a base url must not contain user:password@; put the credential in `api_key`",
            "t.toml:16:1: error: [[upstreams]] entry is missing `base_url`",
        ]
    );
    let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"https://a/v1/\"\napi_key = \"sk bad\"\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("t.toml:4:11: error: `api_key` of upstream `a` has characters"));
    assert!(!errors[0].contains("sk bad"));
    let config = load("[[upstreams]]\nname = \"a\"\nbase_url = \"https://a/v1/\"\napi_key = \"\"").unwrap();
    assert_eq!(config.upstreams[0].base_url, "https://a/v1");
    assert!(config.upstreams[0].api_key.is_none());
    assert_eq!(error("upstreams = []"), "t.toml:1:13: error: `upstreams` is empty");
    assert_eq!(parse_base_url("http://[::1]:8000/").map(|u| u.to_string()), Ok("http://[::1]:8000/".into()));
}

#[test]
fn retry_is_checked() {
    let errors = errors("[retry]\nmax_attempts = 0\nbase_delay = \"10s\"\non_status = [429, 600, 99]\n");
    assert_eq!(
        errors,
        [
            "t.toml:2:16: error: `max_attempts` must be at least 1, not 0",
            "t.toml:3:14: error: base_delay (\"10s\") is longer than max_delay (\"8s\")",
            "t.toml:4:19: error: not an http status code: 600\n  = help: use a code from 100 to 599",
            "t.toml:4:24: error: not an http status code: 99\n  = help: use a code from 100 to 599",
        ]
    );
    // With only max_delay written, the error points at it.
    assert_eq!(
        error("[retry]\nmax_delay = \"100ms\"\n"),
        "t.toml:2:13: error: base_delay (\"250ms\") is longer than max_delay (\"100ms\")"
    );
}

#[test]
fn cache_and_redis_are_checked() {
    let text = "[cache]\nscope = \"globl\"\npaths = [\"v1/chat\"]\nmax_size = \"0\"\nttl = \"0s\"\n\
                [redis]\nurl = \"${REDIS_URL}\"\n";
    let errors = errors(text);
    assert_eq!(
        errors,
        [
            "t.toml:2:9: error: not a valid cache.scope: \"globl\"\n  = help: did you mean `global`?",
            "t.toml:3:10: error: cache path must start with \"/\": \"v1/chat\"\n  = help: e.g. \"/v1/chat/completions\"",
            "t.toml:4:12: error: `max_size` must be greater than 0",
            "t.toml:5:7: error: `ttl` must be longer than 0",
            "t.toml:7:7: error: redis `url` must start with redis:// or rediss:// and name a host\n  \
             = help: e.g. \"redis://127.0.0.1:6379\"",
        ]
    );
    assert!(errors.iter().all(|e| !e.contains("hunter2")));
    assert!(load("[redis]\nprefix = \"x:\"\n").unwrap().redis.is_none());
    let redis = load("[redis]\nurl = \"rediss://:pw@h:6380\"\ncache = false\n").unwrap().redis.unwrap();
    assert_eq!(
        (redis.prefix.as_str(), redis.timeout, redis.limits, redis.cache),
        ("spillway:", Duration::from_millis(100), true, false)
    );
    assert_eq!(redis.url.expose(), "rediss://:pw@h:6380");
    assert!(!format!("{redis:?}").contains(":pw@"));
}

#[test]
fn all_problems_are_reported_in_one_run() {
    let text = "[server]\nlisten = \"x\"\nbogus = 1\n[auth]\nmode = \"keys\"\n\
                [retry]\nmax_attempts = 0\n[cache]\nttl = \"forever\"\n[[upstreams]]\nname = \"a\"\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 6, "{errors:#?}");
    let lines: Vec<&str> = errors.iter().filter_map(|e| e.split(": error:").next()).collect();
    assert_eq!(
        lines,
        ["t.toml:2:10", "t.toml:3:1", "t.toml:5:8", "t.toml:7:16", "t.toml:9:7", "t.toml:10:1"]
    );
}

/// Every duration and size at its maximum, as `spillway check` accepts it.
const AT_MAXIMUM: &str = "\
[server]
max_request_body = \"4GiB\"
request_timeout = \"7d\"
shutdown_grace = \"7d\"
header_read_timeout = \"1d\"
max_header_size = \"1MiB\"
idle_timeout = \"1d\"
[[upstreams]]
name = \"a\"
base_url = \"https://a/v1\"
connect_timeout = \"1d\"
timeout = \"7d\"
[retry]
base_delay = \"1d\"
max_delay = \"1d\"
[cache]
max_size = \"1TiB\"
ttl = \"365d\"
[redis]
url = \"redis://127.0.0.1:6379\"
timeout = \"1m\"
";

#[test]
fn durations_and_sizes_are_bounded() {
    let config = load(AT_MAXIMUM).unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(config.server.request_timeout, Duration::from_secs(7 * 86_400));
    assert_eq!(config.cache.max_size.as_u64(), 1 << 40);
    // One more of anything is refused, every field in the same run, with the maximum.
    let mut over = AT_MAXIMUM.to_owned();
    for (max, more) in [
        ("4GiB", "4097MiB"),
        ("7d", "168h 1s"),
        ("1d", "1441m"),
        ("1MiB", "1025KiB"),
        ("1TiB", "1025GiB"),
        ("365d", "1y"),
        ("1m", "61s"),
    ] {
        over = over.replace(&format!("\"{max}\""), &format!("\"{more}\""));
    }
    assert_eq!(
        errors(&over),
        [
            "t.toml:2:20: error: `max_request_body` is too large: \"4097MiB\"\n  = help: the maximum is \"4GiB\"",
            "t.toml:3:19: error: `request_timeout` is too long: \"168h 1s\"\n  = help: the maximum is \"7d\"",
            "t.toml:4:18: error: `shutdown_grace` is too long: \"168h 1s\"\n  = help: the maximum is \"7d\"",
            "t.toml:5:23: error: `header_read_timeout` is too long: \"1441m\"\n  = help: the maximum is \"1d\"",
            "t.toml:6:19: error: `max_header_size` is too large: \"1025KiB\"\n  = help: the maximum is \"1MiB\"",
            "t.toml:7:16: error: `idle_timeout` is too long: \"1441m\"\n  = help: the maximum is \"1d\"",
            "t.toml:11:19: error: `connect_timeout` is too long: \"1441m\"\n  = help: the maximum is \"1d\"",
            "t.toml:12:11: error: `timeout` is too long: \"168h 1s\"\n  = help: the maximum is \"7d\"",
            "t.toml:14:14: error: `base_delay` is too long: \"1441m\"\n  = help: the maximum is \"1d\"",
            "t.toml:15:13: error: `max_delay` is too long: \"1441m\"\n  = help: the maximum is \"1d\"",
            "t.toml:17:12: error: `max_size` is too large: \"1025GiB\"\n  = help: the maximum is \"1TiB\"",
            "t.toml:18:7: error: `ttl` is too long: \"1y\"\n  = help: the maximum is \"365d\"",
            "t.toml:21:11: error: `redis timeout` is too long: \"61s\"\n  = help: the maximum is \"1m\"",
        ]
    );
    // What broke every request: an `Instant` overflow at run time.
    assert_eq!(
        error("[server]\nrequest_timeout = \"18446744073709551615s\"\n"),
        "t.toml:2:19: error: `request_timeout` is too long: \"18446744073709551615s\""
    );
}
