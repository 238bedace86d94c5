//! The shared cache tier: two replicas on one real Redis and one upstream. What one
//! replica stores is a hit on the other (streams replayed as streams), scopes hold
//! across replicas, damaged values are misses, a Redis outage leaves each replica on
//! its memory tier and sharing comes back with Redis, and nothing in Redis holds a key.
//!
//! Writes to Redis happen in the background after the response, so tests poll Redis
//! (bounded) for an entry before asking the other replica.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use spillway::runtime::Runtime;
use tokio::time::{Instant, sleep, sleep_until};

use crate::support::{
    gateway::{TestGateway, config_for, http, load},
    redis::RedisServer,
    upstream::{MockHandle, MockUpstream},
};

const CHAT: &str = "/v1/chat/completions";
const PREFIX: &str = "dc:";
const CACHE_ON: &str = "[cache]\nenabled = true\n";
/// How long a background write may take to show up in Redis before a test fails.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// A replica sharing `redis`'s cache (limits stay local), its link probed so that it
/// shares from its first request. `extra` is TOML for the upstream table and after; it
/// must hold a `[cache]` section.
async fn replica(upstream: &MockHandle, redis: &RedisServer, extra: &str) -> TestGateway {
    let shared = format!("{}limits = false\ncache = true\n", redis.section(PREFIX));
    let runtime = Runtime::new(load(&config_for(&upstream.base_url(), &format!("{extra}\n{shared}"))))
        .expect("runtime builds");
    let link = runtime.redis.clone().expect("[redis] is configured");
    link.probe().await;
    assert!(link.is_up(), "redis answers the probe");
    TestGateway::start_runtime(Arc::new(runtime)).await
}

fn chat_body(content: &str) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})
}

fn streamed(content: &str) -> Value {
    let mut body = chat_body(content);
    body["stream"] = json!(true);
    body
}

/// What a client saw of one answer.
#[derive(Debug)]
struct Answer {
    cache: String,
    content_type: String,
    text: String,
    took: Duration,
}

async fn send(gateway: &TestGateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let started = Instant::now();
    let mut request = http().post(gateway.url(CHAT)).bearer_auth(key).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("gateway answers");
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response.headers().get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned()
    };
    let (cache, content_type) = (header("x-spillway-cache"), header("content-type"));
    let text = response.text().await.expect("body");
    Answer { cache, content_type, text, took: started.elapsed() }
}

/// The cache entries' Redis keys.
fn cache_keys(redis: &RedisServer) -> Vec<String> {
    let reply = redis.command(&["KEYS", &format!("{PREFIX}cache:*")]);
    reply.lines().filter(|line| line.starts_with(PREFIX)).map(str::to_owned).collect()
}

/// Polls Redis until it holds at least `count` cache entries (a replica's background
/// write landed); fails the test after [`WRITE_WAIT`].
async fn wait_for_entries(redis: &RedisServer, count: usize) -> Vec<String> {
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        let keys = cache_keys(redis);
        if keys.len() >= count {
            return keys;
        }
        assert!(Instant::now() < deadline, "{count} entries expected in redis, found {keys:?}");
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_response_stored_on_one_replica_is_a_hit_on_another() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;

    let live = send(&a, "sk-a", &chat_body("hi"), &[]).await;
    assert_eq!(live.cache, "miss");
    let keys = wait_for_entries(&redis, 1).await;
    let shared = send(&b, "sk-a", &chat_body("hi"), &[]).await;

    assert_eq!(shared.cache, "hit");
    assert_eq!((shared.text, shared.content_type), (live.text, live.content_type));
    assert_eq!(upstream.calls(), 1);
    let digest = keys[0].strip_prefix("dc:cache:").expect("the prefix, then cache:");
    assert!(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{digest}");
    let remaining: u64 =
        redis.command(&["PTTL", &keys[0]]).trim_start_matches(':').trim().parse().expect("ms");
    assert!(remaining > 0 && remaining <= 3_600_000, "entries expire with the cache ttl: {remaining}");
}

#[tokio::test]
async fn a_stream_stored_on_one_replica_is_replayed_as_a_stream_on_another() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;

    let live = send(&a, "sk-a", &streamed("hi"), &[]).await;
    wait_for_entries(&redis, 1).await;
    let shared = send(&b, "sk-a", &streamed("hi"), &[]).await;

    assert_eq!((live.cache.as_str(), shared.cache.as_str()), ("miss", "hit"));
    assert!(shared.content_type.starts_with("text/event-stream"), "{}", shared.content_type);
    assert_eq!(shared.text, live.text, "replayed byte for byte");
    assert!(shared.text.matches("data: ").count() >= 3 && shared.text.ends_with("data: [DONE]\n\n"));
    // A non-streamed request never shares the stream's entry.
    assert_eq!(send(&b, "sk-a", &chat_body("hi"), &[]).await.cache, "miss");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn key_scope_holds_across_replicas() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;

    send(&a, "sk-a", &chat_body("hi"), &[]).await;
    wait_for_entries(&redis, 1).await;

    assert_eq!(send(&b, "sk-b", &chat_body("hi"), &[]).await.cache, "miss", "another key's answer");
    assert_eq!(send(&b, "sk-a", &chat_body("hi"), &[]).await.cache, "hit");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn no_store_writes_nothing_to_redis() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;

    let bypass = send(&a, "sk-a", &chat_body("private"), &[("cache-control", "no-store")]).await;
    assert_eq!(bypass.cache, "bypass");
    // A stored request after it: once its entry is in Redis, the earlier one would be too.
    send(&a, "sk-a", &chat_body("public"), &[]).await;
    wait_for_entries(&redis, 1).await;

    assert_eq!(cache_keys(&redis).len(), 1, "no-store wrote an entry");
    assert_eq!(send(&b, "sk-a", &chat_body("private"), &[]).await.cache, "miss");
    assert_eq!(send(&b, "sk-a", &chat_body("public"), &[]).await.cache, "hit");
}

#[tokio::test]
async fn a_foreign_or_damaged_value_in_redis_is_a_miss() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;
    // Each value replaces a real entry; the last one is not even a string.
    let plants: [&[&str]; 4] = [
        &["SET", "{key}", "garbage"],
        &["SET", "{key}", "SPWC\u{1}\u{0}\u{0}"],
        &["SET", "{key}", "SPWC\u{9}whatever comes next"],
        &["RPUSH", "{key}", "a", "b"],
    ];

    for (round, plant) in plants.iter().enumerate() {
        let body = chat_body(&format!("round {round}"));
        let before = cache_keys(&redis);
        assert_eq!(send(&a, "sk-a", &body, &[]).await.cache, "miss");
        let after = wait_for_entries(&redis, before.len() + 1).await;
        let key = after.iter().find(|key| !before.contains(key)).expect("the new entry");
        redis.command(&["DEL", key]);
        let args: Vec<&str> =
            plant.iter().map(|arg| if *arg == "{key}" { key.as_str() } else { arg }).collect();
        redis.command(&args);

        let answer = send(&b, "sk-a", &body, &[]).await;
        assert_eq!(answer.cache, "miss", "round {round}: {plant:?}");
        assert!(answer.text.contains("chat.completion"), "{}", answer.text);
    }
    assert_eq!(upstream.calls(), 2 * plants.len());
    // Still shared afterwards: nothing above took the link down.
    send(&a, "sk-a", &chat_body("after"), &[]).await;
    wait_for_entries(&redis, plants.len() + 1).await;
    assert_eq!(send(&b, "sk-a", &chat_body("after"), &[]).await.cache, "hit");
}

#[tokio::test]
async fn a_redis_outage_leaves_each_replica_its_memory_and_sharing_resumes() {
    let Some(mut redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;
    send(&a, "sk-a", &chat_body("before"), &[]).await;
    wait_for_entries(&redis, 1).await;
    assert_eq!(send(&b, "sk-a", &chat_body("before"), &[]).await.cache, "hit");

    redis.stop();
    let answers = [
        (send(&a, "sk-a", &chat_body("before"), &[]).await, "hit"),
        (send(&b, "sk-a", &chat_body("before"), &[]).await, "hit"),
        (send(&a, "sk-a", &chat_body("during"), &[]).await, "miss"),
        (send(&a, "sk-a", &chat_body("during"), &[]).await, "hit"),
        (send(&b, "sk-a", &chat_body("during"), &[]).await, "miss"),
        (send(&b, "sk-a", &chat_body("during"), &[]).await, "hit"),
    ];
    for (index, (answer, expected)) in answers.iter().enumerate() {
        assert_eq!(answer.cache, *expected, "answer {index} during the outage");
        assert!(answer.took < Duration::from_secs(1), "answer {index} waited {:?} on redis", answer.took);
    }

    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    for round in 0.. {
        assert!(Instant::now() < deadline, "sharing did not resume within 15 s");
        let body = chat_body(&format!("after {round}"));
        let before = cache_keys(&redis).len();
        send(&a, "sk-a", &body, &[]).await;
        // A's link may still be down: then nothing lands, and the next round tries again.
        let written = Instant::now() + Duration::from_secs(1);
        while cache_keys(&redis).len() == before && Instant::now() < written {
            sleep(Duration::from_millis(20)).await;
        }
        if cache_keys(&redis).len() > before && send(&b, "sk-a", &body, &[]).await.cache == "hit" {
            break;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn nothing_in_redis_holds_a_key_or_an_authorization_value() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let passthrough =
        [replica(&upstream, &redis, CACHE_ON).await, replica(&upstream, &redis, CACHE_ON).await];
    let keys_mode = "api_key = \"sk-upstream-secret\"\n\n[auth]\nmode = \"keys\"\n\n\
                     [[keys]]\nid = \"team\"\nkey = \"sk-gateway-secret\"\n\n[cache]\nenabled = true\n";
    let gateway_keys =
        [replica(&upstream, &redis, keys_mode).await, replica(&upstream, &redis, keys_mode).await];

    let pairs = [(&passthrough, "sk-passthrough-secret"), (&gateway_keys, "sk-gateway-secret")];
    for (pair, caller) in pairs {
        for body in [chat_body("secret test"), streamed("secret test")] {
            send(&pair[0], caller, &body, &[]).await;
        }
    }
    let entries = wait_for_entries(&redis, 4).await;
    for (pair, caller) in pairs {
        for body in [chat_body("secret test"), streamed("secret test")] {
            assert_eq!(send(&pair[1], caller, &body, &[]).await.cache, "hit", "the entries are shared");
        }
    }

    let reply = redis.command(&["KEYS", "*"]);
    let all_keys: Vec<&str> = reply.lines().filter(|line| !line.starts_with(['*', '$'])).collect();
    assert!(all_keys.len() >= entries.len(), "{all_keys:?}");
    for key in &all_keys {
        let value = redis.command(&["GET", key]);
        assert!(value.starts_with('$') && value.len() > 100, "{key} holds {value:?}");
        for secret in
            ["sk-passthrough-secret", "sk-gateway-secret", "sk-upstream-secret", "Bearer", "uthorization"]
        {
            assert!(!key.contains(secret), "{key} names {secret}");
            assert!(!value.contains(secret), "{key} holds {secret}");
        }
    }
}

#[tokio::test]
async fn a_shared_hit_stays_in_memory_only_as_long_as_redis_had_left() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, CACHE_ON).await;
    let b = replica(&upstream, &redis, CACHE_ON).await;

    send(&a, "sk-a", &chat_body("short"), &[("x-spillway-cache-ttl", "3")]).await;
    wait_for_entries(&redis, 1).await;
    // Redis expires the entry at most 3 s from here.
    let written = Instant::now();
    sleep_until(written + Duration::from_millis(1500)).await;
    assert_eq!(send(&b, "sk-a", &chat_body("short"), &[]).await.cache, "hit");

    // B's memory copy took ~1.5 s of life, not 3 s: past the entry's end it is gone
    // (with the full ttl it would live until ~4.5 s).
    sleep_until(written + Duration::from_millis(3600)).await;
    assert_eq!(send(&b, "sk-a", &chat_body("short"), &[]).await.cache, "miss");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test]
async fn a_client_ttl_is_capped_at_the_configured_one_in_redis_too() {
    let Some(redis) = RedisServer::start() else { return };
    let upstream = MockUpstream::new().start().await;
    let a = replica(&upstream, &redis, "[cache]\nenabled = true\nttl = \"1m\"\n").await;

    let century = (100 * 365 * 24 * 3600_u64).to_string();
    send(&a, "sk-a", &chat_body("pinned"), &[("x-spillway-cache-ttl", &century)]).await;
    let keys = wait_for_entries(&redis, 1).await;

    let remaining: u64 =
        redis.command(&["PTTL", &keys[0]]).trim_start_matches(':').trim().parse().expect("ms");
    assert!(remaining > 0 && remaining <= 60_000, "a client ttl outlived cache.ttl: {remaining} ms");
}

#[tokio::test]
async fn a_reload_keeps_the_shared_cache_only_while_its_link_and_switches_are_the_same() {
    // The link connects lazily: no server is needed to tell which store a reload keeps.
    let toml = |prefix: &str, shared: bool, size: &str| {
        let redis = format!(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\nprefix = \"{prefix}\"\nlimits = false\ncache = {shared}\n"
        );
        config_for("http://127.0.0.1:1", &format!("[cache]\nmax_size = \"{size}\"\n{redis}"))
    };
    let runtime = Runtime::new(load(&toml("a:", true, "1MiB"))).expect("runtime builds");
    let same_cache = |next: &Runtime| match (&runtime.cache, &next.cache) {
        (Some(before), Some(after)) => Arc::ptr_eq(before, after),
        _ => false,
    };

    let unchanged = runtime.reload(load(&toml("a:", true, "1MiB"))).expect("reloads");
    assert!(same_cache(&unchanged), "an unchanged config keeps the cache");
    for (prefix, shared, size, why) in [
        ("b:", true, "1MiB", "another prefix"),
        ("a:", false, "1MiB", "cache = false"),
        ("a:", true, "2MiB", "a new size"),
    ] {
        let changed = runtime.reload(load(&toml(prefix, shared, size))).expect("reloads");
        assert!(changed.cache.is_some() && !same_cache(&changed), "{why} keeps the old cache");
    }
}
