//! The response cache: what a cached response is, how requests are keyed, and the
//! [`CacheStore`] trait that backends implement: [`memory`] in process, [`redis`]
//! shared by every replica, and [`tiered`], memory over Redis, in distributed mode.
//!
//! Deciding what to look up, coalescing identical misses and capturing responses as
//! they are relayed belong to the cache stage (`pipeline::cache`), so they work the
//! same for every backend. A store only keeps and returns entries.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};

use crate::limit::{BucketKey, Unavailable};

pub mod key;
pub mod memory;
pub mod redis;
pub mod tiered;

pub use key::CacheKey;

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
    pub method: Method,
    /// Path and query as the client sent them.
    pub path: String,
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
    pub headers: HeaderMap,
    pub body: CachedBody,
    /// How long the entry lives (config `ttl`, or the request's `x-spillway-cache-ttl`).
    pub ttl: Duration,
}

/// A stored body: whole, or a stream's frames in the order they were relayed.
#[derive(Debug, Clone)]
pub enum CachedBody {
    Full(Bytes),
    Events(Vec<Bytes>),
}

impl CachedBody {
    /// Bytes held, for weighing against `cache.max_size`.
    pub fn len(&self) -> usize {
        match self {
            Self::Full(bytes) => bytes.len(),
            Self::Events(frames) => frames.iter().map(Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CachedResponse {
    /// Approximate bytes an entry costs: body, headers and bookkeeping.
    pub fn weight(&self) -> usize {
        let headers: usize =
            self.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum();
        let frames = match &self.body {
            CachedBody::Full(_) => 0,
            CachedBody::Events(frames) => frames.len() * std::mem::size_of::<Bytes>(),
        };
        // ~630 bytes: the entry, its Arc and moka's node and indexes, as measured.
        self.body.len() + headers + frames + self.identity.path.len() + 630
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
