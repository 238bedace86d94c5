//! The one thing about a client's HTTP/1.1 framing that hyper does not show: a request
//! head with both `content-length` and `transfer-encoding`. hyper reads such a body as
//! chunked, drops `content-length` and closes the connection after the response
//! (RFC 9112 §6.1 allows that); the gateway refuses the request with a 400 instead, as
//! nginx does, and only the raw bytes tell.
//!
//! [`Watched`] passes the bytes read from the client through a small tracker: it parses
//! each request head (httparse, as hyper does) and skips its body by `content-length` or
//! chunk by chunk to find the next head, so pipelined and keep-alive requests are
//! followed too. It stops following at the first conflicting head (hyper reads nothing
//! after it) and at anything it cannot follow: an HTTP/2 preface, a protocol upgrade, a
//! head hyper refuses. It never changes a byte. Acting on what it found is for the
//! connection and ingress.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// hyper's own cap on request header lines.
const MAX_HEADERS: usize = 100;
/// Heads longer than this are refused by hyper long before (`max_header_size`).
const MAX_HEAD: usize = 1 << 20;

/// What the tracker found, shared with the connection's service.
#[derive(Debug)]
pub(super) struct Verdict {
    /// The number (from 0) of the first request with conflicting lengths, or `usize::MAX`.
    conflicting: AtomicUsize,
}

impl Verdict {
    /// Whether request `number` (from 0, in the order hyper hands them on) had both
    /// `content-length` and `transfer-encoding`.
    pub(super) fn conflicting_length(&self, number: usize) -> bool {
        self.conflicting.load(Ordering::Relaxed) == number
    }
}

/// A client connection whose reads go through the framing tracker.
pub(super) struct Watched<I> {
    io: I,
    tracker: Tracker,
    verdict: Arc<Verdict>,
}

impl<I> Watched<I> {
    pub(super) fn new(io: I) -> (Self, Arc<Verdict>) {
        let verdict = Arc::new(Verdict { conflicting: AtomicUsize::new(usize::MAX) });
        (Self { io, tracker: Tracker::default(), verdict: verdict.clone() }, verdict)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(number) = this.tracker.feed(&buf.filled()[before..]) {
            this.verdict.conflicting.store(number, Ordering::Relaxed);
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Follows HTTP/1.1 requests through a byte stream.
#[derive(Debug, Default)]
struct Tracker {
    state: State,
    /// Request heads seen so far.
    heads: usize,
}

#[derive(Debug)]
enum State {
    /// Reading a request head; holds its first bytes while it is incomplete.
    Head(Vec<u8>),
    /// Skipping a body of known length: this many bytes are left.
    Length(u64),
    /// Skipping a chunked body.
    Chunked(Chunk),
    /// Not following any more.
    Done,
}

impl Default for State {
    fn default() -> Self {
        Self::Head(Vec::new())
    }
}

/// Where a chunked body is. Lenient about line ends: hyper refuses what is not well
/// formed and then reads nothing more anyway.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// The size line: the hex digits so far.
    Size(u64),
    /// The rest of the size line (extensions) of a chunk of this size.
    SizeLine(u64),
    /// Data bytes left in this chunk.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk; `true` at the start of a line.
    Trailers(bool),
}

impl Tracker {
    /// Feeds bytes read from the client. Returns the number of a request head that has
    /// both `content-length` and `transfer-encoding`, when these bytes complete one.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<usize> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return None,
                State::Head(held) => {
                    let before = held.len();
                    let parsed = match before {
                        0 => head(bytes),
                        _ => {
                            held.extend_from_slice(bytes);
                            head(held)
                        }
                    };
                    let number = self.heads;
                    let (used, state) = match parsed {
                        Head::Incomplete => {
                            if before == 0 {
                                held.extend_from_slice(bytes);
                            }
                            if held.len() > MAX_HEAD {
                                self.state = State::Done;
                            }
                            return None;
                        }
                        Head::Conflicting => {
                            self.state = State::Done;
                            return Some(number);
                        }
                        Head::Complete { used, then } => (used, then),
                    };
                    self.heads += 1;
                    self.state = state;
                    bytes = &bytes[used.saturating_sub(before).min(bytes.len())..];
                }
                State::Length(left) => {
                    let skipped = (*left).min(bytes.len() as u64);
                    *left -= skipped;
                    bytes = &bytes[skipped as usize..];
                    if *left == 0 {
                        self.state = State::default();
                    }
                }
                State::Chunked(chunk) => {
                    let (state, used) = chunk.read(bytes);
                    self.state = state;
                    bytes = &bytes[used..];
                }
            }
        }
        None
    }
}

/// A request head at the start of some bytes.
enum Head {
    Incomplete,
    /// Both `content-length` and `transfer-encoding`.
    Conflicting,
    /// The head took `used` bytes; `then` follows.
    Complete {
        used: usize,
        then: State,
    },
}

fn head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let used = match request.parse(bytes) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Head::Incomplete,
        // An HTTP/2 preface, or a head hyper refuses (and then closes).
        Err(_) => return Head::Complete { used: bytes.len(), then: State::Done },
    };
    let (mut length, mut encoded, mut chunked, mut upgrade) = (None, false, false, false);
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).ok();
            // hyper refuses a length it cannot read.
            length = Some(value.and_then(|value| value.parse::<u64>().ok()));
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // hyper goes by the last coding of the last line.
            let last = header.value.rsplit(|byte| *byte == b',').next().unwrap_or_default();
            (encoded, chunked) = (true, last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let then = match (encoded, length) {
        (true, Some(_)) => return Head::Conflicting,
        // What follows may be another protocol.
        _ if upgrade || request.method == Some("CONNECT") => State::Done,
        (true, None) if chunked => State::Chunked(Chunk::Size(0)),
        // hyper refuses other codings and unreadable lengths with a 400.
        (true, None) | (false, Some(None)) => State::Done,
        (false, Some(Some(length))) if length > 0 => State::Length(length),
        (false, _) => State::default(),
    };
    Head::Complete { used, then }
}

impl Chunk {
    /// Reads what it can of `bytes`: the state after them, and how many it took.
    fn read(self, bytes: &[u8]) -> (State, usize) {
        let mut chunk = self;
        let mut at = 0;
        while at < bytes.len() {
            chunk = match chunk {
                Chunk::Data(left) => {
                    let skipped = left.min((bytes.len() - at) as u64);
                    at += skipped as usize;
                    match left - skipped {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    }
                }
                _ => {
                    at += 1;
                    match chunk.after(bytes[at - 1]) {
                        Ok(chunk) => chunk,
                        Err(state) => return (state, at),
                    }
                }
            };
        }
        (State::Chunked(chunk), at)
    }

    /// The chunk state after one more byte outside chunk data; `Err` when the body
    /// ends with it (the next head follows) or cannot be followed.
    fn after(self, byte: u8) -> Result<Chunk, State> {
        Ok(match (self, byte) {
            (Chunk::Size(size), _) if byte.is_ascii_hexdigit() => {
                let digit = u64::from((byte as char).to_digit(16).unwrap_or_default());
                let size = size.checked_mul(16).and_then(|size| size.checked_add(digit));
                Chunk::Size(size.ok_or(State::Done)?)
            }
            (Chunk::Size(0) | Chunk::SizeLine(0), b'\n') => Chunk::Trailers(true),
            (Chunk::Size(size) | Chunk::SizeLine(size), b'\n') => Chunk::Data(size),
            (Chunk::Size(size) | Chunk::SizeLine(size), _) => Chunk::SizeLine(size),
            (Chunk::DataEnd, b'\n') => Chunk::Size(0),
            (Chunk::Trailers(true), b'\n') => return Err(State::default()),
            (Chunk::Trailers(line_start), b'\r') => Chunk::Trailers(line_start),
            (Chunk::Trailers(_), _) => Chunk::Trailers(byte == b'\n'),
            (chunk, _) => chunk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` cut at `cuts`, returning the conflicting head's number.
    fn conflicting(stream: &[u8], cuts: &[usize]) -> Option<usize> {
        let mut tracker = Tracker::default();
        let mut found = None;
        let mut start = 0;
        for &cut in cuts.iter().chain([&stream.len()]) {
            found = found.or(tracker.feed(&stream[start..cut]));
            start = cut;
        }
        found
    }

    const PIPELINE: &[u8] = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n\
        POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-length: 65\r\n\r\n\
        GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n\
        POST /v1/files HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n\
        1a;name=value\r\nGET / HTTP/1.1\r\nContent-Le\r\n\
        0\r\nx-trailer: 1\r\n\r\n\
        POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
        0\r\n\r\n";

    #[test]
    fn finds_the_conflicting_head_behind_bodies_that_look_like_heads() {
        // Head 1's body is head-like text with both headers, head 2's chunk too.
        assert_eq!(conflicting(PIPELINE, &[]), Some(3));
    }

    #[test]
    fn the_same_wherever_the_reads_split() {
        for cut in 0..PIPELINE.len() {
            assert_eq!(conflicting(PIPELINE, &[cut]), Some(3), "cut at {cut}");
            for second in (cut..PIPELINE.len()).step_by(7) {
                assert_eq!(conflicting(PIPELINE, &[cut, second]), Some(3), "cuts at {cut}, {second}");
            }
        }
    }

    #[test]
    fn stops_following_where_hyper_would_not_go_on_as_http1() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(conflicting(h2, &[]), None);
        let upgrade =
            b"GET /v1/realtime HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\
            POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(conflicting(upgrade, &[]), None);
        let both_first = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n";
        assert_eq!(conflicting(both_first, &[3]), Some(0));
    }
}
