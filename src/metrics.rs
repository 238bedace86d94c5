//! The gateway's metrics: their names in one place, the Prometheus recorder served on
//! the admin port's `/metrics`, and the per-request helpers the stages call.
//!
//! Labels are low-cardinality and never carry a key: `key` is a [`KeyId`] (a
//! configured id, or the first 8 hex digits of a passthrough key's hash), `status` a
//! status code, `limit` and `result` fixed words.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::secret::KeyId;

pub const REQUESTS: &str = "spillway_requests_total";
pub const REQUEST_DURATION: &str = "spillway_request_duration_seconds";
pub const OVERHEAD: &str = "spillway_overhead_seconds";
pub const UPSTREAM_FIRST_BYTE: &str = "spillway_upstream_time_to_first_byte_seconds";
pub const INFLIGHT: &str = "spillway_inflight_requests";
pub const RATE_LIMITED: &str = "spillway_rate_limited_total";
pub const CACHE_LOOKUPS: &str = "spillway_cache_lookups_total";
pub const TOKENS: &str = "spillway_tokens_total";
pub const BUILD_INFO: &str = "spillway_build_info";
pub const RELOADS: &str = "spillway_config_reloads_total";
pub const RUNTIME_TASKS: &str = "spillway_runtime_tasks";

/// Installs the process-wide Prometheus recorder, once. `None` if one was installed
/// already (an embedding process, or tests starting several gateways).
pub fn install() -> Option<PrometheusHandle> {
    let gateway_buckets = [0.000_05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
    let request_buckets =
        [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full(OVERHEAD.into()), &gateway_buckets)
        .and_then(|builder| builder.set_buckets(&request_buckets))
        .and_then(|builder| builder.install_recorder())
        .ok()?;
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Some(handle)
}

/// One finished request, as the access log saw it.
pub fn request(key: Option<&KeyId>, model: &str, upstream: &str, status: u16, duration: Duration) {
    let key = key.map_or_else(|| "-".to_owned(), |key| key.as_str().to_owned());
    let labels = [
        ("key", key),
        ("model", model.to_owned()),
        ("upstream", upstream.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION).record(duration.as_secs_f64());
}

/// Time to the response head spent in the gateway itself, and waiting for the upstream.
pub fn response_head(overhead: Duration, upstream_wait: Option<Duration>) {
    metrics::histogram!(OVERHEAD).record(overhead.as_secs_f64());
    if let Some(wait) = upstream_wait {
        metrics::histogram!(UPSTREAM_FIRST_BYTE).record(wait.as_secs_f64());
    }
}

/// Tasks alive in the async runtime (connections, streams, background work): read at
/// scrape time, so a leak of tasks shows as a line that keeps climbing.
pub fn runtime_tasks() {
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    metrics::gauge!(RUNTIME_TASKS).set(tasks as f64);
}

/// Counts a request in flight until dropped.
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> Self {
        metrics::gauge!(INFLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(INFLIGHT).decrement(1.0);
    }
}

pub fn rate_limited(key: &KeyId, limit: &'static str) {
    metrics::counter!(RATE_LIMITED, "key" => key.as_str().to_owned(), "limit" => limit).increment(1);
}

pub fn cache_lookup(result: &'static str) {
    metrics::counter!(CACHE_LOOKUPS, "result" => result).increment(1);
}

/// Tokens a response really used, by kind (`prompt`, `completion`).
pub fn tokens(key: &KeyId, model: &str, prompt: u64, completion: u64) {
    for (kind, count) in [("prompt", prompt), ("completion", completion)] {
        let labels =
            [("key", key.as_str().to_owned()), ("model", model.to_owned()), ("kind", kind.to_owned())];
        metrics::counter!(TOKENS, &labels).increment(count);
    }
}
