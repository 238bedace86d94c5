//! Hot reload: the request path in service is swapped atomically on SIGHUP or when
//! the config file changes, without dropping a connection.
//!
//! A reload reads and validates the config file again (with the same flag and
//! environment overrides); an invalid one is logged with every error and the running
//! config stays. A valid one becomes a new [`Runtime`] that keeps the limiter (keys
//! whose limits did not change keep their buckets) and, while its size and switch are
//! unchanged, the cache. Requests already in flight finish on the runtime they started
//! with; the listener address, TLS files and shutdown grace are read at startup only.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

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
        match &path {
            Some(path) => reload(&live, path, &overrides),
            None => tracing::info!("SIGHUP: running on built-in defaults, no config file to reload"),
        }
    }
}

/// Reloads from `path` whenever the file it names changes, forever: written in place,
/// replaced by a rename (editors), or swapped behind a symlink (a Kubernetes ConfigMap
/// update swaps a `..data` link). The file's metadata, symlinks followed, is read every
/// [`POLL`]; a change is reloaded once it has held still for [`SETTLE`]. Polling one
/// file costs one `stat` a second however busy its directory is, where a directory
/// watch would wake on every write next to it (a log file, say).
pub async fn on_file_change(live: Arc<Live>, path: PathBuf, overrides: Overrides) {
    let mut seen = stamp(&path).await;
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut now = stamp(&path).await;
        if now.is_none() || now == seen {
            // Gone for a moment (a ConfigMap swap, an editor's rename) or unchanged.
            continue;
        }
        // Let the writer finish: wait until it stops changing.
        loop {
            tokio::time::sleep(SETTLE).await;
            let settled = stamp(&path).await;
            if settled == now {
                break;
            }
            now = settled;
        }
        seen = now;
        reload(&live, &path, &overrides);
    }
}

/// What tells one version of the config file from another: the metadata of the file
/// `path` leads to. `None` while it cannot be read.
async fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;

    let metadata = tokio::fs::metadata(path).await.ok()?;
    Some(Stamp {
        file: (metadata.dev(), metadata.ino()),
        len: metadata.len(),
        modified: (metadata.mtime(), metadata.mtime_nsec()),
        changed: (metadata.ctime(), metadata.ctime_nsec()),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    file: (u64, u64),
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

/// How often the config file's metadata is read.
const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a change must hold still before it is reloaded.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads, validates and swaps in the config at `path`, or logs why not.
fn reload(live: &Live, path: &Path, overrides: &Overrides) {
    let outcome = match config::load(path, overrides) {
        Err(diagnostics) => {
            tracing::error!(file = %path.display(), "config reload refused; the running config stays:\n{diagnostics}");
            "failed"
        }
        Ok(config) => match live.runtime().reload(config) {
            Ok(runtime) => {
                live.swap(Arc::new(runtime));
                tracing::info!(file = %path.display(), "config reloaded");
                "ok"
            }
            Err(error) => {
                tracing::error!(%error, "config reload failed; the running config stays");
                "failed"
            }
        },
    };
    metrics::counter!(crate::metrics::RELOADS, "result" => outcome).increment(1);
}
