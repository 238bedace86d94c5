//! S4 retry, the leaf of the stack: attempts within the request's deadline, full-jitter
//! backoff that honours the upstream's `retry-after`, and failover across the
//! upstreams that serve the model.
//!
//! An attempt that fails to connect, is reset before the response head, times out, or
//! answers with a status in `retry.on_status` is tried again, up to
//! `retry.max_attempts` attempts in all, sleeping `random(0, min(max_delay,
//! base_delay · 2ⁿ))` before retry n (n from 0) — never less than what the upstream
//! asked for in `retry-after-ms`, `x-ms-retry-after-ms` or `retry-after` (seconds or
//! an HTTP date) when `respect_retry_after` is set. A retry goes to the next candidate
//! upstream, so another upstream serving the model is preferred over the one that
//! just failed. When the next wait would pass the request deadline, the last answer is
//! returned at once (or its error: 502 for a connect failure or reset, 504 for a
//! timeout). Nothing is retried once a response head has been handed on: from then on
//! the body streams to the client. A streamed (non-JSON) request body can be sent
//! once only. A client that goes away drops this future, and the loop with it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http::HeaderMap;
use tokio::time::Instant;
use tower::Service;

use super::{
    GatewayResponse, ProxyFuture, ProxyRequest, RequestBody,
    forward::{self, Attempt},
    observe::UpstreamOutcome,
};
use crate::{config::RetryConfig, error::GatewayError, upstream};

#[derive(Clone)]
pub struct Retry {
    policy: Arc<RetryConfig>,
    budget: Arc<Budget>,
}

impl Retry {
    pub fn new(policy: RetryConfig) -> Self {
        Self { policy: Arc::new(policy), budget: Arc::default() }
    }
}

// === impl Retry ===

impl Service<ProxyRequest> for Retry {
    type Response = GatewayResponse;
    type Error = GatewayError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ProxyRequest) -> Self::Future {
        Box::pin(attempts(request, self.policy.clone(), self.budget.clone()))
    }
}

async fn attempts(
    mut request: ProxyRequest,
    policy: Arc<RetryConfig>,
    budget: Arc<Budget>,
) -> Result<GatewayResponse, GatewayError> {
    let started = Instant::now();
    let _in_flight = budget.enter();
    let mut _retrying = None;
    let max_attempts = match request.body {
        RequestBody::Buffered(_) => policy.max_attempts.get(),
        RequestBody::Streaming(_) => 1,
    };
    let candidates = std::mem::take(&mut request.upstreams);
    let mut failed: Option<String> = None;
    let mut attempt = 0u32;
    loop {
        let upstream = upstream::choose(&candidates, failed.as_deref(), fastrand::f64()).clone();
        attempt += 1;
        let result = forward::attempt(&mut request, &upstream).await;
        let (retryable, asked, outcome) = match &result {
            Attempt::Response(response) if policy.on_status.contains(&response.status()) => {
                (true, retry_after(response.headers()), "retryable_status")
            }
            Attempt::Response(_) => (false, None, "response"),
            Attempt::Failed { retryable, error } => (*retryable, None, error.code()),
        };
        crate::metrics::attempt(&upstream.name, outcome);
        match &result {
            Attempt::Response(response) if !response.status().is_server_error() && !retryable => {
                upstream.health.success();
            }
            Attempt::Failed { retryable: false, .. } => {}
            _ => upstream.health.failure(asked),
        }
        let asked = asked.filter(|_| policy.respect_retry_after);
        let wait = backoff(&policy, attempt - 1, asked, fastrand::f64());
        let give_up = !retryable
            || attempt >= max_attempts
            || wait >= request.deadline.saturating_duration_since(Instant::now())
            || (_retrying.is_none() && {
                _retrying = budget.try_retry(&policy);
                _retrying.is_none()
            });
        if give_up {
            tracing::debug!(upstream = %upstream.name, attempt, outcome, "final attempt");
            return match result {
                Attempt::Response(mut response) => {
                    let wait = started.elapsed();
                    let upstream = upstream.name.clone();
                    response.extensions_mut().insert(UpstreamOutcome { upstream, attempts: attempt, wait });
                    Ok(response)
                }
                Attempt::Failed { error, .. } => Err(error),
            };
        }
        tracing::debug!(upstream = %upstream.name, attempt, outcome, wait_ms = wait.as_millis() as u64, "retrying");
        failed = Some(upstream.name.clone());
        drop(result);
        tokio::time::sleep(wait).await;
    }
}

/// Envoy's retry budget: requests in a retry may be at most `budget_percent` of the
/// requests in flight, with `min_retries` always allowed, so that an outage cannot
/// multiply the load on an upstream.
#[derive(Debug, Default)]
struct Budget {
    in_flight: AtomicU64,
    retrying: AtomicU64,
}

impl Budget {
    fn enter(self: &Arc<Self>) -> Counted {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Counted { budget: self.clone(), retry: false }
    }

    /// A retry slot, held until the request ends; `None` when the budget is spent.
    fn try_retry(self: &Arc<Self>, policy: &RetryConfig) -> Option<Counted> {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let allowed =
            (in_flight * u64::from(policy.budget_percent) / 100).max(u64::from(policy.min_retries.get()));
        let retrying = self.retrying.fetch_add(1, Ordering::Relaxed);
        if retrying >= allowed {
            self.retrying.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(retrying, allowed, "retry budget spent; answering with the last attempt");
            return None;
        }
        Some(Counted { budget: self.clone(), retry: true })
    }
}

/// One request (or one retrying request) counted in the budget until dropped.
struct Counted {
    budget: Arc<Budget>,
    retry: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let counter = if self.retry { &self.budget.retrying } else { &self.budget.in_flight };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The wait before retry `n` (0 for the first retry): full jitter over
/// `min(max_delay, base_delay · 2ⁿ)`, scaled by `unit` in [0, 1), and never less than
/// what the upstream `asked` for.
pub fn backoff(policy: &RetryConfig, n: u32, asked: Option<Duration>, unit: f64) -> Duration {
    let ceiling = policy.base_delay.saturating_mul(2u32.saturating_pow(n.min(31))).min(policy.max_delay);
    let jitter = ceiling.mul_f64(unit.clamp(0.0, 1.0));
    asked.map_or(jitter, |asked| jitter.max(asked))
}

/// The longest wait an upstream's `retry-after` is read as: longer than any request
/// deadline (`request_timeout` is at most 7 days), so a longer ask still ends the
/// retries at once.
pub const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(365 * 24 * 3600);

/// What the upstream asked to wait: `retry-after-ms`, Azure's `x-ms-retry-after-ms`,
/// or `retry-after` in seconds or as an HTTP date; at most [`LONGEST_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    let number = |value: &str| value.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0);
    if let Some(ms) =
        text("retry-after-ms").and_then(number).or_else(|| text("x-ms-retry-after-ms").and_then(number))
    {
        return Some(seconds(ms / 1000.0));
    }
    let value = text("retry-after")?;
    if let Some(asked) = number(value) {
        return Some(seconds(asked));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(SystemTime::now()).unwrap_or_default().min(LONGEST_RETRY_AFTER))
}

/// A finite, non-negative number of seconds as a wait, at most [`LONGEST_RETRY_AFTER`]
/// (`1e300` would not fit a `Duration` at all).
fn seconds(asked: f64) -> Duration {
    Duration::try_from_secs_f64(asked).map_or(LONGEST_RETRY_AFTER, |asked| asked.min(LONGEST_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: NonZeroU32::MIN,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            on_status: vec![],
            respect_retry_after: true,
            budget_percent: 20,
            min_retries: NonZeroU32::MIN,
        }
    }

    proptest! {
        #[test]
        fn full_jitter_stays_within_its_ceiling(n in 0u32..64, unit in 0.0f64..1.0) {
            let policy = policy();
            let wait = backoff(&policy, n, None, unit);
            let ceiling = policy.base_delay.saturating_mul(2u32.saturating_pow(n.min(31))).min(policy.max_delay);
            prop_assert!(wait <= ceiling);
            prop_assert!(wait <= policy.max_delay);
        }

        #[test]
        fn never_shorter_than_the_upstream_asked(n in 0u32..64, unit in 0.0f64..1.0, asked in 0u64..100_000) {
            let asked = Duration::from_millis(asked);
            prop_assert!(backoff(&policy(), n, Some(asked), unit) >= asked);
        }
    }

    #[test]
    fn reads_every_retry_after_form() {
        let with = |name: &'static str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")));
            retry_after(&headers)
        };
        assert_eq!(with("retry-after-ms", "150"), Some(Duration::from_millis(150)));
        assert_eq!(with("x-ms-retry-after-ms", "20.5"), Some(Duration::from_micros(20_500)));
        assert_eq!(with("retry-after", "2"), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let from_date = with("retry-after", &later).unwrap_or_default();
        assert!(from_date > Duration::from_secs(27) && from_date <= Duration::from_secs(30), "{from_date:?}");
        assert_eq!(with("retry-after", "soon"), None);
        assert_eq!(with("retry-after-ms", "-5"), None);
    }

    #[test]
    fn asks_too_long_for_a_duration_saturate() {
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            retry_after(&headers)
        };
        for (name, value) in [
            ("retry-after", "1e300"),
            ("retry-after", "18446744073709551616"),
            ("retry-after", "31536001"),
            ("retry-after-ms", "1e300"),
            ("x-ms-retry-after-ms", "1.7976931348623157e308"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(with(name, value), Some(LONGEST_RETRY_AFTER), "{name}: {value}");
        }
        assert_eq!(with("retry-after", "1e-300"), Some(Duration::ZERO));
        assert_eq!(with("retry-after", "inf"), None);
    }

    #[test]
    fn the_longest_delays_config_allows_and_the_longest_ask_do_not_overflow() {
        let day = Duration::from_secs(86_400);
        let policy = RetryConfig { base_delay: day, max_delay: day, ..policy() };
        for n in [0, 1, 31, 32, u32::MAX] {
            assert_eq!(backoff(&policy, n, None, 1.0), day);
            assert_eq!(backoff(&policy, n, Some(LONGEST_RETRY_AFTER), 0.5), LONGEST_RETRY_AFTER);
        }
    }
}
