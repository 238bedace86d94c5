//! Per-key limits: requests per minute, tokens per minute and in-flight requests,
//! behind one [`Limiter`] trait so a shared (Redis) backend can replace the local one
//! without touching the request path.
//!
//! Buckets follow SPEC §3 "Bucket semantics": a per-minute amount is a token bucket
//! whose capacity is the whole amount (or the smaller `burst_*`), refilling
//! continuously at amount/60 per second. Tokens are admitted on an estimate and
//! settled against the real usage later (refund or debt). This module owns the
//! decisions; the admit stage owns when they are asked for and what the caller sees.

use std::{any::Any, fmt, num::NonZeroU32, time::Duration};

use futures_util::future::BoxFuture;

use crate::{
    config::LimitSpec,
    secret::{KeyHash, KeyId},
};

/// Whose buckets: a configured key by its id, or a presented passthrough key by its
/// hash. Never a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BucketKey {
    Configured(KeyId),
    Presented(KeyHash),
}

/// Which limit refused a request; OpenAI's error `type` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits that apply to one caller: its key's own, each falling back to
/// `[limits.default]`; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Quota {
    pub requests_per_minute: Option<NonZeroU32>,
    /// Capacity of the requests bucket; `None` = the per-minute amount.
    pub burst_requests: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
    /// Capacity of the tokens bucket; `None` = the per-minute amount.
    pub burst_tokens: Option<NonZeroU32>,
    pub max_concurrent: Option<NonZeroU32>,
}

impl Quota {
    /// The key's limits over the defaults, field by field.
    pub fn resolve(key: Option<&LimitSpec>, default: &LimitSpec) -> Self {
        let key = key.copied().unwrap_or_default();
        Self {
            requests_per_minute: key.requests_per_minute.or(default.requests_per_minute),
            burst_requests: key.burst_requests.or(default.burst_requests),
            tokens_per_minute: key.tokens_per_minute.or(default.tokens_per_minute),
            burst_tokens: key.burst_tokens.or(default.burst_tokens),
            max_concurrent: key.max_concurrent.or(default.max_concurrent),
        }
    }

    /// Whether any limit applies at all (if not, the limiter is never asked).
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.max_concurrent.is_none()
    }

    /// Capacity of the requests bucket: the burst, never more than the per-minute amount.
    pub fn request_capacity(&self) -> Option<u32> {
        let rpm = self.requests_per_minute?.get();
        Some(self.burst_requests.map_or(rpm, |burst| burst.get().min(rpm)))
    }

    /// Capacity of the tokens bucket: the burst, never more than the per-minute amount.
    pub fn token_capacity(&self) -> Option<u32> {
        let tpm = self.tokens_per_minute?.get();
        Some(self.burst_tokens.map_or(tpm, |burst| burst.get().min(tpm)))
    }
}

/// One bucket's state as OpenAI's `x-ratelimit-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// The per-minute amount (`x-ratelimit-limit-*`).
    pub limit: u64,
    /// What can be taken now (`x-ratelimit-remaining-*`), never negative.
    pub remaining: u64,
    /// Until the bucket is full again (`x-ratelimit-reset-*`).
    pub reset: Duration,
}

/// The requests and tokens buckets of a caller after a decision; `None` for a
/// dimension without a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateSnapshot {
    pub requests: Option<BucketState>,
    pub tokens: Option<BucketState>,
}

/// Holds one in-flight slot of a caller's `max_concurrent`; dropping it gives the slot
/// back (the backend decides how). Empty when no concurrency limit applies.
#[derive(Default)]
pub struct Permit(Option<Box<dyn Any + Send + Sync>>);

impl Permit {
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        Self(Some(Box::new(guard)))
    }

    /// Whether a slot is held.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// The guard, if it is a `T` (the backend that made it takes it back).
    pub(crate) fn take<T: Any>(&mut self) -> Option<T> {
        match self.0.take()?.downcast::<T>() {
            Ok(guard) => Some(*guard),
            Err(other) => {
                self.0 = Some(other);
                None
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Permit(held)" } else { "Permit(none)" })
    }
}

/// What the limiter decided for one request.
#[derive(Debug)]
pub enum Decision {
    /// Taken from every bucket; the permit holds the concurrency slot.
    Admitted { snapshot: RateSnapshot, permit: Permit },
    /// Refused by `limit`; waiting `retry_after` is enough for the same request to be
    /// admitted if nothing else takes from the buckets meanwhile.
    Denied { limit: LimitKind, retry_after: Duration, snapshot: RateSnapshot },
    /// The request alone is larger than the bucket's capacity: it can never fit.
    TooLarge { limit: LimitKind, capacity: u64, snapshot: RateSnapshot },
}

/// A backend (shared limits, shared cache) could not answer, e.g. Redis is down; the
/// caller decides the fallback.
#[derive(Debug, Clone, thiserror::Error)]
#[error("backend unavailable: {0}")]
pub struct Unavailable(pub String);

/// Takes and gives back capacity from a caller's buckets. Never waits for capacity.
///
/// # Atomicity
/// `reserve` takes one request, `tokens` tokens and a concurrency slot all together,
/// or nothing at all: a refused request costs the caller nothing.
///
/// # Failure behaviour
/// Backends return `Unavailable` instead of guessing; the wrapper that owns the
/// fallback policy decides what to do about it.
pub trait Limiter: Send + Sync + 'static {
    /// Admits or refuses one request costing `tokens` (the estimate).
    fn reserve<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        tokens: u64,
    ) -> BoxFuture<'a, Result<Decision, Unavailable>>;

    /// Corrects an admitted request's tokens once its real usage is known:
    /// `delta > 0` charges more (the bucket may go into debt), `delta < 0` refunds
    /// (never above capacity). Called at most once per admitted request.
    fn settle<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), Unavailable>>;

    /// Ends an admitted request: settles `delta` as [`settle`](Self::settle) does and
    /// gives back `permit`'s slot, which happens even when this fails. A backend that
    /// can do both in one exchange overrides it.
    fn finish<'a>(
        &'a self,
        key: &'a BucketKey,
        quota: &'a Quota,
        delta: i64,
        permit: Permit,
    ) -> BoxFuture<'a, Result<(), Unavailable>> {
        drop(permit);
        match delta == 0 || quota.tokens_per_minute.is_none() {
            true => Box::pin(std::future::ready(Ok(()))),
            false => self.settle(key, quota, delta),
        }
    }
}

pub mod local;
pub mod redis;
pub mod shared;
