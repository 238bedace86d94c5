//! The requests bucket of one key: governor's GCRA, with a clock and a state we
//! control.
//!
//! Governor decides (`check`, one cell per request) and reports what remains
//! (`StateInformationMiddleware`) and how long to wait (`NotUntil`). Two things are
//! ours so that the local limiter can stay all-or-nothing and fill the headers:
//!
//! - the clock ([`DecisionClock`]): governor reads the instant the limiter read from
//!   tokio's clock for this decision, so requests and tokens are judged at the same
//!   instant, and governor's start (its TAT's zero) is known exactly;
//! - the state ([`Tat`]), the GCRA's theoretical arrival time, which we can restore
//!   (to give a request back when another limit refuses the same request) and read
//!   (the bucket is full once the clock reaches it: the reset time, which governor
//!   does not expose).
//!
//! Every call happens under the key's lock, held by the caller.

use std::{
    cell::Cell,
    num::{NonZeroU32, NonZeroU64},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::Clock,
    middleware::StateInformationMiddleware,
    nanos::Nanos,
    state::{NotKeyed, StateStore},
};

use crate::limit::BucketState;

/// Governor's clock for one bucket: the instant of the decision being taken, in
/// nanoseconds on the limiter's clock, set before each use. A `Cell`, since the
/// bucket is only used under the key's lock.
#[derive(Debug, Default)]
struct DecisionClock(Cell<u64>);

impl Clock for DecisionClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.get())
    }
}

/// The GCRA state: the TAT in nanoseconds from governor's start, 0 when the bucket
/// has never been used (governor's own `InMemoryState` uses the same encoding).
///
/// Atomic only so that it can be shared with governor, which owns the store; all
/// reads and writes happen under the key's lock, so relaxed loads and stores suffice
/// and governor's compare-and-swap loop is not needed.
#[derive(Debug, Default, Clone)]
struct Tat(Arc<AtomicU64>);

impl StateStore for Tat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let previous = NonZeroU64::new(self.0.load(Relaxed)).map(|tat| Nanos::from(tat.get()));
        let (outcome, next) = f(previous)?;
        self.0.store(next.as_u64(), Relaxed);
        Ok(outcome)
    }
}

type Gcra = RateLimiter<NotKeyed, Tat, DecisionClock, StateInformationMiddleware>;

/// A GCRA requests bucket of `capacity` refilling at `per_minute` requests a minute.
#[derive(Debug)]
pub(super) struct RequestBucket {
    gcra: Gcra,
    tat: Tat,
    /// The instant `gcra` was built at; its TAT counts from there.
    start: u64,
    per_minute: u64,
}

/// One request taken from a bucket; [`RequestBucket::undo`] gives it back.
#[derive(Debug)]
pub(super) struct Taken {
    previous: u64,
    now: u64,
    /// The bucket after taking.
    pub(super) state: BucketState,
}

/// The bucket refused a request.
#[derive(Debug)]
pub(super) struct Refused {
    /// Until a request would be admitted.
    pub(super) wait: Duration,
    pub(super) state: BucketState,
}

// === impl RequestBucket ===

impl RequestBucket {
    /// A full bucket; `now` is the limiter's clock.
    pub(super) fn new(per_minute: NonZeroU32, capacity: NonZeroU32, now: u64) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(capacity);
        let tat = Tat::default();
        let gcra = Gcra::new(quota, tat.clone(), DecisionClock(Cell::new(now)));
        Self { gcra, tat, start: now, per_minute: u64::from(per_minute.get()) }
    }

    /// Takes one request if the bucket holds one at `now`.
    pub(super) fn take(&self, now: u64) -> Result<Taken, Refused> {
        let previous = self.tat.0.load(Relaxed);
        self.gcra.clock().0.set(now);
        match self.gcra.check() {
            Ok(snapshot) => {
                let state = self.state(now, u64::from(snapshot.remaining_burst_capacity()));
                Ok(Taken { previous, now, state })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(Nanos::from(now));
                Err(Refused { wait, state: self.state(now, 0) })
            }
        }
    }

    /// Gives back a request taken at the same `now` under the same lock, and returns
    /// the bucket as it was before.
    pub(super) fn undo(&self, taken: Taken) -> BucketState {
        self.tat.0.store(taken.previous, Relaxed);
        self.state(taken.now, taken.state.remaining + 1)
    }

    /// The bucket at `now`, without taking anything.
    pub(super) fn peek(&self, now: u64) -> BucketState {
        match self.take(now) {
            Ok(taken) => self.undo(taken),
            Err(refused) => refused.state,
        }
    }

    /// Reset is the time until the TAT, when the GCRA is full again.
    fn state(&self, now: u64, remaining: u64) -> BucketState {
        let reset = match self.tat.0.load(Relaxed) {
            0 => 0,
            tat => self.start.saturating_add(tat).saturating_sub(now),
        };
        BucketState { limit: self.per_minute, remaining, reset: Duration::from_nanos(reset) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_minute: u32, capacity: u32) -> RequestBucket {
        let nonzero = |n| NonZeroU32::new(n).unwrap();
        RequestBucket::new(nonzero(per_minute), nonzero(capacity), 5)
    }

    #[test]
    fn takes_until_empty_then_reports_the_wait() {
        let (bucket, now) = (bucket(60, 3), 5);
        assert_eq!(bucket.peek(now), BucketState { limit: 60, remaining: 3, reset: Duration::ZERO });
        let remaining: Vec<_> = (0..3).map(|_| bucket.take(now).unwrap().state.remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = bucket.take(now).unwrap_err();
        assert_eq!(refused.wait, Duration::from_secs(1));
        assert_eq!(refused.state, BucketState { limit: 60, remaining: 0, reset: Duration::from_secs(3) });
    }

    #[test]
    fn undo_restores_the_bucket_exactly() {
        let (bucket, now) = (bucket(60, 3), 5);
        let first = bucket.take(now).unwrap();
        assert_eq!(first.state.reset, Duration::from_secs(1));
        let second = bucket.take(now).unwrap();
        assert_eq!(bucket.undo(second), first.state);
        assert_eq!(bucket.peek(now), first.state);
        assert_eq!(bucket.take(now).unwrap().state.remaining, 1);
    }
}
