//! The connections the gateway talks to an upstream over: HTTP/1.1 keep-alive (as
//! nginx speaks to its upstreams), pooled per upstream.
//!
//! A connection is driven by the request that holds it, not by a task of its own:
//! [`Pool::send`] writes the request and reads the response head, and the response
//! body, [`Relay`], reads the rest as it is polled, then gives the connection back to
//! the pool once the body is complete. An upstream's bytes therefore reach the client
//! without a hand-off between tasks, and whatever one read brought in goes on as one
//! frame. A body dropped before its end (the client went away) closes its
//! connection, so the upstream stops working on it. The wire format is
//! [`super::http1`]'s.
//!
//! Idle connections are kept most recently used first, at most [`MAX_IDLE`] of them,
//! for [`IDLE_TIMEOUT`]: shorter than the 60 to 120 s provider load balancers allow, so
//! the gateway closes first. One that the upstream closed while idle is noticed when
//! it is taken (its read sees the end). A request whose reused connection ends before
//! a byte of the response came back (the upstream closed it just as it was taken) is
//! sent again, once, on a new connection, when its body can be sent again: a race no
//! caller should see as a failure, as nginx treats it. A protocol upgrade (101) hands
//! its connection over as a [`Tunnel`].

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Arc, Weak},
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use super::{
    connect::{ConnectError, Stream, Target},
    http1::{self, Decoded, Framing, Invalid},
};
use crate::error::BoxError;

/// Request bodies streamed upstream (uploads).
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream; more are closed when they come back.
pub const MAX_IDLE: usize = 1024;
/// How often connections idle past [`IDLE_TIMEOUT`] are closed.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// The most bytes of body data one frame gathers.
const MAX_JOINED: usize = 64 * 1024;
/// Bytes read at a time at first; doubled while reads fill them, up to [`MAX_READ`].
const FIRST_READ: usize = 4096;
const MAX_READ: usize = 64 * 1024;

/// A request for an upstream: its head as it goes on the wire (origin-form target,
/// `host` set, hop-by-hop headers gone) and its body.
pub struct Outgoing {
    pub method: Method,
    /// The request target: path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Payload,
}

/// A request body.
pub enum Payload {
    /// All there (JSON read whole): can be sent again.
    Full(Bytes),
    /// Streamed through (an upload): sent once, with its length when known, else
    /// chunked.
    Stream(UpstreamBody),
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("connection closed before the response head")]
    Closed,
    #[error("{0}")]
    Invalid(#[source] Invalid),
    /// The request body failed (the caller's upload: too large, too slow).
    #[error("{0}")]
    Body(#[source] BoxError),
}

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

impl Pool {
    pub fn new(target: Target) -> Arc<Self> {
        Arc::new(Self { target, idle: Mutex::default() })
    }

    /// Sends `outgoing` on an idle connection or a new one (an upgrade always on a new
    /// one) and reads the response head. The response's body reads the rest.
    pub async fn send(self: &Arc<Self>, mut outgoing: Outgoing) -> Result<Response<Relay>, SendError> {
        let upgrade = super::headers::is_upgrade(&outgoing.headers);
        let mut again = true;
        loop {
            let (mut connection, reused) = match self.take_idle().filter(|_| !upgrade) {
                Some(connection) => (connection, true),
                None => (Connection::new(self.target.connect().await?), false),
            };
            let head = match connection.exchange(&mut outgoing).await {
                Ok(head) => head,
                Err(Failed { error, answered }) => {
                    let replayable = matches!(outgoing.body, Payload::Full(_));
                    if reused && !answered && replayable && std::mem::replace(&mut again, false) {
                        continue;
                    }
                    return Err(error);
                }
            };
            let http1::Head { parts, framing, keep_alive } = head;
            let pool = Arc::downgrade(self);
            let mut relay = Relay::new(connection, framing, keep_alive && !upgrade, pool);
            if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
                relay.tunnel = relay.connection.take();
            } else if relay.framing.is_done() {
                // Nothing to read: hyper may never poll an empty body.
                relay.end();
            }
            return Ok(Response::from_parts(parts, relay));
        }
    }

    /// The most recently used idle connection that is still open, if any.
    fn take_idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock();
        let now = Instant::now();
        while let Some((mut connection, since)) = idle.connections.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && connection.still_open() {
                return Some(connection);
            }
        }
        None
    }

    /// Keeps `connection` for the next request.
    fn give_back(self: &Arc<Self>, mut connection: Connection) {
        if connection.read.capacity() > 4 * FIRST_READ {
            // A large body grew it; an idle connection keeps a small one.
            connection.read = BytesMut::new();
            connection.chunk = FIRST_READ;
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

/// An exchange that got no response head; `answered`: some of a response came back
/// (so the request was not simply refused by a connection that had closed).
struct Failed {
    error: SendError,
    answered: bool,
}

/// One connection: the stream, and the bytes read from it that are not used yet.
#[derive(Debug)]
struct Connection {
    io: Stream,
    read: BytesMut,
    /// How much to read at a time.
    chunk: usize,
}

impl Connection {
    fn new(io: Stream) -> Self {
        Self { io, read: BytesMut::new(), chunk: FIRST_READ }
    }

    /// Reads what the socket has into `read`: the bytes read (0 at its end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.chunk / 2 {
            self.read.reserve(self.chunk);
        }
        let spare = self.read.capacity() - self.read.len();
        let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))?;
        if read == spare && self.chunk < MAX_READ {
            self.chunk *= 2;
        }
        Poll::Ready(Ok(read))
    }

    /// Whether an idle connection can still carry a request: one the upstream closed
    /// (or wrote to unasked) cannot.
    fn still_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let polled = Pin::new(&mut self.io).poll_read(&mut Context::from_waker(Waker::noop()), &mut probe);
        polled.is_pending() && self.read.is_empty()
    }

    /// Writes the request and reads the response head. A streamed body is sent while
    /// the head is watched for: an upstream may answer before the body is all in
    /// (a 413, say), and then the rest is not sent.
    async fn exchange(&mut self, outgoing: &mut Outgoing) -> Result<http1::Head, Failed> {
        let head_of = outgoing.method == Method::HEAD;
        let mut sending = Sending::new(outgoing);
        let mut write_error = None;
        poll_fn(|cx| {
            if write_error.is_none() && !sending.done() {
                match sending.poll(&mut self.io, cx, outgoing) {
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                    // The client's own body failed: that is the answer.
                    Poll::Ready(Err(SendError::Body(error))) => {
                        return Poll::Ready(Err(Failed { error: SendError::Body(error), answered: true }));
                    }
                    // A write that failed may still be answered (the upstream closed
                    // after its response): read on, and report it if nothing comes.
                    Poll::Ready(Err(error)) => write_error = Some(error),
                }
            }
            loop {
                match http1::read_head(&mut self.read, head_of) {
                    Ok(Some(head)) => {
                        let keep_alive = head.keep_alive && sending.done();
                        return Poll::Ready(Ok(http1::Head { keep_alive, ..head }));
                    }
                    Ok(None) => {}
                    Err(invalid) => {
                        return Poll::Ready(Err(Failed {
                            error: SendError::Invalid(invalid),
                            answered: true,
                        }));
                    }
                }
                let answered = !self.read.is_empty();
                match ready!(self.poll_fill(cx)) {
                    Ok(0) => {
                        let error = write_error.take().filter(|_| !answered).unwrap_or(SendError::Closed);
                        return Poll::Ready(Err(Failed { error, answered }));
                    }
                    Ok(_) => {}
                    Err(error) => return Poll::Ready(Err(Failed { error: SendError::Io(error), answered })),
                }
            }
        })
        .await
    }
}

/// Where writing a request is.
struct Sending {
    /// Bytes to write before anything else (the head, a chunk's framing).
    pending: Vec<u8>,
    written: usize,
    /// The `Full` body's bytes written so far.
    body_written: usize,
    chunked: bool,
    /// The streamed body has ended (its last chunk queued).
    body_done: bool,
    flushed: bool,
}

impl Sending {
    fn new(outgoing: &Outgoing) -> Self {
        let length = match &outgoing.body {
            Payload::Full(bytes) => Some(bytes.len() as u64),
            Payload::Stream(body) => body.size_hint().exact(),
        };
        let mut pending = Vec::new();
        http1::write_head(&outgoing.method, &outgoing.target, &outgoing.headers, length, &mut pending);
        let chunked = length.is_none();
        Self { pending, written: 0, body_written: 0, chunked, body_done: false, flushed: false }
    }

    fn done(&self) -> bool {
        self.flushed
    }

    /// Writes what it can; `Ready(Ok)` once the whole request is written and flushed.
    fn poll(
        &mut self,
        io: &mut Stream,
        cx: &mut Context<'_>,
        outgoing: &mut Outgoing,
    ) -> Poll<Result<(), SendError>> {
        loop {
            if let Payload::Full(body) = &outgoing.body {
                let (head, body) = (&self.pending[self.written..], &body[self.body_written..]);
                if head.is_empty() && body.is_empty() {
                    break;
                }
                let slices = [io::IoSlice::new(head), io::IoSlice::new(body)];
                let wrote =
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices)).map_err(SendError::Io)?;
                if wrote == 0 {
                    return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into())));
                }
                let from_head = wrote.min(head.len());
                self.written += from_head;
                self.body_written += wrote - from_head;
                continue;
            }
            if self.written < self.pending.len() {
                let wrote = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending[self.written..]))
                    .map_err(SendError::Io)?;
                if wrote == 0 {
                    return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.written += wrote;
                continue;
            }
            if self.body_done {
                break;
            }
            let Payload::Stream(body) = &mut outgoing.body else { break };
            self.pending.clear();
            self.written = 0;
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    match self.chunked {
                        true if !data.is_empty() => http1::chunk(&data, &mut self.pending),
                        true => {}
                        false => self.pending.extend_from_slice(&data),
                    }
                }
                Some(Err(error)) => return Poll::Ready(Err(SendError::Body(error))),
                None => {
                    self.body_done = true;
                    if self.chunked {
                        self.pending.extend_from_slice(http1::LAST_CHUNK);
                    }
                }
            }
        }
        ready!(Pin::new(io).poll_flush(cx)).map_err(SendError::Io)?;
        self.flushed = true;
        Poll::Ready(Ok(()))
    }
}

/// A response body from an upstream, read from its connection as it is polled, the
/// connection given back to the pool once the body is complete.
///
/// Everything the connection has ready (up to 64 KiB) goes on as one frame, so the
/// stages above and the client's socket see one write per read, not one per upstream
/// chunk. A failure is returned only after a poll that was `Pending`: the listener
/// drops a client connection whose response body fails without writing out what it
/// holds, and a failure (an upstream reset) often comes in the same read as the last
/// bytes before it; waiting a poll lets the head and those bytes reach the client,
/// which then sees the body fail, as the upstream's own client would.
pub struct Relay {
    /// `None` once the body is over.
    connection: Option<Connection>,
    framing: Framing,
    /// The connection may carry another request after this body.
    keep_alive: bool,
    pool: Weak<Pool>,
    /// A failure to return, once a poll has been `Pending` since it came.
    failed: Option<BoxError>,
    waited: bool,
    /// Trailers, returned after the data that came with them.
    trailers: Option<HeaderMap>,
    /// The connection of a response that switched protocols.
    tunnel: Option<Connection>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("framing", &self.framing).finish_non_exhaustive()
    }
}

impl Relay {
    fn new(connection: Connection, framing: Framing, keep_alive: bool, pool: Weak<Pool>) -> Self {
        Self {
            connection: Some(connection),
            framing,
            keep_alive,
            pool,
            failed: None,
            waited: false,
            trailers: None,
            tunnel: None,
        }
    }

    /// The body is complete: its connection goes back to the pool, if it can.
    fn end(&mut self) {
        let Some(connection) = self.connection.take() else { return };
        if self.keep_alive
            && connection.read.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.give_back(connection);
        }
    }

    fn fail(&mut self, error: BoxError) {
        self.connection = None;
        self.failed = Some(error);
        self.waited = false;
    }

    /// The connection of a response that switched protocols (101), once: the tunnel's
    /// two ends are it and the client's connection.
    pub fn take_tunnel(&mut self) -> Option<Tunnel> {
        let connection = self.tunnel.take()?;
        Some(Tunnel { io: connection.io, read: connection.read.freeze() })
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
        let mut out = BytesMut::new();
        while let Some(connection) = this.connection.as_mut() {
            match this.framing.decode(&mut connection.read, &mut out) {
                Ok(Decoded::More) => {}
                Ok(Decoded::End(trailers)) => {
                    this.trailers = trailers;
                    this.end();
                    break;
                }
                Err(invalid) => {
                    this.fail(invalid.into());
                    break;
                }
            }
            if out.len() >= MAX_JOINED {
                break;
            }
            match connection.poll_fill(cx) {
                Poll::Ready(Ok(0)) if this.framing.ends_at_close() => {
                    this.keep_alive = false;
                    this.end();
                }
                Poll::Ready(Ok(0)) => {
                    this.fail("the upstream closed the connection before the body's end".into())
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(error)) => this.fail(error.into()),
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => {}
            }
            break;
        }
        if !out.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
        }
        if this.failed.is_some() {
            this.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(this.trailers.take().map(|trailers| Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() && self.failed.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.exact() {
            Some(left) if self.connection.is_some() => SizeHint::with_exact(left),
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// An upstream connection that switched protocols: what was read past the 101's head,
/// then the connection itself, both ways.
pub struct Tunnel {
    io: Stream,
    read: Bytes,
}

impl AsyncRead for Tunnel {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let take = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..take]);
            this.read.advance(take);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
