//! Where the local limiter keeps each key's buckets, and how many it keeps.
//!
//! Configured keys (`[[keys]]`) live in a map that only grows with the config: one
//! entry per key id, never evicted, so no amount of traffic from others can reset
//! them. Presented passthrough keys, which anyone can mint, live in a bounded
//! [`moka::sync::Cache`]: at most `max_tracked_keys` of them, whatever an attacker
//! sends. Its policy is moka's default TinyLFU, which admits a new key only when it is
//! used more often than the one it would evict, so a flood of one-off keys cannot push
//! out busy keys (and reset their buckets); evictions for want of room are counted in
//! [`EVICTIONS_METRIC`]. Idle keys leave after [`IDLE`], by which time their buckets
//! would be full again anyway.
//!
//! A key's state remembers the [`Quota`] it was built for. Asked with another quota
//! (a config reload changed the key's limits), the key starts fresh buckets at the new
//! quota (SPEC §3); its in-flight count carries over when `max_concurrent` did not
//! change, since those requests are still running.

use std::{
    collections::{HashMap, hash_map::Entry},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use moka::{notification::RemovalCause, ops::compute::Op, sync::Cache};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Semaphore;

use super::{clock::TokioClock, requests::RequestBucket, tokens::TokenBucket};
use crate::{
    limit::{BucketKey, Quota},
    secret::{KeyHash, KeyId},
};

/// Counter of passthrough keys evicted to stay within `max_tracked_keys`.
pub const EVICTIONS_METRIC: &str = "spillway_limiter_evictions_total";

/// How long a passthrough key may go unused before its state is dropped. A bucket
/// refills from empty in at most a minute (its capacity is at most the per-minute
/// amount, refilling at amount/60 per second), so after two idle minutes it would
/// be full again: dropping it forgets nothing but debt larger than a whole minute's
/// amount.
pub(super) const IDLE: Duration = Duration::from_secs(120);

/// Everything the limiter knows about one key.
#[derive(Debug)]
pub(super) struct KeyState {
    /// The quota these buckets were built for.
    pub(super) quota: Quota,
    pub(super) buckets: Mutex<Buckets>,
    /// `max_concurrent` slots; `None` without that limit.
    pub(super) concurrency: Option<Arc<Semaphore>>,
}

/// The buckets of one key, behind its lock; `None` for a dimension without a limit.
#[derive(Debug)]
pub(super) struct Buckets {
    pub(super) requests: Option<RequestBucket>,
    pub(super) tokens: Option<TokenBucket>,
}

/// The state of every key the limiter has seen.
pub(super) struct KeyStore {
    clock: TokioClock,
    configured: RwLock<HashMap<KeyId, Arc<KeyState>>>,
    presented: Cache<KeyHash, Arc<KeyState>>,
    evictions: Arc<AtomicU64>,
}

// === impl KeyState ===

impl KeyState {
    /// Fresh buckets for `quota`, keeping `previous`'s in-flight slots if its
    /// `max_concurrent` was the same.
    fn new(quota: &Quota, previous: Option<&KeyState>, clock: TokioClock) -> Self {
        let requests = quota.requests_per_minute.zip(quota.request_capacity().and_then(NonZeroU32::new));
        let tokens = quota.tokens_per_minute.zip(quota.token_capacity());
        let concurrency = quota.max_concurrent.map(|max| {
            previous
                .filter(|previous| previous.quota.max_concurrent == Some(max))
                .and_then(|previous| previous.concurrency.clone())
                .unwrap_or_else(|| Arc::new(Semaphore::new(max.get() as usize)))
        });
        let now = clock.nanos();
        let buckets = Buckets {
            requests: requests.map(|(per_minute, capacity)| RequestBucket::new(per_minute, capacity, now)),
            tokens: tokens.map(|(per_minute, capacity)| TokenBucket::new(capacity, per_minute, now)),
        };
        Self { quota: *quota, buckets: Mutex::new(buckets), concurrency }
    }
}

// === impl KeyStore ===

impl KeyStore {
    pub(super) fn new(max_tracked_keys: u64, clock: TokioClock) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&evictions);
        let presented = Cache::builder()
            .max_capacity(max_tracked_keys)
            .time_to_idle(IDLE)
            .eviction_listener(move |_, _, cause| {
                // Not `Expired` (idle, nothing lost) nor `Replaced` (quota change).
                if cause == RemovalCause::Size {
                    counted.fetch_add(1, Relaxed);
                    metrics::counter!(EVICTIONS_METRIC).increment(1);
                }
            })
            .build();
        Self { clock, configured: RwLock::default(), presented, evictions }
    }

    /// The state of `key` for `quota`: its existing one, or fresh buckets if it has
    /// none or had another quota.
    pub(super) fn get_or_create(&self, key: &BucketKey, quota: &Quota) -> Arc<KeyState> {
        match key {
            BucketKey::Configured(id) => self.configured(id, quota),
            BucketKey::Presented(hash) => self.presented(hash, quota),
        }
    }

    /// The state of `key` if it has one built for `quota`.
    pub(super) fn get(&self, key: &BucketKey, quota: &Quota) -> Option<Arc<KeyState>> {
        let state = match key {
            BucketKey::Configured(id) => self.configured.read().get(id).cloned(),
            BucketKey::Presented(hash) => self.presented.get(hash),
        };
        state.filter(|state| state.quota == *quota)
    }

    /// Passthrough keys evicted for want of room so far.
    pub(super) fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }

    /// Passthrough keys tracked now (moka's count, which lags behind by the
    /// maintenance it has not run yet).
    pub(super) fn tracked(&self) -> u64 {
        self.presented.entry_count()
    }

    /// Runs the cache's pending maintenance (evictions, counts) now.
    #[cfg(test)]
    pub(super) fn run_pending_tasks(&self) {
        self.presented.run_pending_tasks();
    }

    fn configured(&self, id: &KeyId, quota: &Quota) -> Arc<KeyState> {
        if let Some(state) = self.configured.read().get(id)
            && state.quota == *quota
        {
            return Arc::clone(state);
        }
        // First use, or the quota changed: rechecked under the write lock, since
        // another request may have done it meanwhile.
        let mut map = self.configured.write();
        match map.entry(id.clone()) {
            Entry::Occupied(entry) if entry.get().quota == *quota => Arc::clone(entry.get()),
            Entry::Occupied(mut entry) => {
                let fresh = Arc::new(KeyState::new(quota, Some(entry.get()), self.clock));
                entry.insert(Arc::clone(&fresh));
                fresh
            }
            Entry::Vacant(entry) => {
                Arc::clone(entry.insert(Arc::new(KeyState::new(quota, None, self.clock))))
            }
        }
    }

    fn presented(&self, hash: &KeyHash, quota: &Quota) -> Arc<KeyState> {
        if let Some(state) = self.presented.get(hash)
            && state.quota == *quota
        {
            return state;
        }
        // Atomic per key in moka, like the write lock above.
        let computed = self.presented.entry(*hash).and_compute_with(|entry| match entry {
            Some(entry) if entry.value().quota == *quota => Op::Nop,
            entry => {
                let previous = entry.as_ref().map(|entry| &**entry.value());
                Op::Put(Arc::new(KeyState::new(quota, previous, self.clock)))
            }
        });
        match computed.into_entry() {
            Some(entry) => entry.into_value(),
            // Not reachable (the closure never removes); an untracked state admits
            // correctly, it is just not remembered.
            None => Arc::new(KeyState::new(quota, None, self.clock)),
        }
    }
}
