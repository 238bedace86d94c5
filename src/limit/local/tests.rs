//! The local limiter against SPEC §3 "Bucket semantics", on tokio's paused clock.

use std::{num::NonZeroU32, time::Duration};

use tokio::time::advance;

use super::*;
use crate::{
    limit::BucketState,
    secret::{KeyHash, KeyId},
};

const NANO: Duration = Duration::from_nanos(1);

fn n(value: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(value)
}

fn rpm(per_minute: u32) -> Quota {
    Quota { requests_per_minute: n(per_minute), ..Quota::default() }
}

fn tpm(per_minute: u32) -> Quota {
    Quota { tokens_per_minute: n(per_minute), ..Quota::default() }
}

fn key(id: &str) -> BucketKey {
    BucketKey::Configured(KeyId::new(id))
}

fn presented(i: u64) -> BucketKey {
    BucketKey::Presented(KeyHash::of(&i.to_le_bytes()))
}

/// Admitted: the snapshot; anything else fails the test.
#[track_caller]
fn admitted(decision: Decision) -> RateSnapshot {
    match decision {
        Decision::Admitted { snapshot, .. } => snapshot,
        other => panic!("expected admitted, got {other:?}"),
    }
}

/// Denied: which limit and the advertised wait.
#[track_caller]
fn denied(decision: Decision) -> (LimitKind, Duration) {
    match decision {
        Decision::Denied { limit, retry_after, .. } => (limit, retry_after),
        other => panic!("expected denied, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn exactly_the_capacity_is_admitted_then_again_after_the_advertised_wait() {
    // 7 a minute does not divide a second: the wait is governor's exact interval.
    let (limiter, k, q) = (LocalLimiter::new(10), key("a"), rpm(7));
    for _ in 0..7 {
        admitted(limiter.decide(&k, &q, 0));
    }
    let (limit, wait) = denied(limiter.decide(&k, &q, 0));
    assert_eq!(limit, LimitKind::Requests);
    assert_eq!(wait, Duration::from_nanos(8_571_428_571));
    advance(wait - NANO).await;
    assert_eq!(denied(limiter.decide(&k, &q, 0)), (LimitKind::Requests, NANO));
    advance(NANO).await;
    admitted(limiter.decide(&k, &q, 0));
    denied(limiter.decide(&k, &q, 0));
}

#[tokio::test(start_paused = true)]
async fn a_burst_smaller_than_the_rate_caps_the_bucket() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota { burst_requests: n(10), ..rpm(600) };
    for _ in 0..10 {
        admitted(limiter.decide(&k, &q, 0));
    }
    assert_eq!(denied(limiter.decide(&k, &q, 0)), (LimitKind::Requests, Duration::from_millis(100)));
    // A long pause refills the burst, not the minute.
    advance(Duration::from_secs(60)).await;
    let admitted_now = (0..20).filter(|_| matches!(limiter.decide(&k, &q, 0), Decision::Admitted { .. }));
    assert_eq!(admitted_now.count(), 10);
}

#[tokio::test(start_paused = true)]
async fn requests_refill_continuously_at_a_sixtieth_of_the_amount_per_second() {
    let (limiter, k, q) = (LocalLimiter::new(10), key("a"), rpm(60));
    for _ in 0..60 {
        admitted(limiter.decide(&k, &q, 0));
    }
    advance(Duration::from_millis(10_500)).await;
    let admitted_now = (0..20).filter(|_| matches!(limiter.decide(&k, &q, 0), Decision::Admitted { .. }));
    assert_eq!(admitted_now.count(), 10);
    // Half a second into the next one.
    assert_eq!(denied(limiter.decide(&k, &q, 0)).1, Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn tokens_are_admitted_on_the_estimate_then_refunded_or_charged() {
    let (limiter, k, q) = (LocalLimiter::new(10), key("a"), tpm(1000));
    let tokens_left = |snapshot: RateSnapshot| snapshot.tokens.map(|t| t.remaining);
    assert_eq!(tokens_left(admitted(limiter.decide(&k, &q, 400))), Some(600));
    limiter.adjust(&k, &q, -300);
    assert_eq!(tokens_left(admitted(limiter.decide(&k, &q, 0))), Some(900));
    limiter.adjust(&k, &q, -5000);
    assert_eq!(tokens_left(admitted(limiter.decide(&k, &q, 0))), Some(1000), "capped at capacity");

    // Debt: 1000 reserved, 1500 used.
    admitted(limiter.decide(&k, &q, 1000));
    limiter.adjust(&k, &q, 500);
    assert_eq!(tokens_left(admitted(limiter.decide(&k, &q, 0))), Some(0));
    // 500 owed + 100 wanted, at 1000 a minute.
    let (limit, wait) = denied(limiter.decide(&k, &q, 100));
    assert_eq!((limit, wait), (LimitKind::Tokens, Duration::from_secs(36)));
    advance(wait - NANO).await;
    denied(limiter.decide(&k, &q, 100));
    advance(NANO).await;
    assert_eq!(tokens_left(admitted(limiter.decide(&k, &q, 100))), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_request_larger_than_the_bucket_can_never_fit_and_costs_nothing() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota {
        requests_per_minute: n(60),
        tokens_per_minute: n(1000),
        burst_tokens: n(500),
        ..Quota::default()
    };
    match limiter.decide(&k, &q, 501) {
        Decision::TooLarge { limit, capacity, snapshot } => {
            assert_eq!((limit, capacity), (LimitKind::Tokens, 500));
            assert_eq!(snapshot.requests.map(|r| r.remaining), Some(60));
            assert_eq!(snapshot.tokens.map(|t| t.remaining), Some(500));
        }
        other => panic!("expected too large, got {other:?}"),
    }
    let snapshot = admitted(limiter.decide(&k, &q, 500));
    assert_eq!(
        (snapshot.requests.map(|r| r.remaining), snapshot.tokens.map(|t| t.remaining)),
        (Some(59), Some(0))
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_without_tokens_passes_the_tokens_bucket_but_counts_as_a_request() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota { requests_per_minute: n(2), ..tpm(100) };
    admitted(limiter.decide(&k, &q, 100));
    limiter.adjust(&k, &q, 50);
    let snapshot = admitted(limiter.decide(&k, &q, 0));
    assert_eq!(snapshot.requests.map(|r| r.remaining), Some(0));
    assert_eq!(denied(limiter.decide(&k, &q, 0)).0, LimitKind::Requests);
}

#[tokio::test(start_paused = true)]
async fn concurrency_slots_are_held_by_permits_and_released_on_drop() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota { max_concurrent: n(2), ..Quota::default() };
    let permit = |decision| match decision {
        Decision::Admitted { permit, .. } => permit,
        other => panic!("expected admitted, got {other:?}"),
    };
    let (first, second) = (permit(limiter.decide(&k, &q, 0)), permit(limiter.decide(&k, &q, 0)));
    assert_eq!(format!("{first:?}"), "Permit(held)");
    assert_eq!(denied(limiter.decide(&k, &q, 0)), (LimitKind::Concurrency, CONCURRENCY_RETRY_AFTER));
    drop(first);
    let third = permit(limiter.decide(&k, &q, 0));
    denied(limiter.decide(&k, &q, 0));
    drop((second, third));
    let unlimited = permit(limiter.decide(&k, &rpm(10), 0));
    assert_eq!(format!("{unlimited:?}"), "Permit(none)");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_one_limit_takes_nothing_from_the_others() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota {
        requests_per_minute: n(3),
        tokens_per_minute: n(100),
        max_concurrent: n(1),
        ..Quota::default()
    };
    let remaining =
        |snapshot: RateSnapshot| (snapshot.requests.unwrap().remaining, snapshot.tokens.unwrap().remaining);
    let snapshot_of = |decision| match decision {
        Decision::Denied { snapshot, .. } | Decision::Admitted { snapshot, .. } => snapshot,
        Decision::TooLarge { snapshot, .. } => snapshot,
    };

    // Tokens refuse: neither a request nor a slot is taken.
    assert_eq!(remaining(snapshot_of(limiter.decide(&k, &q, 60))), (2, 40));
    admitted(limiter.decide(&k, &q, 0));
    for _ in 0..5 {
        let decision = limiter.decide(&k, &q, 50);
        assert_eq!(remaining(snapshot_of(decision)), (1, 40));
    }
    // Concurrency refuses: neither a request nor tokens.
    let Decision::Admitted { permit, snapshot } = limiter.decide(&k, &q, 10) else { panic!("admitted") };
    assert_eq!(remaining(snapshot), (0, 30));
    advance(Duration::from_secs(20)).await; // one request back
    for _ in 0..3 {
        let Decision::Denied { limit, snapshot, .. } = limiter.decide(&k, &q, 10) else { panic!("denied") };
        assert_eq!((limit, remaining(snapshot)), (LimitKind::Concurrency, (1, 63)));
    }
    drop(permit);
    // Requests refuse: no tokens.
    admitted(limiter.decide(&k, &q, 10));
    let decision = limiter.decide(&k, &q, 10);
    assert_eq!(remaining(snapshot_of(decision)), (0, 53));
}

#[tokio::test(start_paused = true)]
async fn the_first_refusing_limit_is_reported_with_a_wait_that_satisfies_all() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota {
        requests_per_minute: n(60),
        tokens_per_minute: n(60),
        max_concurrent: n(1),
        ..Quota::default()
    };
    admitted(limiter.decide(&k, &q, 60));
    for _ in 0..58 {
        admitted(limiter.decide(&k, &q, 0));
    }
    let Decision::Admitted { permit, .. } = limiter.decide(&k, &q, 0) else { panic!("admitted") };
    // Requests say 1 s, tokens 10 s, concurrency 1 s: reported as requests, 10 s.
    assert_eq!(denied(limiter.decide(&k, &q, 10)), (LimitKind::Requests, Duration::from_secs(10)));
    drop(permit);
    advance(Duration::from_secs(10)).await;
    admitted(limiter.decide(&k, &q, 10));
}

#[tokio::test(start_paused = true)]
async fn keys_have_independent_buckets() {
    let (limiter, q) = (LocalLimiter::new(10), rpm(1));
    for k in [key("a"), key("b"), presented(1), presented(2)] {
        admitted(limiter.decide(&k, &q, 0));
        denied(limiter.decide(&k, &q, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn a_changed_quota_starts_afresh_and_an_unchanged_one_keeps_its_state() {
    let limiter = LocalLimiter::new(10);
    for k in [key("a"), presented(1)] {
        let q = Quota { max_concurrent: n(1), ..rpm(2) };
        admitted(limiter.decide(&k, &q, 0));
        let Decision::Admitted { permit: in_flight, .. } = limiter.decide(&k, &q, 0) else {
            panic!("admitted")
        };
        assert_eq!(denied(limiter.decide(&k, &q, 0)).0, LimitKind::Requests, "same quota: state kept");
        let reloaded = Quota { max_concurrent: n(1), ..rpm(3) };
        // Fresh requests bucket; the request still in flight keeps its slot.
        let Decision::Denied { limit, snapshot, .. } = limiter.decide(&k, &reloaded, 0) else {
            panic!("denied")
        };
        assert_eq!((limit, snapshot.requests.map(|r| r.remaining)), (LimitKind::Concurrency, Some(3)));
        drop(in_flight);
        let snapshot = admitted(limiter.decide(&k, &reloaded, 0));
        assert_eq!(snapshot.requests.map(|r| r.remaining), Some(2));
        // A settlement under the quota a request was admitted with is dropped once
        // the quota has changed.
        let (before, after) = (tpm(100), tpm(200));
        admitted(limiter.decide(&k, &before, 100));
        admitted(limiter.decide(&k, &after, 0));
        limiter.adjust(&k, &before, 1000);
        assert_eq!(admitted(limiter.decide(&k, &after, 0)).tokens.map(|t| t.remaining), Some(200));
    }
}

#[tokio::test(start_paused = true)]
async fn settling_a_key_without_state_does_nothing() {
    let limiter = LocalLimiter::new(10);
    limiter.adjust(&key("nobody"), &tpm(100), 50);
    limiter.adjust(&presented(9), &tpm(100), -50);
    assert_eq!(limiter.tracked_keys(), 0);
    let snapshot = admitted(limiter.decide(&key("nobody"), &tpm(100), 100));
    assert_eq!(snapshot.tokens.map(|t| t.remaining), Some(0));
}

#[tokio::test(start_paused = true)]
async fn unlimited_callers_are_admitted_without_state() {
    let limiter = LocalLimiter::new(10);
    let snapshot = admitted(limiter.decide(&presented(1), &Quota::default(), 1 << 40));
    assert_eq!(snapshot, RateSnapshot::default());
    limiter.keys.run_pending_tasks();
    assert_eq!(limiter.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn passthrough_keys_beyond_the_cap_are_evicted_and_configured_keys_are_not() {
    let (cap, q) = (100, Quota { requests_per_minute: n(1), tokens_per_minute: n(1000), ..Quota::default() });
    let limiter = LocalLimiter::new(cap);
    admitted(limiter.decide(&key("team"), &q, 0));
    for i in 0..10 * cap {
        admitted(limiter.decide(&presented(i), &q, 10));
    }
    limiter.keys.run_pending_tasks();
    assert!(limiter.tracked_keys() <= cap + cap / 10, "{} tracked", limiter.tracked_keys());
    assert!(limiter.evictions() >= 8 * cap, "{} evictions", limiter.evictions());
    assert_eq!(denied(limiter.decide(&key("team"), &q, 0)).0, LimitKind::Requests);
}

#[tokio::test(start_paused = true)]
async fn snapshots_report_limit_remaining_and_time_until_full() {
    let (limiter, k) = (LocalLimiter::new(10), key("a"));
    let q = Quota { requests_per_minute: n(60), tokens_per_minute: n(6000), ..Quota::default() };
    let snapshot = admitted(limiter.decide(&k, &q, 1500));
    assert_eq!(
        snapshot.requests,
        Some(BucketState { limit: 60, remaining: 59, reset: Duration::from_secs(1) })
    );
    assert_eq!(
        snapshot.tokens,
        Some(BucketState { limit: 6000, remaining: 4500, reset: Duration::from_secs(15) })
    );
    advance(Duration::from_millis(500)).await;
    let snapshot = admitted(limiter.decide(&k, &q, 50));
    assert_eq!(
        snapshot.requests,
        Some(BucketState { limit: 60, remaining: 58, reset: Duration::from_millis(1500) })
    );
    assert_eq!(
        snapshot.tokens,
        Some(BucketState { limit: 6000, remaining: 4500, reset: Duration::from_secs(15) }),
        "50 refilled in half a second, 50 taken"
    );
}
