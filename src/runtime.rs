//! Everything the request path needs that is built from one config: the config
//! itself, the upstream pools and the key table. Later stages add their state here
//! (limiters, cache), so a reload can build a new `Runtime` and carry state over.

use std::sync::Arc;

use crate::{
    auth::KeyTable,
    cache::{
        CacheStore,
        memory::{DEFAULT_MAX_ENTRY_DIVISOR, MemoryStore},
    },
    config::Config,
    error::StartupError,
    limit::{Limiter, local::LocalLimiter},
    redis_link::RedisLink,
    upstream::UpstreamSet,
};

pub struct Runtime {
    pub config: Arc<Config>,
    pub upstreams: UpstreamSet,
    pub keys: KeyTable,
    /// Kept across reloads: buckets of keys whose limits did not change live on.
    pub limiter: Arc<dyn Limiter>,
    /// `None` when `cache.enabled = false`.
    pub cache: Option<Arc<dyn CacheStore>>,
    /// Distributed mode's connection; `None` without `[redis] url`.
    pub redis: Option<Arc<RedisLink>>,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Self, StartupError> {
        let redis = config.redis.as_ref().map(RedisLink::new).transpose()?;
        let limiter = Arc::new(LocalLimiter::new(config.limits.max_tracked_keys.get()));
        let cache = Self::cache_for(&config);
        Self::with_state(config, limiter, cache, redis)
    }

    /// A runtime for `config` that keeps using `limiter`, `cache` and `redis` (a
    /// reload's carry-over).
    pub fn with_state(
        config: Config,
        limiter: Arc<dyn Limiter>,
        cache: Option<Arc<dyn CacheStore>>,
        redis: Option<Arc<RedisLink>>,
    ) -> Result<Self, StartupError> {
        Ok(Self {
            cache,
            upstreams: UpstreamSet::new(&config.upstreams)?,
            keys: KeyTable::new(&config.keys, &config.default_limits),
            limiter,
            redis,
            config: Arc::new(config),
        })
    }

    /// The runtime for a reloaded `config`, keeping this one's limiter and, while the
    /// cache's switch and size are unchanged, its cache.
    pub fn reload(&self, config: Config) -> Result<Self, StartupError> {
        let same_cache = config.cache.enabled == self.config.cache.enabled
            && config.cache.max_size == self.config.cache.max_size;
        let cache = match same_cache {
            true => self.cache.clone(),
            false => Self::cache_for(&config),
        };
        let redis = match (&config.redis, &self.redis) {
            (Some(wanted), Some(link)) if link.serves(wanted) => Some(link.clone()),
            (wanted, _) => wanted.as_ref().map(RedisLink::new).transpose()?,
        };
        Self::with_state(config, self.limiter.clone(), cache, redis)
    }

    fn cache_for(config: &Config) -> Option<Arc<dyn CacheStore>> {
        config.cache.enabled.then(|| {
            Arc::new(MemoryStore::new(config.cache.max_size.as_u64(), DEFAULT_MAX_ENTRY_DIVISOR))
                as Arc<dyn CacheStore>
        })
    }
}
