//! SSE framing: where one event of a byte stream ends, however the stream arrives
//! in frames. What an event says is [`super::chunk`]'s business.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Splits an SSE byte stream into events, each with its terminating blank line.
///
/// A blank line ends an event: two line ends in a row, where a line ends with `\n`,
/// `\r\n` or `\r` (so `\n\n`, `\r\n\r\n` and `\r\r` all end one). Concatenating every
/// event and the [`finish`](Self::finish) tail gives back the input, and the events are
/// the same wherever the input is split into frames. An event that lies within one
/// frame is a slice of it; only an incomplete tail is copied, into a carry buffer.
/// An event whose blank line is a `\r` at the very end of a frame waits for the next
/// byte, which may be the `\n` of a `\r\n`.
#[derive(Debug, Default)]
pub struct EventFramer {
    carry: BytesMut,
    /// The line being scanned has a byte before its terminator.
    line_has_text: bool,
    /// The last byte scanned was a `\r`; `Some(true)` when it ended a blank line.
    pending_cr: Option<bool>,
}

/// A complete event: a range of the current frame, or a carried head joined with it.
pub(super) enum Piece {
    Framed(Range<usize>),
    Joined(Bytes),
}

impl EventFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next frame, calling `on_event` with each event it completes, in order.
    pub fn push(&mut self, frame: &Bytes, mut on_event: impl FnMut(Bytes)) {
        let mut at = 0;
        while let Some(piece) = self.next_piece(frame, &mut at) {
            on_event(match piece {
                Piece::Framed(range) => frame.slice(range),
                Piece::Joined(event) => event,
            });
        }
    }

    /// The bytes of an event left incomplete at the end of the stream, if any.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.line_has_text = false;
        self.pending_cr = None;
        (!self.carry.is_empty()).then(|| self.carry.split().freeze())
    }

    /// Bytes held for an incomplete event.
    pub fn buffered(&self) -> usize {
        self.carry.len()
    }

    /// The next complete event of `frame` from `*at` on; `None` once the rest of the
    /// frame has been carried.
    pub(super) fn next_piece(&mut self, frame: &Bytes, at: &mut usize) -> Option<Piece> {
        let start = *at;
        let Some(end) = self.scan(frame, start) else {
            self.carry.extend_from_slice(&frame[start..]);
            *at = frame.len();
            return None;
        };
        *at = end;
        if self.carry.is_empty() {
            return Some(Piece::Framed(start..end));
        }
        self.carry.extend_from_slice(&frame[start..end]);
        Some(Piece::Joined(self.carry.split().freeze()))
    }

    /// Where the event that is open at `from` ends in `frame`, if it does.
    fn scan(&mut self, frame: &[u8], from: usize) -> Option<usize> {
        let mut at = from;
        while at < frame.len() {
            if let Some(blank) = self.pending_cr.take() {
                if frame[at] == b'\n' {
                    at += 1;
                    if blank {
                        return Some(at);
                    }
                    continue;
                }
                if blank {
                    return Some(at);
                }
            }
            let Some(offset) = memchr::memchr2(b'\n', b'\r', &frame[at..]) else {
                self.line_has_text = true;
                return None;
            };
            let end = at + offset;
            let blank = offset == 0 && !self.line_has_text;
            self.line_has_text = false;
            at = end + 1;
            if frame[end] == b'\r' {
                self.pending_cr = Some(blank);
            } else if blank {
                return Some(at);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Events and tail of a whole input, found the plain way, line by line.
    fn reference(input: &[u8]) -> (Vec<Bytes>, Option<Bytes>) {
        let (mut events, mut start, mut line_start, mut at) = (Vec::new(), 0, 0, 0);
        while at < input.len() {
            if !matches!(input[at], b'\n' | b'\r') {
                at += 1;
                continue;
            }
            let blank = at == line_start;
            at += match &input[at..] {
                [b'\r'] => break, // a `\r\n` or not: undecided at the end of input
                [b'\r', b'\n', ..] => 2,
                _ => 1,
            };
            line_start = at;
            if blank {
                events.push(Bytes::copy_from_slice(&input[start..at]));
                start = at;
            }
        }
        (events, (start < input.len()).then(|| Bytes::copy_from_slice(&input[start..])))
    }

    fn frame_all(frames: &[&[u8]]) -> (Vec<Bytes>, Option<Bytes>) {
        let mut framer = EventFramer::new();
        let mut events = Vec::new();
        for frame in frames {
            framer.push(&Bytes::copy_from_slice(frame), |event| events.push(event));
        }
        (events, framer.finish())
    }

    #[test]
    fn splits_at_each_kind_of_blank_line() {
        let input = b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\nid: 1\ndata: e";
        let (events, tail) = frame_all(&[input]);
        let expected: [&[u8]; 4] = [b"data: a\n\n", b"data: b\r\n\r\n", b"data: c\r\r", b"data: d\n\r\n"];
        assert_eq!(events, expected);
        assert_eq!(tail.as_deref(), Some(&b"id: 1\ndata: e"[..]));
    }

    #[test]
    fn a_frame_within_one_event_is_sliced_not_copied() {
        let frame = Bytes::from_static(b"data: a\n\ndata: b\n\n");
        let mut framer = EventFramer::new();
        let mut events = Vec::new();
        framer.push(&frame, |event| events.push(event));
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].as_ptr(), frame.as_ptr());
        assert_eq!(framer.buffered(), 0);
    }

    #[test]
    fn waits_for_the_byte_after_a_final_cr_only() {
        let mut framer = EventFramer::new();
        let mut events = Vec::new();
        framer.push(&Bytes::from_static(b"data: a\r\n\r"), |event| events.push(event));
        assert!(events.is_empty(), "the next byte may be the \\n of \\r\\n");
        framer.push(&Bytes::from_static(b"\ndata: b\n"), |event| events.push(event));
        assert_eq!(events, [Bytes::from_static(b"data: a\r\n\r\n")]);
        framer.push(&Bytes::from_static(b"\n"), |event| events.push(event));
        assert_eq!(events.len(), 2, "a complete \\n\\n event is never held");
        assert_eq!(framer.finish(), None);
    }

    proptest! {
        #[test]
        fn same_events_wherever_the_stream_is_split(
            input in prop::collection::vec(prop::sample::select(b"da: \r\n\r\n".to_vec()), 0..160),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([input.len()]) {
                frames.push(&input[start..cut]);
                start = cut;
            }
            let (events, tail) = frame_all(&frames);
            prop_assert_eq!((events.clone(), tail.clone()), reference(&input));
            let mut joined: Vec<u8> = events.concat();
            joined.extend(tail.as_deref().unwrap_or_default());
            prop_assert_eq!(joined, input);
        }
    }
}
