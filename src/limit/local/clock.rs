//! The local limiter's time source: tokio's clock, read as nanoseconds since the
//! limiter was built.
//!
//! Everything in the local limiter (governor's requests buckets and our own tokens
//! buckets) takes its time from here, so a paused runtime
//! (`#[tokio::test(start_paused = true)]` with `tokio::time::advance`) drives refill in
//! tests, and nothing reads the wall clock. The limiter reads it once per decision
//! and hands that instant to every bucket it consults (governor through
//! `requests::DecisionClock`), so all of a decision's checks, waits and reset times
//! refer to the same instant. This module does not decide anything; it only tells
//! the time.

use tokio::time::Instant;

/// Tokio's clock as a monotonic count of nanoseconds from a fixed origin.
#[derive(Debug, Clone, Copy)]
pub(super) struct TokioClock {
    origin: Instant,
}

// === impl TokioClock ===

impl TokioClock {
    /// A clock whose zero is now.
    pub(super) fn new() -> Self {
        Self { origin: Instant::now() }
    }

    /// Nanoseconds since the origin; saturates after about 584 years.
    pub(super) fn nanos(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_tokio_clock_to_the_nanosecond() {
        let clock = TokioClock::new();
        assert_eq!(clock.nanos(), 0);
        tokio::time::advance(Duration::from_nanos(1_500_000_007)).await;
        assert_eq!(clock.nanos(), 1_500_000_007);
    }
}
