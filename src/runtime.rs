//! Everything the request path needs that is built from one config: the config
//! itself, the upstream pools and the key table. Later stages add their state here
//! (limiters, cache), so a reload can build a new `Runtime` and carry state over.

use std::sync::Arc;

use crate::{
    auth::KeyTable,
    cache::ResponseCache,
    config::Config,
    error::StartupError,
    limit::{
        Limiter,
        local::LocalLimiter,
        redis::{RedisLimiter, lease_for},
        shared::SharedLimiter,
    },
    redis_link::RedisLink,
    upstream::UpstreamSet,
};

pub struct Runtime {
    pub config: Arc<Config>,
    pub upstreams: UpstreamSet,
    pub keys: KeyTable,
    /// The local limiter, or in distributed mode (`[redis] limits = true`) the
    /// shared one over it.
    pub limiter: Arc<dyn Limiter>,
    /// Kept across reloads: buckets of keys whose limits did not change live on.
    local_limiter: Arc<LocalLimiter>,
    /// `None` when `cache.enabled = false`.
    pub cache: Option<Arc<ResponseCache>>,
    /// Distributed mode's connection; `None` without `[redis] url`.
    pub redis: Option<Arc<RedisLink>>,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Self, StartupError> {
        let redis = config.redis.as_ref().map(RedisLink::new).transpose()?;
        let local_limiter = Arc::new(LocalLimiter::new(config.limits.max_tracked_keys.get()));
        let cache = Self::cache_for(&config, redis.as_ref());
        Self::with_state(config, local_limiter, cache, redis)
    }

    /// A runtime for `config` that keeps using `local_limiter`, `cache` and `redis` (a
    /// reload's carry-over). The limiter is `local_limiter`, or the shared one over it
    /// when `config` shares limits through `redis`; the shared one keeps no state of
    /// its own, so building it again loses nothing.
    pub fn with_state(
        config: Config,
        local_limiter: Arc<LocalLimiter>,
        cache: Option<Arc<ResponseCache>>,
        redis: Option<Arc<RedisLink>>,
    ) -> Result<Self, StartupError> {
        let shared_limits =
            redis.as_ref().filter(|_| config.redis.as_ref().is_some_and(|redis| redis.limits));
        let limiter: Arc<dyn Limiter> = match shared_limits {
            Some(link) => {
                let shared = RedisLimiter::new(link.clone(), lease_for(config.server.request_timeout));
                Arc::new(SharedLimiter::new(shared, local_limiter.clone()))
            }
            None => local_limiter.clone(),
        };
        Ok(Self {
            cache,
            upstreams: UpstreamSet::new(&config.upstreams)?,
            keys: KeyTable::new(&config.keys, &config.default_limits),
            limiter,
            local_limiter,
            redis,
            config: Arc::new(config),
        })
    }

    /// The runtime for a reloaded `config`, keeping this one's limiter and, while the
    /// cache's switch and size are unchanged and its shared tier (if any) would use
    /// the same Redis link, its cache.
    pub fn reload(&self, config: Config) -> Result<Self, StartupError> {
        let redis = match (&config.redis, &self.redis) {
            (Some(wanted), Some(link)) if link.serves(wanted) => Some(link.clone()),
            (wanted, _) => wanted.as_ref().map(RedisLink::new).transpose()?,
        };
        let same_tier = match (
            shared_cache_link(&config, redis.as_ref()),
            shared_cache_link(&self.config, self.redis.as_ref()),
        ) {
            (Some(wanted), Some(used)) => Arc::ptr_eq(wanted, used),
            (wanted, used) => wanted.is_none() && used.is_none(),
        };
        let same_cache = config.cache.enabled == self.config.cache.enabled
            && config.cache.max_size == self.config.cache.max_size
            && same_tier;
        let cache = match same_cache {
            true => self.cache.clone(),
            false => Self::cache_for(&config, redis.as_ref()),
        };
        Self::with_state(config, self.local_limiter.clone(), cache, redis)
    }

    /// The cache `config` asks for: none, memory, or memory over Redis (`[redis]
    /// cache = true` with a link).
    fn cache_for(config: &Config, redis: Option<&Arc<RedisLink>>) -> Option<Arc<ResponseCache>> {
        config.cache.enabled.then(|| {
            let shared = shared_cache_link(config, redis).cloned();
            Arc::new(ResponseCache::new(config.cache.max_size.as_u64(), shared))
        })
    }
}

/// `redis` when `config` shares its cache through it (`[redis] cache = true`).
fn shared_cache_link<'a>(config: &Config, redis: Option<&'a Arc<RedisLink>>) -> Option<&'a Arc<RedisLink>> {
    redis.filter(|_| config.cache.enabled && config.redis.as_ref().is_some_and(|redis| redis.cache))
}
