//! The response headers a cache entry replays, kept compactly: one buffer of
//! `name:value\n` lines, copied out of the upstream's response.
//!
//! The copy matters: hyper parses a response head into header values that are slices
//! of its connection's read buffer, so keeping such a value would keep that whole
//! buffer (8 KiB and up) alive for as long as the entry lives. Which headers are
//! worth replaying is [`REPLAYED`]; credentials are never kept, whatever asks.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Response headers kept with an entry; everything else is per request or per tenant.
pub static REPLAYED: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    HeaderName::from_static("openai-model"),
    HeaderName::from_static("openai-version"),
];

/// Headers as one block: per header its name (lower-case; a name never holds `:`),
/// `:`, its value (a value never holds a line end) and `\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHeaders(Bytes);

// === impl StoredHeaders ===

impl StoredHeaders {
    /// The [`REPLAYED`] headers of `headers`, copied into a block of their own.
    pub fn copy_from(headers: &HeaderMap) -> Self {
        let kept: Vec<_> = REPLAYED
            .iter()
            .flat_map(|name| headers.get_all(name).into_iter().map(move |value| (name, value)))
            .filter(|(name, value)| storable(name, value))
            .collect();
        // Allocated once, at its exact length.
        let len = kept.iter().map(|(name, value)| name.as_str().len() + value.len() + 2).sum();
        let mut block = Vec::with_capacity(len);
        for (name, value) in kept {
            block.extend_from_slice(name.as_str().as_bytes());
            block.push(b':');
            block.extend_from_slice(value.as_bytes());
            block.push(b'\n');
        }
        Self(Bytes::from(block))
    }

    /// A block read back from elsewhere (the Redis tier), or `None` unless every line
    /// is a valid header that may be stored.
    pub fn from_block(block: Bytes) -> Option<Self> {
        let valid =
            Lines(block.clone()).all(|line| line.is_some_and(|(name, value)| storable(&name, &value)));
        valid.then_some(Self(block))
    }

    /// The block itself.
    pub fn block(&self) -> &Bytes {
        &self.0
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers as a map, their values slices of the block (no copy).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in Lines(self.0.clone()).flatten() {
            map.append(name, value);
        }
        map
    }
}

/// Whether a header may be kept in the cache: never credentials.
fn storable(name: &HeaderName, value: &HeaderValue) -> bool {
    name != header::AUTHORIZATION && name != header::PROXY_AUTHORIZATION && !value.is_sensitive()
}

/// The lines of a block, each `None` when it is not a valid header.
struct Lines(Bytes);

impl Iterator for Lines {
    type Item = Option<(HeaderName, HeaderValue)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let Some(end) = memchr::memchr(b'\n', &self.0) else {
            self.0.clear();
            return Some(None);
        };
        let mut line = self.0.split_to(end + 1);
        line.truncate(end);
        Some(parse(line))
    }
}

/// One `name:value` line; the value stays a slice of the block.
fn parse(mut line: Bytes) -> Option<(HeaderName, HeaderValue)> {
    let colon = memchr::memchr(b':', &line)?;
    let value = line.split_off(colon + 1);
    let name = &line[..colon];
    // The replayed names are static: no allocation for them on every hit.
    let name = match REPLAYED.iter().find(|known| known.as_str().as_bytes() == name) {
        Some(known) => known.clone(),
        None => HeaderName::from_bytes(name).ok()?,
    };
    Some((name, HeaderValue::from_maybe_shared(value).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("openai-model", HeaderValue::from_static("gpt-4o-mini-2024-07-18"));
        headers.append("openai-version", HeaderValue::from_static("2020-10-01"));
        headers.append("openai-version", HeaderValue::from_static("second"));
        headers.insert("x-request-id", HeaderValue::from_static("req_1"));
        headers.insert("openai-organization", HeaderValue::from_static("org-1"));
        headers
    }

    #[test]
    fn keeps_the_replayed_headers_in_order_and_nothing_else() {
        let stored = StoredHeaders::copy_from(&upstream_headers());
        assert_eq!(
            &stored.block()[..],
            b"content-type:application/json\nopenai-model:gpt-4o-mini-2024-07-18\n\
              openai-version:2020-10-01\nopenai-version:second\n"
        );
        assert_eq!(stored.len(), stored.block().len());
        let map = stored.to_map();
        assert_eq!(map.len(), 4);
        assert_eq!(map[header::CONTENT_TYPE], "application/json");
        let versions: Vec<_> = map.get_all("openai-version").iter().collect();
        assert_eq!(versions, ["2020-10-01", "second"]);
        assert!(StoredHeaders::copy_from(&HeaderMap::new()).to_map().is_empty());
    }

    #[test]
    fn values_are_copied_so_the_read_buffer_they_came_from_is_freed() {
        // As hyper parses a head: every value a slice of the connection's read buffer.
        let read_buffer = Bytes::from(b"application/json and the rest of an 8 KiB buffer".to_vec());
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_maybe_shared(read_buffer.slice(..16)).expect("a header value");
        headers.insert(header::CONTENT_TYPE, value);

        let stored = StoredHeaders::copy_from(&headers);
        drop(headers);

        assert!(read_buffer.is_unique(), "the stored headers keep the read buffer");
        assert_eq!(stored.to_map()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn replayed_values_are_slices_of_the_block() {
        let stored = StoredHeaders::copy_from(&upstream_headers());
        let block = stored.block().as_ptr_range();
        for value in stored.to_map().values() {
            assert!(block.contains(&value.as_bytes().as_ptr()), "{value:?} was copied");
        }
    }

    #[test]
    fn credentials_are_never_kept_nor_read_back() {
        let mut headers = upstream_headers();
        let mut sensitive = HeaderValue::from_static("application/secret");
        sensitive.set_sensitive(true);
        headers.insert(header::CONTENT_TYPE, sensitive);
        assert!(!String::from_utf8_lossy(StoredHeaders::copy_from(&headers).block()).contains("secret"));

        for forged in [&b"authorization:Bearer sk\n"[..], b"Proxy-Authorization:Basic x\n"] {
            assert_eq!(StoredHeaders::from_block(Bytes::from_static(forged)), None);
        }
    }

    #[test]
    fn a_block_that_is_not_header_lines_is_refused() {
        let good = StoredHeaders::copy_from(&upstream_headers());
        assert_eq!(StoredHeaders::from_block(good.block().clone()), Some(good));
        assert_eq!(StoredHeaders::from_block(Bytes::new()), Some(StoredHeaders::default()));
        for bad in [
            &b"content-type:application/json"[..],
            b"content-type application/json\n",
            b":value\n",
            b"bad name:value\n",
            b"content-type:bad\x01value\n",
            b"\n",
        ] {
            assert_eq!(StoredHeaders::from_block(Bytes::from_static(bad)), None, "{bad:?}");
        }
    }
}
