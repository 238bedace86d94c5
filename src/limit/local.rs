//! The in-process [`Limiter`]: every key's buckets in this process's memory.
//!
//! Each key has a requests bucket (governor's GCRA, in `requests`), a refundable
//! tokens bucket of our own (`tokens`) and a `max_concurrent` semaphore. Time is
//! tokio's clock (`clock`), so paused-clock tests drive refill; it is read once per
//! decision and passed to every bucket. Which keys are kept, and how many, is the
//! business of `keys`. This module decides one request at a time; it does not know
//! HTTP, headers or the config (the admit stage passes each call's [`Quota`], so a
//! reload needs no call here: a key asked with a new quota starts afresh). Every
//! decision is taken synchronously under the key's lock, so the futures it returns
//! are ready at once.
//!
//! # Order of the checks (all or nothing)
//!
//! Under the key's lock, for a request costing `tokens`:
//!
//! 1. tokens bucket: refill to now; a cost above its capacity is
//!    [`Decision::TooLarge`] at once, nothing taken; otherwise note whether the cost
//!    fits now, without taking it;
//! 2. concurrency: try to take a slot (held in the returned [`Permit`]);
//! 3. requests bucket: take one request (governor's check);
//! 4. if all three agreed, take the tokens; if any refused, give back what 2 and 3
//!    took (drop the slot, restore the GCRA state) and nothing was spent.
//!
//! Only the tokens check is a pure look, and it runs first; the two takes are
//! undone exactly, and the lock keeps every other decision for the key out of the
//! window in which they are held. Running all three even after a refusal is what
//! makes the answer complete: the refusal reported is the first of requests, tokens,
//! concurrency that refused, and `retry_after` is the longest wait among those that
//! refused, so a client that waits it out and retries the same request is admitted
//! (if nothing else took from the key meanwhile).

mod clock;
mod keys;
mod requests;
#[cfg(test)]
mod tests;
mod tokens;

use std::{future::ready, time::Duration};

use futures_util::future::BoxFuture;

pub use self::keys::EVICTIONS_METRIC;
use self::{clock::TokioClock, keys::KeyStore};
use super::{BucketKey, Decision, LimitKind, Limiter, Permit, Quota, RateSnapshot, Unavailable};

/// The `retry_after` of a concurrency refusal. A slot frees up when another request
/// of the key finishes, which the limiter cannot foresee, so this is a hint, not a
/// promise: one second, OpenAI's usual granularity.
pub const CONCURRENCY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The in-process limiter: per-key buckets in memory, passthrough keys bounded by
/// `max_tracked_keys`. Keep one across config reloads; keys whose quota changed start
/// afresh on their next request.
pub struct LocalLimiter {
    clock: TokioClock,
    keys: KeyStore,
}

// === impl LocalLimiter ===

impl LocalLimiter {
    /// A limiter keeping the state of at most `max_tracked_keys` passthrough keys
    /// (configured keys are always kept). Time starts now on tokio's clock.
    pub fn new(max_tracked_keys: u64) -> Self {
        let clock = TokioClock::new();
        Self { clock, keys: KeyStore::new(max_tracked_keys, clock) }
    }

    /// Admits or refuses one request of `key` costing `tokens`; [`Limiter::reserve`]
    /// without the future.
    pub fn decide(&self, key: &BucketKey, quota: &Quota, tokens: u64) -> Decision {
        if quota.is_unlimited() {
            return Decision::Admitted { snapshot: RateSnapshot::default(), permit: Permit::default() };
        }
        let state = self.keys.get_or_create(key, quota);
        let now = self.clock.nanos();
        let mut buckets = state.buckets.lock();
        let buckets = &mut *buckets;

        // 1. Tokens: a look, nothing taken.
        let mut tokens_wait = None;
        if let Some(bucket) = &mut buckets.tokens {
            bucket.refill(now);
            if tokens > bucket.capacity() {
                let capacity = bucket.capacity();
                let requests = buckets.requests.as_ref().map(|bucket| bucket.peek(now));
                let snapshot = RateSnapshot { requests, tokens: Some(bucket.state()) };
                return Decision::TooLarge { limit: LimitKind::Tokens, capacity, snapshot };
            }
            tokens_wait = bucket.shortfall(tokens);
        }
        // 2. Concurrency: a slot, released by dropping it.
        let permit = match &state.concurrency {
            None => Some(Permit::default()),
            Some(slots) => slots.clone().try_acquire_owned().ok().map(Permit::new),
        };
        // 3. Requests: taken, undone below if anything refused.
        let request = buckets.requests.as_ref().map(|bucket| bucket.take(now));

        let refusals = [
            (LimitKind::Requests, request.as_ref().and_then(|taken| taken.as_ref().err()).map(|r| r.wait)),
            (LimitKind::Tokens, tokens_wait),
            (LimitKind::Concurrency, permit.is_none().then_some(CONCURRENCY_RETRY_AFTER)),
        ];
        let refused = refusals.iter().find_map(|(limit, wait)| wait.map(|_| *limit));
        let requests_state = |undo: bool| {
            let (bucket, outcome) = (buckets.requests.as_ref()?, request?);
            Some(match outcome {
                Ok(taken) if undo => bucket.undo(taken),
                Ok(taken) => taken.state,
                Err(refused) => refused.state,
            })
        };
        match (refused, permit) {
            // 4. Everything agreed: take the tokens.
            (None, Some(permit)) => {
                let requests = requests_state(false);
                let tokens = buckets.tokens.as_mut().map(|bucket| {
                    bucket.take(tokens);
                    bucket.state()
                });
                Decision::Admitted { snapshot: RateSnapshot { requests, tokens }, permit }
            }
            // A refusal: the slot (if taken) is dropped here and the request given back.
            (refused, _) => {
                let requests = requests_state(true);
                let tokens = buckets.tokens.as_ref().map(|bucket| bucket.state());
                let retry_after = refusals.iter().filter_map(|(_, wait)| *wait).max().unwrap_or_default();
                Decision::Denied {
                    limit: refused.unwrap_or(LimitKind::Concurrency),
                    retry_after,
                    snapshot: RateSnapshot { requests, tokens },
                }
            }
        }
    }

    /// Corrects an admitted request's tokens; [`Limiter::settle`] without the
    /// future. Nothing happens for a key that has no state for `quota` any more
    /// (evicted, or its quota changed since the request was admitted).
    pub fn adjust(&self, key: &BucketKey, quota: &Quota, delta: i64) {
        if delta == 0 || quota.tokens_per_minute.is_none() {
            return;
        }
        let Some(state) = self.keys.get(key, quota) else { return };
        let now = self.clock.nanos();
        if let Some(bucket) = &mut state.buckets.lock().tokens {
            bucket.refill(now);
            bucket.settle(delta);
        }
    }

    /// Passthrough keys evicted so far to stay within `max_tracked_keys` (idle keys
    /// leaving are not counted); also counted in [`EVICTIONS_METRIC`].
    pub fn evictions(&self) -> u64 {
        self.keys.evictions()
    }

    /// Passthrough keys whose state is kept now; may briefly exceed
    /// `max_tracked_keys` until the cache's maintenance catches up.
    pub fn tracked_keys(&self) -> u64 {
        self.keys.tracked()
    }
}

impl Limiter for LocalLimiter {
    fn reserve<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        tokens: u64,
    ) -> BoxFuture<'a, Result<Decision, Unavailable>> {
        Box::pin(ready(Ok(self.decide(key, quota, tokens))))
    }

    fn settle<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        self.adjust(key, quota, delta);
        Box::pin(ready(Ok(())))
    }
}

impl std::fmt::Debug for LocalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("tracked_keys", &self.tracked_keys())
            .field("evictions", &self.evictions())
            .finish_non_exhaustive()
    }
}
