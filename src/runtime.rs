//! Everything the request path needs that is built from one config: the config
//! itself, the upstream pools and the key table. Later stages add their state here
//! (limiters, cache), so a reload can build a new `Runtime` and carry state over.

use std::sync::Arc;

use crate::{auth::KeyTable, config::Config, error::StartupError, upstream::UpstreamSet};

#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub upstreams: UpstreamSet,
    pub keys: KeyTable,
}

impl Runtime {
    pub fn new(config: Config) -> Result<Self, StartupError> {
        Ok(Self {
            upstreams: UpstreamSet::new(&config.upstreams)?,
            keys: KeyTable::new(&config.keys),
            config: Arc::new(config),
        })
    }
}
