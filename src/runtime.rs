//! Everything the request path needs that is built from one config: the config
//! itself, the upstream pools and the key table. Later stages add their state here
//! (limiters, cache), so a reload can build a new `Runtime` and carry state over.

use std::sync::Arc;

use crate::{
    auth::KeyTable,
    config::Config,
    error::StartupError,
    limit::{Limiter, local::LocalLimiter},
    upstream::UpstreamSet,
};

pub struct Runtime {
    pub config: Arc<Config>,
    pub upstreams: UpstreamSet,
    pub keys: KeyTable,
    /// Kept across reloads: buckets of keys whose limits did not change live on.
    pub limiter: Arc<dyn Limiter>,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Self, StartupError> {
        let limiter = Arc::new(LocalLimiter::new(config.limits.max_tracked_keys.get()));
        Self::with_limiter(config, limiter)
    }

    /// A runtime for `config` that keeps using `limiter` (a reload's carry-over).
    pub fn with_limiter(config: Config, limiter: Arc<dyn Limiter>) -> Result<Self, StartupError> {
        Ok(Self {
            upstreams: UpstreamSet::new(&config.upstreams)?,
            keys: KeyTable::new(&config.keys, &config.default_limits),
            limiter,
            config: Arc::new(config),
        })
    }
}
