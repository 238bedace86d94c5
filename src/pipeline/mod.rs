//! The request path, as a stack of named stages. This file is the only place their
//! order is decided.
//!
//! ```text
//! S0 observe   request id, server-timing, access-log line          observe.rs
//! S1 ingress   read body (limit) → parse → authenticate → route    ingress.rs
//!              ⇒ ProxyRequest; gateway errors → OpenAI JSON        respond.rs
//! S2 admit     concurrency slot + request + token estimate, or 429  admit.rs
//!              (the response body settles the estimate at its end)  metered.rs
//! S3 cache     lookup → coalesce identical misses → capture, store  cache.rs
//! S4 retry     attempts within the deadline, full-jitter backoff,    retry.rs
//!              retry-after, failover; each attempt is one
//!              forward: header hygiene, credentials, send,          forward.rs
//!              per-attempt timeout, relay the response as it arrives
//! ```
//!
//! Stages above `ingress` see raw hyper requests and never fail (`Infallible`);
//! stages below it take a typed [`ProxyRequest`] and fail with [`GatewayError`], which
//! `ingress` turns into a response through `respond` (the single rescue point). Data
//! passes down as fields of `ProxyRequest`; what stages learn on the way back (upstream,
//! attempts, errors) rides in response extensions for `observe` to log.

use std::{
    convert::Infallible,
    future::Future,
    sync::Arc,
    task::{Context, Waker},
};

use bytes::Bytes;
use http::Response;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{ServiceBuilder, util::BoxCloneSyncService};

use crate::{
    auth::Caller,
    error::{BoxError, GatewayError},
    openai::CallSummary,
    runtime::Runtime,
    upstream::{Upstream, UpstreamBody},
};

pub mod admit;
pub mod cache;
pub mod forward;
pub mod ingress;
pub mod metered;
pub mod observe;
pub mod respond;
pub mod retry;
pub mod tap;

/// Response bodies on the way back to the client: relayed, replayed or made here.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
pub type GatewayResponse = Response<ResponseBody>;

/// The whole stack as one cloneable service, ready for hyper.
pub type Stack = BoxCloneSyncService<http::Request<Incoming>, GatewayResponse, Infallible>;

/// Builds the request path for one runtime (config and the state built from it).
pub fn build(runtime: Arc<Runtime>) -> Stack {
    let stack = ServiceBuilder::new()
        .layer(observe::ObserveLayer::new())
        .layer(ingress::IngressLayer::new(runtime.clone()))
        .layer(admit::AdmitLayer::new(
            runtime.limiter.clone(),
            runtime.config.limits.default_completion_tokens,
        ))
        .layer(cache::CacheLayer::new(runtime.cache.clone(), runtime.config.cache.clone()))
        .service(retry::Retry::new(runtime.config.retry.clone()));
    BoxCloneSyncService::new(stack)
}

/// A request that has passed ingress: body read (or ready to stream), caller known,
/// route chosen.
pub struct ProxyRequest {
    /// Method, URI, version, headers and extensions as the client sent them.
    pub head: http::request::Parts,
    pub body: RequestBody,
    pub caller: Caller,
    pub call: CallSummary,
    /// The gateway asked the upstream for the stream's usage chunk on the client's
    /// behalf (`stream_options.include_usage`), so it must be stripped on the way back.
    pub strip_usage: bool,
    /// The upstreams that may serve it, in preference order; never empty.
    pub upstreams: Vec<Arc<Upstream>>,
    /// `server.request_timeout` after the request arrived: retries and the streamed
    /// response body included.
    pub deadline: Instant,
}

/// The request body as it goes upstream.
pub enum RequestBody {
    /// A JSON body read whole: replayable, byte-identical on every attempt.
    Buffered(Bytes),
    /// Any other body (multipart, binary), streamed through; can be sent once.
    Streaming(Option<UpstreamBody>),
}

/// What every stage below ingress returns.
pub type ProxyFuture = std::pin::Pin<Box<dyn Future<Output = Result<GatewayResponse, GatewayError>> + Send>>;

/// A stage below ingress, in the form `tower` composes.
pub trait ProxyService:
    tower::Service<ProxyRequest, Response = GatewayResponse, Error = GatewayError, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> ProxyService for S where
    S: tower::Service<ProxyRequest, Response = GatewayResponse, Error = GatewayError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// Runs `work` now if it completes at once (the in-memory backends), or in the
/// background (a remote backend, tracked by [`crate::background`]), so it never
/// delays a response. It runs in `span`, the request's, so its log lines carry the
/// request id.
pub(crate) fn finish_soon(span: tracing::Span, work: impl Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(tracing::Instrument::instrument(work, span));
    if work.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
        crate::background::spawn(work);
    }
}
