//! Canonical JSON: one byte string for every way of writing the same JSON document,
//! so that two semantically equal request bodies get the same cache key.
//!
//! The canonical form has object members sorted by their unescaped key (bytewise;
//! a repeated key keeps its last value, as `serde_json` does), no insignificant
//! whitespace, and strings written from their unescaped value with `serde_json`'s
//! escaping (so `"\u00e9"` and `"é"` are the same string). Numbers and array order
//! are kept exactly as written: `0.70` stays `0.70`, and `1`, `1.0` and `1e0` stay
//! three different bodies, because an upstream may treat them differently and a
//! cache must never guess that it does not.
//!
//! One linear pass builds a small tree that borrows from the input (numbers,
//! literals and strings already in canonical form are never copied), then one pass
//! writes it out; strings are scanned eight bytes at a time. Nesting is bounded by
//! [`MAX_DEPTH`], so no input can exhaust the stack. This module only canonicalizes;
//! hashing the result belongs to [`super::CacheKey`].

use std::borrow::Cow;

/// Containers (objects and arrays) may nest this deep and no deeper: `serde_json`'s
/// own limit, so every body it parses has a canonical form.
pub const MAX_DEPTH: usize = 127;

/// Why a body has no canonical form (the cache stage then bypasses the cache).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("body is not valid JSON at byte {offset}: {reason}")]
    Invalid { offset: usize, reason: &'static str },
    #[error("body nests JSON deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// The canonical form of a JSON document (see the module doc).
///
/// # Errors
/// [`CanonicalError::Invalid`] for anything `serde_json` would refuse as JSON (bad
/// UTF-8, syntax, control characters or lone surrogates in strings, trailing
/// characters), except that numbers too large for an `f64` are accepted and kept as
/// written; [`CanonicalError::TooDeep`] past [`MAX_DEPTH`] levels of nesting.
pub fn canonical_json(body: &[u8]) -> Result<Vec<u8>, CanonicalError> {
    let text = std::str::from_utf8(body)
        .map_err(|error| CanonicalError::Invalid { offset: error.valid_up_to(), reason: "not UTF-8" })?;
    let mut parser = Parser { text, pos: 0 };
    parser.skip_whitespace();
    let node = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != text.len() {
        return Err(parser.invalid("trailing characters after the document"));
    }
    let mut out = Vec::with_capacity(body.len());
    node.write(&mut out);
    Ok(out)
}

/// A parsed value, borrowing from the input wherever it can be written back as is.
enum Node<'a> {
    /// Written unchanged: a number or literal, or a string (quotes included)
    /// already in canonical form.
    Raw(&'a str),
    /// Any other string, unescaped; escaped again on output.
    Text(String),
    Array(Vec<Node<'a>>),
    /// Members sorted by key, each key once.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

// === impl Parser ===

impl<'a> Parser<'a> {
    fn invalid(&self, reason: &'static str) -> CanonicalError {
        CanonicalError::Invalid { offset: self.pos, reason }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    /// The input from the current position on.
    fn rest(&self) -> &'a [u8] {
        self.text.as_bytes().get(self.pos..).unwrap_or_default()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.pos += usize::from(found);
        found
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// A value starting at the current position; `depth` containers enclose it.
    fn value(&mut self, depth: usize) -> Result<Node<'a>, CanonicalError> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string_value(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(_) => Err(self.invalid("expected a value")),
            None => Err(self.invalid("unexpected end of input")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node<'a>, CanonicalError> {
        if depth > MAX_DEPTH {
            return Err(CanonicalError::TooDeep);
        }
        self.pos += 1;
        let mut members = Vec::new();
        self.skip_whitespace();
        if !self.eat(b'}') {
            loop {
                self.skip_whitespace();
                if self.peek() != Some(b'"') {
                    return Err(self.invalid("expected a string key"));
                }
                let key = self.string()?;
                self.skip_whitespace();
                if !self.eat(b':') {
                    return Err(self.invalid("expected `:`"));
                }
                self.skip_whitespace();
                members.push((key, self.value(depth)?));
                self.skip_whitespace();
                if self.eat(b'}') {
                    break;
                }
                if !self.eat(b',') {
                    return Err(self.invalid("expected `,` or `}`"));
                }
            }
        }
        // Stable, so equal keys stay in document order; then each run of equal keys
        // keeps the last one's value.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        members.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        Ok(Node::Object(members))
    }

    fn array(&mut self, depth: usize) -> Result<Node<'a>, CanonicalError> {
        if depth > MAX_DEPTH {
            return Err(CanonicalError::TooDeep);
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if !self.eat(b']') {
            loop {
                self.skip_whitespace();
                items.push(self.value(depth)?);
                self.skip_whitespace();
                if self.eat(b']') {
                    break;
                }
                if !self.eat(b',') {
                    return Err(self.invalid("expected `,` or `]`"));
                }
            }
        }
        Ok(Node::Array(items))
    }

    /// A string value: written back as is when its text already is canonical (no
    /// escapes, or only those `serde_json` writes), else unescaped to be escaped again.
    fn string_value(&mut self) -> Result<Node<'a>, CanonicalError> {
        let start = self.pos;
        if self.scan_string()? {
            return Ok(Node::Raw(&self.text[start..self.pos]));
        }
        self.pos = start;
        Ok(Node::Text(self.string()?.into_owned()))
    }

    /// Checks the string at the current position and moves past it; whether its
    /// text, quotes included, is already in canonical form.
    fn scan_string(&mut self) -> Result<bool, CanonicalError> {
        self.pos += 1;
        let mut canonical = true;
        loop {
            let Some(found) = find_special(self.rest()) else {
                return Err(self.invalid("unterminated string"));
            };
            self.pos += found;
            let escape = self.pos;
            if self.eat(b'"') {
                return Ok(canonical);
            }
            if !self.eat(b'\\') {
                return Err(self.invalid("control character in a string"));
            }
            let unescaped = self.escape()?;
            canonical &= escaped_char(unescaped) == Some(&self.text[escape..self.pos]);
        }
    }

    /// The unescaped value of the string at the current position (borrowed when it
    /// has no escapes), moving past it.
    fn string(&mut self) -> Result<Cow<'a, str>, CanonicalError> {
        self.pos += 1;
        let mut owned: Option<String> = None;
        let mut segment = self.pos;
        loop {
            let Some(found) = find_special(self.rest()) else {
                return Err(self.invalid("unterminated string"));
            };
            self.pos += found;
            let plain = &self.text[segment..self.pos];
            if self.eat(b'"') {
                return Ok(match owned {
                    Some(mut text) => {
                        text.push_str(plain);
                        Cow::Owned(text)
                    }
                    None => Cow::Borrowed(plain),
                });
            }
            if !self.eat(b'\\') {
                return Err(self.invalid("control character in a string"));
            }
            let text = owned.get_or_insert_with(String::new);
            text.push_str(plain);
            text.push(self.escape()?);
            segment = self.pos;
        }
    }

    /// The character of the escape after a backslash (the position is just past it).
    fn escape(&mut self) -> Result<char, CanonicalError> {
        let Some(kind) = self.peek() else {
            return Err(self.invalid("unterminated string"));
        };
        self.pos += 1;
        Ok(match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xD800..=0xDBFF => {
                        if !(self.eat(b'\\') && self.eat(b'u')) {
                            return Err(self.invalid("lone leading surrogate in a string"));
                        }
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.invalid("lone leading surrogate in a string"));
                        }
                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(self.invalid("lone trailing surrogate in a string")),
                    code => code,
                };
                char::from_u32(code).ok_or_else(|| self.invalid("invalid unicode escape"))?
            }
            _ => {
                self.pos -= 1;
                return Err(self.invalid("invalid escape in a string"));
            }
        })
    }

    /// Four hex digits of a `\u` escape.
    fn hex4(&mut self) -> Result<u32, CanonicalError> {
        let digits = self.rest().get(..4).unwrap_or(self.rest());
        let mut code = 0;
        for &digit in digits {
            let value = (digit as char).to_digit(16).ok_or_else(|| self.invalid("invalid unicode escape"))?;
            code = code * 16 + value;
            self.pos += 1;
        }
        if digits.len() < 4 {
            return Err(self.invalid("unterminated string"));
        }
        Ok(code)
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, kept as written.
    fn number(&mut self) -> Result<Node<'a>, CanonicalError> {
        let start = self.pos;
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.invalid("expected a digit")),
        }
        if self.eat(b'.') {
            self.required_digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.required_digits()?;
        }
        Ok(Node::Raw(&self.text[start..self.pos]))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn required_digits(&mut self) -> Result<(), CanonicalError> {
        let start = self.pos;
        self.digits();
        if self.pos == start {
            return Err(self.invalid("expected a digit"));
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static str) -> Result<Node<'a>, CanonicalError> {
        if !self.rest().starts_with(word.as_bytes()) {
            return Err(self.invalid("expected a value"));
        }
        self.pos += word.len();
        Ok(Node::Raw(word))
    }
}

// === impl Node ===

impl Node<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Raw(text) => out.extend_from_slice(text.as_bytes()),
            Self::Text(text) => write_string(out, text),
            Self::Array(items) => {
                out.push(b'[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Self::Object(members) => {
                out.push(b'{');
                for (index, (key, value)) in members.iter().enumerate() {
                    if index > 0 {
                        out.push(b',');
                    }
                    write_string(out, key);
                    out.push(b':');
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }
}

/// A JSON string escaped as `serde_json` escapes it: `"`, `\` and control
/// characters only (short forms where JSON has them, else `\u00xx`).
fn write_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let mut rest = text.as_bytes();
    while let Some((plain, special)) = find_special(rest).and_then(|found| rest.split_at_checked(found)) {
        out.extend_from_slice(plain);
        let Some((&byte, after)) = special.split_first() else { break };
        out.extend_from_slice(escaped(byte).unwrap_or_default().as_bytes());
        rest = after;
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// How `serde_json` writes `byte` inside a string, if it escapes it.
fn escaped(byte: u8) -> Option<&'static str> {
    const CONTROL: [&str; 32] = [
        "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007", "\\b", "\\t",
        "\\n", "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010", "\\u0011", "\\u0012", "\\u0013",
        "\\u0014", "\\u0015", "\\u0016", "\\u0017", "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c",
        "\\u001d", "\\u001e", "\\u001f",
    ];
    match byte {
        b'"' => Some("\\\""),
        b'\\' => Some("\\\\"),
        _ => CONTROL.get(usize::from(byte)).copied(),
    }
}

fn escaped_char(c: char) -> Option<&'static str> {
    u8::try_from(c).ok().and_then(escaped)
}

/// Where the first byte a string cannot hold as is (`"`, `\`, a control character)
/// is, eight bytes at a time.
fn find_special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    // A byte's high bit is set where it is zero (or below `n`); bytes after the first
    // such byte may be flagged wrongly, never bytes before it, so the lowest flag is
    // exact.
    let zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let below = |word: u64, n: u64| word.wrapping_sub(ONES * n) & !word & HIGHS;
    let (words, tail) = bytes.as_chunks::<8>();
    for (index, word) in words.iter().enumerate() {
        let word = u64::from_le_bytes(*word);
        let flags = zero(word ^ (ONES * u64::from(b'"')))
            | zero(word ^ (ONES * u64::from(b'\\')))
            | below(word, 0x20);
        if flags != 0 {
            return Some(index * 8 + (flags.trailing_zeros() / 8) as usize);
        }
    }
    let found = tail.iter().position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)?;
    Some(words.len() * 8 + found)
}

#[cfg(test)]
mod tests;
