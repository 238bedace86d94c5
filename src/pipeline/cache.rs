//! S3 cache: exact-match response caching with identical misses coalesced.
//!
//! For a request on `cache.paths` with a JSON body, the key is the caller's scope,
//! method, path and query, stream flag and the body's canonical JSON (`cache::key`).
//! A hit is replayed from the store (a stream as its recorded frames); a miss goes
//! on, and its response is captured frame by frame as it is relayed (no added
//! latency) and stored once it completed: a 200, and for a stream one that reached
//! `data: [DONE]` without an error or a `content_filter` finish. A cut, failed or
//! refused response is never stored.
//!
//! Identical misses in flight at once make one upstream call: the first is the
//! leader; the others wait until its response is complete and stored, then are
//! answered from the cache (streams too: they get the replay once the leader's stream
//! completed, not the live stream). If the leader's response is not stored, each
//! waiter goes upstream on its own; nothing is cached from a failure.
//!
//! Request controls: `cache-control: no-store` (bypass), `no-cache` (skip the lookup,
//! refresh the entry), `x-spillway-cache-ttl: SECONDS` (this entry's lifetime; 0 =
//! do not store). Every response through this stage carries `x-spillway-cache:
//! hit|miss|bypass`, and the same [`CacheStatus`] in its extensions.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use parking_lot::Mutex;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use super::{
    GatewayResponse, ProxyFuture, ProxyRequest, ProxyService, RequestBody, ResponseBody, respond,
    tap::{End, Tap, Tapped},
};
use crate::{
    cache::{
        CacheKey, CacheStore, CachedBody, CachedResponse, RequestIdentity, Scope, key,
        memory::DEFAULT_MAX_ENTRY_DIVISOR,
    },
    config::{CacheConfig, CacheScope},
    error::{BoxError, GatewayError},
    metrics,
    openai::sse::StreamWatch,
};

const X_SPILLWAY_CACHE: HeaderName = HeaderName::from_static("x-spillway-cache");
const X_SPILLWAY_CACHE_TTL: HeaderName = HeaderName::from_static("x-spillway-cache-ttl");
/// Response headers kept with an entry; everything else is per request or per tenant.
const STORED_HEADERS: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    HeaderName::from_static("openai-model"),
    HeaderName::from_static("openai-version"),
];

/// What the cache did for a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

#[derive(Clone)]
pub struct CacheLayer {
    store: Option<Arc<dyn CacheStore>>,
    settings: Arc<CacheConfig>,
    flights: Arc<Flights>,
}

impl CacheLayer {
    /// `store` is `None` when `cache.enabled = false`: every response is a bypass.
    pub fn new(store: Option<Arc<dyn CacheStore>>, settings: CacheConfig) -> Self {
        Self { store, settings: Arc::new(settings), flights: Arc::default() }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            store: self.store.clone(),
            settings: self.settings.clone(),
            flights: self.flights.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    store: Option<Arc<dyn CacheStore>>,
    settings: Arc<CacheConfig>,
    flights: Arc<Flights>,
}

// === impl Cache ===

impl<S: ProxyService> Service<ProxyRequest> for Cache<S> {
    type Response = GatewayResponse;
    type Error = GatewayError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ProxyRequest) -> Self::Future {
        let inner = self.inner.clone();
        let flights = self.flights.clone();
        let plan =
            self.store.clone().and_then(|store| plan(&request, &self.settings).map(|plan| (store, plan)));
        Box::pin(async move {
            let Some((store, plan)) = plan else {
                return Ok(mark(inner.oneshot(request).await?, CacheStatus::Bypass));
            };
            let mut flight = None;
            if plan.lookup {
                if let Some(hit) = lookup(&*store, &plan).await {
                    return Ok(replay(&hit));
                }
                match flights.join_or_lead(plan.key) {
                    Joined::Lead(guard) => flight = Some(guard),
                    Joined::Wait(mut done) => {
                        // Bounded by the request deadline; then look again.
                        let _ = tokio::time::timeout_at(request.deadline, done.changed()).await;
                        if let Some(hit) = lookup(&*store, &plan).await {
                            return Ok(replay(&hit));
                        }
                    }
                }
            }
            let response = inner.oneshot(request).await?;
            let response = match response.status() == StatusCode::OK && plan.ttl > Duration::ZERO {
                true => capture(response, store, plan, flight),
                false => response,
            };
            Ok(mark(response, CacheStatus::Miss))
        })
    }
}

/// A request the cache applies to.
struct Plan {
    key: CacheKey,
    identity: RequestIdentity,
    /// False for `cache-control: no-cache`: go upstream, then refresh the entry.
    lookup: bool,
    ttl: Duration,
    /// Entries larger than this are not captured.
    max_entry: usize,
}

/// Whether and how the cache applies to `request`; `None` is a bypass.
fn plan(request: &ProxyRequest, settings: &CacheConfig) -> Option<Plan> {
    let head = &request.head;
    if !settings.paths.iter().any(|path| path == head.uri.path()) {
        return None;
    }
    let RequestBody::Buffered(body) = &request.body else { return None };
    let directives = cache_control(&head.headers);
    if directives.iter().any(|directive| directive == "no-store") {
        return None;
    }
    let ttl = match head.headers.get(X_SPILLWAY_CACHE_TTL).and_then(|value| value.to_str().ok()) {
        Some(seconds) => Duration::from_secs(seconds.trim().parse().ok()?),
        None => settings.ttl,
    };
    let canonical = key::canonical_json(body).ok()?;
    let scope = match settings.scope {
        CacheScope::Key => Scope::Key(request.caller.bucket()),
        CacheScope::Global => Scope::Global,
    };
    let path = head.uri.path_and_query().map_or_else(|| head.uri.path().to_owned(), |path| path.to_string());
    let identity = RequestIdentity {
        scope,
        method: head.method.clone(),
        path,
        stream: request.call.stream,
        body_len: canonical.len(),
    };
    Some(Plan {
        key: CacheKey::new(&identity, &canonical),
        identity,
        lookup: !directives.iter().any(|directive| directive == "no-cache"),
        ttl,
        max_entry: usize::try_from(settings.max_size.as_u64() / DEFAULT_MAX_ENTRY_DIVISOR)
            .unwrap_or(usize::MAX),
    })
}

/// The request's `cache-control` directives, lower-cased.
fn cache_control(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|directive| directive.trim().to_ascii_lowercase())
        .collect()
}

/// A stored entry for `plan`, if there is one for exactly this request. A store that
/// cannot answer is a miss.
async fn lookup(store: &dyn CacheStore, plan: &Plan) -> Option<Arc<CachedResponse>> {
    match store.get(&plan.key).await {
        Ok(Some(entry)) if entry.identity == plan.identity => Some(entry),
        Ok(_) => None,
        Err(error) => {
            tracing::debug!(%error, "cache lookup failed; treated as a miss");
            None
        }
    }
}

fn mark(mut response: GatewayResponse, status: CacheStatus) -> GatewayResponse {
    metrics::cache_lookup(status.as_str());
    response.headers_mut().insert(X_SPILLWAY_CACHE, HeaderValue::from_static(status.as_str()));
    response.extensions_mut().insert(status);
    response
}

/// A hit, as the response it was.
fn replay(entry: &CachedResponse) -> GatewayResponse {
    let body: ResponseBody = match &entry.body {
        CachedBody::Full(bytes) => respond::full(bytes.clone()),
        CachedBody::Events(frames) => {
            let frames = frames.clone().into_iter().map(|frame| Ok::<_, BoxError>(Frame::data(frame)));
            StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers.clone();
    mark(response, CacheStatus::Hit)
}

/// Wraps a cacheable response's body so that it is stored once complete.
fn capture(
    response: GatewayResponse,
    store: Arc<dyn CacheStore>,
    plan: Plan,
    flight: Option<FlightGuard>,
) -> GatewayResponse {
    let headers = response.headers();
    if headers.get(header::CONTENT_ENCODING).is_some_and(|encoding| encoding != "identity") {
        return response;
    }
    let stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    let mut kept = HeaderMap::new();
    for name in STORED_HEADERS {
        if let Some(value) = headers.get(&name) {
            kept.insert(name, value.clone());
        }
    }
    let status = response.status();
    response.map(|body| {
        let pending =
            Pending { store, plan, status, headers: kept, span: tracing::Span::current(), _flight: flight };
        let watch = stream.then(|| Box::new(StreamWatch::new(false)));
        Tapped::new(body, Capture { frames: Vec::new(), len: 0, watch, pending: Some(pending) })
            .boxed_unsync()
    })
}

/// What is needed to store a captured response, and the flight to land once stored.
struct Pending {
    store: Arc<dyn CacheStore>,
    plan: Plan,
    status: StatusCode,
    headers: HeaderMap,
    /// The request's span, for the store's log lines.
    span: tracing::Span,
    /// Dropped after the entry is stored: waiters then find it.
    _flight: Option<FlightGuard>,
}

impl Pending {
    fn store(self, frames: Vec<Bytes>, stream: bool) {
        let body = match stream {
            true => CachedBody::Events(frames),
            false => CachedBody::Full(frames.concat().into()),
        };
        let Pending { store, plan, status, headers, span, _flight } = self;
        let entry = CachedResponse { identity: plan.identity, status, headers, body, ttl: plan.ttl };
        // The memory store answers at once; a remote tier finishes in the background.
        super::finish_soon(span, async move {
            if let Err(error) = store.put(plan.key, Arc::new(entry)).await {
                tracing::debug!(%error, "cache store failed; response not cached");
            }
            drop(_flight);
        });
    }
}

/// Records a response for the cache as it passes to the client, and stores it if it
/// completed cleanly.
struct Capture {
    frames: Vec<Bytes>,
    len: usize,
    /// For streams: whether it completed cleanly.
    watch: Option<Box<StreamWatch>>,
    /// `None` once the response is known not to be stored (too large); dropping it
    /// lets the waiters go.
    pending: Option<Pending>,
}

impl Tap for Capture {
    fn data(&mut self, data: &Bytes) {
        let Some(pending) = &self.pending else { return };
        self.len += data.len();
        if self.len > pending.plan.max_entry {
            self.pending = None;
            self.frames = Vec::new();
            return;
        }
        if let Some(watch) = self.watch.as_mut() {
            watch.relay(data.clone());
        }
        self.frames.push(data.clone());
    }

    /// A failed or abandoned body is never stored.
    fn end(self, how: End) {
        let Some(pending) = self.pending else { return };
        let clean = self.watch.as_ref().is_none_or(|watch| {
            watch.done() && !watch.error() && !watch.content_filtered() && !watch.gave_up()
        });
        if how == End::Complete && clean {
            pending.store(self.frames, self.watch.is_some());
        }
    }
}

/// Misses in flight, by key: the leader's guard holds the sender; waiters hold
/// receivers that wake when it is dropped.
#[derive(Default)]
struct Flights {
    in_flight: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
}

enum Joined {
    Lead(FlightGuard),
    Wait(watch::Receiver<()>),
}

impl Flights {
    fn join_or_lead(self: &Arc<Self>, key: CacheKey) -> Joined {
        let mut in_flight = self.in_flight.lock();
        if let Some(done) = in_flight.get(&key) {
            return Joined::Wait(done.clone());
        }
        let (landed, done) = watch::channel(());
        in_flight.insert(key, done);
        Joined::Lead(FlightGuard { key, flights: self.clone(), _landed: landed })
    }
}

/// Held by the leader of a miss until its response is stored or known unstorable.
struct FlightGuard {
    key: CacheKey,
    flights: Arc<Flights>,
    /// Dropping it wakes every waiter.
    _landed: watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.flights.in_flight.lock().remove(&self.key);
    }
}
