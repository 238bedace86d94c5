//! S2 admit: a caller's limits, enforced before anything else is spent on the request.
//!
//! Order: one call to the limiter takes a concurrency slot, one request and the token
//! estimate, all or nothing (see `limit::Limiter`). A refusal becomes a 429 with
//! `retry-after`, `retry-after-ms` and OpenAI's `x-ratelimit-*` headers, without
//! touching the upstream. An admitted request's response gets the same headers, and its
//! body is wrapped in [`Metered`], which settles the token estimate against the real
//! usage and releases the concurrency slot when the body ends, fails, or is dropped
//! (the client went away). Callers without any limit skip the limiter entirely.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service, ServiceExt};

use super::{
    GatewayResponse, ProxyFuture, ProxyRequest, ProxyService, RequestBody,
    metered::{Metered, Settlement},
    respond,
};
use crate::{
    error::GatewayError,
    limit::{BucketState, Decision, LimitKind, Limiter, RateSnapshot},
    metrics,
    openai::tokens,
};

/// Request bodies larger than this are counted on the blocking pool.
const BLOCKING_ESTIMATE: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdmitLayer {
    limiter: Arc<dyn Limiter>,
    default_completion: u64,
}

impl AdmitLayer {
    /// `default_completion` is the completion allowance of a request that sets no
    /// `max_tokens` (`[limits] default_completion_tokens`).
    pub fn new(limiter: Arc<dyn Limiter>, default_completion: u64) -> Self {
        Self { limiter, default_completion }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit { inner, limiter: self.limiter.clone(), default_completion: self.default_completion }
    }
}

#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    limiter: Arc<dyn Limiter>,
    default_completion: u64,
}

// === impl Admit ===

impl<S: ProxyService> Service<ProxyRequest> for Admit<S> {
    type Response = GatewayResponse;
    type Error = GatewayError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ProxyRequest) -> Self::Future {
        let inner = self.inner.clone();
        let limiter = self.limiter.clone();
        let default_completion = self.default_completion;
        Box::pin(async move {
            let quota = request.caller.quota;
            let strip_usage = request.strip_usage;
            if quota.is_unlimited() {
                return pass_unlimited(inner, request).await;
            }
            if quota.tokens_per_minute.is_some() {
                // Only until the vocabularies are unpacked, just after startup.
                tokens::ready().await;
            }
            let estimate = match (&request.body, &request.call.model, quota.tokens_per_minute) {
                (RequestBody::Buffered(body), Some(model), Some(_)) if body.len() > BLOCKING_ESTIMATE => {
                    // About 1 ms of BPE per 64 KiB: keep it off the I/O workers.
                    let (model, body) = (model.clone(), body.clone());
                    tokio::task::spawn_blocking(move || tokens::estimate(&model, &body, default_completion))
                        .await
                        .map_err(|error| GatewayError::Internal(error.into()))?
                }
                (RequestBody::Buffered(body), Some(model), Some(_)) => {
                    tokens::estimate(model, body, default_completion)
                }
                _ => tokens::TokenEstimate::default(),
            };
            let key = request.caller.bucket();
            let decision = match limiter.reserve(&key, &quota, estimate.total()).await {
                Ok(decision) => decision,
                Err(unavailable) => {
                    // Only a shared backend can be unavailable, and its wrapper falls
                    // back to local limits; reaching here means no limit can be
                    // enforced, so serve rather than refuse.
                    tracing::warn!(error = %unavailable, "limiter unavailable; request admitted unlimited");
                    return pass_unlimited(inner, request).await;
                }
            };
            let (snapshot, permit) = match decision {
                Decision::Admitted { snapshot, permit } => (snapshot, permit),
                Decision::Denied { limit, retry_after, snapshot } => {
                    metrics::rate_limited(&request.caller.id, limit.as_str());
                    return Err(GatewayError::RateLimited {
                        key: request.caller.id,
                        limit,
                        retry_after,
                        snapshot,
                    });
                }
                Decision::TooLarge { capacity, snapshot, .. } => {
                    metrics::rate_limited(&request.caller.id, LimitKind::Tokens.as_str());
                    let needed = estimate.total();
                    return Err(GatewayError::NeverFits {
                        key: request.caller.id,
                        needed,
                        capacity,
                        snapshot,
                    });
                }
            };
            let caller = request.caller.id.clone();
            let span = tracing::Span::current();
            let settlement = Settlement { limiter: limiter.clone(), key, quota, estimate, permit, span };
            let model = request.call.model.clone().unwrap_or_default();
            match inner.oneshot(request).await {
                Ok(mut response) => {
                    insert_ratelimit_headers(response.headers_mut(), &snapshot);
                    Ok(Metered::wrap(response, caller, model, Some(settlement), strip_usage))
                }
                Err(error) => {
                    // Nothing reached a model: give the whole estimate back. The caller was
                    // identified, so its 502/504 carries the rate-limit headers too.
                    settlement.refund();
                    let mut response = respond::error_response(&error);
                    insert_ratelimit_headers(response.headers_mut(), &snapshot);
                    Ok(response)
                }
            }
        })
    }
}

/// Serves a request no limit applies to; a model call's usage is still read.
async fn pass_unlimited<S: ProxyService>(
    inner: S,
    request: ProxyRequest,
) -> Result<GatewayResponse, GatewayError> {
    let (caller, model, strip_usage) =
        (request.caller.id.clone(), request.call.model.clone(), request.strip_usage);
    let response = inner.oneshot(request).await?;
    Ok(match model {
        Some(model) => Metered::wrap(response, caller, model, None, strip_usage),
        None => response,
    })
}

/// OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; a dimension
/// without a limit is left out.
pub fn insert_ratelimit_headers(headers: &mut HeaderMap, snapshot: &RateSnapshot) {
    let mut put = |kind: LimitKind, bucket: Option<BucketState>| {
        let Some(bucket) = bucket else { return };
        let names: [&'static str; 3] = match kind {
            LimitKind::Requests => {
                ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]
            }
            _ => ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
        };
        let reset = HeaderValue::try_from(format_reset(bucket.reset));
        let values = [Ok(HeaderValue::from(bucket.limit)), Ok(HeaderValue::from(bucket.remaining)), reset];
        for (name, value) in names.into_iter().zip(values) {
            if let Ok(value) = value {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    };
    put(LimitKind::Requests, snapshot.requests);
    put(LimitKind::Tokens, snapshot.tokens);
}

/// `retry-after` (whole seconds, rounded up, at least 1) and `retry-after-ms`.
pub fn insert_retry_after(headers: &mut HeaderMap, wait: Duration) {
    let millis = wait.as_millis().max(1);
    let seconds = millis.div_ceil(1000).max(1);
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds as u64));
    headers.insert(HeaderName::from_static("retry-after-ms"), HeaderValue::from(millis as u64));
}

/// A duration as OpenAI writes resets (Go's format, to the millisecond): `20ms`,
/// `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let (hours, rest) = (millis / 3_600_000, millis % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, fraction) = (rest / 1000, rest % 1000);
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    text.push_str(&seconds.to_string());
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push('s');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_formatted_like_openai() {
        let cases = [
            (0, "0s"),
            (20, "20ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (1250, "1.25s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (90_500, "1m30.5s"),
            (3_723_000, "1h2m3s"),
        ];
        for (millis, text) in cases {
            assert_eq!(format_reset(Duration::from_millis(millis)), text);
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let mut headers = HeaderMap::new();
        insert_retry_after(&mut headers, Duration::from_millis(1200));
        assert_eq!(
            (&headers["retry-after"], &headers["retry-after-ms"]),
            (&"2".parse().unwrap(), &"1200".parse().unwrap())
        );
        insert_retry_after(&mut headers, Duration::from_millis(3));
        assert_eq!(
            (&headers["retry-after"], &headers["retry-after-ms"]),
            (&"1".parse().unwrap(), &"3".parse().unwrap())
        );
    }
}
