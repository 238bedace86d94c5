//! Hot reload: the request path in service is swapped atomically on SIGHUP, without
//! dropping a connection.
//!
//! A reload reads and validates the config file again (with the same flag and
//! environment overrides); an invalid one is logged with every error and the running
//! config stays. A valid one becomes a new [`Runtime`] that keeps the limiter (keys
//! whose limits did not change keep their buckets) and, while its size and switch are
//! unchanged, the cache. Requests already in flight finish on the runtime they started
//! with; the listener address, TLS files and shutdown grace are read at startup only.

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use tokio::signal::unix::Signal;

use crate::{
    config::{self, Overrides},
    pipeline::{self, Stack},
    runtime::Runtime,
};

/// The runtime and request path currently in service.
pub struct Live {
    runtime: ArcSwap<Runtime>,
    stack: ArcSwap<Stack>,
}

impl Live {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        let stack = Arc::new(pipeline::build(runtime.clone()));
        Self { runtime: ArcSwap::new(runtime), stack: ArcSwap::new(stack) }
    }

    /// The request path for the next request.
    pub fn stack(&self) -> Stack {
        self.stack.load().as_ref().clone()
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Puts `runtime` in service for every request from now on.
    pub fn swap(&self, runtime: Arc<Runtime>) {
        self.stack.store(Arc::new(pipeline::build(runtime.clone())));
        self.runtime.store(runtime);
    }
}

/// Reloads from `path` on every SIGHUP in `hangups`, forever. Without a config file
/// (built-in defaults) there is nothing to re-read, and the signal is only logged.
pub async fn on_sighup(mut hangups: Signal, live: Arc<Live>, path: Option<PathBuf>, overrides: Overrides) {
    while hangups.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::info!("SIGHUP: running on built-in defaults, no config file to reload");
            continue;
        };
        match config::load(path, &overrides) {
            Err(diagnostics) => {
                tracing::error!(file = %path.display(), "config reload refused; the running config stays:\n{diagnostics}");
            }
            Ok(config) => match live.runtime().reload(config) {
                Ok(runtime) => {
                    live.swap(Arc::new(runtime));
                    tracing::info!(file = %path.display(), "config reloaded");
                }
                Err(error) => tracing::error!(%error, "config reload failed; the running config stays"),
            },
        }
    }
}
