//! Limiter bench: the cost of one local admission decision and of one settlement.
//!
//! Each `reserve` goes through the `Limiter` trait (boxed, immediately ready future)
//! against a quota with all three limits (requests, tokens, concurrency) and is
//! admitted; its permit is dropped at once, as a finished request would. Keys: one
//! configured key, or 100k passthrough keys taken round-robin (all tracked, so each
//! call finds its key in the bounded cache). The goal is well under 1 µs per
//! admission. It also prints the memory a tracked passthrough key costs, which is
//! what `[limits] max_tracked_keys` bounds.
//!
//! `cargo bench --bench limiter`

#[path = "support/proc_stats.rs"]
#[allow(dead_code)]
mod proc_stats;

use std::{hint::black_box, num::NonZeroU32, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use spillway::{
    limit::{BucketKey, Decision, Limiter, Quota, local::LocalLimiter},
    secret::{KeyHash, KeyId},
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

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = limiter
}
criterion_main!(benches);
