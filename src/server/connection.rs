//! One client connection, served until it ends, the gateway drains, or it has had no
//! request in flight for `server.idle_timeout`.
//!
//! A request is in flight from the moment its head is read until its response body
//! is finished or dropped, so a long stream keeps its connection however quiet it is,
//! and an idle HTTP/2 connection (which hyper never times out by itself) is closed
//! with a GOAWAY. HTTP/1.1 keep-alive connections are also bounded by hyper's
//! `header_read_timeout`, which runs while they wait for their next request. Closing
//! for either reason is hyper's graceful shutdown: requests in flight finish first.
//!
//! A 408 (the request body stopped arriving) closes an HTTP/1.1 connection.

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
};
use tower::ServiceExt;

use super::Live;
use crate::pipeline::{GatewayResponse, forward::UpgradeHold};

/// Serves `io` until the client closes it, `stop` turns true (then drains it), or it
/// idles for `idle_timeout`. `slot` (its place under `max_connections`) is held until
/// then, and by any protocol upgrade spliced from it until that ends.
pub(super) async fn serve<I>(
    builder: auto::Builder<TokioExecutor>,
    io: I,
    slot: OwnedSemaphorePermit,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    idle_timeout: Duration,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (in_flight, mut changes) = watch::channel(0_usize);
    let in_flight = Arc::new(in_flight);
    let slot = UpgradeHold(Arc::new(slot));
    let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        let guard = InFlight::begin(in_flight.clone());
        if request.headers().contains_key(header::UPGRADE) {
            request.extensions_mut().insert(slot.clone());
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
    let mut closing = false;
    loop {
        let idle = *changes.borrow_and_update() == 0;
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, %peer, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stop: &bool| *stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep(idle_timeout), if idle && !closing => {
                tracing::debug!(%peer, "closing a connection idle for idle_timeout");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            Ok(()) = changes.changed() => {}
        }
    }
}

/// Counts one request of a connection as in flight until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn begin(count: Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|count| *count += 1);
        Self(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count = count.saturating_sub(1));
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
