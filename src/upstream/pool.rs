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
                    return Ok(response.map(|body| Relay {
                        body,
                        connection: Some(connection),
                        pool,
                        failed: None,
                    }));
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
        Ok(response.map(|body| Relay { body, connection: None, pool: Weak::new(), failed: None }))
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
/// A failure is returned one poll late. The listener drops a client connection whose
/// response body fails without writing out what it holds, and with the connection
/// driven here a failure (an upstream reset) often comes in the same poll as the last
/// bytes before it: waiting a poll lets the head and those bytes reach the client,
/// which then sees the body fail, as the upstream's own client would.
pub struct Relay {
    body: Incoming,
    /// `None` once given back, or for an upgrade's (its task drives it).
    connection: Option<Connection>,
    pool: Weak<Pool>,
    /// A failure, returned by the next poll.
    failed: Option<hyper::Error>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("connection", &self.connection).finish_non_exhaustive()
    }
}

impl Relay {
    fn give_back(&mut self) {
        let Some(mut connection) = self.connection.take() else { return };
        // Let it finish the exchange it just ended, so it is ready for the next.
        connection.drive(&mut Context::from_waker(Waker::noop()));
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(connection);
        }
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
            return Poll::Ready(Some(Err(error)));
        }
        // The body first (it tells the connection it wants more), then the
        // connection, then the body again with what the connection brought.
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending()
            && let Some(connection) = this.connection.as_mut()
        {
            connection.drive(cx);
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            Poll::Ready(Some(Err(error))) => {
                this.connection = None;
                this.failed = Some(error);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
