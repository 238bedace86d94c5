//! S1 ingress: turns a raw hyper request into a [`ProxyRequest`], or into a gateway
//! error response.
//!
//! The steps are plain functions run in order: check the request's shape (method,
//! framing, `host`), put the path in its normal form (or refuse a spelling an upstream
//! could read differently), say who the client is in the forwarding headers,
//! authenticate, read the body (whole for JSON, up to `max_request_body`; streamed
//! otherwise; either way within the request deadline and `body_read_timeout`), parse
//! the fields the gateway needs, authorize the model, and choose candidate upstreams.
//! Every later stage can rely on what this one established. Errors from here and from
//! every stage below are turned into responses by `respond`, here, so the stack above
//! is infallible.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service, ServiceExt};

use super::{GatewayResponse, ProxyRequest, ProxyService, RequestBody, observe::Exchange, respond};
use crate::{
    auth,
    error::{BoxError, GatewayError},
    openai::{CallSummary, ModelEndpoint},
    runtime::Runtime,
    upstream::{
        UpstreamBody,
        forwarded::{self, ClientAddr},
        path,
    },
};

#[derive(Clone)]
pub struct IngressLayer {
    runtime: Arc<Runtime>,
}

impl IngressLayer {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Self { runtime }
    }
}

impl<S> Layer<S> for IngressLayer {
    type Service = Ingress<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Ingress { runtime: self.runtime.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Ingress<S> {
    runtime: Arc<Runtime>,
    inner: S,
}

// === impl Ingress ===

impl<S: ProxyService> Service<Request<Incoming>> for Ingress<S> {
    type Response = GatewayResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<GatewayResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner stages are cloned per request and made ready in `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let runtime = self.runtime.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut exchange = Exchange::default();
            let result = match proxy_request(&runtime, request, &mut exchange).await {
                Ok(request) => inner.oneshot(request).await,
                Err(error) => Err(error),
            };
            let mut response = result.unwrap_or_else(|error| respond::error_response(&error));
            response.extensions_mut().insert(exchange);
            Ok(response)
        })
    }
}

/// Runs the ingress steps, recording the caller and model in `exchange` as soon as
/// they are known so that even a refused request is logged with them.
async fn proxy_request(
    runtime: &Runtime,
    request: Request<Incoming>,
    exchange: &mut Exchange,
) -> Result<ProxyRequest, GatewayError> {
    check_shape(&request)?;
    let deadline = Instant::now() + runtime.config.server.request_timeout;
    let (mut head, body) = request.into_parts();
    head.uri = normal_uri(&head.uri)?;
    let path = head.uri.path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return Err(GatewayError::UnknownPath(path.to_owned()));
    }
    let endpoint = match head.method {
        http::Method::POST => ModelEndpoint::of(path),
        _ => None,
    };
    let peer = head.extensions.get::<ClientAddr>().map(|ClientAddr(peer)| peer.ip());
    forwarded::rewrite(&mut head.headers, peer, runtime.config.server.trusted_proxy_hops);
    let caller = auth::authenticate(&head.headers, runtime.config.auth, &runtime.keys)?;
    exchange.key = Some(caller.id.clone());

    let limit = runtime.config.server.max_request_body;
    if declared_length(&head.headers).is_some_and(|length| length > limit.0) {
        return Err(GatewayError::RequestTooLarge { limit });
    }
    let body = ClientBody::new(body, runtime.config.server.body_read_timeout, deadline);
    let mut strip_usage = false;
    let (body, call) = if is_json(&head, endpoint) {
        let mut bytes = read_whole(body, limit).await?;
        // SDKs send a JSON content type on GET and DELETE too, with no body.
        let call = match bytes.is_empty() && head.method != http::Method::POST {
            true => CallSummary::default(),
            false => CallSummary::parse(&bytes).map_err(GatewayError::InvalidJson)?,
        };
        // Token accounting needs a stream's usage: ask for it on the client's behalf,
        // and have it stripped again on the way back.
        if endpoint.is_some_and(ModelEndpoint::streams_usage)
            && let Some(with_usage) = call.with_include_usage(&bytes)
        {
            bytes = with_usage;
            strip_usage = true;
        }
        (RequestBody::Buffered(bytes), call)
    } else {
        (RequestBody::Streaming(Some(stream_through(body, limit))), CallSummary::default())
    };
    exchange.model = call.model.clone();
    // A model call without a model would skip the allowlist and the estimate, and the
    // upstream might still pick one: refused, as OpenAI does.
    if endpoint.is_some() && call.model.as_deref().is_none_or(str::is_empty) {
        return Err(GatewayError::MissingModel);
    }

    if let Some(model) = &call.model
        && !caller.may_use(model)
    {
        return Err(GatewayError::ModelNotAllowed { key: caller.id.clone(), model: model.clone() });
    }
    let upstreams = runtime.upstreams.candidates(call.model.as_deref());
    if upstreams.is_empty() {
        return Err(GatewayError::ModelNotFound(call.model.unwrap_or_default()));
    }
    Ok(ProxyRequest { head, body, caller, call, strip_usage, upstreams, deadline })
}

/// Whether the body is JSON to read whole: a JSON content type anywhere, and any body
/// to a model endpoint whatever its content type (none of them takes another, and an
/// upstream may parse it as JSON all the same: a key's model list cannot be sidestepped
/// with another content type, and `curl -d` works). Other bodies (multipart uploads,
/// binary) stream through.
fn is_json(head: &http::request::Parts, endpoint: Option<ModelEndpoint>) -> bool {
    let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
    let essence =
        content_type.unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    endpoint.is_some() || essence == "application/json" || essence.ends_with("+json")
}

/// The request's URI with its path in the one normal form that every later decision
/// and the upstream act on ([`path::normalize`]); the query is kept as sent.
fn normal_uri(uri: &http::Uri) -> Result<http::Uri, GatewayError> {
    let refused = |reason| GatewayError::InvalidPath { path: uri.path().to_owned(), reason };
    let path = path::normalize(uri.path()).map_err(refused)?;
    if path == uri.path() {
        return Ok(uri.clone());
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        http::uri::PathAndQuery::try_from(path_and_query)
            .map_err(|_| refused(path::PathError::Unprintable))?,
    );
    http::Uri::from_parts(parts).map_err(|_| refused(path::PathError::Unprintable))
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// What a request must look like before anything else reads it: not both
/// `content-length` and `transfer-encoding`, one `host` header at most and on HTTP/1.1
/// exactly one (400, as nginx answers); no `CONNECT` or `TRACE` (405): the gateway
/// relays API calls, not tunnels, and never echoes a request with the caller's
/// credentials in it.
fn check_shape<B>(request: &Request<B>) -> Result<(), GatewayError> {
    if request.extensions().get::<ConflictingLength>().is_some() {
        return Err(GatewayError::MalformedRequest("both content-length and transfer-encoding are set"));
    }
    match request.headers().get_all(header::HOST).iter().count() {
        0 if request.version() == http::Version::HTTP_11 => {
            return Err(GatewayError::MalformedRequest("an HTTP/1.1 request needs a host header"));
        }
        0 | 1 => {}
        _ => return Err(GatewayError::MalformedRequest("more than one host header")),
    }
    if [http::Method::CONNECT, http::Method::TRACE].contains(request.method()) {
        return Err(GatewayError::MethodNotAllowed(request.method().clone()));
    }
    Ok(())
}

/// Set on a request by the listener when its HTTP/1.1 head had both `content-length`
/// and `transfer-encoding`: hyper reads such a body as chunked and drops
/// `content-length`, so only the raw bytes show it.
#[derive(Debug, Clone, Copy)]
pub struct ConflictingLength;

/// Reads a body whole, refusing it as soon as it passes `limit` (the rest is never
/// read into memory) or stops arriving in time.
async fn read_whole(body: ClientBody, limit: crate::config::ByteSize) -> Result<Bytes, GatewayError> {
    match Limited::new(body, limit.as_usize()).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(GatewayError::RequestTooLarge { limit }),
        Err(error) => match error.downcast::<GatewayError>() {
            Ok(gateway) => Err(*gateway),
            Err(error) => Err(GatewayError::ClientBody(error.to_string())),
        },
    }
}

/// A body to stream upstream as it arrives, cut off past `limit`; when it fails (too
/// large, too slow) the upstream attempt fails with the caller's error inside.
fn stream_through(body: ClientBody, limit: crate::config::ByteSize) -> UpstreamBody {
    Limited::new(body, limit.as_usize())
        .map_err(move |error| match error.is::<LengthLimitError>() {
            true => BoxError::from(GatewayError::RequestTooLarge { limit }),
            false => error,
        })
        .boxed_unsync()
}

pin_project! {
    /// The client's request body, held to the request deadline and to
    /// `server.body_read_timeout` between two pieces of it: past either it fails with
    /// a 408 error, so a body that stops arriving cannot keep its connection.
    struct ClientBody {
        #[pin]
        body: Incoming,
        gap: Duration,
        // Whether the last poll found nothing, so `stall` runs from that first wait.
        waiting: bool,
        #[pin]
        stall: Sleep,
        #[pin]
        deadline: Sleep,
    }
}

impl ClientBody {
    fn new(body: Incoming, gap: Duration, deadline: Instant) -> Self {
        let stall = tokio::time::sleep_until(deadline);
        Self { body, gap, waiting: false, stall, deadline: tokio::time::sleep_until(deadline) }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            *this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)));
        }
        if !*this.waiting {
            *this.waiting = true;
            if let Some(until) = Instant::now().checked_add(*this.gap) {
                this.stall.as_mut().reset(until);
            }
        }
        if this.deadline.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(GatewayError::BodyPastDeadline.into())));
        }
        if this.stall.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(GatewayError::BodyStalled { after: *this.gap }.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
