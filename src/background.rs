//! Work that runs after its response was sent and that nobody waits on: token
//! settlements, concurrency lease releases, cache writes to Redis. It is tracked in
//! one place, so that the process can give it a moment at exit instead of dropping it
//! (a release dropped at exit would hold a Redis slot until its lease expires).

use std::{future::Future, sync::LazyLock, time::Duration};

use tokio_util::task::TaskTracker;

static WORK: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Runs `work` on the current runtime, tracked.
pub fn spawn(work: impl Future<Output = ()> + Send + 'static) {
    WORK.spawn(work);
}

/// Runs `work` on `runtime`, tracked (for work started where there may be no current
/// runtime, such as a `Drop`).
pub fn spawn_on(runtime: &tokio::runtime::Handle, work: impl Future<Output = ()> + Send + 'static) {
    WORK.spawn_on(work, runtime);
}

/// Waits, at most `within`, for the work started so far to end.
pub async fn finish(within: Duration) {
    WORK.close();
    if tokio::time::timeout(within, WORK.wait()).await.is_err() {
        tracing::debug!(pending = WORK.len(), "background work left unfinished at exit");
    }
    WORK.reopen();
}
