//! Log lines: how an event becomes one line of JSON or text, and how lines reach
//! stdout.
//!
//! The formats are tracing-subscriber's own (`json` flattened with the current span;
//! `pretty` as its full text format) written by a formatter of our own: the access
//! line is written for every request, and tracing-subscriber's formatters spent some
//! 25 000 instructions on it (a styled `Debug` pass per field, a calendar computation
//! per timestamp), where this one writes each value straight into the line. Text
//! values are escaped in both formats, so no client-chosen string can start a line
//! of its own. Colour (the level only) is for terminals.
//!
//! Lines are written as they are made, except access lines at `info`: those gather in
//! a buffer that goes out in one write when a worker thread runs out of work
//! ([`flush`], hooked to the runtime's park), when it holds [`FLUSH_AT`] bytes, when a
//! line that is not an access line comes, and every [`FLUSH_EVERY`] in any case. Under
//! load that is one `write(2)` per hundred-odd requests instead of one each.

use std::{
    cell::Cell,
    fmt::{self, Write as _},
    io::{self, Write as _},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{Event, Level, Metadata, Subscriber, field::Field};
use tracing_subscriber::{
    field::{RecordFields, Visit},
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter, format::Writer},
    registry::LookupSpan,
};

/// The target of the access line: `RUST_LOG=spillway::access=off` silences it.
pub const ACCESS: &str = "spillway::access";

/// Access lines held back this long at most.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Held-back lines go out once they are this many bytes.
const FLUSH_AT: usize = 32 * 1024;

/// Formats events (and, as [`SpanFields`], the request span's fields) as one line each.
#[derive(Debug, Clone, Copy)]
pub struct Lines {
    pub json: bool,
    pub colour: bool,
}

/// The fields of a span, formatted once when it opens, for every line inside it.
#[derive(Debug, Clone, Copy)]
pub struct SpanFields {
    pub json: bool,
}

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Fields { out: &mut writer, json: self.json, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let span = ctx.lookup_current();
        let extensions = span.as_ref().map(|span| span.extensions());
        let span_fields = extensions
            .as_ref()
            .and_then(|extensions| extensions.get::<FormattedFields<N>>())
            .map_or("", |fields| fields.fields.as_str());
        if self.json {
            out.write_str("{\"timestamp\":\"")?;
            timestamp(&mut out)?;
            out.write_str("\",\"level\":\"")?;
            out.write_str(meta.level().as_str())?;
            out.write_char('"')?;
            let mut visitor = Fields { out: &mut out, json: true, first: false, result: Ok(()) };
            event.record(&mut visitor);
            visitor.result?;
            out.write_str(",\"target\":")?;
            json_str(&mut out, meta.target())?;
            if let Some(span) = &span {
                out.write_str(",\"span\":{")?;
                if !span_fields.is_empty() {
                    out.write_str(span_fields)?;
                    out.write_char(',')?;
                }
                out.write_str("\"name\":")?;
                json_str(&mut out, span.name())?;
                out.write_char('}')?;
            }
            return out.write_str("}\n");
        }
        timestamp(&mut out)?;
        out.write_char(' ')?;
        level(&mut out, meta.level(), self.colour)?;
        out.write_char(' ')?;
        if let Some(span) = &span {
            out.write_str(span.name())?;
            out.write_char('{')?;
            out.write_str(span_fields)?;
            out.write_str("}: ")?;
        }
        out.write_str(meta.target())?;
        out.write_str(": ")?;
        let mut visitor = Fields { out: &mut out, json: false, first: true, result: Ok(()) };
        event.record(&mut visitor);
        visitor.result?;
        out.write_char('\n')
    }
}

/// Writes fields: `"name":value` after a comma for JSON, `name=value` after a space
/// for text (the text message unnamed, first).
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    json: bool,
    /// Nothing written yet (no separator before the first field).
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Writes the separator and name of `field`, then `value`.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>, bool) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let json = self.json;
        let first = std::mem::replace(&mut self.first, false);
        let out = &mut *self.out;
        self.result = (|| {
            match (json, first) {
                (true, true) => {}
                (true, false) => out.write_char(',')?,
                (false, true) if field.name() == "message" => return value(out, json),
                (false, true) => {}
                (false, false) => out.write_char(' ')?,
            }
            if json {
                out.write_char('"')?;
                out.write_str(field.name())?;
                out.write_str("\":")?;
            } else if field.name() != "message" {
                out.write_str(field.name())?;
                out.write_char('=')?;
            }
            value(out, json)
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out, json| match json {
            true => json_str(out, value),
            // Text quotes strings, as `Debug` would.
            false => {
                out.write_char('"')?;
                Escape { out, quotes: true }.write_str(value)?;
                out.write_char('"')
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out, _| decimal(out, value, false));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out, _| decimal(out, value.unsigned_abs(), value < 0));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out, json| match json && !value.is_finite() {
            true => out.write_str("null"),
            false => write!(out, "{value}"),
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out, _| out.write_str(if value { "true" } else { "false" }));
    }

    /// `%value`, `?value` and the message: their text, escaped; JSON quotes it.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out, json| {
            if json {
                out.write_char('"')?;
            }
            write!(Escape { out, quotes: json }, "{value:?}")?;
            if json { out.write_char('"') } else { Ok(()) }
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"));
    }
}

/// An integer in decimal, without the formatting machinery (most fields are numbers).
fn decimal(out: &mut Writer<'_>, mut value: u64, negative: bool) -> fmt::Result {
    let mut digits = [0u8; 21];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        digits[at] = b'-';
    }
    out.write_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"))
}

/// `text` as a JSON string.
fn json_str(out: &mut Writer<'_>, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escape { out, quotes: true }.write_str(text)?;
    out.write_char('"')
}

/// Writes text with control characters escaped (`\n`, `\u{1b}`…), and with
/// `quotes`, `"` and `\` too: valid inside a JSON string, one line in text.
struct Escape<'a, 'w> {
    out: &'a mut Writer<'w>,
    quotes: bool,
}

impl fmt::Write for Escape<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let special = |c: char| c.is_control() || (self.quotes && (c == '"' || c == '\\'));
        let mut rest = text;
        while let Some(at) = rest.find(special) {
            self.out.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '"' => self.out.write_str("\\\"")?,
                '\\' => self.out.write_str("\\\\")?,
                '\n' => self.out.write_str("\\n")?,
                '\r' => self.out.write_str("\\r")?,
                '\t' => self.out.write_str("\\t")?,
                c => write!(self.out, "\\u{:04x}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.out.write_str(rest)
    }
}

/// The level, five wide and right-aligned (` INFO`, `ERROR`), coloured on terminals.
fn level(out: &mut Writer<'_>, level: &Level, colour: bool) -> fmt::Result {
    let (text, colour_code) = match *level {
        Level::ERROR => ("ERROR", "\u{1b}[31m"),
        Level::WARN => (" WARN", "\u{1b}[33m"),
        Level::INFO => (" INFO", "\u{1b}[32m"),
        Level::DEBUG => ("DEBUG", "\u{1b}[34m"),
        Level::TRACE => ("TRACE", "\u{1b}[35m"),
    };
    if !colour {
        return out.write_str(text);
    }
    out.write_str(colour_code)?;
    out.write_str(text)?;
    out.write_str("\u{1b}[0m")
}

/// Now, as RFC 3339 in UTC to the microsecond: `2026-12-04T02:06:20.791710Z`. The
/// date and time to the second are worked out once a second per thread.
fn timestamp(out: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = now.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != seconds {
        text = civil(seconds);
        SECOND.set((seconds, text));
    }
    out.write_str(std::str::from_utf8(&text).unwrap_or("1970-01-01T00:00:00."))?;
    let micros = now.subsec_micros();
    let mut fraction = *b"000000Z";
    for (at, digit) in fraction[..6].iter_mut().enumerate() {
        *digit = b'0' + (micros / 10_u32.pow(5 - at as u32) % 10) as u8;
    }
    out.write_str(std::str::from_utf8(&fraction).unwrap_or("000000Z"))
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (days to a civil date after
/// Howard Hinnant's algorithm, proleptic Gregorian, years 0 to 9999).
fn civil(seconds: u64) -> [u8; 20] {
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = (year_of_era + era * 400 + i64::from(month <= 2)).clamp(0, 9999);
    let mut text = [0u8; 20];
    let mut put = |at: usize, value: i64, width: usize| {
        for i in (0..width).rev() {
            text[at + width - 1 - i] = b'0' + (value / 10_i64.pow(i as u32) % 10) as u8;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, (second_of_day / 3600) as i64, 2);
    put(14, (second_of_day / 60 % 60) as i64, 2);
    put(17, (second_of_day % 60) as i64, 2);
    for (at, separator) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.')] {
        text[at] = separator;
    }
    text
}

/// Where lines go: stdout, access lines through the buffer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stdout;

/// Access lines waiting for [`flush`].
static HELD: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Whether [`HELD`] may hold something: the park hook's check, without the lock.
static PENDING: AtomicBool = AtomicBool::new(false);

/// One line on its way out.
pub struct Line {
    /// An access line at `info`: may wait in the buffer.
    hold: bool,
}

impl<'a> MakeWriter<'a> for Stdout {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { hold: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line { hold: meta.target() == ACCESS && *meta.level() >= Level::INFO }
    }
}

impl io::Write for Line {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        held.extend_from_slice(line);
        if self.hold && held.len() < FLUSH_AT {
            PENDING.store(true, Ordering::Relaxed);
        } else {
            write_out(&mut held);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes out the access lines held back, if any: when a worker thread is about to
/// wait for work, every [`FLUSH_EVERY`], and at exit.
pub fn flush() {
    if PENDING.load(Ordering::Relaxed) {
        write_out(&mut HELD.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Writes `held` to stdout and empties it. A failed write (stdout closed) loses the
/// lines rather than keep them without bound.
fn write_out(held: &mut Vec<u8>) {
    PENDING.store(false, Ordering::Relaxed);
    if !held.is_empty() {
        let _ = io::stdout().lock().write_all(held);
        held.clear();
    }
    if held.capacity() > 4 * FLUSH_AT {
        // One huge line (a long error) should not keep its buffer for good.
        *held = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_instants() {
        let text = |seconds| String::from_utf8(civil(seconds).to_vec()).unwrap_or_default();
        assert_eq!(text(0), "1970-01-01T00:00:00.");
        assert_eq!(text(951_782_400), "2000-02-29T00:00:00.");
        assert_eq!(text(1_796_342_380), "2026-12-03T23:59:40.");
        assert_eq!(text(4_102_444_799), "2099-12-31T23:59:59.");
    }
}
