//! The shared cache tier: entries kept in Redis, so that a response stored by one
//! replica is a hit on every other.
//!
//! Each entry is one string, `{prefix}cache:{hex of the CacheKey digest}`, holding
//! the whole [`CachedResponse`] in [`codec`]'s versioned binary layout, written with
//! `SET … PX ttl` so Redis expires it. A lookup reads the value and its remaining
//! time to live in one round trip, and the entry it returns carries that remaining
//! time as its `ttl` (for the memory tier above it). Every call goes through
//! [`RedisLink::call`], so none waits longer than `[redis] timeout`, and none is made
//! while the link is down.
//!
//! This store does not decide cacheability, coalesce or compare identities (the
//! cache stage does), nor run its writes in the background (the tiered store does).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{CacheKey, CacheStore, CachedResponse};
use crate::{
    limit::Unavailable,
    redis_link::{Lane, RedisLink},
};

mod codec;
#[cfg(test)]
mod tests;

/// Longest time to live written to Redis: a longer one (`x-spillway-cache-ttl` takes
/// any number of seconds) is cut to this, which Redis accepts whatever its clock.
const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The heaviest entry shared through Redis (4 MiB): a lookup must come back within
/// `[redis] timeout`, and a larger value would not on most networks. Heavier entries
/// stay in each replica's memory.
pub const MAX_ENTRY_WEIGHT: u32 = 4 << 20;

/// How long a write to Redis may take: it runs after the response was sent and
/// delays nobody.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Responses kept in Redis, shared by every replica using the same prefix.
pub struct RedisStore {
    link: Arc<RedisLink>,
    /// Heavier entries (by [`CachedResponse::weight`]) are not written: the memory
    /// tier's own bound, so that neither tier keeps what the other would refuse.
    max_entry_weight: u32,
}

// === impl RedisStore ===

impl RedisStore {
    /// A store over `link` that writes no entry heavier than `max_entry_weight` (nor
    /// than [`MAX_ENTRY_WEIGHT`]).
    pub fn new(link: Arc<RedisLink>, max_entry_weight: u32) -> Self {
        Self { link, max_entry_weight: max_entry_weight.min(MAX_ENTRY_WEIGHT) }
    }

    /// `{prefix}cache:{hex digest}`: the Redis key of an entry.
    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}cache:{key}", self.link.prefix())
    }
}

impl CacheStore for RedisStore {
    /// The entry under `key` with its remaining time to live as `ttl`, or `None` when
    /// there is none or the value is not a well-formed entry (a foreign, older or
    /// damaged value is a miss, never an error). `Unavailable` when Redis cannot
    /// answer within the timeout or is known to be down.
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedResponse>>, Unavailable>> {
        let redis_key = self.redis_key(key);
        Box::pin(async move {
            let (value, remaining_ms) = self
                .link
                .call(Lane::Cache, move |mut connection| async move {
                    redis::pipe()
                        .cmd("GET")
                        .arg(&redis_key)
                        .cmd("PTTL")
                        .arg(&redis_key)
                        .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                        .await
                })
                .await?;
            let Some(value) = value else { return Ok(None) };
            let Some(mut entry) = codec::decode(Bytes::from(value)) else {
                tracing::debug!(?key, "value in redis is not a cache entry of this version; a miss");
                return Ok(None);
            };
            // -1: no expiry (not written by this store; keep the entry's own ttl);
            // -2 or 0: it expired between the two commands.
            match remaining_ms {
                -1 => {}
                remaining if remaining > 0 => entry.ttl = Duration::from_millis(remaining.unsigned_abs()),
                _ => return Ok(None),
            }
            Ok(Some(Arc::new(entry)))
        })
    }

    /// Writes `value` under `key` with `PX` its ttl, replacing any entry there. An
    /// entry heavier than [`MAX_ENTRY_WEIGHT`] or the memory tier's largest, or with a
    /// ttl under a millisecond, is not written and the answer is still `Ok`. Nobody
    /// waits on a write, so it gets [`WRITE_TIMEOUT`] and a slow one does not mark
    /// the link down; none is tried while the link is down.
    fn put(&self, key: CacheKey, value: Arc<CachedResponse>) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            if !self.link.is_up() {
                return Err(Unavailable("redis is down".into()));
            }
            let ttl_ms = u64::try_from(value.ttl.min(LONGEST_TTL).as_millis()).unwrap_or(u64::MAX);
            let too_heavy = value.weight() > usize::try_from(self.max_entry_weight).unwrap_or(usize::MAX);
            if too_heavy || ttl_ms == 0 {
                return Ok(());
            }
            let Some(encoded) = codec::encode(&value) else { return Ok(()) };
            let redis_key = self.redis_key(&key);
            self.link
                .call_in_background(Lane::Cache, WRITE_TIMEOUT, move |mut connection| async move {
                    redis::cmd("SET")
                        .arg(redis_key)
                        .arg(encoded.as_ref())
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<()>(&mut connection)
                        .await
                })
                .await
        })
    }
}
