//! Distributed limits seen from the outside: two gateways sharing one real Redis
//! enforce one quota per key (requests, tokens, in-flight requests); with Redis gone
//! each serves on its own local limits without waiting for it, and sharing resumes
//! once Redis is back. Nothing either of them writes to Redis holds a key or an
//! `Authorization` value.
//!
//! Each test runs its own `redis-server`; without one installed it returns at once
//! (under `CI` it fails instead, see `support::redis`). The scripts' semantics
//! against the local limiter are in `script`.

mod script;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{
    gateway::{TestGateway, config_for, http},
    redis::RedisServer,
    upstream::{Gate, MockHandle, MockUpstream, Reply},
};

const PREFIX: &str = "dl:";
/// The gateway key whose limits are shared; it must never reach Redis.
const TEAM_KEY: &str = "gw-team-7f3a9c2e51";
/// Keys of two callers that only show when a replica writes to Redis.
const PROBE_A: (&str, &str) = ("probe-a", "gw-probe-a-5d1e");
const PROBE_B: (&str, &str) = ("probe-b", "gw-probe-b-8b2c");
/// How long a replica may take to share (again) once Redis answers.
const SHARING_WITHIN: Duration = Duration::from_secs(10);

/// A `keys`-mode config with key `team` limited by `team_limits`, two probe keys, and
/// limits shared through `redis`.
fn config(upstream: &MockHandle, redis: &RedisServer, team_limits: &str) -> String {
    let extra = format!(
        r#"
[auth]
mode = "keys"

[[keys]]
id = "team"
key = "{TEAM_KEY}"
{team_limits}

[[keys]]
id = "{}"
key = "{}"
requests_per_minute = 100000

[[keys]]
id = "{}"
key = "{}"
requests_per_minute = 100000

{}limits = true
cache = false
"#,
        PROBE_A.0,
        PROBE_A.1,
        PROBE_B.0,
        PROBE_B.1,
        redis.section(PREFIX)
    );
    config_for(&upstream.base_url(), &extra)
}

/// Two replicas of the same config.
async fn replicas(config: &str) -> (TestGateway, TestGateway) {
    (TestGateway::start(config).await, TestGateway::start(config).await)
}

/// A chat completion as `key`, asking for `max_tokens` when given.
async fn chat(gateway: &TestGateway, key: &str, stream: bool, max_tokens: Option<u64>) -> reqwest::Response {
    let mut body = json!({"model": "gpt-4o", "messages": [], "stream": stream});
    if let Some(max_tokens) = max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    let request = http().post(gateway.url("/v1/chat/completions")).bearer_auth(key).json(&body);
    request.send().await.expect("gateway answers")
}

fn number(response: &reqwest::Response, name: &str) -> i64 {
    let value = response.headers().get(name).and_then(|value| value.to_str().ok()).unwrap_or_default();
    value.parse().unwrap_or_else(|_| panic!("{name} is not a number: {value:?}"))
}

async fn refusal(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json error");
    (status, body["error"]["type"].as_str().unwrap_or_default().to_owned())
}

/// The Redis keys of configured key `id`'s buckets, as a `KEYS` pattern.
fn buckets_of_id(id: &str) -> String {
    format!("{PREFIX}limit:c:{id}:buckets:*")
}

/// The Redis keys of passthrough key `key`'s buckets (by its hash), as a `KEYS` pattern.
fn buckets_of_key(key: &str) -> String {
    let hash = spillway::secret::KeyHash::of(key.as_bytes());
    format!("{PREFIX}limit:p:{}:buckets:*", hex::encode(hash.as_bytes()))
}

/// Waits until `gateway` decides in Redis: a request as `key` leaves buckets
/// matching `pattern` there. Panics after [`SHARING_WITHIN`].
async fn until_shared(redis: &RedisServer, gateway: &TestGateway, pattern: &str, key: &str) {
    let deadline = Instant::now() + SHARING_WITHIN;
    loop {
        // Refused or not (the local limiter may answer until the link is up).
        http().get(gateway.url("/v1/models")).bearer_auth(key).send().await.expect("answer");
        if redis.command(&["KEYS", pattern]).contains(":buckets:") {
            return;
        }
        assert!(Instant::now() < deadline, "{pattern} did not appear within {SHARING_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until both replicas of a `config()` gateway decide in Redis.
async fn until_both_share(redis: &RedisServer, a: &TestGateway, b: &TestGateway) {
    until_shared(redis, a, &buckets_of_id(PROBE_A.0), PROBE_A.1).await;
    until_shared(redis, b, &buckets_of_id(PROBE_B.0), PROBE_B.1).await;
}

/// Every key in Redis and every value under it, as text.
fn dump(redis: &RedisServer) -> String {
    let keys = redis.command(&["KEYS", "*"]);
    let mut text = keys.clone();
    for key in keys.lines().filter(|line| !line.starts_with(['*', '$'])) {
        let contents = match redis.command(&["TYPE", key]).trim() {
            "+hash" => redis.command(&["HGETALL", key]),
            "+zset" => redis.command(&["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            "+string" => redis.command(&["GET", key]),
            other => panic!("unexpected {other} at {key}"),
        };
        text.push_str(&contents);
    }
    text
}

#[track_caller]
fn assert_no_secrets(redis: &RedisServer, secrets: &[&str]) {
    let dump = dump(redis);
    assert!(dump.contains(&format!("{PREFIX}limit:")), "nothing was written:\n{dump}");
    for secret in secrets.iter().chain(&["Bearer", "bearer"]) {
        assert!(!dump.contains(secret), "{secret:?} was written to Redis:\n{dump}");
    }
}

#[tokio::test]
async fn two_replicas_share_one_requests_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let (a, b) = replicas(&config(&upstream, &redis, "requests_per_minute = 3")).await;
    until_both_share(&redis, &a, &b).await;
    let calls = upstream.calls();

    for (gateway, remaining) in [(&a, 2), (&a, 1), (&b, 0)] {
        let response = chat(gateway, TEAM_KEY, false, None).await;
        assert_eq!(response.status(), 200);
        assert_eq!(number(&response, "x-ratelimit-remaining-requests"), remaining);
    }
    for gateway in [&a, &b] {
        let refused = chat(gateway, TEAM_KEY, false, None).await;
        // One request every 20 s at 3 a minute, less the time the test has taken.
        let wait = number(&refused, "retry-after-ms");
        assert!((15_000..=20_000).contains(&wait), "retry-after-ms {wait}");
        assert_eq!(number(&refused, "retry-after"), (wait + 999) / 1000);
        assert_eq!(refusal(refused).await, (429, "requests".into()));
    }
    assert_eq!(upstream.calls(), calls + 3, "a refused request must not reach the upstream");
    assert_no_secrets(&redis, &[TEAM_KEY, PROBE_A.1, PROBE_B.1]);
}

#[tokio::test]
async fn two_replicas_share_one_tokens_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let gate = Gate::new();
    let upstream =
        MockUpstream::new().route("/v1/chat/completions", Reply::openai().gate_after(1, &gate)).start().await;
    let (a, b) = replicas(&config(&upstream, &redis, "tokens_per_minute = 1000")).await;
    until_both_share(&redis, &a, &b).await;

    // A stream on A holds its estimate (prompt + 800) until it ends.
    let held = chat(&a, TEAM_KEY, true, Some(800)).await;
    assert_eq!(held.status(), 200);
    let left = number(&held, "x-ratelimit-remaining-tokens");
    assert!((150..200).contains(&left), "{left} tokens left after reserving 800");
    let mut held = held.bytes_stream();
    held.next().await.expect("a first chunk").expect("no error");

    // B sees what A took: more than is left is refused, less is admitted.
    let refused = chat(&b, TEAM_KEY, false, Some(left as u64 + 50)).await;
    assert!(number(&refused, "retry-after-ms") > 0);
    assert_eq!(refusal(refused).await, (429, "tokens".into()));
    let admitted = chat(&b, TEAM_KEY, false, Some(left as u64 - 80)).await;
    assert_eq!(admitted.status(), 200);
    admitted.bytes().await.expect("body");
    let refused = chat(&b, TEAM_KEY, false, Some(600)).await;
    assert_eq!(refusal(refused).await, (429, "tokens".into()));

    // A's stream ends: its estimate is settled to the real usage, in Redis, and
    // B can take much more again.
    gate.open();
    while held.next().await.transpose().expect("the stream ends cleanly").is_some() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = chat(&b, TEAM_KEY, false, Some(600)).await;
        if response.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "A's unused estimate never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_secrets(&redis, &[TEAM_KEY, PROBE_A.1, PROBE_B.1]);
}

/// Two sharing replicas of a key with `max_concurrent = 1`, and a stream on A that
/// holds that one slot (its first chunk read) until `gate` opens.
async fn holding_the_only_slot(
    redis: &RedisServer,
    gate: &Gate,
) -> (
    MockHandle,
    TestGateway,
    TestGateway,
    impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) {
    let upstream =
        MockUpstream::new().route("/v1/chat/completions", Reply::openai().gate_after(1, gate)).start().await;
    let (a, b) = replicas(&config(&upstream, redis, "max_concurrent = 1")).await;
    until_both_share(redis, &a, &b).await;
    let held = chat(&a, TEAM_KEY, true, None).await;
    assert_eq!(held.status(), 200);
    let mut held = held.bytes_stream();
    held.next().await.expect("a first chunk").expect("no error");
    (upstream, a, b, held)
}

#[tokio::test]
async fn two_replicas_share_one_concurrency_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let gate = Gate::new();
    let (_upstream, a, b, mut held) = holding_the_only_slot(&redis, &gate).await;

    // A slow stream on A holds the only slot: B is refused, and so is A.
    for gateway in [&b, &a] {
        let refused = chat(gateway, TEAM_KEY, false, None).await;
        assert_eq!(number(&refused, "retry-after"), 1);
        assert_eq!(refusal(refused).await, (429, "concurrency".into()));
    }

    // The stream ends: the slot comes back (released in the background, so polled).
    gate.open();
    while held.next().await.transpose().expect("the stream ends cleanly").is_some() {}
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = chat(&b, TEAM_KEY, false, None).await;
        if response.status() == 200 {
            response.bytes().await.expect("body");
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not released after the stream ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slots = format!("{PREFIX}limit:c:team:slots:1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !redis.command(&["ZCARD", &slots]).starts_with(":0") {
        assert!(Instant::now() < deadline, "a lease outlived its request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_no_secrets(&redis, &[TEAM_KEY, PROBE_A.1, PROBE_B.1]);
}

#[tokio::test]
async fn a_slot_freed_while_redis_is_stalled_is_released_once_it_answers() {
    let Some(redis) = RedisServer::start() else { return };
    let gate = Gate::new();
    let (_upstream, a, b, mut held) = holding_the_only_slot(&redis, &gate).await;

    // Redis stalls; A finds out (a request waits the timeout, then is decided locally).
    redis.freeze();
    let local = chat(&a, TEAM_KEY, false, None).await;
    assert_eq!(local.status(), 200, "decided on A's own limits while Redis is away");
    local.bytes().await.expect("body");
    // The held stream ends while A's link is down: its lease must still be released.
    gate.open();
    while held.next().await.transpose().expect("the stream ends cleanly").is_some() {}

    redis.thaw();
    let slots = format!("{PREFIX}limit:c:team:slots:1");
    let deadline = Instant::now() + SHARING_WITHIN;
    while !redis.command(&["ZCARD", &slots]).starts_with(":0") {
        assert!(Instant::now() < deadline, "the lease outlived its request: {}", dump(&redis));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_both_share(&redis, &a, &b).await;
    let response = chat(&b, TEAM_KEY, false, None).await;
    assert_eq!(response.status(), 200, "the slot is free again");
}

#[tokio::test]
async fn without_redis_each_replica_enforces_the_full_quota_then_shares_again() {
    let Some(mut redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let (a, b) = replicas(&config(&upstream, &redis, "requests_per_minute = 3")).await;
    until_both_share(&redis, &a, &b).await;
    let timed = |gateway| async move {
        let started = Instant::now();
        let response = chat(gateway, TEAM_KEY, false, None).await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(800), "a request waited {took:?} on Redis");
        response.status().as_u16()
    };

    // Shared: 3 in all.
    let statuses = [timed(&a).await, timed(&a).await, timed(&b).await, timed(&b).await];
    assert_eq!(statuses, [200, 200, 200, 429]);

    // Redis gone: each replica answers on its own, at once, with the full quota.
    redis.stop();
    for gateway in [&a, &b] {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(timed(gateway).await);
        }
        assert_eq!(statuses, [200, 200, 200, 429], "local limits while Redis is down");
    }

    // Redis back (empty, scripts gone): both share again within a few seconds.
    redis.resume();
    until_both_share(&redis, &a, &b).await;
    let statuses = [timed(&b).await, timed(&a).await, timed(&b).await, timed(&a).await];
    assert_eq!(statuses, [200, 200, 200, 429], "shared again");
    assert_no_secrets(&redis, &[TEAM_KEY, PROBE_A.1, PROBE_B.1]);
}

#[tokio::test]
async fn passthrough_keys_are_shared_by_their_hash() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let extra =
        format!("[limits.default]\nrequests_per_minute = 1\n\n{}cache = false\n", redis.section(PREFIX));
    let (a, b) = replicas(&config_for(&upstream.base_url(), &extra)).await;
    let (secret, probe) = ("sk-passthrough-4e8d0b6a", "sk-passthrough-probe");
    until_shared(&redis, &b, &buckets_of_key(probe), probe).await;

    // The first request that reaches Redis is the caller's only one for 60 s.
    let deadline = Instant::now() + SHARING_WITHIN;
    while !redis.command(&["KEYS", &buckets_of_key(secret)]).contains(":buckets:") {
        assert!(Instant::now() < deadline, "a passthrough key was never shared");
        chat(&a, secret, false, None).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = chat(&b, secret, false, None).await;
    assert_eq!(refusal(refused).await, (429, "requests".into()));
    let other = chat(&b, "sk-passthrough-other", false, None).await;
    assert_eq!(other.status(), 200, "another key has its own buckets");
    assert_no_secrets(&redis, &[secret, probe, "sk-passthrough-other"]);
}
