//! The in-memory cache tier: a [`moka::future::Cache`] bounded by bytes, each entry
//! living for its own time to live.
//!
//! Entries are weighed by [`CachedResponse::weight`] against the tier's capacity
//! (its share of `cache.max_size`, see [`super::ResponseCache`]); an entry heavier
//! than a set bound is not stored at all, so one large response can never flush
//! everything else. When full, the least recently used entries go first. The bytes
//! held are reported in the [`BYTES_METRIC`] gauge, kept from the puts and removals
//! themselves (moka's own count lags behind until its next maintenance run). An
//! expired entry is never returned, but it keeps its bytes until moka's maintenance
//! removes it (its timer wheel ticks about once a second, and maintenance runs with
//! cache activity). What to store, for how long, and coalescing belong to the cache
//! stage; this store never fails (`Unavailable` is for remote tiers).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use moka::{Expiry, future::Cache};

use super::{CacheKey, CacheStore, CachedResponse};
use crate::limit::Unavailable;

/// Gauge of the bytes (by [`CachedResponse::weight`]) the memory tier holds.
pub const BYTES_METRIC: &str = "spillway_cache_bytes";

/// Responses kept in process memory.
pub struct MemoryStore {
    cache: Cache<CacheKey, Arc<CachedResponse>>,
    /// Heavier entries are not stored.
    max_entry_weight: u32,
    /// Weight put in minus weight removed (moka reports every removal).
    held: Arc<AtomicI64>,
}

/// Lets each entry expire after its own `ttl`, on insertion and on replacement.
struct EntryTtl;

// === impl MemoryStore ===

impl MemoryStore {
    /// A store holding at most `capacity` bytes (by weight), in which no entry may
    /// weigh more than `max_entry_weight`.
    pub fn new(capacity: u64, max_entry_weight: u32) -> Self {
        let held = Arc::new(AtomicI64::new(0));
        let removed = Arc::clone(&held);
        let cache = Cache::builder()
            .max_capacity(capacity)
            // Least recently used goes first, and a new response is always kept: under
            // TinyLFU a fresh entry may be refused, and then coalesced waiters would
            // find nothing and all go upstream.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_, value: &Arc<CachedResponse>| weight(value))
            .expire_after(EntryTtl)
            .eviction_listener(move |_, value: Arc<CachedResponse>, _| {
                removed.fetch_sub(i64::from(weight(&value)), Relaxed);
                report(&removed);
            })
            .build();
        Self { cache, max_entry_weight, held }
    }

    /// The weight held, once moka has applied every pending insertion, removal and
    /// expiry.
    pub async fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }

    /// Entries held, once moka has applied everything pending.
    pub async fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    /// The weight the gauge reports: put in minus removed so far (it counts an
    /// insertion before moka decides whether to keep it).
    pub fn held_bytes(&self) -> u64 {
        u64::try_from(self.held.load(Relaxed)).unwrap_or(0)
    }

    /// The heaviest entry `put` stores.
    pub fn max_entry_weight(&self) -> u32 {
        self.max_entry_weight
    }
}

impl CacheStore for MemoryStore {
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedResponse>>, Unavailable>> {
        Box::pin(async move { Ok(self.cache.get(key).await) })
    }

    /// Stores `value` under `key`, replacing any entry there, unless it weighs more
    /// than [`MemoryStore::max_entry_weight`]: then nothing changes and the answer
    /// is still `Ok`.
    fn put(&self, key: CacheKey, value: Arc<CachedResponse>) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let weight = weight(&value);
            if weight > self.max_entry_weight {
                return Ok(());
            }
            self.held.fetch_add(i64::from(weight), Relaxed);
            report(&self.held);
            self.cache.insert(key, value).await;
            Ok(())
        })
    }
}

/// An entry's weight for moka, which counts in `u32`.
fn weight(value: &CachedResponse) -> u32 {
    u32::try_from(value.weight()).unwrap_or(u32::MAX)
}

fn report(held: &AtomicI64) {
    metrics::gauge!(BYTES_METRIC).set(held.load(Relaxed).max(0) as f64);
}

// === impl EntryTtl ===

// moka's `Expiry` hands over its own `std::time::Instant`s; they are ignored here.
#[allow(clippy::disallowed_types)]
impl Expiry<CacheKey, Arc<CachedResponse>> for EntryTtl {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<CachedResponse>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Arc<CachedResponse>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{Method, StatusCode};

    use super::*;
    use crate::cache::{CachedBody, RequestIdentity, Scope, StoredHeaders};

    const KIB: u64 = 1024;

    fn identity() -> RequestIdentity {
        RequestIdentity {
            scope: Scope::Global,
            account: None,
            method: Method::POST,
            path: "/v1/chat/completions".into(),
            stream: false,
            body_len: 2,
        }
    }

    fn key(n: u64) -> CacheKey {
        CacheKey::new(&identity(), n.to_string().as_bytes())
    }

    fn response(body_bytes: usize, ttl: Duration) -> Arc<CachedResponse> {
        Arc::new(CachedResponse {
            identity: identity(),
            status: StatusCode::OK,
            headers: StoredHeaders::default(),
            body: CachedBody::Full(Bytes::from(vec![b'x'; body_bytes])),
            ttl,
        })
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn returns_what_was_put() {
        let store = MemoryStore::new(KIB * KIB, 128 * 1024);
        let first = response(100, HOUR);
        store.put(key(1), Arc::clone(&first)).await.expect("memory never fails");
        let found = store.get(&key(1)).await.expect("memory never fails").expect("a hit");
        assert!(Arc::ptr_eq(&found, &first));
        assert!(store.get(&key(2)).await.expect("memory never fails").is_none());

        let second = response(200, HOUR);
        store.put(key(1), Arc::clone(&second)).await.expect("memory never fails");
        let found = store.get(&key(1)).await.expect("memory never fails").expect("a hit");
        assert!(Arc::ptr_eq(&found, &second), "a put replaces the entry");
        assert_eq!(store.entry_count().await, 1);
        assert_eq!(store.held_bytes(), store.weighted_size().await);
        assert_eq!(store.held_bytes(), second.weight() as u64);
    }

    /// moka keeps its own clock, so this one test waits in real time (bounded: about
    /// twice the short ttl).
    #[tokio::test]
    async fn each_entry_expires_after_its_own_ttl() {
        let short = Duration::from_millis(200);
        let store = MemoryStore::new(KIB * KIB, 128 * 1024);
        let start = tokio::time::Instant::now();
        store.put(key(1), response(10, short)).await.expect("memory never fails");
        store.put(key(2), response(10, HOUR)).await.expect("memory never fails");
        // Replacing an entry gives it the new value's ttl, not what was left of the old one.
        store.put(key(3), response(10, HOUR)).await.expect("memory never fails");
        store.put(key(3), response(10, short)).await.expect("memory never fails");
        let fresh = [
            store.get(&key(1)).await.expect("memory never fails").is_some(),
            store.get(&key(3)).await.expect("memory never fails").is_some(),
        ];
        // Only meaningful if this machine did not stall past the short ttl meanwhile.
        if start.elapsed() < short {
            assert_eq!(fresh, [true, true]);
        }

        tokio::time::sleep(2 * short).await;
        assert!(store.get(&key(1)).await.expect("memory never fails").is_none());
        assert!(store.get(&key(2)).await.expect("memory never fails").is_some());
        assert!(store.get(&key(3)).await.expect("memory never fails").is_none());
    }

    #[tokio::test]
    async fn stays_within_its_size_by_evicting() {
        let max_size = 64 * KIB;
        let store = MemoryStore::new(max_size, 8 * 1024);
        for n in 0..100 {
            store.put(key(n), response(4 * KIB as usize, HOUR)).await.expect("memory never fails");
        }
        let held = store.weighted_size().await;
        assert!(held <= max_size, "{held} bytes held");
        assert!(held > max_size / 2, "only {held} bytes held");
        assert!(store.entry_count().await < 100);
        assert_eq!(store.held_bytes(), held, "evictions reach the gauge");
    }

    #[tokio::test]
    async fn does_not_store_an_entry_over_its_share() {
        let store = MemoryStore::new(64 * KIB, 8 * 1024);
        assert_eq!(store.max_entry_weight(), 8 * 1024);
        let overhead = response(0, HOUR).weight();
        let largest = response(8 * KIB as usize - overhead, HOUR);
        let heavier = response(8 * KIB as usize - overhead + 1, HOUR);
        store.put(key(1), heavier).await.expect("dropped, not an error");
        store.put(key(2), Arc::clone(&largest)).await.expect("memory never fails");
        assert!(store.get(&key(1)).await.expect("memory never fails").is_none());
        assert!(store.get(&key(2)).await.expect("memory never fails").is_some());
        assert_eq!(store.entry_count().await, 1);
        assert_eq!(store.held_bytes(), largest.weight() as u64);
    }
}
