//! The Redis limiter's scripts against a real Redis, call by call: the same answers
//! as the local limiter for the same sequence of calls, leases of a replica that died
//! expire, scripts come back after Redis lost them, and idle keys vanish.
//!
//! Redis's clock cannot be paused, so the rates here are slow enough (a token every
//! 10 s, a request every 20 s) that a test's own duration never moves a count; waits
//! and resets are compared to within a margin.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use spillway::{
    config::RedisConfig,
    limit::{
        BucketKey, Decision, LimitKind, Limiter, Quota, RateSnapshot,
        local::LocalLimiter,
        redis::{RedisLimiter, lease_for},
    },
    redis_link::RedisLink,
    secret::{KeyId, Secret},
};
use tokio::time::Instant;

use crate::support::redis::RedisServer;

const PREFIX: &str = "ls:";
/// How far apart two limiters' waits and resets may be: they read different clocks
/// a few milliseconds apart.
const MARGIN: Duration = Duration::from_millis(300);

/// A link to `redis`, up.
async fn link(redis: &RedisServer) -> Arc<RedisLink> {
    let config = RedisConfig {
        url: Secret::new(redis.url()),
        prefix: PREFIX.into(),
        timeout: Duration::from_millis(250),
        limits: true,
        cache: false,
    };
    let link = RedisLink::new(&config).expect("link");
    link.probe().await;
    assert!(link.is_up(), "redis answers");
    link
}

fn n(value: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(value)
}

/// What two limiters must agree on: the decision without its permit, its waits and
/// resets rounded down to whole seconds.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Admitted(Counts),
    Denied(LimitKind, Counts),
    TooLarge(u64, Counts),
}

#[derive(Debug, PartialEq, Eq)]
struct Counts {
    requests: Option<u64>,
    tokens: Option<u64>,
}

/// The answer, the permit (if admitted) and the decision's durations: retry-after,
/// then the requests and tokens resets.
fn answer(decision: Decision) -> (Answer, Option<spillway::limit::Permit>, [Duration; 3]) {
    let counts = |snapshot: &RateSnapshot| Counts {
        requests: snapshot.requests.map(|bucket| bucket.remaining),
        tokens: snapshot.tokens.map(|bucket| bucket.remaining),
    };
    let resets = |snapshot: &RateSnapshot| {
        let reset =
            |bucket: Option<spillway::limit::BucketState>| bucket.map(|b| b.reset).unwrap_or_default();
        (reset(snapshot.requests), reset(snapshot.tokens))
    };
    match decision {
        Decision::Admitted { snapshot, permit } => {
            let (r, t) = resets(&snapshot);
            (Answer::Admitted(counts(&snapshot)), Some(permit), [Duration::ZERO, r, t])
        }
        Decision::Denied { limit, retry_after, snapshot } => {
            let (r, t) = resets(&snapshot);
            (Answer::Denied(limit, counts(&snapshot)), None, [retry_after, r, t])
        }
        Decision::TooLarge { capacity, snapshot, .. } => {
            let (r, t) = resets(&snapshot);
            (Answer::TooLarge(capacity, counts(&snapshot)), None, [Duration::ZERO, r, t])
        }
    }
}

/// One call to both limiters.
enum Call {
    Reserve(u64),
    Settle(i64),
    /// Drops the permit of the last admitted request.
    Release,
}

#[tokio::test]
async fn the_redis_limiter_answers_like_the_local_one() {
    let Some(redis) = RedisServer::start() else { return };
    let shared = RedisLimiter::new(link(&redis).await, lease_for(Duration::from_secs(600)));
    let local = LocalLimiter::new(10);
    let key = BucketKey::Configured(KeyId::new("team"));
    let quota = Quota {
        requests_per_minute: n(3),
        tokens_per_minute: n(6),
        max_concurrent: n(1),
        ..Quota::default()
    };
    let slots = format!("{PREFIX}limit:c:team:slots:1");
    use Call::*;
    let script = [
        Reserve(2), // admitted: 2 requests, 4 tokens left; holds the slot
        Reserve(0), // concurrency
        Release,    //
        Reserve(5), // tokens: 4 left
        Reserve(7), // too large: the bucket holds 6
        Settle(-2), // refund, capped at 6
        Reserve(6), // admitted: 1 request, 0 tokens
        Release,    //
        Settle(3),  // 3 tokens of debt
        Reserve(1), // tokens: 40 s away
        Reserve(0), // a zero cost passes in debt: 0 requests left
        Release,    //
        Reserve(0), // requests
    ];
    let (mut held_shared, mut held_local) = (None, None);
    let mut answers = Vec::new();
    for (step, call) in script.iter().enumerate() {
        match call {
            Reserve(tokens) => {
                let (expected, permit, expected_times) = answer(local.decide(&key, &quota, *tokens));
                held_local = permit.or(held_local);
                let decision = shared.reserve(&key, &quota, *tokens).await.expect("redis answers");
                let (got, permit, times) = answer(decision);
                held_shared = permit.or(held_shared);
                assert_eq!(got, expected, "step {step}");
                for (got, expected) in times.into_iter().zip(expected_times) {
                    assert!(got.abs_diff(expected) <= MARGIN, "step {step}: {got:?} against {expected:?}");
                }
                answers.push(got);
            }
            Settle(delta) => {
                local.adjust(&key, &quota, *delta);
                shared.settle(&key, &quota, *delta).await.expect("redis answers");
            }
            Release => {
                (held_shared, held_local) = (None, None);
                let deadline = Instant::now() + Duration::from_secs(5);
                while !redis.command(&["ZCARD", &slots]).starts_with(":0") {
                    assert!(Instant::now() < deadline, "step {step}: the lease was not released");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    // The script covered every kind of answer.
    let kinds = |wanted: fn(&Answer) -> bool| answers.iter().filter(|answer| wanted(answer)).count();
    assert_eq!(kinds(|a| matches!(a, Answer::Admitted(_))), 3);
    assert_eq!(kinds(|a| matches!(a, Answer::Denied(LimitKind::Concurrency, _))), 1);
    assert_eq!(kinds(|a| matches!(a, Answer::Denied(LimitKind::Tokens, _))), 2);
    assert_eq!(kinds(|a| matches!(a, Answer::Denied(LimitKind::Requests, _))), 1);
    assert_eq!(kinds(|a| matches!(a, Answer::TooLarge(6, _))), 1);
}

#[tokio::test]
async fn a_lease_left_by_a_replica_that_died_expires() {
    let Some(redis) = RedisServer::start() else { return };
    let lease = Duration::from_millis(300);
    let shared = RedisLimiter::new(link(&redis).await, lease);
    let (key, quota) =
        (BucketKey::Configured(KeyId::new("team")), Quota { max_concurrent: n(1), ..Quota::default() });

    let Decision::Admitted { permit, .. } = shared.reserve(&key, &quota, 0).await.expect("answer") else {
        panic!("the first request is admitted")
    };
    // The replica dies: its permit is never dropped.
    std::mem::forget(permit);
    let started = Instant::now();
    let refused = shared.reserve(&key, &quota, 0).await.expect("answer");
    assert!(matches!(refused, Decision::Denied { limit: LimitKind::Concurrency, .. }), "{refused:?}");
    loop {
        if let Decision::Admitted { .. } = shared.reserve(&key, &quota, 0).await.expect("answer") {
            break;
        }
        assert!(started.elapsed() < lease + Duration::from_secs(2), "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() + Duration::from_millis(50) >= lease, "expired early: {:?}", started.elapsed());
}

#[tokio::test]
async fn finishing_a_request_settles_its_tokens_and_frees_its_slot() {
    let Some(redis) = RedisServer::start() else { return };
    let shared = RedisLimiter::new(link(&redis).await, lease_for(Duration::from_secs(600)));
    let key = BucketKey::Configured(KeyId::new("team"));
    let quota = Quota { tokens_per_minute: n(60), max_concurrent: n(1), ..Quota::default() };

    let Ok(Decision::Admitted { permit, .. }) = shared.reserve(&key, &quota, 40).await else {
        panic!("the first request is admitted")
    };
    let before = redis.command(&["INFO", "commandstats"]);
    shared.finish(&key, &quota, -30, permit).await.expect("finish");
    let after = redis.command(&["INFO", "commandstats"]);
    // Script calls that ran (a first EVALSHA fails with NOSCRIPT, then loads it).
    let calls = |stats: &str| {
        let line = stats.lines().find(|line| line.starts_with("cmdstat_evalsha:")).unwrap_or_default();
        let field = |name: &str| {
            line.split(',').find_map(|part| part.split_once(name)).and_then(|(_, n)| n.parse::<u64>().ok())
        };
        field("calls=").unwrap_or(0) - field("failed_calls=").unwrap_or(0)
    };
    assert_eq!(calls(&after) - calls(&before), 1, "one script call");
    assert_eq!(redis.command(&["ZCARD", &format!("{PREFIX}limit:c:team:slots:1")]), ":0\r\n");

    // The slot is free, and 30 of the 40 tokens came back: 60 - 10 = 50 left.
    match shared.reserve(&key, &quota, 0).await {
        Ok(Decision::Admitted { snapshot, .. }) => {
            assert_eq!(snapshot.tokens.map(|tokens| tokens.remaining), Some(50));
        }
        other => panic!("expected admitted, got {other:?}"),
    }
}

#[tokio::test]
async fn scripts_are_loaded_again_when_redis_forgot_them() {
    let Some(redis) = RedisServer::start() else { return };
    let shared = RedisLimiter::new(link(&redis).await, lease_for(Duration::from_secs(600)));
    let (key, quota) =
        (BucketKey::Configured(KeyId::new("team")), Quota { tokens_per_minute: n(60), ..Quota::default() });

    assert!(matches!(shared.reserve(&key, &quota, 10).await, Ok(Decision::Admitted { .. })));
    assert!(redis.command(&["SCRIPT", "FLUSH"]).starts_with("+OK"));
    shared.settle(&key, &quota, -5).await.expect("settle after a flush");
    assert!(redis.command(&["SCRIPT", "FLUSH"]).starts_with("+OK"));
    match shared.reserve(&key, &quota, 0).await {
        Ok(Decision::Admitted { snapshot, .. }) => {
            assert_eq!(snapshot.tokens.map(|tokens| tokens.remaining), Some(55));
        }
        other => panic!("expected admitted, got {other:?}"),
    }
}

#[tokio::test]
async fn keys_expire_once_their_buckets_are_full_again() {
    let Some(redis) = RedisServer::start() else { return };
    let lease = Duration::from_secs(600);
    let shared = RedisLimiter::new(link(&redis).await, lease);
    let key = BucketKey::Configured(KeyId::new("team"));
    // 1 request back in 2 s, 600 tokens back in 6 s.
    let quota = Quota {
        requests_per_minute: n(30),
        tokens_per_minute: n(6000),
        max_concurrent: n(4),
        ..Quota::default()
    };
    let Ok(Decision::Admitted { permit, .. }) = shared.reserve(&key, &quota, 600).await else {
        panic!("admitted")
    };
    let keys = redis.command(&["KEYS", &format!("{PREFIX}limit:*")]);
    let buckets = keys.lines().find(|line| line.contains(":buckets:")).expect("a buckets key").to_owned();
    let ttl = |key: &str| -> i64 {
        let reply = redis.command(&["PTTL", key]);
        reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("PTTL {key}: {reply}"))
    };
    // Full again in 6 s, plus a second's margin.
    let buckets_ttl = ttl(&buckets);
    assert!((6_000..=7_000).contains(&buckets_ttl), "{buckets_ttl} ms");
    let slots_ttl = ttl(&format!("{PREFIX}limit:c:team:slots:4"));
    assert!((600_000..=601_000).contains(&slots_ttl), "{slots_ttl} ms");
    drop(permit);

    // A charge of a whole bucket more: full again in 66 s, and the key lives as long.
    shared.settle(&key, &quota, 6000).await.expect("settle");
    let charged = ttl(&buckets);
    assert!((66_000..=67_000).contains(&charged), "{charged} ms after a charge of 6000");
}
