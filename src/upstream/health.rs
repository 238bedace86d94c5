//! Passive health: an upstream that keeps failing is cooled down for a while, and
//! comes back by itself when the cool-down ends.
//!
//! A failure is a connect error, a reset, a timeout, a 5xx or a 429. After
//! [`FAILURES_TO_COOL`] in a row the upstream cools for [`COOLDOWN`], or for as long as
//! its last `retry-after` asked if that is longer (at most [`MAX_COOLDOWN`]). Any
//! success resets the count. Choosing among upstreams with this knowledge is the retry
//! stage's business.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Consecutive failures that cool an upstream down.
pub const FAILURES_TO_COOL: u32 = 3;
/// How long a cool-down lasts at least.
pub const COOLDOWN: Duration = Duration::from_secs(10);
/// The longest cool-down an upstream's `retry-after` can ask for.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    cooling_until: Option<Instant>,
    last_failure: Option<Instant>,
}

impl Health {
    /// An attempt got a usable answer.
    pub fn success(&self) {
        let mut state = self.state.lock();
        state.consecutive_failures = 0;
        state.cooling_until = None;
    }

    /// An attempt failed; `asked` is the upstream's `retry-after`, if it sent one.
    pub fn failure(&self, asked: Option<Duration>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.last_failure = Some(now);
        if state.consecutive_failures >= FAILURES_TO_COOL {
            let cooldown = asked.map_or(COOLDOWN, |asked| asked.clamp(COOLDOWN, MAX_COOLDOWN));
            state.cooling_until = Some(now + cooldown);
        }
    }

    pub fn is_cooling(&self, now: Instant) -> bool {
        self.state.lock().cooling_until.is_some_and(|until| until > now)
    }

    pub fn last_failure(&self) -> Option<Instant> {
        self.state.lock().last_failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn cools_after_consecutive_failures_and_recovers_by_itself() {
        let health = Health::default();
        health.failure(None);
        health.failure(None);
        assert!(!health.is_cooling(Instant::now()));
        health.failure(Some(Duration::from_secs(30)));
        assert!(health.is_cooling(Instant::now()));

        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(health.is_cooling(Instant::now()), "retry-after lengthens the cool-down");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!health.is_cooling(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let health = Health::default();
        health.failure(None);
        health.failure(None);
        health.success();
        health.failure(None);
        assert!(!health.is_cooling(Instant::now()));
    }
}
