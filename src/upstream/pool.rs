//! The connections the gateway talks to an upstream over: HTTP/1.1 keep-alive (as
//! nginx speaks to its upstreams), pooled per upstream.
//!
//! A connection is driven by the request that holds it, not by a task of its own:
//! [`Pool::send`] drives it until the response head arrives, and the response body,
//! [`Relay`], drives it while it relays, then gives it back to the pool once the body
//! is complete. An upstream's bytes therefore reach the client without a hand-off
//! between tasks, and whatever one read brought in goes out before the request waits
//! again. A body dropped before its end (the client went away) closes its connection,
//! so the upstream stops working on it.
//!
//! Idle connections are kept most recently used first, at most [`MAX_IDLE`] of them,
//! for [`IDLE_TIMEOUT`]: shorter than the 60 to 120 s provider load balancers allow, so
//! the gateway closes first and never writes to a dead socket. One that the upstream
//! closed while idle is noticed when it is taken (its reader sees the end), and a
//! request that a dead connection refused before sending a byte is sent again on a new
//! one, once: a race no caller should see as a failure. Protocol upgrades (WebSocket)
//! get a connection of their own, driven by a task until the tunnel opens.

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::connect::{ConnectError, Stream, Target};
use crate::error::BoxError;

/// Request bodies sent upstream: buffered JSON or a streamed upload.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream; more are closed when they come back.
pub const MAX_IDLE: usize = 1024;
/// How often connections idle past [`IDLE_TIMEOUT`] are closed.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// One upstream's connections.
#[derive(Debug)]
pub struct Pool {
    target: Target,
    idle: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    connections: Vec<(Connection, Instant)>,
    /// A task closes expired connections (started with the first idle one).
    reaping: bool,
}

/// Why a request could not be sent or got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Pool {
    pub fn new(target: Target) -> Arc<Self> {
        Arc::new(Self { target, idle: Mutex::default() })
    }

    /// Sends `request` (origin-form URI, `host` set) on an idle connection or a new
    /// one, driving it until the response head. The response's body drives the
    /// connection from then on.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<Relay>, SendError> {
        if super::headers::is_upgrade(request.headers()) {
            return self.send_upgrade(request).await;
        }
        loop {
            let (mut connection, reused) = match self.take_idle() {
                Some(connection) => (connection, true),
                None => (self.connect().await?, false),
            };
            let sent = connection.sender.try_send_request(request);
            tokio::pin!(sent);
            let answer = poll_fn(|cx| {
                connection.drive(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(response) => {
                    let pool = Arc::downgrade(self);
                    return Ok(response.map(|body| Relay::new(body, Some(connection), pool)));
                }
                Err(mut refused) => match refused.take_message() {
                    // An idle connection that had died: nothing was sent, try a new one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(refused.into_error())),
                },
            }
        }
    }

    /// An upgrade on a connection of its own, driven by a task until it is handed over
    /// (`hyper::upgrade::on` on the response), then the tunnel's.
    async fn send_upgrade(&self, request: Request<UpstreamBody>) -> Result<Response<Relay>, SendError> {
        let (mut sender, driver) = http1::handshake(TokioIo::new(self.target.connect().await?)).await?;
        tokio::spawn(async move {
            if let Err(error) = driver.with_upgrades().await {
                tracing::debug!(%error, "upstream connection of an upgrade ended with an error");
            }
        });
        let response = sender.send_request(request).await?;
        Ok(response.map(|body| Relay::new(body, None, Weak::new())))
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let stream = self.target.connect().await?;
        let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Connection { sender, driver, done: false })
    }

    /// The most recently used idle connection that is still open, if any.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock();
        let now = Instant::now();
        while let Some((mut connection, since)) = idle.connections.pop() {
            // Polled once, a connection the upstream closed sees its end now.
            connection.drive(&mut Context::from_waker(Waker::noop()));
            if connection.reusable() && now.duration_since(since) < IDLE_TIMEOUT {
                return Some(connection);
            }
        }
        None
    }

    /// Keeps `connection` for the next request, if it can carry one.
    fn give_back(self: &Arc<Self>, connection: Connection) {
        if !connection.reusable() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.connections.len() >= MAX_IDLE {
            return;
        }
        idle.connections.push((connection, Instant::now()));
        if !std::mem::replace(&mut idle.reaping, true) {
            reap(Arc::downgrade(self));
        }
    }
}

/// Closes connections idle for [`IDLE_TIMEOUT`], every [`REAP_EVERY`], for as long as
/// the pool lives.
fn reap(pool: Weak<Pool>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(REAP_EVERY);
        loop {
            ticks.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            pool.idle.lock().connections.retain(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT);
        }
    });
}

/// One HTTP/1.1 connection: the handle to send on and the state machine that moves
/// its bytes, which whoever holds the connection polls.
struct Connection {
    sender: http1::SendRequest<UpstreamBody>,
    driver: http1::Connection<TokioIo<Stream>, UpstreamBody>,
    /// The driver finished: the connection closed or failed.
    done: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("done", &self.done).finish_non_exhaustive()
    }
}

impl Connection {
    /// Moves bytes: writes what is queued, reads what arrived.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && self.driver.poll_without_shutdown(cx).is_ready() {
            self.done = true;
        }
    }

    fn reusable(&self) -> bool {
        !self.done && !self.sender.is_closed()
    }
}

/// A response body from an upstream, driving its connection as it is read and giving
/// it back to the pool once complete.
///
/// Frames that arrived together go on as one: everything the connection has ready
/// when the body is polled (up to [`MAX_JOINED`] bytes) is one frame, so the stages
/// above and the client's socket see one write per read, not one per chunk.
///
/// A failure is returned only after a poll that was `Pending`. The listener drops a
/// client connection whose response body fails without writing out what it holds,
/// and with the connection driven here a failure (an upstream reset) often comes in
/// the same poll as the last bytes before it: waiting a poll lets the head and those
/// bytes reach the client, which then sees the body fail, as the upstream's own
/// client would.
pub struct Relay {
    body: Incoming,
    /// `None` once given back, or for an upgrade's (its task drives it).
    connection: Option<Connection>,
    pool: Weak<Pool>,
    /// A failure to return, once a poll has been `Pending` since it came.
    failed: Option<hyper::Error>,
    waited: bool,
    /// Trailers that came after data joined into one frame, returned next.
    trailers: Option<http::HeaderMap>,
}

/// The most bytes of frames joined into one.
const MAX_JOINED: usize = 64 * 1024;

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("connection", &self.connection).finish_non_exhaustive()
    }
}

impl Relay {
    fn new(body: Incoming, connection: Option<Connection>, pool: Weak<Pool>) -> Self {
        Self { body, connection, pool, failed: None, waited: false, trailers: None }
    }

    fn give_back(&mut self) {
        let Some(mut connection) = self.connection.take() else { return };
        // Let it finish the exchange it just ended, so it is ready for the next.
        connection.drive(&mut Context::from_waker(Waker::noop()));
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(connection);
        }
    }

    /// The next frame the connection has: the body polled first (it tells the
    /// connection it wants more), then the connection driven, then the body again
    /// with what the connection brought.
    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut polled = Pin::new(&mut self.body).poll_frame(cx);
        if polled.is_pending()
            && let Some(connection) = self.connection.as_mut()
        {
            connection.drive(cx);
            polled = Pin::new(&mut self.body).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.connection = None,
            _ => {}
        }
        polled
    }

    fn fail(&mut self, error: hyper::Error) {
        self.failed = Some(error);
        self.waited = false;
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(error) = this.failed.take() {
            if std::mem::replace(&mut this.waited, true) {
                return Poll::Ready(Some(Err(error)));
            }
            this.failed = Some(error);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let first = match this.next(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => {
                this.fail(error);
                this.waited = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            other => return other,
        };
        let first = match first.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        let mut joined: Option<bytes::BytesMut> = None;
        while !this.body.is_end_stream()
            && joined.as_ref().map_or(first.len(), |joined| joined.len()) < MAX_JOINED
        {
            let more = match this.next(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(more) => more,
                    Err(trailers) => {
                        this.trailers = trailers.into_trailers().ok();
                        break;
                    }
                },
                Poll::Ready(Some(Err(error))) => {
                    this.fail(error);
                    break;
                }
                Poll::Ready(None) | Poll::Pending => break,
            };
            joined.get_or_insert_with(|| bytes::BytesMut::from(&first[..])).extend_from_slice(&more);
        }
        let data = joined.map_or(first, bytes::BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
