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

/// Reloads from `path` whenever its directory changes, forever, so editors that replace
/// the file (write, then rename) and ConfigMap updates are seen too; a burst of events
/// becomes one reload once the directory has been quiet for [`SETTLE`].
pub async fn on_file_change(live: Arc<Live>, path: PathBuf, overrides: Overrides) {
    use notify::{RecursiveMode, Watcher};

    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    // The file's own name, and the name it links to when it is a symlink (a link to
    // another file of the same directory is edited under that name).
    let names: Vec<std::ffi::OsString> = [Some(path.clone()), std::fs::read_link(&path).ok()]
        .into_iter()
        .flatten()
        .filter_map(|name| name.file_name().map(ToOwned::to_owned))
        .collect();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // An event without paths (the watcher lost track, e.g. an overflow) may be one.
        if event.is_ok_and(|event| {
            !event.kind.is_access()
                && (event.paths.is_empty()
                    || event.paths.iter().any(|changed| concerns_config(changed, &names)))
        }) {
            let _ = changed.send(());
        }
    }) {
        Ok(watcher) => watcher,
        Err(error) => return tracing::warn!(%error, "cannot watch the config file; reload on SIGHUP only"),
    };
    let directory = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Err(error) = watcher.watch(directory, RecursiveMode::NonRecursive) {
        return tracing::warn!(%error, "cannot watch the config file; reload on SIGHUP only");
    }
    while changes.recv().await.is_some() {
        // Let the writer finish: wait until no event came for a moment.
        while let Ok(Some(())) = tokio::time::timeout(SETTLE, changes.recv()).await {}
        reload(&live, &path, &overrides);
    }
}

/// Whether a change at `changed` in the config's directory can change the config: the
/// file itself under one of its `names` (written, or replaced by a rename), or a
/// Kubernetes ConfigMap update, which swaps a `..data` symlink and never touches the
/// file's own name. Other files (a log written next to the config, an editor's swap
/// file) do not count, or a log line about a reload would set off the next one.
fn concerns_config(changed: &Path, names: &[std::ffi::OsString]) -> bool {
    changed.file_name().is_some_and(|name| {
        names.iter().any(|config| config.as_os_str() == name) || name.as_encoded_bytes().starts_with(b"..")
    })
}

/// How long the config file must be quiet before a change is reloaded.
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
