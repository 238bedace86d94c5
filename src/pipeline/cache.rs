//! S3 cache: exact-match response caching with identical misses coalesced.
//!
//! For a request on `cache.paths` with a JSON body, the key is the caller's scope,
//! method, path and query, stream flag and the body's canonical JSON (`cache::key`).
//! A hit is replayed from the store (a stream as its recorded bytes); a miss goes on,
//! and its response is recorded as it is relayed (no added latency) and stored once
//! it completed: a 200 whose body is valid JSON, or a stream that reached
//! `data: [DONE]` and whose every event's data is a chunk the stream watch could read,
//! without an error or a `content_filter` finish. A cut, failed, refused or
//! unreadable response is never stored.
//!
//! A recording copies each frame into one growing buffer of its own (keeping the
//! relayed frames would keep hyper's whole read buffers alive), paid for from the
//! cache's [`RecordingBudget`](crate::cache::RecordingBudget), which every recording
//! in flight shares. A recording that would not fit in it, outgrows the largest
//! entry, or turns out unstorable (a stream error) is dropped at once; the response
//! still goes to its client.
//!
//! Identical misses in flight at once make one upstream call: the first is the
//! leader; the others wait until its response is complete and stored, then are
//! answered from the cache (streams too: they get the replay once the leader's stream
//! completed, not the live stream). If the leader's response is not stored, each
//! waiter goes upstream on its own as soon as that is known; nothing is cached from a
//! failure.
//!
//! Request controls: `cache-control: no-store` (bypass), `no-cache` (skip the lookup,
//! refresh the entry), `x-spillway-cache-ttl: SECONDS` (this entry's lifetime, at most
//! `cache.ttl`; 0 = do not store). Every response through this stage carries
//! `x-spillway-cache: hit|miss|bypass`, and the same [`CacheStatus`] in its extensions.

use std::{
    collections::HashMap,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame};
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
        CacheKey, CacheStore, CachedBody, CachedResponse, RequestIdentity, Reservation, ResponseCache, Scope,
        StoredHeaders, key,
    },
    config::{CacheConfig, CacheScope},
    error::{BoxError, GatewayError},
    metrics,
    openai::sse::StreamWatch,
    upstream::Billing,
};

const X_SPILLWAY_CACHE: HeaderName = HeaderName::from_static("x-spillway-cache");
const X_SPILLWAY_CACHE_TTL: HeaderName = HeaderName::from_static("x-spillway-cache-ttl");

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
    cache: Option<Arc<ResponseCache>>,
    settings: Arc<CacheConfig>,
    flights: Arc<Flights>,
}

impl CacheLayer {
    /// `cache` is `None` when `cache.enabled = false`: every response is a bypass.
    pub fn new(cache: Option<Arc<ResponseCache>>, settings: CacheConfig) -> Self {
        Self { cache, settings: Arc::new(settings), flights: Arc::default() }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            cache: self.cache.clone(),
            settings: self.settings.clone(),
            flights: self.flights.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    cache: Option<Arc<ResponseCache>>,
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
            self.cache.clone().and_then(|cache| plan(&request, &self.settings).map(|plan| (cache, plan)));
        Box::pin(async move {
            let Some((cache, plan)) = plan else {
                return Ok(mark(inner.oneshot(request).await?, CacheStatus::Bypass));
            };
            let mut flight = None;
            if plan.lookup {
                if let Some(hit) = lookup(&*cache.store, &plan).await {
                    return Ok(replay(&hit));
                }
                match flights.join_or_lead(plan.key) {
                    Joined::Lead(guard) => flight = Some(guard),
                    Joined::Wait(mut done) => {
                        // Bounded by the request deadline; then look again.
                        let _ = tokio::time::timeout_at(request.deadline, done.changed()).await;
                        if let Some(hit) = lookup(&*cache.store, &plan).await {
                            return Ok(replay(&hit));
                        }
                    }
                }
            }
            let response = inner.oneshot(request).await?;
            let response = match response.status() == StatusCode::OK && plan.ttl > Duration::ZERO {
                true => capture(response, &cache, plan, flight),
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
    // A client may shorten an entry's life, never lengthen it past `cache.ttl`.
    let ttl = match head.headers.get(X_SPILLWAY_CACHE_TTL).and_then(|value| value.to_str().ok()) {
        Some(seconds) => Duration::from_secs(seconds.trim().parse().ok()?).min(settings.ttl),
        None => settings.ttl,
    };
    let canonical = key::canonical_json(body).ok()?;
    let scope = match settings.scope {
        CacheScope::Key => Scope::Key(request.caller.bucket()),
        CacheScope::Global => Scope::Global,
    };
    let path = head.uri.path_and_query().map_or_else(|| head.uri.path(), |path| path.as_str()).into();
    let identity = RequestIdentity {
        account: account(request, &scope),
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
    })
}

/// The account a passthrough caller's own key bills, as it chose with the OpenAI
/// headers: part of a key's scope, since one key may answer for several accounts.
/// `None` when the caller's key does not go upstream (its choice is dropped there) or
/// the scope is global.
fn account(request: &ProxyRequest, scope: &Scope) -> Option<Box<str>> {
    if !request.caller.forwards_own_key || *scope == Scope::Global {
        return None;
    }
    let header = |name| request.head.headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    let (organization, project) = (header(Billing::ORGANIZATION), header(Billing::PROJECT));
    if organization.is_none() && project.is_none() {
        return None;
    }
    let account = format!("organization={} project={}", organization.unwrap_or(""), project.unwrap_or(""));
    Some(account.into())
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
        // A stream stays a stream (no length): its events in one frame.
        CachedBody::Events(bytes) => {
            let frame = Ok::<_, BoxError>(Frame::data(bytes.clone()));
            StreamBody::new(futures_util::stream::iter([frame])).boxed_unsync()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers.to_map();
    mark(response, CacheStatus::Hit)
}

/// Wraps a cacheable response's body so that it is recorded as it goes and stored
/// once complete. A body announced larger than an entry may be, or than the
/// recording budget has room for, is not recorded at all.
fn capture(
    response: GatewayResponse,
    cache: &ResponseCache,
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
    // A body of known length gets a buffer of exactly that size at once; a stream's
    // buffer grows as it arrives.
    let announced = response.body().size_hint().exact().map(usize::try_from);
    let capacity = match announced {
        Some(Ok(len)) if len <= cache.max_entry => len,
        Some(_) => return response,
        None => 0,
    };
    let mut reservation = Reservation::new(&cache.recordings);
    if !reservation.grow_to(capacity) {
        return response;
    }
    let pending = Pending {
        store: cache.store.clone(),
        plan,
        status: response.status(),
        headers: StoredHeaders::copy_from(headers),
        span: tracing::Span::current(),
        _flight: flight,
    };
    let recording = Recording {
        body: Vec::with_capacity(capacity),
        reservation,
        max_len: cache.max_entry,
        watch: stream.then(|| Box::new(StreamWatch::outcome_only())),
        pending,
    };
    response.map(|body| Tapped::new(body, Capture(Some(recording))).boxed_unsync())
}

/// Records a response for the cache as it passes to the client; `None` once it is
/// known not to be stored.
struct Capture(Option<Recording>);

impl Tap for Capture {
    fn data(&mut self, data: &Bytes) {
        if let Some(recording) = &mut self.0
            && !recording.record(data)
        {
            // Dropping it gives its memory back and lets the waiters go now.
            self.0 = None;
        }
    }

    /// A failed or abandoned body is never stored.
    fn end(self, how: End) {
        if let (Some(recording), End::Complete) = (self.0, how) {
            recording.complete();
        }
    }
}

/// One response being recorded.
struct Recording {
    /// The body so far, copied out of the relayed frames.
    body: Vec<u8>,
    /// What `body`'s buffer takes from the cache's recording budget: its capacity.
    reservation: Reservation,
    /// The longest body an entry may have.
    max_len: usize,
    /// For streams: how the stream goes.
    watch: Option<Box<StreamWatch>>,
    pending: Pending,
}

impl Recording {
    /// Copies `data` in. `false` when the response can no longer be stored: longer
    /// than an entry may be, no room left in the budget, or a stream that failed.
    fn record(&mut self, data: &Bytes) -> bool {
        let len = self.body.len() + data.len();
        if len > self.max_len {
            return false;
        }
        if let Some(watch) = self.watch.as_mut() {
            watch.relay(data.clone());
            if spoiled(watch) {
                return false;
            }
        }
        if len > self.body.capacity() {
            // Double the buffer, as a `Vec` would; when the budget has no room for
            // that, grow by just this frame.
            let doubled = len.max(self.body.capacity() * 2).min(self.max_len);
            if !self.reservation.grow_to(doubled) && !self.reservation.grow_to(len) {
                return false;
            }
            self.body.reserve_exact(self.reservation.bytes() - self.body.len());
        }
        self.body.extend_from_slice(data);
        true
    }

    /// The body came to its end: stores it if it is what it claims to be.
    fn complete(self) {
        let Recording { body, reservation, watch, pending, .. } = self;
        let body = match watch {
            Some(mut watch) => {
                // An event left without its blank line (`data: [DONE]`, typically).
                let _ = watch.finish();
                if !watch.done() || spoiled(&watch) {
                    return;
                }
                CachedBody::Events(compact(body))
            }
            None if crate::openai::is_json(&body) => CachedBody::Full(compact(body)),
            None => return,
        };
        pending.store(body, reservation);
    }
}

/// A stream that cannot be stored, whatever comes next.
fn spoiled(watch: &StreamWatch) -> bool {
    watch.error() || watch.content_filtered() || watch.malformed() || watch.gave_up()
}

/// `body` in a buffer of exactly its length.
fn compact(body: Vec<u8>) -> Bytes {
    match body.len() == body.capacity() {
        true => Bytes::from(body),
        false => Bytes::copy_from_slice(&body),
    }
}

/// What is needed to store a recorded response, and the flight to land once stored.
struct Pending {
    store: Arc<dyn CacheStore>,
    plan: Plan,
    status: StatusCode,
    headers: StoredHeaders,
    /// The request's span, for the store's log lines.
    span: tracing::Span,
    /// Dropped after the entry is stored (or known not to be): waiters then go on.
    _flight: Option<FlightGuard>,
}

impl Pending {
    /// Stores `body`; `reservation` is given back once the store holds the entry.
    fn store(self, body: CachedBody, reservation: Reservation) {
        let Pending { store, plan, status, headers, span, _flight } = self;
        let entry = CachedResponse { identity: plan.identity, status, headers, body, ttl: plan.ttl };
        // The memory store answers at once; a remote tier finishes in the background.
        super::finish_soon(span, async move {
            if let Err(error) = store.put(plan.key, Arc::new(entry)).await {
                tracing::debug!(%error, "cache store failed; response not cached");
            }
            drop(reservation);
            drop(_flight);
        });
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
