//! Streamed responses (`text/event-stream`), read as they are relayed.
//!
//! [`EventFramer`] splits a byte stream into Server-Sent Events wherever its frames
//! happen to be cut; [`StreamWatch`] sits on a chat/completions or completions stream,
//! records what the gateway needs to know about it (final usage, the completion's
//! tokens counted as they pass, `[DONE]`, finish reason, errors, data it could not
//! read) and, when asked, strips the usage-only chunk the gateway requested on the
//! client's behalf. Frames pass through uncopied unless a chunk is stripped from them.
//! Each chunk is read once, by a reader that checks its JSON and picks out the few
//! fields the watch records (`chunk`).
//!
//! What the records mean for limits and caching is decided elsewhere; the Responses
//! API's typed events (`response.completed`) are not read here.

pub(crate) mod chunk;
mod framer;

use std::ops::Range;

use bytes::{Bytes, BytesMut};
pub use framer::EventFramer;
use framer::Piece;

use super::{Usage, tokens::Encoding};

/// Completion text counted with the model's encoding when no usage arrives; past
/// this, bytes are counted instead (one token per 4).
pub const COUNTED_TEXT_BYTES: usize = 64 * 1024;
/// An event still incomplete past this size is not SSE the gateway can read: the
/// watch stops reading and passes the rest of the stream through.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Watches one chat/completions or completions stream on its way to the client.
#[derive(Debug, Default)]
pub struct StreamWatch {
    framer: EventFramer,
    strip_usage_chunk: bool,
    usage: Option<Usage>,
    /// How the completion's text is counted; `None` counts nothing.
    encoding: Option<Encoding>,
    /// Completion tokens counted so far, chunk by chunk.
    counted: u64,
    /// Completion text seen so far, in bytes.
    text_bytes: u64,
    done: bool,
    finish_reason: Option<Box<str>>,
    content_filtered: bool,
    error: bool,
    malformed: bool,
    gave_up: bool,
}

impl StreamWatch {
    /// `strip_usage_chunk`: the gateway asked for usage the client did not, so the
    /// usage-only chunk must not reach the client. `model`: the completion's tokens
    /// are counted with its encoding, for a stream that ends without usage.
    pub fn new(strip_usage_chunk: bool, model: &str) -> Self {
        Self { strip_usage_chunk, encoding: Some(Encoding::for_model(model)), ..Self::default() }
    }

    /// A watch that records how the stream goes (`[DONE]`, errors, finish reasons,
    /// unreadable data) but counts no completion, and strips nothing.
    pub fn outcome_only() -> Self {
        Self::default()
    }

    /// Reads one frame and returns what to send the client for it. Without stripping
    /// that is the frame itself. With stripping it is every complete event so far
    /// except a usage-only chunk (the last chunk, whose `choices` is empty and which
    /// carries `usage`); an incomplete trailing event is held until it completes or
    /// [`finish`](Self::finish) flushes it. The result may be empty.
    pub fn relay(&mut self, frame: Bytes) -> Bytes {
        if self.gave_up {
            return frame;
        }
        let mut at = 0;
        if !self.strip_usage_chunk {
            while let Some(piece) = self.framer.next_piece(&frame, &mut at) {
                match piece {
                    Piece::Framed(range) => self.record(&frame[range]),
                    Piece::Joined(event) => self.record(&event),
                };
            }
            let _already_sent = self.give_up_if_oversized();
            return frame;
        }
        let mut out = Output::Empty;
        let mut run: Option<Range<usize>> = None;
        while let Some(piece) = self.framer.next_piece(&frame, &mut at) {
            match piece {
                Piece::Framed(range) => {
                    let strip = self.record(&frame[range.clone()]);
                    match &mut run {
                        Some(open) if !strip && open.end == range.start => open.end = range.end,
                        _ => {
                            if let Some(open) = run.take() {
                                out.push(frame.slice(open));
                            }
                            run = (!strip).then_some(range);
                        }
                    }
                }
                Piece::Joined(event) => {
                    if !self.record(&event) {
                        out.push(event);
                    }
                }
            }
        }
        if let Some(open) = run {
            out.push(frame.slice(open));
        }
        if let Some(held) = self.give_up_if_oversized() {
            out.push(held);
        }
        out.into_bytes()
    }

    /// Ends the stream: records an event left without its blank line and returns what
    /// is still owed to the client (with stripping, that event unless it is the usage
    /// chunk; without, nothing, as every byte has gone already).
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.gave_up {
            return None;
        }
        let tail = self.framer.finish()?;
        let strip = self.record(&tail);
        (self.strip_usage_chunk && !strip).then_some(tail)
    }

    /// The stream's final `usage`, when the upstream sent one.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The completion tokens to charge: the upstream's usage when it sent one, else
    /// the completion's text counted chunk by chunk with the model's encoding (its
    /// first [`COUNTED_TEXT_BYTES`]; one token per 4 bytes past that). A chunk is
    /// about one token, so counting each one's text on its own gives about what the
    /// model generated.
    pub fn completion_tokens(&self) -> u64 {
        match self.usage {
            Some(usage) => usage.completion_tokens,
            None => self.counted,
        }
    }

    /// `data: [DONE]` was seen: the stream was not cut off.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The last non-null `finish_reason` of any choice.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// Some choice finished with `content_filter`.
    pub fn content_filtered(&self) -> bool {
        self.content_filtered
    }

    /// An `event: error` or a chunk with an `error` object was seen.
    pub fn error(&self) -> bool {
        self.error
    }

    /// Some event's data was neither `[DONE]` nor a JSON chunk the watch could read.
    pub fn malformed(&self) -> bool {
        self.malformed
    }

    /// An event grew past [`MAX_EVENT_BYTES`]: the stream was passed through unread
    /// from there on, so the other records are incomplete.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Stops reading once an event outgrows [`MAX_EVENT_BYTES`]; `Some` holds what
    /// was held back, to send on at once.
    fn give_up_if_oversized(&mut self) -> Option<Bytes> {
        if self.framer.buffered() <= MAX_EVENT_BYTES {
            return None;
        }
        self.gave_up = true;
        self.framer.finish()
    }

    /// Records one complete event; `true` when it is the usage-only chunk to strip.
    fn record(&mut self, event: &[u8]) -> bool {
        let fields = chunk::fields(event);
        self.error |= fields.error_event;
        let Some(data) = fields.data else { return false };
        if &data[..] == b"[DONE]" {
            self.done = true;
            return false;
        }
        let (mut counted, mut text_bytes) = (0u64, self.text_bytes);
        let encoding = self.encoding;
        let read = chunk::read(&data, |text| {
            let Some(encoding) = encoding else { return };
            let within = COUNTED_TEXT_BYTES.saturating_sub(usize::try_from(text_bytes).unwrap_or(usize::MAX));
            let (exact, past) = text.split_at(floor_char_boundary(text, within));
            counted += encoding.count(exact) + u64::try_from(past.len().div_ceil(4)).unwrap_or(u64::MAX);
            text_bytes = text_bytes.saturating_add(text.len() as u64);
        });
        let Ok(chunk) = read else {
            self.malformed = true;
            return false;
        };
        self.counted = self.counted.saturating_add(counted);
        self.text_bytes = text_bytes;
        self.error |= chunk.error;
        self.content_filtered |= chunk.content_filtered;
        if let Some(reason) = chunk.finish_reason {
            self.finish_reason = Some(reason.into());
        }
        let usage_only = chunk.choices == 0 && chunk.usage.is_some() && !chunk.error;
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        usage_only
    }
}

/// The largest character boundary of `text` at or below `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// What one `relay` call sends: nothing, one slice, or several joined.
enum Output {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Output {
    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Output::Empty) {
            Output::Empty => Output::One(bytes),
            Output::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + bytes.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&bytes);
                Output::Many(joined)
            }
            Output::Many(mut joined) => {
                joined.extend_from_slice(&bytes);
                Output::Many(joined)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Output::Empty => Bytes::new(),
            Output::One(bytes) => bytes,
            Output::Many(joined) => joined.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const USAGE: Usage = Usage { prompt_tokens: 11, completion_tokens: 5, total_tokens: 16 };

    /// A chat stream: its bytes, each event's end offset and whether stripping drops it.
    #[derive(Debug)]
    struct Stream {
        bytes: Vec<u8>,
        events: Vec<(usize, bool)>,
        /// Each delta counted on its own (o200k).
        delta_tokens: u64,
        finish_reason: Option<&'static str>,
        usage: bool,
        done: bool,
    }

    impl Stream {
        fn new(
            deltas: &[String],
            end: &str,
            finish_reason: Option<&'static str>,
            usage: bool,
            done: bool,
        ) -> Self {
            let mut stream = Stream {
                bytes: Vec::new(),
                events: Vec::new(),
                delta_tokens: deltas.iter().map(|delta| Encoding::O200kBase.count(delta)).sum(),
                finish_reason,
                usage,
                done,
            };
            let mut push = |event: String, strip: bool| {
                stream.bytes.extend_from_slice(event.as_bytes());
                stream.events.push((stream.bytes.len(), strip));
            };
            let line = &end[..end.len() / 2];
            push(format!(": keep-alive{line}{line}"), false);
            for delta in deltas {
                let chunk = json!({"id": "c", "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}], "usage": null});
                push(format!("data: {chunk}{end}"), false);
            }
            if let Some(reason) = finish_reason {
                let chunk = json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}], "usage": null});
                push(format!("data: {chunk}{end}"), false);
            }
            if usage {
                let chunk = json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}});
                push(format!("data: {chunk}{end}"), true);
            }
            if done {
                push(format!("data: [DONE]{end}"), false);
            }
            stream
        }

        /// What a client gets of the first `consumed` bytes when stripping.
        fn stripped_prefix(&self, consumed: usize) -> Vec<u8> {
            let mut out = Vec::new();
            let mut start = 0;
            for &(end, strip) in &self.events {
                let complete = end < consumed || (end == consumed && self.bytes[end - 1] != b'\r');
                if !complete {
                    break;
                }
                if !strip {
                    out.extend_from_slice(&self.bytes[start..end]);
                }
                start = end;
            }
            out
        }
    }

    fn deltas(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|text| text.to_string()).collect()
    }

    #[test]
    fn passes_frames_through_uncopied_when_not_stripping() {
        let stream = Stream::new(&deltas(&["Hel", "lo"]), "\n\n", Some("stop"), true, true);
        let frame = Bytes::from(stream.bytes);
        let mut watch = StreamWatch::new(false, "gpt-4o");
        let out = watch.relay(frame.clone());
        assert_eq!((out.as_ptr(), out.len()), (frame.as_ptr(), frame.len()));
        assert_eq!(watch.finish(), None);
        assert_eq!((watch.usage(), watch.done()), (Some(USAGE), true));
        assert_eq!(
            (watch.finish_reason(), watch.content_filtered(), watch.error()),
            (Some("stop"), false, false)
        );
        assert_eq!(watch.completion_tokens(), 5, "usage wins over counting");
    }

    #[test]
    fn strips_the_usage_chunk_without_copying_the_rest() {
        let frame = Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":5,\"total_tokens\":16}}\n\ndata: [DONE]\n\n",
        );
        let mut watch = StreamWatch::new(true, "gpt-4o");
        let out = watch.relay(frame.clone());
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        assert!(frame.as_ptr_range().contains(&out.as_ptr()), "a slice of the frame");
        assert_eq!((watch.usage(), watch.done()), (Some(USAGE), true));
    }

    #[test]
    fn keeps_empty_choice_chunks_without_usage() {
        let frame = Bytes::from_static(b"data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n");
        let mut watch = StreamWatch::new(true, "gpt-4o");
        assert_eq!(watch.relay(frame.clone()), frame);
        let error =
            Bytes::from_static(b"data: {\"choices\":[],\"usage\":{},\"error\":{\"message\":\"x\"}}\n\n");
        assert_eq!(watch.relay(error.clone()), error, "an error is the client's to see");
        assert!(watch.error());
    }

    #[test]
    fn records_errors_filters_and_counts_without_usage() {
        let events = Bytes::from_static(
            b"data: {\"choices\":[{\"text\":\"hello world\",\"finish_reason\":\"content_filter\"}]}\n\n\
            event: error\ndata: {\"message\":\"overloaded\"}\n\n",
        );
        let mut watch = StreamWatch::new(false, "gpt-4o");
        watch.relay(events.clone());
        assert!(watch.content_filtered() && watch.error() && !watch.done());
        assert_eq!(watch.completion_tokens(), 2);
        let mut watch = StreamWatch::new(false, "unknown-model");
        watch.relay(events);
        assert_eq!(watch.completion_tokens(), 3, "11 bytes / 4, rounded up");
    }

    #[test]
    fn counts_text_up_to_its_cap_and_the_rest_by_bytes() {
        let mut watch = StreamWatch::new(false, "llama");
        let chunk = json!({"choices": [{"delta": {"content": "é".repeat(COUNTED_TEXT_BYTES)}}]});
        watch.relay(Bytes::from(format!("data: {chunk}\n\n")));
        let counted = (COUNTED_TEXT_BYTES as u64).div_ceil(4);
        assert_eq!(watch.completion_tokens(), counted + counted, "the first half counted, the rest by bytes");
    }

    #[test]
    fn flags_data_that_is_not_a_chunk() {
        let mut watch = StreamWatch::new(false, "gpt-4o");
        watch.relay(Bytes::from_static(b": keep-alive\n\nevent: ping\n\ndata: {\"choices\":[]}\n\n"));
        assert!(!watch.malformed(), "comments, data-less events and chunks are fine");
        watch.relay(Bytes::from_static(b"data: {\"choices\":[{\"delta\":\n\n"));
        assert!(watch.malformed());

        let mut watch = StreamWatch::new(false, "gpt-4o");
        watch.relay(Bytes::from_static(b"data: <html>502 Bad Gateway</html>\n\ndata: [DONE]\n\n"));
        assert!(watch.malformed() && watch.done());
    }

    #[test]
    fn an_outcome_only_watch_counts_nothing_and_strips_nothing() {
        let stream = Stream::new(&deltas(&["Hel", "lo"]), "\n\n", Some("stop"), false, true);
        let frame = Bytes::from(stream.bytes);
        let mut watch = StreamWatch::outcome_only();
        assert_eq!(watch.relay(frame.clone()), frame);
        assert_eq!(watch.completion_tokens(), 0);
        assert_eq!((watch.done(), watch.finish_reason(), watch.malformed()), (true, Some("stop"), false));
    }

    #[test]
    fn finish_flushes_an_unterminated_event() {
        let mut watch = StreamWatch::new(true, "gpt-4o");
        assert!(watch.relay(Bytes::from_static(b"data: [DONE]")).is_empty());
        assert_eq!(watch.finish().as_deref(), Some(&b"data: [DONE]"[..]));
        assert!(watch.done());
    }

    #[test]
    fn passes_an_oversized_event_through_unread() {
        let mut watch = StreamWatch::new(true, "gpt-4o");
        let big = Bytes::from(vec![b'x'; MAX_EVENT_BYTES + 1]);
        assert_eq!(watch.relay(big.clone()), big);
        assert!(watch.gave_up());
        let more = Bytes::from_static(b"data: [DONE]\n\n");
        assert_eq!(watch.relay(more.clone()), more);
        assert_eq!(watch.finish(), None);
    }

    fn stream() -> impl Strategy<Value = Stream> {
        let deltas = prop::collection::vec("[a-zé \"\\\\\n]{0,6}", 0..10);
        let end = prop::sample::select(vec!["\n\n", "\r\n\r\n", "\r\r"]);
        let reason = prop::option::of(prop::sample::select(vec!["stop", "length", "content_filter"]));
        (deltas, end, reason, any::<bool>(), any::<bool>())
            .prop_map(|(deltas, end, reason, usage, done)| Stream::new(&deltas, end, reason, usage, done))
    }

    proptest! {
        #[test]
        fn relays_the_same_wherever_the_stream_is_split(
            stream in stream(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
            strip in any::<bool>(),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut watch = StreamWatch::new(strip, "gpt-4o");
            let mut out = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([stream.bytes.len()]) {
                out.extend_from_slice(&watch.relay(Bytes::copy_from_slice(&stream.bytes[start..cut])));
                start = cut;
                if strip {
                    prop_assert_eq!(&out, &stream.stripped_prefix(cut), "no complete event is held back");
                }
            }
            out.extend(watch.finish().as_deref().unwrap_or_default());
            let expected = if strip { stream.stripped_prefix(usize::MAX) } else { stream.bytes.clone() };
            prop_assert_eq!(out, expected);
            let completion = if stream.usage { USAGE.completion_tokens } else { stream.delta_tokens };
            prop_assert_eq!(watch.completion_tokens(), completion);
            prop_assert_eq!(watch.usage(), stream.usage.then_some(USAGE));
            prop_assert_eq!(watch.done(), stream.done);
            prop_assert_eq!(watch.finish_reason(), stream.finish_reason);
            prop_assert_eq!(watch.content_filtered(), stream.finish_reason == Some("content_filter"));
            prop_assert!(!watch.error() && !watch.malformed());
        }
    }
}
