//! A JSON reader that goes over a document once, checking its syntax as it goes and
//! handing the caller only the members it asks for, everything else skipped without
//! being decoded: no allocation, no value built, strings left as the bytes they are
//! until someone wants one as text.
//!
//! It exists for the streamed chunks the gateway reads by the dozen per response,
//! where serde's derive spent some 6 000 instructions a chunk matching every key and
//! validating every string. The syntax checked is RFC 8259's; nesting deeper than
//! [`MAX_DEPTH`] is refused, as serde_json refuses it.

use std::borrow::Cow;

/// Containers nested deeper than this are refused (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// The bytes that end a run of plain text in a string: `"`, `\` and the control
/// characters.
static STRING_STOP: [bool; 256] = {
    let mut stop = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        stop[byte] = true;
        byte += 1;
    }
    stop[b'"' as usize] = true;
    stop[b'\\' as usize] = true;
    stop
};

/// Where the plain text of a string that continues at `at` ends: at the first `"`,
/// `\\` or control character. Eight bytes at a time (a word test: a byte below 0x20,
/// or equal to `"` or `\\`, sets its high bit in `stops`; a false one can only come
/// after a true one, so the lowest is the answer), byte by byte in the last few.
/// Chunks are full of short strings, where a vectorised search costs more to set up
/// than it saves.
fn plain_run(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let stops = word.wrapping_sub(ONES * 0x20) & !word & HIGHS
            | zero_byte(word ^ (ONES * u64::from(b'"')))
            | zero_byte(word ^ (ONES * u64::from(b'\\')));
        if stops != 0 {
            return at + (stops.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while bytes.get(at).is_some_and(|&byte| !STRING_STOP[usize::from(byte)]) {
        at += 1;
    }
    at
}

/// The input is not JSON (or not the JSON the caller expects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// A JSON document being read, from its start.
pub struct Skim<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// A string as written: the bytes between its quotes.
#[derive(Debug, Clone, Copy)]
pub struct Str<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl<'a> Str<'a> {
    /// The string decoded, as bytes to match a key against (as serde matches field
    /// names): borrowed unless it has escapes.
    pub fn name(&self) -> Result<Cow<'a, [u8]>, Malformed> {
        match self.escaped {
            false => Ok(Cow::Borrowed(self.raw)),
            true => Ok(Cow::Owned(self.text()?.into_owned().into_bytes())),
        }
    }

    /// The string's text, decoded (borrowed when it has no escapes). `Err` when it is
    /// not UTF-8 or has a lone surrogate escape.
    pub fn text(&self) -> Result<Cow<'a, str>, Malformed> {
        if !self.escaped {
            return std::str::from_utf8(self.raw).map(Cow::Borrowed).map_err(|_| Malformed);
        }
        let quoted = [b"\"", self.raw, b"\""].concat();
        serde_json::from_slice::<String>(&quoted).map(Cow::Owned).map_err(|_| Malformed)
    }
}

impl<'a> Skim<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// Skips white space, then looks at the next byte.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&byte) = self.bytes.get(self.at) {
            if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    fn expect(&mut self, byte: u8) -> Result<(), Malformed> {
        match self.peek() {
            Some(found) if found == byte => {
                self.at += 1;
                Ok(())
            }
            _ => Err(Malformed),
        }
    }

    /// Nothing but white space is left.
    pub fn end(&mut self) -> Result<(), Malformed> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Malformed),
        }
    }

    /// Consumes a `null`, if that is what comes next.
    pub fn null(&mut self) -> bool {
        let is_null = self.peek() == Some(b'n') && self.bytes[self.at..].starts_with(b"null");
        if is_null {
            self.at += 4;
        }
        is_null
    }

    /// A string: a quote, text with valid escapes and no control characters, a quote.
    pub fn string(&mut self) -> Result<Str<'a>, Malformed> {
        self.expect(b'"')?;
        let start = self.at;
        let mut escaped = false;
        loop {
            self.at = plain_run(self.bytes, self.at);
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Str { raw: &self.bytes[start..self.at - 1], escaped });
                }
                Some(b'\\') => {}
                // A control character, or the end of the input.
                _ => return Err(Malformed),
            }
            escaped = true;
            let escape = self.bytes.get(self.at + 1).ok_or(Malformed)?;
            self.at += match escape {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                b'u' => {
                    let hex = self.bytes.get(self.at + 2..self.at + 6).ok_or(Malformed)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Malformed);
                    }
                    6
                }
                _ => return Err(Malformed),
            };
        }
    }

    /// An object: `member(key, self)` is called for each member and must read its
    /// value (with [`Skim::value`] to skip it).
    pub fn object(
        &mut self,
        mut member: impl FnMut(Str<'a>, &mut Self) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            member(key, self)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
        }
    }

    /// An array: `element(self)` is called for each element and must read it.
    pub fn array(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Result<(), Malformed>,
    ) -> Result<(), Malformed> {
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(Malformed),
            }
        }
    }

    /// Reads any value and returns it as written.
    pub fn raw(&mut self) -> Result<&'a [u8], Malformed> {
        self.peek();
        let start = self.at;
        self.value()?;
        Ok(&self.bytes[start..self.at])
    }

    /// Reads any value, checking its syntax, keeping nothing. Containers are followed
    /// with a stack of their kinds, not by recursion, so depth costs no stack.
    pub fn value(&mut self) -> Result<(), Malformed> {
        // Whether each open container is an object (`true`) or an array.
        let mut open: Vec<bool> = Vec::new();
        loop {
            // A value.
            match self.peek().ok_or(Malformed)? {
                b'"' => {
                    self.string()?;
                }
                b'{' | b'[' => {
                    let object = self.bytes[self.at] == b'{';
                    self.at += 1;
                    if open.len() + 1 >= MAX_DEPTH {
                        return Err(Malformed);
                    }
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.at += 1;
                    } else {
                        open.push(object);
                        if object {
                            self.string()?;
                            self.expect(b':')?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return Err(Malformed),
            }
            // After a value: the next member or element, or the end of containers.
            loop {
                let Some(&object) = open.last() else { return Ok(()) };
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if object {
                            self.string()?;
                            self.expect(b':')?;
                        }
                        break;
                    }
                    Some(b'}') if object => {
                        self.at += 1;
                        open.pop();
                    }
                    Some(b']') if !object => {
                        self.at += 1;
                        open.pop();
                    }
                    _ => return Err(Malformed),
                }
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Malformed> {
        match self.bytes[self.at..].starts_with(word) {
            true => {
                self.at += word.len();
                Ok(())
            }
            false => Err(Malformed),
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<(), Malformed> {
        let digits = |skim: &mut Self| {
            let start = skim.at;
            while skim.bytes.get(skim.at).is_some_and(u8::is_ascii_digit) {
                skim.at += 1;
            }
            skim.at - start
        };
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.bytes.get(self.at) {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(Malformed),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return Err(Malformed);
            }
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(Malformed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn valid(text: &str) -> bool {
        let mut skim = Skim::new(text.as_bytes());
        skim.value().and_then(|()| skim.end()).is_ok()
    }

    #[test]
    fn takes_json_and_nothing_else() {
        for good in [
            "null",
            " true ",
            "-0.5e+10",
            "\"a\\u00e9\\n\"",
            "[]",
            "{}",
            "[1,[2,{\"a\":[]}],\"x\"]",
            "{\"a\":{\"b\":null},\"c\":[true,false]}",
        ] {
            assert!(valid(good), "{good}");
        }
        for bad in [
            "",
            "nul",
            "01",
            "1.",
            "-",
            "1e",
            "\"a",
            "\"\\x\"",
            "\"\u{1}\"",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{\"a\":}",
            "{1:2}",
            "[1 2]",
            "{\"a\":1,}",
            "[}",
            "{]",
            "1 2",
            "\"\\u12G4\"",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(!valid(&deep), "nesting past the limit");
        let fine = "[".repeat(MAX_DEPTH - 2) + &"]".repeat(MAX_DEPTH - 2);
        assert!(valid(&fine));
    }

    proptest! {
        #[test]
        fn plain_runs_end_at_the_first_stop_byte(bytes in prop::collection::vec(any::<u8>(), 0..40), at in 0usize..40) {
            let at = at.min(bytes.len());
            let expected = bytes[at..].iter().position(|&byte| STRING_STOP[usize::from(byte)]).map_or(bytes.len(), |offset| at + offset);
            prop_assert_eq!(plain_run(&bytes, at), expected);
        }
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |n| n.is_finite()).prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::vec((".{0,4}", inner), 0..5)
                    .prop_map(|members| serde_json::Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json_on_what_is_json(text in ".{0,24}") {
            let serde = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
            prop_assert_eq!(valid(&text), serde, "{:?}", text);
        }

        #[test]
        fn reads_whatever_serde_json_writes(value in json(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) };
            let text = text.unwrap_or_default();
            prop_assert!(valid(&text), "{}", text);
            let mut skim = Skim::new(text.as_bytes());
            prop_assert_eq!(skim.raw().ok(), Some(text.trim().as_bytes()));
        }
    }
}
