//! The memory that responses being recorded for the cache share.
//!
//! While a cacheable response is relayed, the cache stage copies it into a buffer of
//! its own (`pipeline::cache`). Every such buffer is paid for from one
//! [`RecordingBudget`] per cache, a fixed share of `cache.max_size` (see
//! [`super::ResponseCache`]): a recording takes a [`Reservation`] and grows it before
//! its buffer grows, and a recording whose reservation cannot grow is dropped at once.
//! What a recording holds and when it is stored belong to the cache stage.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Bytes reserved by recordings in flight, against a fixed limit.
#[derive(Debug)]
pub struct RecordingBudget {
    limit: usize,
    reserved: AtomicUsize,
}

/// Bytes taken from a [`RecordingBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<RecordingBudget>,
    bytes: usize,
}

// === impl RecordingBudget ===

impl RecordingBudget {
    pub fn new(limit: usize) -> Self {
        Self { limit, reserved: AtomicUsize::new(0) }
    }

    /// The most that recordings may hold at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// What recordings in flight hold now.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }
}

// === impl Reservation ===

impl Reservation {
    /// A reservation of nothing yet from `budget`.
    pub fn new(budget: &Arc<RecordingBudget>) -> Self {
        Self { budget: Arc::clone(budget), bytes: 0 }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows the reservation to `bytes` in all, if the budget has room: `false` (and
    /// nothing changed) if not. Never shrinks it.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|more| *more > 0) else { return true };
        let limit = self.budget.limit;
        let taken = self.budget.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
            reserved.checked_add(more).filter(|total| *total <= limit)
        });
        if taken.is_ok() {
            self.bytes = bytes;
        }
        taken.is_ok()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_limit_and_give_back_on_drop() {
        let budget = Arc::new(RecordingBudget::new(1000));
        let mut first = Reservation::new(&budget);
        let mut second = Reservation::new(&budget);
        assert!(first.grow_to(600));
        assert!(!second.grow_to(500), "over the limit");
        assert_eq!((second.bytes(), budget.reserved()), (0, 600), "a refusal takes nothing");
        assert!(second.grow_to(400), "up to the limit exactly");
        assert!(!first.grow_to(601));
        assert!(first.grow_to(300), "never shrinks");
        assert_eq!((first.bytes(), budget.reserved()), (600, 1000));

        drop(first);
        assert_eq!(budget.reserved(), 400);
        assert!(second.grow_to(1000));
        drop(second);
        assert_eq!(budget.reserved(), 0);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let budget = Arc::new(RecordingBudget::new(10_000));
        std::thread::scope(|threads| {
            for _ in 0..4 {
                threads.spawn(|| {
                    for round in 0..1000 {
                        let mut reservation = Reservation::new(&budget);
                        for step in 1..=10 {
                            if !reservation.grow_to(step * (round % 7 + 1) * 100) {
                                break;
                            }
                            assert!(budget.reserved() <= budget.limit());
                        }
                    }
                });
            }
        });
        assert_eq!(budget.reserved(), 0);
    }
}
