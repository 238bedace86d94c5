//! The gateway's metrics: their names in one place, the Prometheus recorder served on
//! the admin port's `/metrics`, and the per-request helpers the stages call.
//!
//! Labels are bounded and never carry a key: every series a client can make costs
//! memory for the life of the process (the exporter never forgets one), so label values
//! come from config or from capped sets, through [`key_label`] and [`model_label`]:
//!
//! - `key`: a configured key's `id`; for a passthrough key the first 8 hex digits of its
//!   hash, for the first [`MAX_PRESENTED_KEYS`] such keys an upstream served
//!   (`other` for the rest); `-` before a key is known.
//! - `model`: the requested name when it is at most [`MAX_MODEL_LEN`] bytes of
//!   `A-Z a-z 0-9 . _ - : / @ +` and among the first [`MAX_MODELS`] names an upstream
//!   served (`other` otherwise); `-` when the request names none.
//! - `upstream` is a configured name, `status` a status code, `limit`, `result`,
//!   `kind` and `outcome` fixed words.
//!
//! A value takes a place in a capped set only from a successful (2xx) response, so
//! refused keys and unknown models never fill the set ahead of the real ones.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics::SharedString;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::secret::KeyId;

pub const REQUESTS: &str = "spillway_requests_total";
pub const REQUEST_DURATION: &str = "spillway_request_duration_seconds";
pub const OVERHEAD: &str = "spillway_overhead_seconds";
pub const UPSTREAM_FIRST_BYTE: &str = "spillway_upstream_time_to_first_byte_seconds";
pub const INFLIGHT: &str = "spillway_inflight_requests";
pub const ATTEMPTS: &str = "spillway_upstream_attempts_total";
pub const RATE_LIMITED: &str = "spillway_rate_limited_total";
pub const CACHE_LOOKUPS: &str = "spillway_cache_lookups_total";
pub const TOKENS: &str = "spillway_tokens_total";
pub const BUILD_INFO: &str = "spillway_build_info";
pub const RELOADS: &str = "spillway_config_reloads_total";
pub const RUNTIME_TASKS: &str = "spillway_runtime_tasks";

/// How often histogram samples are folded into their buckets when no scrape does it.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder, once, and (inside a tokio runtime)
/// the task that folds histogram samples into their buckets every [`UPKEEP_EVERY`]:
/// the exporter keeps every sample until then, so without it a gateway nobody scrapes
/// would grow by 8 bytes per sample forever. `None` if a recorder was installed
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
    RECORDING.store(true, Ordering::Relaxed);
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let handle = handle.clone();
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_EVERY);
            loop {
                ticks.tick().await;
                handle.run_upkeep();
            }
        });
    }
    Some(handle)
}

/// Whether [`install`] put a recorder in place. The per-request helpers below return
/// at once when not: their label values would be built for nothing.
static RECORDING: AtomicBool = AtomicBool::new(false);

fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Passthrough keys labelled by their hash prefix; the others are `other`.
pub const MAX_PRESENTED_KEYS: usize = 100;
/// Model names used as labels; the others are `other`.
pub const MAX_MODELS: usize = 100;
/// The longest model name used as a label, in bytes.
pub const MAX_MODEL_LEN: usize = 128;
/// The label of values past a cap, and of model names unfit to be one.
pub const OTHER: &str = "other";
/// The label of a key or model not known (yet).
const NONE: &str = "-";

static PRESENTED_KEYS: LabelSet = LabelSet::new(MAX_PRESENTED_KEYS);
static MODELS: LabelSet = LabelSet::new(MAX_MODELS);

/// The `key` label of `key`; `served` (a 2xx response) may give a passthrough key a
/// place of its own.
pub fn key_label(key: Option<&KeyId>, served: bool) -> SharedString {
    match key {
        None => SharedString::const_str(NONE),
        Some(key) if key.is_presented() => PRESENTED_KEYS.label(key.as_str(), served),
        Some(key) => SharedString::from(key.as_str().to_owned()),
    }
}

/// The `model` label of a requested `model` (empty: none); `served` (a 2xx response)
/// may give it a place of its own.
pub fn model_label(model: &str, served: bool) -> SharedString {
    let fit = |byte: u8| byte.is_ascii_alphanumeric() || b"._-:/@+".contains(&byte);
    match model {
        "" => SharedString::const_str(NONE),
        _ if model.len() > MAX_MODEL_LEN || !model.bytes().all(fit) => SharedString::const_str(OTHER),
        _ => MODELS.label(model, served),
    }
}

/// The values that have a label of their own, at most `cap` of them, kept for the life
/// of the process (as the series they name are).
struct LabelSet {
    cap: usize,
    values: RwLock<BTreeSet<Arc<str>>>,
}

impl LabelSet {
    const fn new(cap: usize) -> Self {
        Self { cap, values: RwLock::new(BTreeSet::new()) }
    }

    /// `value` if it has a place, or was given the last free one now (only if `admit`);
    /// else `other`.
    fn label(&self, value: &str, admit: bool) -> SharedString {
        let known = self.values.read().unwrap_or_else(PoisonError::into_inner).get(value).cloned();
        if let Some(known) = known {
            return SharedString::from(known);
        }
        if !admit {
            return SharedString::const_str(OTHER);
        }
        let mut values = self.values.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = values.get(value) {
            return SharedString::from(known.clone());
        }
        if values.len() >= self.cap {
            return SharedString::const_str(OTHER);
        }
        let value: Arc<str> = value.into();
        values.insert(value.clone());
        SharedString::from(value)
    }
}

/// One finished request, as the access log saw it; `model` is empty when it named none.
pub fn request(key: Option<&KeyId>, model: &str, upstream: &str, status: u16, duration: Duration) {
    if !recording() {
        return;
    }
    let served = (200..300).contains(&status);
    let labels = [
        ("key", key_label(key, served)),
        ("model", model_label(model, served)),
        ("upstream", SharedString::from(upstream.to_owned())),
        ("status", SharedString::from(status.to_string())),
    ];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION).record(duration.as_secs_f64());
}

/// Time to the response head spent in the gateway itself, and waiting for the upstream.
pub fn response_head(overhead: Duration, upstream_wait: Option<Duration>) {
    if !recording() {
        return;
    }
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
        if recording() {
            metrics::gauge!(INFLIGHT).increment(1.0);
        }
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if recording() {
            metrics::gauge!(INFLIGHT).decrement(1.0);
        }
    }
}

/// One attempt at an upstream and how it ended.
pub fn attempt(upstream: &str, outcome: &'static str) {
    if !recording() {
        return;
    }
    metrics::counter!(ATTEMPTS, "upstream" => upstream.to_owned(), "outcome" => outcome).increment(1);
}

pub fn rate_limited(key: &KeyId, limit: &'static str) {
    if !recording() {
        return;
    }
    metrics::counter!(RATE_LIMITED, "key" => key_label(Some(key), false), "limit" => limit).increment(1);
}

pub fn cache_lookup(result: &'static str) {
    if !recording() {
        return;
    }
    metrics::counter!(CACHE_LOOKUPS, "result" => result).increment(1);
}

/// Tokens a successful response really used, by kind (`prompt`, `completion`); `model`
/// is empty when the request named none.
pub fn tokens(key: &KeyId, model: &str, prompt: u64, completion: u64) {
    if !recording() {
        return;
    }
    let (key, model) = (key_label(Some(key), true), model_label(model, true));
    for (kind, count) in [("prompt", prompt), ("completion", completion)] {
        let labels =
            [("key", key.clone()), ("model", model.clone()), ("kind", SharedString::const_str(kind))];
        metrics::counter!(TOKENS, &labels).increment(count);
    }
}
