//! The shared [`Limiter`]: a caller's buckets and in-flight slots kept in Redis, so
//! every replica sharing that Redis enforces one quota (SPEC §4 "Distributed mode").
//!
//! Each decision is one server-side script, run with `EVALSHA` in one round trip
//! (`redis::Script` loads it again by itself after `NOSCRIPT`, e.g. when Redis
//! restarted): `redis/reserve.lua` admits or refuses a request, all or nothing and in
//! the local limiter's order (`limit::local`), and `redis/settle.lua` corrects its
//! tokens afterwards and, when the request ends ([`Limiter::finish`]), removes its
//! concurrency lease in the same call. Both start with `redis/buckets.lua`, the one
//! definition of how a stored bucket is read and refilled, and both read Redis's clock
//! (`TIME`), never a replica's. This module builds the keys and arguments, and turns replies into [`Decision`]s; it does not
//! decide what happens when Redis cannot answer (that is `limit::shared`) and it does
//! not own the connection (`redis_link`).
//!
//! # What is stored
//!
//! For each caller, under `{prefix}limit:{c|p}:{key id, or the key hash in hex}`:
//!
//! - `:buckets:{quota fingerprint}`, a hash holding the requests and tokens buckets
//!   (level in micro-tokens, time of the last update in microseconds). The
//!   fingerprint is 8 hex digits of SHA-256 over the quota and [`LAYOUT_VERSION`], so a
//!   key whose limits changed in a reload starts afresh (SPEC §3), and replicas that
//!   briefly run different configs during a rollout keep separate buckets instead of
//!   resetting each other's. A missing hash is a pair of full buckets, so the hash
//!   expires as soon as both would be full again.
//! - `:slots:{max_concurrent}`, a sorted set of concurrency leases: member = a random
//!   permit id, score = the lease's expiry in Redis time (ms). The [`Permit`] of an
//!   admitted request removes its lease when dropped; a lease whose replica died is
//!   pruned by the next decision once [`lease_for`] has passed.
//!
//! Nothing else is written: no key, no `Authorization` value, only ids and hashes.
//!
//! # Departures from the local limiter
//!
//! Times are Redis's microseconds and refill is exact in steps of 60 µs, so waits
//! and resets agree with the local limiter's to within 60 µs. A charge settled for a
//! key with no state in Redis is recorded against a full bucket (a missing bucket is
//! a full one), where the local limiter ignores it; and a key whose quota changes
//! from A to B and back to A before A's buckets were full again finds them as they
//! were, where the local limiter starts afresh.

use std::{mem, num::NonZeroU32, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use redis::Script;
use sha2::{Digest, Sha256};

use super::{
    BucketKey, BucketState, Decision, LimitKind, Limiter, Permit, Quota, RateSnapshot, Unavailable,
    local::CONCURRENCY_RETRY_AFTER,
};
use crate::redis_link::{Lane, PROBE_INTERVAL, RedisLink};

/// The version of the stored layout (the hash fields and their units), hashed into
/// every quota fingerprint: a new layout never reads an old one's state. Bump it with
/// the version in the scripts' `name=` lines.
pub const LAYOUT_VERSION: u8 = 1;

/// How much longer than `server.request_timeout` a concurrency lease lasts. A request
/// cannot outlive its deadline, so a live request never loses its slot; a replica
/// that died holding slots gives them back this long after its last request's
/// deadline at the latest.
pub const LEASE_MARGIN: Duration = Duration::from_secs(60);

/// The lease of a concurrency slot for requests whose deadline is `request_timeout`
/// (11 minutes with the default `"10m"`).
pub fn lease_for(request_timeout: Duration) -> Duration {
    request_timeout.saturating_add(LEASE_MARGIN)
}

/// How many times a lease release is tried, a probe interval apart (about half a
/// minute): a slot outlives a longer outage only until its lease expires.
const RELEASE_ATTEMPTS: u32 = 30;

/// Fields in a `reserve.lua` reply.
const RESERVE_REPLY_LEN: usize = 8;

/// Limits shared through Redis. Holds no state of its own: building another one over
/// the same link changes nothing.
pub struct RedisLimiter {
    link: Arc<RedisLink>,
    reserve: Script,
    settle: Script,
    lease: Duration,
}

/// Where one caller's state lives in Redis, for one quota.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StateKeys {
    buckets: String,
    slots: String,
}

/// One bucket in a `reserve.lua` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BucketReply {
    remaining: u64,
    reset: Duration,
    /// Until a request would fit; zero if it does.
    wait: Duration,
}

/// A `reserve.lua` reply, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReserveReply {
    outcome: Outcome,
    requests: BucketReply,
    tokens: BucketReply,
    slot_refused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Admitted,
    Denied,
    TooLarge,
}

/// One concurrency lease, held by an admitted request's [`Permit`]. Dropping it
/// removes the lease with a `ZREM` spawned on the runtime that took it, in the
/// background: nothing waits for it, and if it fails (or that runtime is gone) the
/// lease expires by itself.
struct Lease {
    link: Arc<RedisLink>,
    /// Where the release runs, wherever the permit is dropped; `None` if the lease
    /// was taken outside a tokio runtime.
    runtime: Option<tokio::runtime::Handle>,
    slots: String,
    id: String,
    /// Whether the script may hold this lease; a refused request's is never taken.
    armed: bool,
}

// === impl RedisLimiter ===

impl RedisLimiter {
    /// A limiter over `link` whose concurrency leases last `lease` (see [`lease_for`]).
    pub fn new(link: Arc<RedisLink>, lease: Duration) -> Self {
        Self {
            link,
            reserve: Script::new(concat!(
                include_str!("redis/buckets.lua"),
                include_str!("redis/reserve.lua")
            )),
            settle: Script::new(concat!(include_str!("redis/buckets.lua"), include_str!("redis/settle.lua"))),
            lease,
        }
    }

    /// Whether Redis answered the last call; while it does not, every call fails at
    /// once with [`Unavailable`].
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    fn keys(&self, key: &BucketKey, quota: &Quota) -> StateKeys {
        state_keys(self.link.prefix(), key, quota)
    }

    async fn decide(&self, key: &BucketKey, quota: &Quota, tokens: u64) -> Result<Decision, Unavailable> {
        if quota.is_unlimited() {
            return Ok(Decision::Admitted { snapshot: RateSnapshot::default(), permit: Permit::default() });
        }
        let keys = self.keys(key, quota);
        // Made before asking, so that a slot the script may have taken is given back
        // whatever happens to the reply.
        let lease = quota.max_concurrent.map(|_| Lease {
            link: self.link.clone(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            slots: keys.slots.clone(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            armed: true,
        });
        let mut invocation = self.reserve.prepare_invoke();
        invocation
            .key(&keys.buckets)
            .key(&keys.slots)
            .arg(quota.request_capacity().unwrap_or(0))
            .arg(per_minute(quota.requests_per_minute))
            .arg(quota.token_capacity().unwrap_or(0))
            .arg(per_minute(quota.tokens_per_minute))
            .arg(tokens)
            .arg(per_minute(quota.max_concurrent))
            .arg(lease.as_ref().map_or("", |lease| lease.id.as_str()))
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX));
        let reply: Vec<i64> = self
            .link
            .call(
                Lane::Limits,
                |mut connection| async move { invocation.invoke_async(&mut connection).await },
            )
            .await?;
        ReserveReply::parse(&reply)?.decision(quota, lease)
    }

    /// Settles `delta` tokens and removes `lease`, both in one script call (none when
    /// there is nothing to do). A lease the call did not remove is released in the
    /// background when it drops.
    async fn correct(
        &self,
        key: &BucketKey,
        quota: &Quota,
        delta: i64,
        lease: Option<Lease>,
    ) -> Result<(), Unavailable> {
        let tokens = quota.token_capacity().zip(quota.tokens_per_minute).filter(|_| delta != 0);
        if tokens.is_none() && lease.is_none() {
            return Ok(());
        }
        let (capacity, per_minute) =
            tokens.map_or((0, 0), |(capacity, per_minute)| (capacity, per_minute.get()));
        let keys = self.keys(key, quota);
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(&keys.buckets)
            .key(lease.as_ref().map_or(keys.slots.as_str(), |lease| lease.slots.as_str()))
            .arg(capacity)
            .arg(per_minute)
            .arg(delta)
            .arg(lease.as_ref().map_or("", |lease| lease.id.as_str()));
        let remaining: i64 = self
            .link
            .call(
                Lane::Limits,
                |mut connection| async move { invocation.invoke_async(&mut connection).await },
            )
            .await?;
        if let Some(lease) = lease {
            lease.disarm();
        }
        if remaining < 0 {
            return Err(malformed("settle replied a negative level"));
        }
        Ok(())
    }
}

impl Limiter for RedisLimiter {
    fn reserve<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        tokens: u64,
    ) -> BoxFuture<'a, Result<Decision, Unavailable>> {
        Box::pin(self.decide(key, quota, tokens))
    }

    fn settle<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        Box::pin(self.correct(key, quota, delta, None))
    }

    /// Settles and removes the request's lease in one script call. A permit that is
    /// not a lease (a local slot, taken while Redis was away) is given back at once.
    fn finish<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
        mut permit: Permit,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        let lease = permit.take::<Lease>();
        drop(permit);
        Box::pin(self.correct(key, quota, delta, lease))
    }
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter").field("link", &self.link).field("lease", &self.lease).finish()
    }
}

// === impl ReserveReply ===

impl ReserveReply {
    /// Checks a reply's shape and ranges; anything else is [`Unavailable`].
    fn parse(reply: &[i64]) -> Result<Self, Unavailable> {
        let &[outcome, r_remaining, r_reset, r_wait, t_remaining, t_reset, t_wait, slot_refused] = reply
        else {
            return Err(malformed(&format!("{} fields, not {RESERVE_REPLY_LEN}", reply.len())));
        };
        let outcome = match outcome {
            0 => Outcome::Admitted,
            1 => Outcome::Denied,
            2 => Outcome::TooLarge,
            other => return Err(malformed(&format!("outcome {other}"))),
        };
        let count =
            |value: i64| u64::try_from(value).map_err(|_| malformed(&format!("negative field {value}")));
        let bucket = |remaining, reset, wait| -> Result<BucketReply, Unavailable> {
            Ok(BucketReply {
                remaining: count(remaining)?,
                reset: Duration::from_micros(count(reset)?),
                wait: Duration::from_micros(count(wait)?),
            })
        };
        let slot_refused = match slot_refused {
            0 => false,
            1 => true,
            other => return Err(malformed(&format!("slot flag {other}"))),
        };
        Ok(Self {
            outcome,
            requests: bucket(r_remaining, r_reset, r_wait)?,
            tokens: bucket(t_remaining, t_reset, t_wait)?,
            slot_refused,
        })
    }

    /// The decision for a request under `quota`; `lease` is its concurrency lease, if
    /// the quota has that limit.
    fn decision(self, quota: &Quota, lease: Option<Lease>) -> Result<Decision, Unavailable> {
        let state = |per_minute: Option<NonZeroU32>, bucket: BucketReply| {
            per_minute.map(|per_minute| BucketState {
                limit: u64::from(per_minute.get()),
                remaining: bucket.remaining,
                reset: bucket.reset,
            })
        };
        let snapshot = RateSnapshot {
            requests: state(quota.requests_per_minute, self.requests),
            tokens: state(quota.tokens_per_minute, self.tokens),
        };
        match self.outcome {
            Outcome::Admitted => {
                Ok(Decision::Admitted { snapshot, permit: lease.map(Permit::new).unwrap_or_default() })
            }
            Outcome::Denied => {
                if let Some(lease) = lease {
                    lease.disarm();
                }
                let nonzero = |wait: Duration| (!wait.is_zero()).then_some(wait);
                let refusals = [
                    (LimitKind::Requests, nonzero(self.requests.wait)),
                    (LimitKind::Tokens, nonzero(self.tokens.wait)),
                    (LimitKind::Concurrency, self.slot_refused.then_some(CONCURRENCY_RETRY_AFTER)),
                ];
                let Some(limit) = refusals.iter().find_map(|(limit, wait)| wait.map(|_| *limit)) else {
                    return Err(malformed("denied without a refusing limit"));
                };
                let retry_after = refusals.iter().filter_map(|(_, wait)| *wait).max().unwrap_or_default();
                Ok(Decision::Denied { limit, retry_after, snapshot })
            }
            Outcome::TooLarge => {
                if let Some(lease) = lease {
                    lease.disarm();
                }
                let Some(capacity) = quota.token_capacity() else {
                    return Err(malformed("too large without a tokens limit"));
                };
                Ok(Decision::TooLarge { limit: LimitKind::Tokens, capacity: u64::from(capacity), snapshot })
            }
        }
    }
}

// === impl Lease ===

impl Lease {
    /// Drops the lease without removing anything: the script did not take it.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take().filter(|_| self.armed) else { return };
        let (link, slots, id) = (self.link.clone(), mem::take(&mut self.slots), mem::take(&mut self.id));
        // Tried even while the link is down, and again for a while, so that a slot
        // held across a short outage is not lost until its lease expires.
        crate::background::spawn_on(&runtime, async move {
            for attempt in 1..=RELEASE_ATTEMPTS {
                let release =
                    link.call_in_background(Lane::Limits, link.timeout(), |mut connection| {
                        let (slots, id) = (slots.clone(), id.clone());
                        async move {
                            redis::cmd("ZREM").arg(slots).arg(id).query_async::<i64>(&mut connection).await
                        }
                    });
                match release.await {
                    Ok(_) => return,
                    Err(error) if attempt == RELEASE_ATTEMPTS => {
                        tracing::debug!(%error, "concurrency lease left to expire");
                    }
                    Err(_) => tokio::time::sleep(PROBE_INTERVAL).await,
                }
            }
        });
    }
}

/// A per-minute amount as the scripts take it: 0 for no limit.
fn per_minute(amount: Option<NonZeroU32>) -> u32 {
    amount.map_or(0, NonZeroU32::get)
}

fn malformed(what: &str) -> Unavailable {
    Unavailable(format!("malformed reply from a limits script: {what}"))
}

/// The Redis keys of `key`'s state under `quota`.
fn state_keys(prefix: &str, key: &BucketKey, quota: &Quota) -> StateKeys {
    let who = match key {
        BucketKey::Configured(id) => format!("c:{}", id.as_str()),
        BucketKey::Presented(hash) => format!("p:{}", hex::encode(hash.as_bytes())),
    };
    StateKeys {
        buckets: format!("{prefix}limit:{who}:buckets:{}", fingerprint(quota)),
        slots: format!("{prefix}limit:{who}:slots:{}", per_minute(quota.max_concurrent)),
    }
}

/// 8 hex digits of SHA-256 over the quota and the layout version; the same on every
/// replica and build.
fn fingerprint(quota: &Quota) -> String {
    let mut hasher = Sha256::new();
    hasher.update([LAYOUT_VERSION]);
    for limit in [
        quota.requests_per_minute,
        quota.burst_requests,
        quota.tokens_per_minute,
        quota.burst_tokens,
        quota.max_concurrent,
    ] {
        hasher.update(per_minute(limit).to_le_bytes());
    }
    hex::encode(&hasher.finalize()[..4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{KeyHash, KeyId};

    fn quota(rpm: u32, tpm: u32, max_concurrent: u32) -> Quota {
        Quota {
            requests_per_minute: NonZeroU32::new(rpm),
            tokens_per_minute: NonZeroU32::new(tpm),
            max_concurrent: NonZeroU32::new(max_concurrent),
            ..Quota::default()
        }
    }

    fn reply(outcome: i64, requests: [i64; 3], tokens: [i64; 3], slot_refused: i64) -> Vec<i64> {
        let [rr, rs, rw] = requests;
        let [tr, ts, tw] = tokens;
        vec![outcome, rr, rs, rw, tr, ts, tw, slot_refused]
    }

    #[test]
    fn keys_name_the_caller_by_id_or_hash_and_change_with_the_quota() {
        let hash = KeyHash::of(b"sk-secret");
        let configured = state_keys("sw:", &BucketKey::Configured(KeyId::new("team")), &quota(60, 0, 2));
        let presented = state_keys("sw:", &BucketKey::Presented(hash), &quota(60, 0, 2));
        assert!(configured.buckets.starts_with("sw:limit:c:team:buckets:"), "{configured:?}");
        assert_eq!(configured.slots, "sw:limit:c:team:slots:2");
        assert!(
            presented.buckets.starts_with(&format!("sw:limit:p:{}:buckets:", hex::encode(hash.as_bytes())))
        );
        assert!(!format!("{presented:?}").contains("sk-secret"));

        let bursty = Quota { burst_requests: NonZeroU32::new(5), ..quota(60, 0, 2) };
        let reloaded = state_keys("sw:", &BucketKey::Configured(KeyId::new("team")), &bursty);
        assert_ne!(reloaded.buckets, configured.buckets, "a changed quota starts afresh");
        assert_eq!(reloaded.slots, configured.slots, "in-flight requests keep their slots");
        assert_eq!(fingerprint(&quota(60, 0, 2)).len(), 8);
    }

    #[test]
    fn a_denial_reports_the_first_refusing_limit_and_the_longest_wait() {
        let q = quota(60, 60, 1);
        let parsed =
            ReserveReply::parse(&reply(1, [0, 2_000_000, 1_000_000], [0, 60_000_000, 10_000_000], 1));
        match parsed.and_then(|reply| reply.decision(&q, None)) {
            Ok(Decision::Denied { limit, retry_after, snapshot }) => {
                assert_eq!((limit, retry_after), (LimitKind::Requests, Duration::from_secs(10)));
                let requests = BucketState { limit: 60, remaining: 0, reset: Duration::from_secs(2) };
                assert_eq!(snapshot.requests, Some(requests));
            }
            other => panic!("expected denied, got {other:?}"),
        }
        let parsed = ReserveReply::parse(&reply(1, [3, 0, 0], [0, 0, 0], 1));
        match parsed.and_then(|reply| reply.decision(&q, None)) {
            Ok(Decision::Denied { limit, retry_after, .. }) => {
                assert_eq!((limit, retry_after), (LimitKind::Concurrency, CONCURRENCY_RETRY_AFTER));
            }
            other => panic!("expected denied, got {other:?}"),
        }
    }

    #[test]
    fn admitted_snapshots_leave_out_unlimited_dimensions() {
        let q = quota(0, 6000, 0);
        let parsed = ReserveReply::parse(&reply(0, [0, 0, 0], [4500, 15_000_000, 0], 0));
        match parsed.and_then(|reply| reply.decision(&q, None)) {
            Ok(Decision::Admitted { snapshot, permit }) => {
                assert_eq!(snapshot.requests, None);
                let tokens = BucketState { limit: 6000, remaining: 4500, reset: Duration::from_secs(15) };
                assert_eq!(snapshot.tokens, Some(tokens));
                assert_eq!(format!("{permit:?}"), "Permit(none)");
            }
            other => panic!("expected admitted, got {other:?}"),
        }
    }

    #[test]
    fn malformed_replies_are_unavailable() {
        let q = quota(60, 60, 0);
        let bad = [
            vec![],
            vec![0; 7],
            vec![0; 9],
            reply(3, [0; 3], [0; 3], 0),
            reply(0, [-1, 0, 0], [0; 3], 0),
            reply(0, [0; 3], [0; 3], 2),
        ];
        for reply in bad {
            assert!(ReserveReply::parse(&reply).is_err(), "{reply:?}");
        }
        let denied_for_nothing = ReserveReply::parse(&reply(1, [0; 3], [0; 3], 0));
        assert!(denied_for_nothing.and_then(|reply| reply.decision(&q, None)).is_err());
        let too_large_untokened = ReserveReply::parse(&reply(2, [0; 3], [0; 3], 0));
        assert!(too_large_untokened.and_then(|reply| reply.decision(&quota(60, 0, 0), None)).is_err());
    }
}
