//! HTTP/1.1, the client's side of one upstream connection (RFC 9112): a request head
//! written out, a response head read in, and how the response body is delimited,
//! decoded from the bytes as they come. Pure functions over buffers: the pool owns
//! the connection and decides when to read and write.
//!
//! The gateway speaks HTTP/1.1 to its upstreams with this rather than with hyper's
//! client connection, which kept per connection an 8 KiB request queue and an 8 KiB
//! head buffer, ran a dispatcher between the request and the socket, and handed body
//! bytes over a channel: a quarter of an open stream's memory and a tenth of a
//! request's instructions. Heads are parsed by `httparse`, as hyper parses them.
//!
//! What a response may be, read strictly: a status line and at most [`MAX_HEADERS`]
//! header lines within [`MAX_HEAD`] bytes; informational (1xx) heads before the final
//! one are skipped; a body delimited by `transfer-encoding: chunked` (which wins over
//! `content-length`, and then the connection is not reused), by one
//! `content-length` (several must agree), or by the connection's end. Chunk sizes are
//! hex without overflow, every line ends in CRLF, and trailers are header lines too.

use bytes::{Buf, BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header, response};

/// Header lines a response head may have (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// The longest a response head (or a trailer section) may be, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;

/// What is wrong with a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Head(String),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid content-length")]
    ContentLength,
    #[error("invalid chunked body")]
    Chunked,
    #[error("trailers larger than {MAX_HEAD} bytes or not header lines")]
    Trailers,
}

/// The request head as it goes on the wire: `method target HTTP/1.1`, then the
/// headers. `length`: the body's `content-length`, or `None` for a chunked one.
/// Whatever framing headers `headers` has are the caller's to have removed.
pub fn write_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    length: Option<u64>,
    out: &mut Vec<u8>,
) {
    let size: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
    out.reserve(method.as_str().len() + target.len() + size + 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        // hyper's rule: no length for an empty body of a method that has none.
        Some(0) if matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS) => {}
        Some(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(length.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head, and how its body is delimited.
#[derive(Debug)]
pub struct Head {
    pub parts: response::Parts,
    pub framing: Framing,
    /// The connection can carry another request once this body is read.
    pub keep_alive: bool,
}

/// Reads a response head from the start of `buffer`, taking its bytes out: `Ok(None)`
/// while it is incomplete. Informational heads (1xx but 101) are skipped. `head_of`
/// says whether the request was a `HEAD` (whose response has no body whatever it
/// says).
pub fn read_head(buffer: &mut BytesMut, head_of: bool) -> Result<Option<Head>, Invalid> {
    loop {
        let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut lines);
        let used = match response.parse(buffer) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => return Err(Invalid::HeadTooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(error) => return Err(Invalid::Head(error.to_string())),
        };
        let code = response.code.unwrap_or_default();
        let status =
            StatusCode::from_u16(code).map_err(|_| Invalid::Head(format!("invalid status {code}")))?;
        let version = match response.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        // Where each header line's name and value sit in the head, so they can be taken
        // from it uncopied once it is out of the buffer.
        let at = |slice: &[u8]| slice.as_ptr() as usize - buffer.as_ptr() as usize;
        let spans: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> = response
            .headers
            .iter()
            .map(|line| {
                (
                    at(line.name.as_bytes())..at(line.name.as_bytes()) + line.name.len(),
                    at(line.value)..at(line.value) + line.value.len(),
                )
            })
            .collect();
        let head = buffer.split_to(used).freeze();
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        let mut headers = HeaderMap::with_capacity(spans.len());
        for (name, value) in spans {
            let name = HeaderName::from_bytes(&head[name])
                .map_err(|_| Invalid::Head("invalid header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| Invalid::Head("invalid header value".into()))?;
            headers.append(name, value);
        }
        let (framing, mut keep_alive) = framing(status, &headers, head_of)?;
        keep_alive &= version == Version::HTTP_11 && !has_token(&headers, header::CONNECTION, "close");
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(Head { parts, framing, keep_alive }));
    }
}

/// How a body is delimited (RFC 9112 §6.3), and whether the connection may be reused
/// after it.
fn framing(status: StatusCode, headers: &HeaderMap, head_of: bool) -> Result<(Framing, bool), Invalid> {
    if head_of
        || status == StatusCode::SWITCHING_PROTOCOLS
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), status != StatusCode::SWITCHING_PROTOCOLS));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers.get_all(header::TRANSFER_ENCODING).iter().next_back();
        let coding = last.map(HeaderValue::as_bytes).unwrap_or_default();
        let final_coding = coding.rsplit(|&byte| byte == b',').next().unwrap_or_default();
        if final_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            let with_length = headers.contains_key(header::CONTENT_LENGTH);
            return Ok((Framing::Chunked(Chunked::default()), !with_length));
        }
        return Ok((Framing::Close, false));
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&byte| byte == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(Invalid::ContentLength);
            }
            let parsed: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(Invalid::ContentLength)?;
            if length.is_some_and(|length| length != parsed) {
                return Err(Invalid::ContentLength);
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(length) => (Framing::Length(length), true),
        None => (Framing::Close, false),
    })
}

/// Whether a comma-separated header has `token` (ignoring case) among its values.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&byte| byte == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// How a response body is delimited, and how far it has been read.
#[derive(Debug)]
pub enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the connection ends.
    Close,
}

/// What decoding found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer is used up; more bytes are needed.
    More,
    /// The body is complete, with these trailers if it had any.
    End(Option<HeaderMap>),
}

impl Framing {
    /// Takes what it can of `buffer`, adding the body's data to `out`: `End` once the
    /// body is complete (the bytes after it are left in `buffer`).
    pub fn decode(&mut self, buffer: &mut BytesMut, out: &mut BytesMut) -> Result<Decoded, Invalid> {
        match self {
            Self::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buffer.len());
                out.put_slice(&buffer[..take]);
                buffer.advance(take);
                *left -= take as u64;
                Ok(if *left == 0 { Decoded::End(None) } else { Decoded::More })
            }
            Self::Chunked(chunked) => chunked.decode(buffer, out),
            Self::Close => {
                out.put_slice(buffer);
                buffer.clear();
                Ok(Decoded::More)
            }
        }
    }

    /// Whether the connection ending now ends the body (rather than cutting it).
    pub fn ends_at_close(&self) -> bool {
        matches!(self, Self::Close)
    }

    /// Whether nothing of the body is left (a known length, all read).
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Length(0))
    }

    /// The body's exact length, when it is known and nothing of it has been read.
    pub fn exact(&self) -> Option<u64> {
        match self {
            Self::Length(left) => Some(*left),
            _ => None,
        }
    }
}

/// Where a chunked body is.
#[derive(Debug, Default)]
pub struct Chunked {
    state: Chunk,
    /// The trailer section read so far.
    trailers: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk's size: its hex digits so far, and whether there are any.
    #[default]
    Start,
    Size(u64),
    /// The rest of the size line (extensions), up to its CR.
    Extension(u64),
    /// The LF ending the size line.
    SizeLf(u64),
    /// Data bytes left in the chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataCr,
    DataLf,
    /// The trailer section, after the last chunk.
    Trailers,
    Done,
}

impl Chunked {
    fn decode(&mut self, buffer: &mut BytesMut, out: &mut BytesMut) -> Result<Decoded, Invalid> {
        loop {
            if self.state == Chunk::Trailers {
                return self.trailers(buffer);
            }
            if self.state == Chunk::Done {
                return Ok(Decoded::End(None));
            }
            if let Chunk::Data(left) = self.state {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buffer.len());
                out.put_slice(&buffer[..take]);
                buffer.advance(take);
                let left = left - take as u64;
                if left > 0 {
                    self.state = Chunk::Data(left);
                    return Ok(Decoded::More);
                }
                self.state = Chunk::DataCr;
                continue;
            }
            let Some(&byte) = buffer.first() else { return Ok(Decoded::More) };
            buffer.advance(1);
            self.state = match (self.state, byte) {
                (Chunk::Start, _) => Chunk::Size(u64::from(hex(byte).ok_or(Invalid::Chunked)?)),
                (Chunk::Size(size), _) if byte.is_ascii_hexdigit() => {
                    let digit = u64::from(hex(byte).unwrap_or_default());
                    Chunk::Size(
                        size.checked_mul(16)
                            .and_then(|size| size.checked_add(digit))
                            .ok_or(Invalid::Chunked)?,
                    )
                }
                (Chunk::Size(size), b';' | b' ' | b'\t') => Chunk::Extension(size),
                (Chunk::Size(size) | Chunk::Extension(size), b'\r') => Chunk::SizeLf(size),
                (Chunk::Extension(size), byte) if byte != b'\n' => Chunk::Extension(size),
                (Chunk::SizeLf(0), b'\n') => Chunk::Trailers,
                (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Start,
                _ => return Err(Invalid::Chunked),
            };
        }
    }

    /// The trailer section: header lines, then an empty line.
    fn trailers(&mut self, buffer: &mut BytesMut) -> Result<Decoded, Invalid> {
        while let Some(&byte) = buffer.first() {
            buffer.advance(1);
            self.trailers.push(byte);
            if self.trailers.len() > MAX_HEAD {
                return Err(Invalid::Trailers);
            }
            if self.trailers.ends_with(b"\n")
                && (self.trailers == b"\r\n" || self.trailers.ends_with(b"\r\n\r\n"))
            {
                self.state = Chunk::Done;
                let section = std::mem::take(&mut self.trailers);
                return Ok(Decoded::End(trailer_map(&section)?));
            }
        }
        Ok(Decoded::More)
    }
}

/// A trailer section (header lines and the empty line) as headers; `None` when empty.
fn trailer_map(section: &[u8]) -> Result<Option<HeaderMap>, Invalid> {
    if section == b"\r\n" {
        return Ok(None);
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, lines))) = httparse::parse_headers(section, &mut lines) else {
        return Err(Invalid::Trailers);
    };
    let mut trailers = HeaderMap::with_capacity(lines.len());
    for line in lines {
        let name = HeaderName::from_bytes(line.name.as_bytes()).map_err(|_| Invalid::Trailers)?;
        let value = HeaderValue::from_bytes(line.value).map_err(|_| Invalid::Trailers)?;
        trailers.append(name, value);
    }
    Ok(Some(trailers))
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).and_then(|digit| u8::try_from(digit).ok())
}

/// Chunked encoding of one piece of a request body.
pub fn chunk(data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked request body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Invalid> {
        read_head(&mut BytesMut::from(text), false)
    }

    #[test]
    fn reads_heads_and_their_framing() {
        let ok =
            head("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"a\":1}");
        let ok = ok.ok().flatten().expect("a head");
        assert_eq!(
            (ok.parts.status, ok.parts.headers["content-type"].as_bytes()),
            (StatusCode::OK, &b"application/json"[..])
        );
        assert!(matches!(ok.framing, Framing::Length(12)) && ok.keep_alive);

        let chunked =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n")
                .ok()
                .flatten();
        let chunked = chunked.expect("a head");
        assert!(
            matches!(chunked.framing, Framing::Chunked(_)) && !chunked.keep_alive,
            "both: TE wins, no reuse"
        );

        let close = head("HTTP/1.0 200 OK\r\n\r\n").ok().flatten().expect("a head");
        assert!(matches!(close.framing, Framing::Close) && !close.keep_alive);
        let no_body =
            head("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n").ok().flatten().expect("a head");
        assert!(no_body.framing.is_done() && no_body.keep_alive);
        let after_continue =
            head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(after_continue.ok().flatten().map(|head| head.parts.status), Some(StatusCode::CREATED));
        let closing = head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive, Close\r\n\r\n");
        assert!(!closing.ok().flatten().expect("a head").keep_alive);

        assert!(matches!(head("HTTP/1.1 200 OK\r\ncontent-"), Ok(None)));
        assert!(
            matches!(head("SSH-2.0-OpenSSH_9.6\r\n"), Err(Invalid::Head(message)) if message == "invalid HTTP version")
        );
        for bad in [
            "content-length: 1, 2",
            "content-length: -1",
            "content-length: 1\r\ncontent-length: 2",
            "content-length: +3",
        ] {
            assert_eq!(
                head(&format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n")).err(),
                Some(Invalid::ContentLength),
                "{bad}"
            );
        }
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n").is_ok());
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge).err(), Some(Invalid::HeadTooLarge));
    }

    /// A chunked encoding of `pieces`, with extensions here and there, and trailers.
    fn chunked(pieces: &[Vec<u8>], trailers: bool) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, piece) in pieces.iter().filter(|piece| !piece.is_empty()).enumerate() {
            let extension = if i % 2 == 1 { ";name=value" } else { "" };
            body.extend_from_slice(format!("{:X}{extension}\r\n", piece.len()).as_bytes());
            body.extend_from_slice(piece);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        if trailers {
            body.extend_from_slice(b"x-checksum: abc\r\n");
        }
        body.extend_from_slice(b"\r\n");
        body
    }

    /// A decoded body: its data, its trailers, the bytes after it.
    type Decoding = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Decodes `wire` fed in pieces cut at `cuts`; the data, the trailers, what is left.
    fn decode_cut(framing: &mut Framing, wire: &[u8], cuts: &[usize]) -> Result<Decoding, Invalid> {
        let mut buffer = BytesMut::new();
        let mut out = BytesMut::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([&wire.len()]) {
            let cut = cut.clamp(start, wire.len());
            buffer.extend_from_slice(&wire[start..cut]);
            start = cut;
            if let Decoded::End(trailers) = framing.decode(&mut buffer, &mut out)? {
                buffer.extend_from_slice(&wire[start..]);
                return Ok((out.to_vec(), trailers, buffer.to_vec()));
            }
        }
        Ok((out.to_vec(), None, Vec::new()))
    }

    proptest! {
        #[test]
        fn chunked_bodies_decode_alike_wherever_they_are_cut(
            pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6),
            trailers in any::<bool>(),
            cuts in prop::collection::vec(0usize..300, 0..8),
        ) {
            let mut wire = chunked(&pieces, trailers);
            wire.extend_from_slice(b"HTTP/1.1 next");
            let mut cuts = cuts;
            cuts.sort_unstable();
            let (data, found, left) = decode_cut(&mut Framing::Chunked(Chunked::default()), &wire, &cuts)?;
            prop_assert_eq!(data, pieces.concat());
            prop_assert_eq!(found.map(|found| found["x-checksum"].clone()), trailers.then(|| HeaderValue::from_static("abc")));
            prop_assert_eq!(left, b"HTTP/1.1 next".to_vec());
        }
    }

    #[test]
    fn refuses_broken_chunked_bodies() {
        for wire in [
            &b"g\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            let decoded = decode_cut(&mut Framing::Chunked(Chunked::default()), wire, &[]);
            assert!(decoded.is_err(), "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn writes_request_heads_with_their_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.example"));
        let mut out = Vec::new();
        write_head(&Method::POST, "/v1/chat/completions", &headers, Some(2), &mut out);
        assert_eq!(
            out,
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.example\r\ncontent-length: 2\r\n\r\n"
        );
        out.clear();
        write_head(&Method::GET, "/v1/models", &headers, Some(0), &mut out);
        assert_eq!(out, b"GET /v1/models HTTP/1.1\r\nhost: api.example\r\n\r\n");
        out.clear();
        write_head(&Method::POST, "/v1/files", &headers, None, &mut out);
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        let mut chunk_out = Vec::new();
        chunk(b"hello", &mut chunk_out);
        assert_eq!(chunk_out, b"5\r\nhello\r\n");
    }
}
