//! Limiter bench: the cost of one local admission decision and of one settlement,
//! and of one shared (Redis) admission.
//!
//! Each `reserve` goes through the `Limiter` trait (boxed, immediately ready future)
//! against a quota with all three limits (requests, tokens, concurrency) and is
//! admitted; its permit is dropped at once, as a finished request would. Keys: one
//! configured key, or 100k passthrough keys taken round-robin (all tracked, so each
//! call finds its key in the bounded cache). The goal is well under 1 µs per
//! admission. It also prints the memory a tracked passthrough key costs, which is
//! what `[limits] max_tracked_keys` bounds.
//!
//! The `redis limiter` group runs only when `SPILLWAY_BENCH_REDIS` names a reachable
//! Redis (`redis://127.0.0.1:6379`): one `reserve` is one `EVALSHA` round trip,
//! measured from the caller's side. With a concurrency limit, each admission's lease
//! is released by a `ZREM` spawned when its permit drops, running on the runtime's
//! workers alongside the next admissions, as in the gateway. It writes under the
//! `spillway-bench:` prefix.
//!
//! `cargo bench --bench limiter`
//! `SPILLWAY_BENCH_REDIS=redis://127.0.0.1:6379 cargo bench --bench limiter -- redis`

#[path = "support/proc_stats.rs"]
#[allow(dead_code)]
mod proc_stats;

use std::{hint::black_box, num::NonZeroU32, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use spillway::{
    config::RedisConfig,
    limit::{
        BucketKey, Decision, Limiter, Quota,
        local::LocalLimiter,
        redis::{RedisLimiter, lease_for},
    },
    redis_link::RedisLink,
    secret::{KeyHash, KeyId, Secret},
};

/// The release binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSTHROUGH_KEYS: u64 = 100_000;

/// Every limit set, and large enough that nothing is refused during a run.
fn quota() -> Quota {
    Quota {
        requests_per_minute: NonZeroU32::new(u32::MAX),
        tokens_per_minute: NonZeroU32::new(u32::MAX),
        max_concurrent: NonZeroU32::new(64),
        ..Quota::default()
    }
}

/// One admission through the trait; the permit is dropped with the decision.
fn reserve(limiter: &LocalLimiter, key: &BucketKey, quota: &Quota) {
    match limiter.reserve(key, quota, 100).now_or_never() {
        Some(Ok(decision @ Decision::Admitted { .. })) => drop(black_box(decision)),
        other => panic!("expected an admission, got {other:?}"),
    }
}

fn limiter(c: &mut Criterion) {
    let quota = quota();
    let mut group = c.benchmark_group("limiter");

    let one = LocalLimiter::new(PASSTHROUGH_KEYS);
    let key = BucketKey::Configured(KeyId::new("team-search"));
    group.bench_function("reserve/1 key", |b| b.iter(|| reserve(&one, black_box(&key), &quota)));
    group.bench_function("decide/1 key (no future)", |b| {
        b.iter(|| drop(black_box(one.decide(black_box(&key), &quota, 100))))
    });

    let many = LocalLimiter::new(2 * PASSTHROUGH_KEYS);
    let keys: Vec<_> =
        (0..PASSTHROUGH_KEYS).map(|i| BucketKey::Presented(KeyHash::of(&i.to_le_bytes()))).collect();
    let before = proc_stats::resident_bytes();
    for key in &keys {
        reserve(&many, key, &quota);
    }
    if let (Some(before), Some(after)) = (before, proc_stats::resident_bytes()) {
        let per_key = after.saturating_sub(before) / PASSTHROUGH_KEYS;
        println!("memory: about {per_key} bytes per tracked passthrough key (resident set growth)");
    }
    let mut next = keys.iter().cycle();
    group.bench_function("reserve/100k passthrough keys", |b| {
        b.iter(|| reserve(&many, black_box(next.next().unwrap_or(&keys[0])), &quota))
    });

    group.bench_function("settle/1 key", |b| {
        b.iter(|| one.settle(black_box(&key), &quota, black_box(-10)).now_or_never())
    });
    group.finish();
}

/// The Redis limiter over the link named by `SPILLWAY_BENCH_REDIS`, if it answers.
fn redis_limiter(runtime: &tokio::runtime::Runtime) -> Option<RedisLimiter> {
    let url = std::env::var("SPILLWAY_BENCH_REDIS").ok()?;
    let config = RedisConfig {
        url: Secret::new(url),
        prefix: "spillway-bench:".into(),
        timeout: Duration::from_secs(1),
        limits: true,
        cache: false,
    };
    let link = runtime.block_on(async {
        let link = RedisLink::new(&config).ok()?;
        link.probe().await;
        Some(link)
    })?;
    if !link.is_up() {
        println!("redis limiter: SPILLWAY_BENCH_REDIS does not answer; skipped");
        return None;
    }
    Some(RedisLimiter::new(link, lease_for(Duration::from_secs(600))))
}

fn redis(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => panic!("tokio runtime: {error}"),
    };
    let Some(limiter) = redis_limiter(&runtime) else {
        println!("redis limiter: set SPILLWAY_BENCH_REDIS=redis://HOST:PORT to measure it");
        return;
    };
    let key = BucketKey::Configured(KeyId::new("team-search"));
    let buckets_only = Quota { max_concurrent: None, ..quota() };
    // Releases run in the background, so allow room for the ones still on their way.
    let with_slots = Quota { max_concurrent: NonZeroU32::new(10_000), ..quota() };
    let admit = |quota: &Quota| {
        match runtime.block_on(limiter.reserve(&key, quota, 100)) {
            // The lease's release is spawned here, on the runtime's worker.
            Ok(decision @ Decision::Admitted { .. }) => drop(black_box(decision)),
            other => panic!("expected an admission, got {other:?}"),
        }
    };
    let mut group = c.benchmark_group("redis limiter");
    group.bench_function("reserve/requests + tokens", |b| b.iter(|| admit(&buckets_only)));
    group.bench_function("reserve/requests + tokens + concurrency", |b| b.iter(|| admit(&with_slots)));
    group.bench_function("settle", |b| {
        b.iter(|| runtime.block_on(limiter.settle(&key, &buckets_only, black_box(-10))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = limiter, redis
}
criterion_main!(benches);
