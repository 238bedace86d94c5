//! Limits shared across replicas, with the local limiter as the fallback: the
//! [`Limiter`] of distributed mode (`[redis] limits = true`).
//!
//! # Failure behaviour
//!
//! Fail open to local limits (SPEC §4 "Distributed mode"). While the Redis link is up,
//! every decision and settlement is taken in Redis ([`RedisLimiter`]). When Redis
//! cannot answer (down, slower than `[redis] timeout`, or a reply that makes no
//! sense), the request is decided by the [`LocalLimiter`] instead, so each replica
//! enforces the full quota on its own until Redis returns; no request waits on Redis
//! longer than the timeout, which the link enforces. Settlements follow the same rule,
//! to Redis while it is up, else locally, so a request admitted on one side and
//! settled on the other corrects the other side's bucket (a small, bounded error
//! that only arises across a change of state). Leases in Redis and the local
//! semaphores do not see each other: during an outage, requests still in flight from
//! before it do not count against the local `max_concurrent`.
//!
//! The link logs its own change of state and drives the `spillway_redis_up` gauge;
//! this module logs only replies that fail while the link is up (a script error),
//! once until the next good reply.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use futures_util::future::BoxFuture;

use super::{
    BucketKey, Decision, Limiter, Permit, Quota, Unavailable, local::LocalLimiter, redis::RedisLimiter,
};

/// Redis first, the local limiter when Redis cannot answer. Holds no state of its
/// own beyond the local limiter it is given, which a reload passes on.
pub struct SharedLimiter {
    redis: RedisLimiter,
    local: Arc<LocalLimiter>,
    /// Whether the last answer from a live link was an error.
    failing: AtomicBool,
}

// === impl SharedLimiter ===

impl SharedLimiter {
    pub fn new(redis: RedisLimiter, local: Arc<LocalLimiter>) -> Self {
        Self { redis, local, failing: AtomicBool::new(false) }
    }

    /// Notes the outcome of a call to Redis; a failure while the link stays up is
    /// logged once.
    fn note<T>(&self, outcome: &Result<T, Unavailable>) {
        match outcome {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("shared limits answer again");
                }
            }
            Err(error) if self.redis.is_up() => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "shared limits failed; deciding on local limits meanwhile");
                }
            }
            // The link is down and has said so.
            Err(_) => {}
        }
    }
}

impl Limiter for SharedLimiter {
    fn reserve<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        tokens: u64,
    ) -> BoxFuture<'a, Result<Decision, Unavailable>> {
        Box::pin(async move {
            if self.redis.is_up() {
                let shared = self.redis.reserve(key, quota, tokens).await;
                self.note(&shared);
                if let Ok(decision) = shared {
                    return Ok(decision);
                }
            }
            Ok(self.local.decide(key, quota, tokens))
        })
    }

    fn settle<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        // A settle is an end without a slot to give back.
        Box::pin(self.end(key, quota, delta, Permit::default()))
    }

    fn finish<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
        permit: Permit,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        Box::pin(self.end(key, quota, delta, permit))
    }
}

impl SharedLimiter {
    /// [`Limiter::finish`] (and [`Limiter::settle`], with no permit): in one exchange
    /// with Redis while it is up; otherwise the slot goes back by itself (a Redis lease's release is retried in the background,
    /// a local slot is freed at once) and the tokens are settled locally.
    async fn end(
        &self,
        key: &BucketKey,
        quota: &Quota,
        delta: i64,
        permit: Permit,
    ) -> Result<(), Unavailable> {
        if self.redis.is_up() {
            let shared = self.redis.finish(key, quota, delta, permit).await;
            self.note(&shared);
            if shared.is_ok() {
                return Ok(());
            }
        } else {
            drop(permit);
        }
        self.local.adjust(key, quota, delta);
        Ok(())
    }
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter").field("redis", &self.redis).field("local", &self.local).finish()
    }
}
