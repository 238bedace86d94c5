//! Forward: one attempt at one upstream, for the retry stage.
//!
//! It builds the upstream request (URL under the upstream's base, hop-by-hop headers
//! dropped, `Authorization` replaced by the upstream's `api_key` where one is set, the
//! caller's gateway key never forwarded in `keys` mode, and next to the operator's key
//! the caller never picks the billed organization or project), sends it on the upstream's
//! pooled client within the per-attempt timeout, and relays the response as it
//! arrives: the body is never buffered, and it stops at the request deadline; in an
//! error response the upstream's own `api_key` is masked. A failed send becomes a 502
//! that says what went wrong (refused, DNS, TLS, closed before the head, not HTTP), or
//! the caller's own error when its streamed body was the cause. Protocol upgrades
//! (WebSocket) are spliced both ways. Dropping the response body (the client went away)
//! closes the upstream exchange with it.
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

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode, header, header::HeaderName};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::{GatewayResponse, ProxyRequest, RequestBody};
use crate::{
    error::{BoxError, GatewayError, UpstreamFailure},
    upstream::{
        Upstream, UpstreamBody,
        connect::ConnectError,
        headers,
        pool::{Outgoing, Payload, Relay, SendError, Tunnel},
    },
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
    if let Payload::Stream(body) = outgoing.body {
        let waiting = held_up_by_client.clone();
        outgoing.body = Payload::Stream(Upload { body, held_up_by_client: waiting }.boxed_unsync());
    }
    let attempt_deadline = (Instant::now() + upstream.timeout).min(request.deadline);
    let sent = tokio::time::timeout_at(attempt_deadline, upstream.pool.send(outgoing)).await;
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
    if let Some(tunnel) = response.body_mut().take_tunnel()
        && let Some(client_side) = request.head.extensions.remove::<OnUpgrade>()
    {
        let hold = request.head.extensions.get::<UpgradeHold>().cloned();
        splice_upgrade(client_side, tunnel, hold);
    }
    Attempt::Response(relay(response, request.deadline, upstream))
}

/// The request as the upstream gets it. Takes a streamed body out of `request`.
fn upstream_request(upstream: &Upstream, request: &mut ProxyRequest) -> Result<Outgoing, GatewayError> {
    let head = &request.head;
    let path =
        head.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let target = upstream.target_for(&path);

    let mut headers = head.headers.clone();
    let upgrade = headers::is_upgrade(&headers);
    headers::strip_hop_by_hop(&mut headers, upgrade);
    headers::strip_method_overrides(&mut headers);
    headers.insert(header::HOST, upstream.host.clone());
    // The body's length is declared as it goes: the body may have been rewritten
    // (stream usage), and framing is the connection's business.
    headers.remove(header::CONTENT_LENGTH);
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
    let callers_own_key = upstream.authorization.is_none() && request.caller.forwards_own_key;
    upstream.billing.apply(&mut headers, callers_own_key);

    let body =
        match &mut request.body {
            RequestBody::Buffered(bytes) => {
                // JSON answers must stay readable: usage is read from them, usage chunks
                // stripped, and cached ones replayed to clients of any encoding.
                headers.remove(header::ACCEPT_ENCODING);
                Payload::Full(bytes.clone())
            }
            RequestBody::Streaming(body) => Payload::Stream(body.take().ok_or_else(|| {
                GatewayError::Internal("a streamed request body cannot be sent twice".into())
            })?),
        };
    Ok(Outgoing { method: head.method.clone(), target, headers, body })
}

/// A failed send as the caller sees it: an error of the caller's body (over the limit,
/// stalled: ingress put it in the body) is the caller's, anything else the upstream's
/// 502, saying what went wrong as far as the error chain tells.
fn transport_error(upstream: &Upstream, error: SendError) -> GatewayError {
    let (mut failure, root): (_, &(dyn std::error::Error + 'static)) = match &error {
        SendError::Connect(ConnectError::Dns(error)) => (Some(UpstreamFailure::Dns), error),
        SendError::Connect(ConnectError::Tls(error)) => (Some(UpstreamFailure::Tls), error),
        SendError::Connect(error @ ConnectError::Timeout(_)) => (Some(UpstreamFailure::Connect), error),
        SendError::Connect(ConnectError::Io(error)) => match error.kind() {
            std::io::ErrorKind::ConnectionRefused => (Some(UpstreamFailure::Refused), error),
            _ => (Some(UpstreamFailure::Connect), error),
        },
        SendError::Closed => (Some(UpstreamFailure::Closed), &error),
        SendError::Invalid(invalid) => (Some(UpstreamFailure::InvalidResponse), invalid),
        SendError::Io(error) => (None, error),
        SendError::Body(body) => {
            if let Some(client) = body.downcast_ref::<GatewayError>().and_then(client_body_error) {
                return client;
            }
            (None, &**body)
        }
    };
    let mut details: Vec<String> = Vec::new();
    let mut cause = Some(root);
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
    let failure = failure.unwrap_or(UpstreamFailure::Other);
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
    None
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
/// request id renamed, its body relayed frame by frame until the deadline, and in an
/// error (status >= 400) the upstream's `api_key` masked, should it echo the credential
/// it got.
fn relay(response: Response<Relay>, deadline: Instant, upstream: &Upstream) -> GatewayResponse {
    let (mut head, body) = response.into_parts();
    let upgrade = head.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut head.headers, upgrade);
    if let Some(id) = head.headers.remove("x-request-id") {
        head.headers.insert(X_UPSTREAM_REQUEST_ID, id);
    }
    let body = UntilDeadline { body, deadline: tokio::time::sleep_until(deadline) };
    let failed = head.status.is_client_error() || head.status.is_server_error();
    match failed.then(|| provider_key(upstream)).flatten() {
        Some(key) => {
            // The mask is not as long as the key.
            head.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(head, MaskKey::new(body, key).boxed_unsync())
        }
        None => Response::from_parts(head, body.boxed_unsync()),
    }
}

/// The key the gateway sends `upstream` in place of the caller's (its `api_key`), if
/// it has one: the credential an upstream could echo that the caller must not see.
fn provider_key(upstream: &Upstream) -> Option<Bytes> {
    let key = upstream.authorization.as_ref()?.as_bytes().strip_prefix(b"Bearer ")?;
    (!key.is_empty()).then(|| Bytes::copy_from_slice(key))
}

/// What must live as long as a spliced upgrade: the listener puts its connection's
/// slot in an upgrade request's extensions, so the tunnel counts against
/// `max_connections` and a drain waits for it (within `shutdown_grace`), though hyper
/// is done with the connection once it switched protocols.
#[derive(Clone)]
pub struct UpgradeHold(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

/// Copies bytes both ways between the client and the upstream once both sides have
/// switched protocols. Ends when either side closes; `hold` is kept until then.
fn splice_upgrade(client_side: OnUpgrade, mut upstream_io: Tunnel, hold: Option<UpgradeHold>) {
    tokio::spawn(async move {
        let _hold = hold;
        let client_io = match client_side.await {
            Ok(client_io) => client_io,
            Err(error) => {
                tracing::debug!(%error, "protocol upgrade failed");
                return;
            }
        };
        let mut client_io = TokioIo::new(client_io);
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
        body: Relay,
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
            Poll::Ready(frame) => Poll::Ready(frame),
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

/// What an upstream's key is replaced by in a relayed error body.
const KEY_MASK: &[u8] = b"[redacted]";

pin_project! {
    /// An upstream's error body with every occurrence of its provider key masked, also
    /// one split across frames: the last `key.len() - 1` bytes of what came in are held
    /// back until the next frame shows whether they start the key. Nothing else is
    /// buffered.
    struct MaskKey<B> {
        #[pin]
        body: B,
        key: Bytes,
        held: BytesMut,
        // Trailers that came in while bytes were held back: sent after them.
        trailers: Option<http::HeaderMap>,
        ended: bool,
    }
}

impl<B> MaskKey<B> {
    fn new(body: B, key: Bytes) -> Self {
        Self { body, key, held: BytesMut::new(), trailers: None, ended: false }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for MaskKey<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        loop {
            if *this.ended {
                return Poll::Ready(None);
            }
            let frame = match std::task::ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    *this.ended = true;
                    match this.held.is_empty() {
                        true => return Poll::Ready(None),
                        false => return Poll::Ready(Some(Ok(Frame::data(this.held.split().freeze())))),
                    }
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    this.held.extend_from_slice(&data);
                    let ready = mask(this.held, this.key);
                    if !ready.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(ready))));
                    }
                }
                Err(frame) if this.held.is_empty() => return Poll::Ready(Some(Ok(frame))),
                Err(frame) => {
                    *this.trailers = frame.into_trailers().ok();
                    return Poll::Ready(Some(Ok(Frame::data(this.held.split().freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.held.is_empty() && self.trailers.is_none() && self.body.is_end_stream())
    }
}

/// Masks every whole `key` in `held` and takes out what may be sent: all but the last
/// `key.len() - 1` bytes, which could be the start of a key the next frame ends.
fn mask(held: &mut BytesMut, key: &[u8]) -> Bytes {
    let keep = |len: usize| len.min(key.len().saturating_sub(1));
    let Some(first) = memchr::memmem::find(held, key) else {
        return held.split_to(held.len() - keep(held.len())).freeze();
    };
    let mut ready = BytesMut::with_capacity(held.len());
    let mut rest = &held[..];
    let mut next = Some(first);
    while let Some(at) = next {
        ready.extend_from_slice(&rest[..at]);
        ready.extend_from_slice(KEY_MASK);
        rest = &rest[at + key.len()..];
        next = memchr::memmem::find(rest, key);
    }
    let sent = rest.len() - keep(rest.len());
    ready.extend_from_slice(&rest[..sent]);
    let tail = held.len() - (rest.len() - sent);
    *held = held.split_off(tail);
    ready.freeze()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What `MaskKey` sends for a body that comes in as `frames`.
    fn masked(frames: &[&[u8]], key: &[u8]) -> Vec<u8> {
        let mut held = BytesMut::new();
        let mut sent = Vec::new();
        for frame in frames {
            held.extend_from_slice(frame);
            sent.extend_from_slice(&mask(&mut held, key));
        }
        sent.extend_from_slice(&held);
        sent
    }

    proptest! {
        #[test]
        fn masks_every_key_wherever_the_frames_split(
            texts in proptest::collection::vec("[a-z \"]{0,12}", 1..6),
            cuts in proptest::collection::vec(0usize..100, 0..6),
        ) {
            let key = "sk-proj-abc123";
            let body = texts.join(key);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut.min(body.len())).collect();
            cuts.sort_unstable();
            let frames: Vec<&[u8]> = [0].iter().chain(&cuts).zip(cuts.iter().chain([&body.len()]))
                .map(|(start, end)| &body.as_bytes()[*start..*end])
                .collect();
            let expected = texts.join(std::str::from_utf8(KEY_MASK).unwrap_or_default());
            prop_assert_eq!(masked(&frames, key.as_bytes()), expected.into_bytes());
        }
    }

    #[test]
    fn holds_back_only_what_could_start_the_key() {
        let mut held = BytesMut::from(&b"hello sk-pr"[..]);
        assert_eq!(&mask(&mut held, b"sk-proj"[..].as_ref())[..], b"hello");
        assert_eq!(&held[..], b" sk-pr");
    }
}
