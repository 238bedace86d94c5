//! One client connection, served until it ends, the gateway drains, it sends no request
//! head within `server.header_read_timeout` of its accept, or it has had no request in
//! flight for `server.idle_timeout`.
//!
//! A request is in flight from the moment its head is read until its response body
//! is finished or dropped, so a long stream keeps its connection however quiet it is,
//! and an idle HTTP/2 connection (which hyper never times out by itself) is closed
//! with a GOAWAY. HTTP/1.1 keep-alive connections are also bounded by hyper's
//! `header_read_timeout`, which runs while they wait for their next request (hyper only
//! starts it once the first byte is in, so the first head's timer is kept here, from
//! accept, for h2c too). Closing when idle is hyper's graceful shutdown: requests in
//! flight finish first. A connection with no request yet is simply dropped.
//!
//! HTTP/1.1 reads pass through the [`framing`](super::framing) tracker; a request it
//! found with both `content-length` and `transfer-encoding` is marked for ingress to
//! refuse. A 408 (the request body stopped arriving) closes an HTTP/1.1 connection.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{OwnedSemaphorePermit, watch},
    time::Instant,
};
use tower::ServiceExt;

use super::{Live, framing};
use crate::{
    pipeline::{GatewayResponse, forward::UpgradeHold, ingress::ConflictingLength},
    upstream::forwarded::ClientAddr,
};

/// How long a connection may go without a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    /// Its accept + `header_read_timeout`: the first request head must be in by then.
    pub first_head: Instant,
    pub idle_timeout: Duration,
}

/// Serves `io` until the client closes it, `stop` turns true (then drains it), it sends
/// no request head by `deadlines.first_head`, or it idles for `idle_timeout`. `slot`
/// (its place under `max_connections`) is held until then, and by any protocol upgrade
/// spliced from it until that ends.
pub(super) async fn serve<I>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    slot: OwnedSemaphorePermit,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    deadlines: Deadlines,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (requests, mut changes) = watch::channel(Requests::default());
    let requests = Arc::new(requests);
    let (io, framing) = framing::Watched::new(io);
    let slot = UpgradeHold(Arc::new(slot));
    let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        let (guard, number) = InFlight::begin(requests.clone());
        request.extensions_mut().insert(ClientAddr(peer));
        if request.headers().contains_key(header::UPGRADE) {
            request.extensions_mut().insert(slot.clone());
        }
        if framing.conflicting_length(number) {
            request.extensions_mut().insert(ConflictingLength);
        }
        let http1 = request.version() < Version::HTTP_2;
        let stack = live.stack();
        async move {
            let mut response: GatewayResponse = stack.oneshot(request).await?;
            if http1 && response.status() == StatusCode::REQUEST_TIMEOUT {
                // The gateway's 408 left the rest of the body unread, so nothing after it
                // can be; and any 408 means the server gave up on the connection (RFC 9110).
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response.map(|body| Held { body, _guard: guard }))
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let first_head = tokio::time::sleep_until(deadlines.first_head);
    tokio::pin!(first_head);
    let mut closing = false;
    loop {
        let Requests { in_flight, started } = *changes.borrow_and_update();
        let idle = in_flight == 0;
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, %peer, "connection ended with an error");
                }
                return;
            }
            () = &mut first_head, if started == 0 => {
                tracing::debug!(%peer, "closing a connection that sent no request head within header_read_timeout");
                return;
            }
            _ = stop.wait_for(|stop: &bool| *stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(deadlines.idle_timeout), if idle && !closing => {
                tracing::debug!(%peer, "closing a connection idle for idle_timeout");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            Ok(()) = changes.changed() => {}
        }
    }
}

/// A connection's requests so far.
#[derive(Debug, Clone, Copy, Default)]
struct Requests {
    in_flight: usize,
    started: usize,
}

/// Counts one request of a connection as in flight until dropped.
struct InFlight(Arc<watch::Sender<Requests>>);

impl InFlight {
    /// Starts request number `n` (from 0) of the connection: returns its guard and `n`.
    fn begin(requests: Arc<watch::Sender<Requests>>) -> (Self, usize) {
        let mut number = 0;
        requests.send_modify(|requests| {
            number = requests.started;
            requests.started += 1;
            requests.in_flight += 1;
        });
        (Self(requests), number)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|requests| requests.in_flight = requests.in_flight.saturating_sub(1));
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until it is finished or dropped.
    struct Held<B> {
        #[pin]
        body: B,
        _guard: InFlight,
    }
}

impl<B: Body> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
