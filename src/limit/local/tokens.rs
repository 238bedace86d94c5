//! The tokens bucket of one key: a token bucket that can give tokens back.
//!
//! Governor cannot refund, and a tokens reservation is an estimate corrected later
//! (SPEC §3 "Token accounting"), so this is our own, kept as small as it can be. It
//! holds a level that refills continuously at `tokens_per_minute / 60` per second up
//! to its capacity, may go below zero when a request used more than it reserved
//! (debt, paid back by refill), and is never raised above capacity by a refund. It
//! does not lock, read the clock or know about keys: the caller passes the time and
//! holds the key's lock.
//!
//! # Fixed point
//!
//! The level is counted in units of 1/60_000_000_000 of a token: one nanosecond then
//! refills exactly `tokens_per_minute` units, so refill is an integer multiplication
//! with no rounding and no drift however often it runs, and a wait is the exact
//! number of nanoseconds until the level reaches an amount, rounded up. An `i128`
//! holds any level: a full `u32` bucket is about 2.6e20 units, and debt from `i64`
//! settlements saturates long before the type's 1.7e38.

use std::{num::NonZeroU32, time::Duration};

use crate::limit::BucketState;

/// Units per token: nanoseconds per minute (see the module doc).
const UNITS: i128 = 60_000_000_000;

/// A refundable token bucket; time is nanoseconds on the limiter's clock.
#[derive(Debug)]
pub(super) struct TokenBucket {
    /// In tokens; also the admission ceiling of a single request.
    capacity: u64,
    /// The refill rate, in tokens per minute (= units per nanosecond).
    per_minute: u64,
    /// In units; below zero is debt.
    level: i128,
    /// When `level` was last brought up to date.
    updated: u64,
}

// === impl TokenBucket ===

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilling at `per_minute` tokens per minute.
    pub(super) fn new(capacity: u32, per_minute: NonZeroU32, now: u64) -> Self {
        let (capacity, per_minute) = (u64::from(capacity), u64::from(per_minute.get()));
        Self { capacity, per_minute, level: i128::from(capacity) * UNITS, updated: now }
    }

    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Adds what has been refilled since the last update, up to capacity.
    pub(super) fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.updated);
        self.updated = self.updated.max(now);
        let refilled = i128::from(elapsed) * i128::from(self.per_minute);
        self.level = self.level.saturating_add(refilled).min(self.full());
    }

    /// `None` if `cost` tokens can be taken now, else how long until they can.
    /// A cost of zero always can, even in debt. Expects `cost <= capacity`.
    pub(super) fn shortfall(&self, cost: u64) -> Option<Duration> {
        if cost == 0 {
            return None;
        }
        let wait = self.until(i128::from(cost) * UNITS);
        (!wait.is_zero()).then_some(wait)
    }

    /// Takes `cost` tokens; the caller has checked [`Self::shortfall`] under the same lock.
    pub(super) fn take(&mut self, cost: u64) {
        self.level = self.level.saturating_sub(i128::from(cost) * UNITS);
    }

    /// Charges `delta` more tokens (`> 0`, may go into debt) or refunds `-delta`
    /// (`< 0`, never above capacity).
    pub(super) fn settle(&mut self, delta: i64) {
        let units = i128::from(delta).saturating_mul(UNITS);
        self.level = self.level.saturating_sub(units).min(self.full());
    }

    /// As the headers report it: remaining whole tokens (zero in debt) and the time
    /// until the bucket is full.
    pub(super) fn state(&self) -> BucketState {
        let remaining = u64::try_from(self.level.max(0) / UNITS).unwrap_or(u64::MAX);
        BucketState { limit: self.per_minute, remaining, reset: self.until(self.full()) }
    }

    fn full(&self) -> i128 {
        i128::from(self.capacity) * UNITS
    }

    /// Time until the level reaches `target` units, rounded up to the nanosecond.
    fn until(&self, target: i128) -> Duration {
        let missing = target - self.level;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.per_minute);
        let nanos = (missing + rate - 1) / rate;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn bucket(capacity: u32, per_minute: u32) -> TokenBucket {
        TokenBucket::new(capacity, NonZeroU32::new(per_minute).unwrap(), 0)
    }

    #[test]
    fn starts_full_and_refills_at_a_sixtieth_of_the_amount_per_second() {
        let mut bucket = bucket(6000, 6000);
        assert_eq!(bucket.state(), BucketState { limit: 6000, remaining: 6000, reset: Duration::ZERO });
        bucket.take(6000);
        bucket.refill(SECOND);
        assert_eq!(bucket.state().remaining, 100);
        bucket.refill(10 * SECOND);
        assert_eq!(bucket.state().remaining, 1000);
        assert_eq!(bucket.state().reset, Duration::from_secs(50));
        bucket.refill(1000 * SECOND);
        assert_eq!(bucket.state().remaining, 6000, "never above capacity");
    }

    #[test]
    fn refill_is_exact_when_the_rate_does_not_divide_a_second() {
        // 7 tokens a minute: one token every 8.571428571… s.
        let mut bucket = bucket(7, 7);
        bucket.take(7);
        let wait = bucket.shortfall(1).unwrap();
        assert_eq!(wait, Duration::from_nanos(8_571_428_572), "rounded up");
        // Refilling in many small steps gives the same level as one step.
        for step in 1..=8_571 {
            bucket.refill(step * 1_000_000);
        }
        assert_eq!(bucket.shortfall(1), Some(Duration::from_nanos(428_572)));
        bucket.refill(8_571_428_572);
        assert_eq!(bucket.shortfall(1), None);
        assert_eq!(bucket.state().remaining, 1);
    }

    #[test]
    fn refunds_are_capped_and_debt_is_paid_back_by_refill() {
        let mut bucket = bucket(1000, 1000);
        bucket.take(400);
        bucket.settle(-300);
        assert_eq!(bucket.state().remaining, 900);
        bucket.settle(-5000);
        assert_eq!(bucket.state().remaining, 1000);
        bucket.take(1000);
        bucket.settle(500);
        assert_eq!(bucket.state().remaining, 0);
        // 500 owed + 100 wanted at 1000/min = 36 s.
        assert_eq!(bucket.shortfall(100), Some(Duration::from_secs(36)));
        assert_eq!(bucket.state().reset, Duration::from_secs(90));
        assert_eq!(bucket.shortfall(0), None, "a zero cost passes even in debt");
    }

    #[test]
    fn extreme_settlements_saturate_instead_of_overflowing() {
        let mut bucket = bucket(u32::MAX, u32::MAX);
        bucket.settle(i64::MAX);
        bucket.settle(i64::MAX);
        bucket.refill(u64::MAX);
        assert_eq!(bucket.state().remaining, 0);
        for _ in 0..3 {
            bucket.settle(i64::MIN);
        }
        assert_eq!(bucket.state().remaining, u64::from(u32::MAX));
    }
}
