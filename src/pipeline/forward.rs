//! Forward: one attempt at one upstream, for the retry stage.
//!
//! It builds the upstream request (URL under the upstream's base, hop-by-hop headers
//! dropped, `Authorization` replaced by the upstream's `api_key` where one is set, the
//! caller's gateway key never forwarded in `keys` mode), sends it on the upstream's
//! pooled client within the per-attempt timeout, and relays the response as it
//! arrives: the body is never buffered, and it stops at the request deadline. A failed
//! send becomes a 502 that says what went wrong (refused, DNS, TLS, closed before the
//! head, not HTTP), or the caller's own error when its streamed body was the cause.
//! Protocol upgrades (WebSocket) are spliced both ways. Dropping the response body (the
//! client went away) closes the upstream exchange with it.
//!
//! Which upstream to try and whether to try again is the retry stage's business.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, header, header::HeaderName};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{GatewayResponse, ProxyRequest, RequestBody};
use crate::{
    error::{BoxError, GatewayError, UpstreamFailure},
    upstream::{Upstream, UpstreamBody, headers},
};

const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// How one attempt ended.
pub enum Attempt {
    /// The upstream answered (any status); its body is being relayed.
    Response(GatewayResponse),
    /// No answer. `retryable`: a connect error, a reset before the response head, or
    /// the per-attempt timeout; not the request deadline, nor a body that cannot be
    /// sent again.
    Failed { retryable: bool, error: GatewayError },
}

/// One attempt at `upstream`: send, wait for the head within the per-attempt timeout
/// (and the request deadline), relay. A protocol upgrade is spliced on the attempt
/// that gets the 101.
pub async fn attempt(request: &mut ProxyRequest, upstream: &Upstream) -> Attempt {
    let mut outgoing = match upstream_request(upstream, request) {
        Ok(outgoing) => outgoing,
        Err(error) => return Attempt::Failed { retryable: false, error },
    };
    let held_up_by_client = Arc::new(AtomicBool::new(false));
    if matches!(request.body, RequestBody::Streaming(_)) {
        let waiting = held_up_by_client.clone();
        outgoing = outgoing.map(|body| Upload { body, held_up_by_client: waiting }.boxed_unsync());
    }
    let attempt_deadline = (Instant::now() + upstream.timeout).min(request.deadline);
    let client = match headers::is_upgrade(outgoing.headers()) {
        true => &upstream.clients.http1,
        false => &upstream.clients.any,
    };
    let sent = tokio::time::timeout_at(attempt_deadline, client.request(outgoing)).await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            let error = transport_error(upstream, error);
            let retryable = matches!(error, GatewayError::UpstreamFailed { .. });
            return Attempt::Failed { retryable, error };
        }
        Err(_) if attempt_deadline == request.deadline => {
            let error = match held_up_by_client.load(Ordering::Relaxed) {
                true => GatewayError::BodyPastDeadline,
                false => GatewayError::DeadlineReached,
            };
            return Attempt::Failed { retryable: false, error };
        }
        Err(_) => {
            let error =
                GatewayError::UpstreamTimeout { upstream: upstream.name.clone(), after: upstream.timeout };
            return Attempt::Failed { retryable: true, error };
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = request.head.extensions.remove::<OnUpgrade>()
    {
        let hold = request.head.extensions.get::<UpgradeHold>().cloned();
        splice_upgrade(client_side, hyper::upgrade::on(&mut response), hold);
    }
    Attempt::Response(relay(response, request.deadline))
}

/// The request as the upstream gets it. Takes a streamed body out of `request`.
fn upstream_request(
    upstream: &Upstream,
    request: &mut ProxyRequest,
) -> Result<Request<UpstreamBody>, GatewayError> {
    let head = &request.head;
    let path =
        head.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = upstream.url_for(&path).map_err(|error| GatewayError::Internal(error.into()))?;

    let mut headers = head.headers.clone();
    let upgrade = headers::is_upgrade(&headers);
    headers::strip_hop_by_hop(&mut headers, upgrade);
    headers.remove(header::HOST);
    // The client's `100-continue` was answered when its body was read (or is answered
    // as it streams); the upstream gets the body without waiting.
    headers.remove(header::EXPECT);
    if let Some(authorization) = &upstream.authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
        headers.remove("api-key");
    } else if !request.caller.forwards_own_key {
        headers.remove(header::AUTHORIZATION);
        headers.remove("api-key");
    }

    let body = match &mut request.body {
        RequestBody::Buffered(bytes) => {
            // The body may have been rewritten (stream usage): its length is what
            // hyper declares, not what the client did.
            headers.remove(header::CONTENT_LENGTH);
            // JSON answers must stay readable: usage is read from them, usage chunks
            // stripped, and cached ones replayed to clients of any encoding.
            headers.remove(header::ACCEPT_ENCODING);
            Full::new(bytes.clone()).map_err(|never| match never {}).boxed_unsync()
        }
        RequestBody::Streaming(body) => body
            .take()
            .ok_or_else(|| GatewayError::Internal("a streamed request body cannot be sent twice".into()))?,
    };
    let mut outgoing = Request::new(body);
    *outgoing.method_mut() = head.method.clone();
    *outgoing.uri_mut() = uri;
    *outgoing.version_mut() = Version::HTTP_11;
    *outgoing.headers_mut() = headers;
    Ok(outgoing)
}

/// A failed send as the caller sees it: an error of the caller's body (over the limit,
/// stalled: ingress put it in the body) is the caller's, anything else the upstream's
/// 502, saying what went wrong as far as the error chain tells.
fn transport_error(upstream: &Upstream, error: hyper_util::client::legacy::Error) -> GatewayError {
    let mut failure = None;
    let mut details: Vec<String> = Vec::new();
    // The chain's head is hyper-util's "client error (Connect)": `failure` says more.
    let mut cause = std::error::Error::source(&error);
    while let Some(error) = cause {
        if let Some(client) = error.downcast_ref::<GatewayError>().and_then(client_body_error) {
            return client;
        }
        failure = failure.or_else(|| failure_of(error));
        let detail = error.to_string();
        if details.last() != Some(&detail) {
            details.push(detail);
        }
        // An `io::Error`'s own `source` skips the error it wraps (a TLS error, say).
        cause = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    let failure = failure.unwrap_or(match error.is_connect() {
        true => UpstreamFailure::Connect,
        false => UpstreamFailure::Other,
    });
    GatewayError::UpstreamFailed { upstream: upstream.name.clone(), failure, detail: details.join(": ") }
}

/// What one error of a failed send's chain says happened, if it says.
fn failure_of(error: &(dyn std::error::Error + 'static)) -> Option<UpstreamFailure> {
    if error.is::<rustls::Error>() {
        return Some(UpstreamFailure::Tls);
    }
    if let Some(io) = error.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Some(UpstreamFailure::Refused),
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof => Some(UpstreamFailure::Closed),
            _ => None,
        };
    }
    if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
        if hyper.is_parse() || hyper.is_parse_status() || hyper.is_parse_too_large() {
            return Some(UpstreamFailure::InvalidResponse);
        }
        if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
            return Some(UpstreamFailure::Closed);
        }
    }
    // hyper-util does not export its connect error type; this is its message.
    (error.to_string() == "dns error").then_some(UpstreamFailure::Dns)
}

/// The caller's own error, when its body failed the send.
fn client_body_error(error: &GatewayError) -> Option<GatewayError> {
    match error {
        GatewayError::RequestTooLarge { limit } => Some(GatewayError::RequestTooLarge { limit: *limit }),
        GatewayError::BodyStalled { after } => Some(GatewayError::BodyStalled { after: *after }),
        GatewayError::BodyPastDeadline => Some(GatewayError::BodyPastDeadline),
        _ => None,
    }
}

/// The upstream's response on its way to the client: hop-by-hop headers dropped, its
/// request id renamed, its body relayed frame by frame until the deadline.
fn relay(response: Response<Incoming>, deadline: Instant) -> GatewayResponse {
    let (mut head, body) = response.into_parts();
    let upgrade = head.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut head.headers, upgrade);
    if let Some(id) = head.headers.remove("x-request-id") {
        head.headers.insert(X_UPSTREAM_REQUEST_ID, id);
    }
    let body = UntilDeadline { body, deadline: tokio::time::sleep_until(deadline) };
    Response::from_parts(head, body.boxed_unsync())
}

/// What must live as long as a spliced upgrade: the listener puts its connection's
/// slot in an upgrade request's extensions, so the tunnel counts against
/// `max_connections` and a drain waits for it (within `shutdown_grace`), though hyper
/// is done with the connection once it switched protocols.
#[derive(Clone)]
pub struct UpgradeHold(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

/// Copies bytes both ways between the client and the upstream once both sides have
/// switched protocols. Ends when either side closes; `hold` is kept until then.
fn splice_upgrade(client_side: OnUpgrade, upstream_side: OnUpgrade, hold: Option<UpgradeHold>) {
    tokio::spawn(async move {
        let _hold = hold;
        let (client_io, upstream_io) = match tokio::try_join!(client_side, upstream_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "protocol upgrade failed");
                return;
            }
        };
        let mut client_io = TokioIo::new(client_io);
        let mut upstream_io = TokioIo::new(upstream_io);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    });
}

pin_project! {
    /// A relayed body that fails once the request deadline passes, so a stream can
    /// never outlive `server.request_timeout`.
    struct UntilDeadline {
        #[pin]
        body: Incoming,
        #[pin]
        deadline: Sleep,
    }
}

impl Body for UntilDeadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from))),
            Poll::Pending if this.deadline.poll(cx).is_ready() => {
                Poll::Ready(Some(Err("request deadline reached while streaming the response".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A streamed request body on its way upstream that tells whether the client is what
    /// holds it up (nothing new from it, or its body failed): at the request deadline
    /// that makes the answer the caller's 408, not the upstream's 504.
    struct Upload {
        #[pin]
        body: UpstreamBody,
        held_up_by_client: Arc<AtomicBool>,
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        let flowing = matches!(polled, Poll::Ready(Some(Ok(_)) | None));
        this.held_up_by_client.store(!flowing, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
