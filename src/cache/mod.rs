//! The response cache: what a cached response is, how requests are keyed, the
//! [`CacheStore`] trait that backends implement ([`memory`] in process, [`redis`]
//! shared by every replica, and [`tiered`], memory over Redis, in distributed mode),
//! and [`ResponseCache`], which splits `cache.max_size` between stored entries and
//! responses being recorded.
//!
//! Deciding what to look up, coalescing identical misses and recording responses as
//! they are relayed belong to the cache stage (`pipeline::cache`), so they work the
//! same for every backend. A store only keeps and returns entries.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, StatusCode};

use crate::{
    limit::{BucketKey, Unavailable},
    redis_link::RedisLink,
};

pub mod headers;
pub mod key;
pub mod memory;
pub mod recording;
pub mod redis;
pub mod tiered;

pub use headers::StoredHeaders;
pub use key::CacheKey;
pub use recording::{RecordingBudget, Reservation};

/// Whose namespace an entry lives in. A type, not a string prefix, so that no two
/// callers can ever produce the same scope by accident.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `cache.scope = "key"`: the caller's own namespace (a configured key's id, or a
    /// passthrough key's full hash).
    Key(BucketKey),
    /// `cache.scope = "global"`: shared by every caller.
    Global,
}

/// What a request is, for the cache: everything that must match for a stored
/// response to be served. Stored with the entry and compared on every hit, so that
/// even a hash collision could never serve another scope's or request's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIdentity {
    pub scope: Scope,
    /// The OpenAI organization and project a passthrough caller's own key was sent
    /// with (`openai-organization`, `openai-project`): one key may answer for several
    /// accounts, and each keeps its own entries. `None` otherwise.
    pub account: Option<Box<str>>,
    pub method: Method,
    /// Path and query as the client sent them.
    pub path: Box<str>,
    pub stream: bool,
    /// Length of the canonical JSON body.
    pub body_len: usize,
}

/// A stored response.
#[derive(Debug)]
pub struct CachedResponse {
    pub identity: RequestIdentity,
    pub status: StatusCode,
    /// Only the headers worth replaying (content type, `openai-model`…): never
    /// per-request or per-tenant ones.
    pub headers: StoredHeaders,
    pub body: CachedBody,
    /// How long the entry lives (config `ttl`, or the request's shorter
    /// `x-spillway-cache-ttl`).
    pub ttl: Duration,
}

/// A stored body in one buffer of its own: a whole body, or a stream's bytes (its
/// events back to back, exactly as they were relayed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedBody {
    Full(Bytes),
    Events(Bytes),
}

impl CachedBody {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Self::Full(bytes) | Self::Events(bytes) => bytes,
        }
    }
}

/// What an entry costs beyond its path, headers and body, in bytes: the entry in its
/// `Arc`, the reference counts its two buffers get when first replayed, and moka's own
/// bookkeeping (the key, its node, the LRU and timer-wheel entries, the hash table),
/// as measured by `benches/cache_memory.rs`.
pub const ENTRY_OVERHEAD: usize = 720;

impl CachedResponse {
    /// The bytes an entry costs the process, which is what it weighs against
    /// `cache.max_size`: its path, headers and body, and [`ENTRY_OVERHEAD`].
    pub fn weight(&self) -> usize {
        ENTRY_OVERHEAD + self.identity.path.len() + self.headers.len() + self.body.bytes().len()
    }
}

/// Keeps responses by key. Never coalesces, never decides cacheability.
///
/// # Failure behaviour
/// A backend that cannot answer returns `Unavailable`; the cache stage treats that as
/// a miss (and a failed `put` as not stored), so a cache outage never fails a request.
pub trait CacheStore: Send + Sync + 'static {
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedResponse>>, Unavailable>>;
    fn put(&self, key: CacheKey, value: Arc<CachedResponse>) -> BoxFuture<'_, Result<(), Unavailable>>;
}

/// The response cache as the request path uses it: where entries are kept, and the
/// memory that responses being recorded for it share.
///
/// `cache.max_size` bounds both together: responses being recorded share at most a
/// quarter of it, the memory tier holds the rest, so entries and recordings never
/// weigh more than `max_size` between them. No entry, and no recording, may take more
/// than an eighth of it.
pub struct ResponseCache {
    pub store: Arc<dyn CacheStore>,
    pub recordings: Arc<RecordingBudget>,
    /// The longest body recorded (a heavier entry would not be kept anyway).
    pub max_entry: usize,
}

/// Recordings in flight share `max_size` / this.
pub const RECORDING_SHARE: u64 = 4;
/// No entry may weigh more than `max_size` / this.
pub const MAX_ENTRY_SHARE: u64 = 8;

impl ResponseCache {
    /// A cache of `max_size` bytes in all: in memory, or in memory over Redis through
    /// `shared`.
    pub fn new(max_size: u64, shared: Option<Arc<RedisLink>>) -> Self {
        let recordings = max_size / RECORDING_SHARE;
        let max_entry = max_size / MAX_ENTRY_SHARE;
        let memory =
            memory::MemoryStore::new(max_size - recordings, u32::try_from(max_entry).unwrap_or(u32::MAX));
        let store: Arc<dyn CacheStore> = match shared {
            Some(link) => Arc::new(tiered::TieredStore::new(memory, link)),
            None => Arc::new(memory),
        };
        Self {
            store,
            recordings: Arc::new(RecordingBudget::new(usize::try_from(recordings).unwrap_or(usize::MAX))),
            max_entry: usize::try_from(max_entry).unwrap_or(usize::MAX),
        }
    }
}
