//! S0 observe: request ids, `server-timing`, and the one access-log line per request.
//!
//! It runs first and last. On the way in it keeps the client's `x-request-id` or makes
//! one, so every later stage and the upstream see the same id. On the way back it
//! reads what the stages recorded in the response extensions ([`Exchange`],
//! [`UpstreamOutcome`], [`Failure`]), adds `x-request-id` and `server-timing`, and
//! wraps the body so the log line is written when the body ends or the client goes
//! away: streams are logged with their real duration. Text the client chose (method,
//! path, model, and error details that quote them) is cut to `MAX_LOGGED_LEN` bytes.

use std::{
    borrow::Cow,
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, header::HeaderName};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;

use super::{
    GatewayResponse,
    cache::CacheStatus,
    metered::UsageSeen,
    respond::Failure,
    tap::{End, Tap, Tapped},
};
use crate::{metrics, secret::KeyId};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// Client-sent ids longer than this are replaced, so logs stay bounded.
const MAX_REQUEST_ID_LEN: usize = 200;
/// Longer client-chosen text is cut in the access line, so logs stay bounded.
const MAX_LOGGED_LEN: usize = 512;

/// Who asked for what, recorded by ingress.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub key: Option<KeyId>,
    pub model: Option<String>,
}

/// Which upstream answered, after how many attempts and how long a wait for the
/// response head, recorded by the stage that talked to it.
#[derive(Debug, Clone)]
pub struct UpstreamOutcome {
    pub upstream: String,
    pub attempts: u32,
    pub wait: Duration,
}

#[derive(Clone, Default)]
pub struct ObserveLayer;

impl ObserveLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

// === impl Observe ===

impl<S> Service<Request<Incoming>> for Observe<S>
where
    S: Service<Request<Incoming>, Response = GatewayResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = GatewayResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<GatewayResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let id = request_id(&request);
        request.headers_mut().insert(X_REQUEST_ID, id.clone());
        let span = tracing::info_span!("request", id = id.to_str().unwrap_or("-"));
        crate::telemetry::continue_trace(&span, request.headers());
        let line = AccessLine {
            started: Some(started),
            method: request.method().clone(),
            path: clip(request.uri().path()).into_owned(),
            ..AccessLine::default()
        };
        let in_flight = metrics::InFlight::enter();
        let response = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let Ok(mut response) = response.await;
            let line = line.response(&mut response);
            metrics::response_head(line.overhead, line.upstream.as_ref().map(|outcome| outcome.wait));
            let headers = response.headers_mut();
            headers.insert(X_REQUEST_ID, id);
            let timing = server_timing(&line, headers.get_all(SERVER_TIMING));
            headers.remove(SERVER_TIMING);
            if let Ok(timing) = HeaderValue::try_from(timing) {
                headers.insert(SERVER_TIMING, timing);
            }
            Ok(response
                .map(|body| Tapped::new(body, LogOnEnd { line, span, _in_flight: in_flight }).boxed_unsync()))
        })
    }
}

/// The client's `x-request-id` when it sent a usable one, else a new one.
fn request_id<B>(request: &Request<B>) -> HeaderValue {
    request
        .headers()
        .get(X_REQUEST_ID)
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN)
        .cloned()
        .unwrap_or_else(new_request_id)
}

/// 32 random hex digits, as OpenAI's own request ids have (without a syscall: ids need
/// to be unique, not unpredictable).
fn new_request_id() -> HeaderValue {
    let random = fastrand::u128(..);
    let mut hex = [0u8; 32];
    for (at, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(random >> (124 - 4 * at)) as usize & 15];
    }
    HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("-"))
}

/// `spillway;dur=MS, upstream;dur=MS` followed by the upstream's own entries.
fn server_timing(line: &AccessLine, upstream_entries: http::header::GetAll<'_, HeaderValue>) -> String {
    let mut timing = String::with_capacity(64);
    timing.push_str("spillway;dur=");
    push_millis(&mut timing, line.overhead);
    if let Some(outcome) = &line.upstream {
        timing.push_str(", upstream;dur=");
        push_millis(&mut timing, outcome.wait);
    }
    for entry in upstream_entries.iter().filter_map(|value| value.to_str().ok()) {
        timing.push_str(", ");
        timing.push_str(entry);
    }
    timing
}

/// Everything the access-log line says, gathered as the request goes.
#[derive(Debug, Default)]
struct AccessLine {
    started: Option<Instant>,
    method: http::Method,
    path: String,
    status: u16,
    exchange: Exchange,
    upstream: Option<UpstreamOutcome>,
    failure: Option<Failure>,
    cache: Option<CacheStatus>,
    /// The usage the response reports, once its body has ended.
    usage: Option<UsageSeen>,
    /// Time to the response head spent in the gateway itself (upstream wait excluded).
    overhead: Duration,
    body_bytes: u64,
}

impl AccessLine {
    fn response(mut self, response: &mut GatewayResponse) -> Self {
        self.status = response.status().as_u16();
        let extensions = response.extensions_mut();
        self.exchange = extensions.remove().unwrap_or_default();
        self.upstream = extensions.remove();
        self.failure = extensions.remove();
        self.cache = extensions.remove();
        self.usage = extensions.remove();
        let to_head = self.started.map(|started| started.elapsed()).unwrap_or_default();
        let waited = self.upstream.as_ref().map(|outcome| outcome.wait).unwrap_or_default();
        self.overhead = to_head.saturating_sub(waited);
        self
    }

    fn write(&self, outcome: &'static str) {
        let duration = self.started.map(|started| started.elapsed()).unwrap_or_default();
        let key = self.exchange.key.as_ref().map(KeyId::as_str).unwrap_or("-");
        let model = clip(self.exchange.model.as_deref().unwrap_or("-"));
        let upstream = self.upstream.as_ref().map(|outcome| outcome.upstream.as_str()).unwrap_or("-");
        let attempts = self.upstream.as_ref().map(|outcome| outcome.attempts).unwrap_or(0);
        let error = self.failure.as_ref().map(|failure| failure.code).unwrap_or("-");
        let detail = clip(self.failure.as_ref().map(|failure| failure.message.as_str()).unwrap_or(""));
        let usage = self.usage.as_ref().and_then(UsageSeen::get);
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: crate::telemetry::ACCESS,
                    $level,
                    method = %clip(self.method.as_str()),
                    path = %self.path,
                    status = self.status,
                    key,
                    model = %model,
                    upstream,
                    attempts,
                    cache = self.cache.map_or("-", CacheStatus::as_str),
                    prompt_tokens = usage.map(|usage| usage.prompt_tokens),
                    completion_tokens = usage.map(|usage| usage.completion_tokens),
                    error,
                    body_bytes = self.body_bytes,
                    overhead_ms = millis(self.overhead),
                    latency_ms = millis(duration),
                    outcome,
                    "{detail}"
                )
            };
        }
        match self.failure.as_ref().map(|failure| failure.level) {
            Some(tracing::Level::ERROR) => line!(tracing::Level::ERROR),
            Some(tracing::Level::WARN) => line!(tracing::Level::WARN),
            _ if outcome != "completed" => line!(tracing::Level::WARN),
            _ => line!(tracing::Level::INFO),
        }
    }
}

/// Writes the access-log line when the body ends, fails, or is dropped unfinished
/// (the client went away), inside the request's span.
struct LogOnEnd {
    line: AccessLine,
    span: tracing::Span,
    /// The request counts as in flight until its body is done.
    _in_flight: metrics::InFlight,
}

impl Tap for LogOnEnd {
    fn data(&mut self, data: &Bytes) {
        self.line.body_bytes += data.len() as u64;
    }

    fn end(self, how: End) {
        let _entered = self.span.enter();
        self.line.write(how.as_str());
        let line = &self.line;
        let upstream = line.upstream.as_ref().map_or("-", |outcome| outcome.upstream.as_str());
        let duration = line.started.map(|started| started.elapsed()).unwrap_or_default();
        let model = line.exchange.model.as_deref().unwrap_or_default();
        metrics::request(line.exchange.key.as_ref(), model, upstream, line.status, duration);
    }
}

/// A duration in milliseconds, to the microsecond, as the access line gives it.
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// Appends `duration` in milliseconds with three decimals (`12.345`).
fn push_millis(text: &mut String, duration: Duration) {
    let micros = duration.as_micros();
    let (whole, fraction) = (micros / 1000, micros % 1000);
    text.push_str(&whole.to_string());
    text.push('.');
    for divisor in [100, 10, 1] {
        text.push(char::from(b'0' + (fraction / divisor % 10) as u8));
    }
}

/// `text` as a log line carries it: at most [`MAX_LOGGED_LEN`] bytes.
fn clip(text: &str) -> Cow<'_, str> {
    crate::error::clip(text, MAX_LOGGED_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_client_text_is_cut_on_a_character_boundary() {
        assert_eq!(clip("gpt-4o"), "gpt-4o");
        let exact = "m".repeat(MAX_LOGGED_LEN);
        assert_eq!(clip(&exact), exact);
        let long = format!("{}é{}", "m".repeat(MAX_LOGGED_LEN - 1), "x".repeat(900_000));
        let cut = clip(&long);
        assert_eq!(cut, format!("{}…({} bytes)", "m".repeat(MAX_LOGGED_LEN - 1), long.len()));
    }
}
