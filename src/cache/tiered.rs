//! Distributed mode's cache: the in-memory tier in front of the shared Redis tier.
//!
//! A lookup asks memory first, then Redis; a Redis hit is copied into memory for what
//! is left of its time to live, so later hits on this replica stay local. A store goes
//! into memory at once and is written to Redis by a spawned task, so the response
//! (and any coalesced waiters) never wait for Redis. When Redis is down or slow the
//! memory tier keeps answering on its own: a Redis failure is a miss, and a failed
//! write is logged at debug and forgotten. This store never returns `Unavailable`.
//!
//! Cacheability, coalescing and identity checks stay in the cache stage; how an entry
//! looks in Redis belongs to [`RedisStore`].

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tracing::Instrument;

use super::{CacheKey, CacheStore, CachedResponse, memory::MemoryStore, redis::RedisStore};
use crate::{limit::Unavailable, redis_link::RedisLink};

/// Memory over Redis.
pub struct TieredStore {
    memory: MemoryStore,
    /// In an `Arc` so that background writes can outlive the call that started them.
    shared: Arc<RedisStore>,
}

// === impl TieredStore ===

impl TieredStore {
    /// `memory` in front of Redis through `link`. Redis gets the same largest-entry
    /// bound as `memory`.
    pub fn new(memory: MemoryStore, link: Arc<RedisLink>) -> Self {
        let shared = Arc::new(RedisStore::new(link, memory.max_entry_weight()));
        Self { memory, shared }
    }
}

impl CacheStore for TieredStore {
    /// A memory hit; else a Redis hit, copied into memory first; else `None`. Waits on
    /// Redis at most `[redis] timeout`, and not at all while it is known to be down.
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedResponse>>, Unavailable>> {
        Box::pin(async move {
            if let Some(hit) = self.memory.get(key).await? {
                return Ok(Some(hit));
            }
            match self.shared.get(key).await {
                Ok(Some(entry)) => {
                    // Its ttl is what Redis had left, so both copies expire together.
                    self.memory.put(*key, Arc::clone(&entry)).await?;
                    Ok(Some(entry))
                }
                Ok(None) => Ok(None),
                Err(error) => {
                    tracing::debug!(%error, "shared cache lookup failed; a miss");
                    Ok(None)
                }
            }
        })
    }

    /// Stores in memory, then starts the Redis write in the background and returns
    /// without waiting for it.
    fn put(&self, key: CacheKey, value: Arc<CachedResponse>) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            self.memory.put(key, Arc::clone(&value)).await?;
            let shared = Arc::clone(&self.shared);
            let write = async move {
                if let Err(error) = shared.put(key, value).await {
                    tracing::debug!(%error, "shared cache write failed; kept in memory only");
                }
            };
            crate::background::spawn(write.in_current_span());
            Ok(())
        })
    }
}
