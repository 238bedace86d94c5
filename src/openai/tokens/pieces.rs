//! Splitting text into the pieces that byte-pair encoding sees, exactly as tiktoken's
//! patterns split them, without a regex engine: a small scanner per pattern over a
//! table of character classes.
//!
//! The patterns (tiktoken's `pat_str`; `P` is `[^\r\n\p{L}\p{N}]`, `C` the
//! contractions `(?i:'s|'t|'re|'ve|'m|'ll|'d)`):
//!
//! - cl100k_base: `C | P?\p{L}+ | \p{N}{1,3} | ␠?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ |
//!   \s+(?!\S) | \s+`
//! - o200k_base: `P?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+C? |
//!   P?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*C? | \p{N}{1,3} |
//!   ␠?[^\s\p{L}\p{N}]+[\r\n/]* | \s*[\r\n]+ | \s+(?!\S) | \s+`
//!
//! Each alternative is tried in order at the start of the next piece and the first that
//! matches wins, with the backtracking a regex does inside it (the scanners below say
//! where). The character classes come from `regex-syntax`'s Unicode tables, the ones
//! tiktoken's own matcher uses; a table of the Basic Multilingual Plane answers most
//! characters in one lookup. The tests hold the scanners to a regex-built tokenizer on
//! random text.

use std::sync::OnceLock;

/// Which encoding's pattern to split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pattern {
    Cl100k,
    O200k,
}

/// The pieces of `text` under `pattern`, in order; together they are `text`.
pub(super) fn split(pattern: Pattern, text: &str) -> Pieces<'_> {
    Pieces { scan: Scan { text, classes: classes() }, pattern, at: 0 }
}

/// Builds the character class table now (a few milliseconds), not on first use.
pub(super) fn warm_up() {
    classes();
}

/// Character classes, one bit each.
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`: o200k's upper-case-ish run.
const UPPER: u8 = 4;
/// `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`: o200k's lower-case-ish run.
const LOWER: u8 = 8;
/// `\s`: Unicode `White_Space`.
const SPACE: u8 = 16;

/// Every character's classes.
struct Classes {
    /// The Basic Multilingual Plane, indexed by code point.
    plane0: Box<[u8; 0x10000]>,
    /// Above it: `(first, last, classes)`, sorted, for the characters that have any.
    above: Vec<(u32, u32, u8)>,
}

impl Classes {
    fn of(&self, c: char) -> u8 {
        let code = c as u32;
        if let Some(classes) = self.plane0.get(code as usize) {
            return *classes;
        }
        let at = self.above.partition_point(|&(_, last, _)| last < code);
        match self.above.get(at) {
            Some(&(first, _, classes)) if first <= code => classes,
            _ => 0,
        }
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut plane0 = Box::new([0u8; 0x10000]);
        let mut above: Vec<(u32, u32, u8)> = Vec::new();
        for (class, bit) in [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", UPPER),
            (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", LOWER),
            (r"\s", SPACE),
        ] {
            for (first, last) in ranges(class) {
                for code in first..=last.min(0xFFFF) {
                    plane0[code as usize] |= bit;
                }
                if last > 0xFFFF {
                    above.push((first.max(0x10000), last, bit));
                }
            }
        }
        Classes { plane0, above: merge(above) }
    })
}

/// The code point ranges of a Unicode class, from `regex-syntax`.
fn ranges(class: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    match regex_syntax::parse(class).map(|hir| hir.into_kind()) {
        Ok(HirKind::Class(Class::Unicode(class))) => {
            class.ranges().iter().map(|range| (range.start() as u32, range.end() as u32)).collect()
        }
        // The classes above are fixed and parse; nothing else can reach here.
        _ => Vec::new(),
    }
}

/// Overlapping `(first, last, bit)` ranges as disjoint sorted ones with every bit
/// that applies.
fn merge(ranges: Vec<(u32, u32, u8)>) -> Vec<(u32, u32, u8)> {
    let mut cuts: Vec<u32> = ranges.iter().flat_map(|&(first, last, _)| [first, last + 1]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut merged: Vec<(u32, u32, u8)> = Vec::new();
    for window in cuts.windows(2) {
        let (first, last) = (window[0], window[1] - 1);
        let bits = ranges
            .iter()
            .filter(|&&(from, to, _)| from <= first && last <= to)
            .fold(0, |bits, &(_, _, bit)| bits | bit);
        match merged.last_mut() {
            _ if bits == 0 => {}
            Some((_, end, previous)) if *previous == bits && *end + 1 == first => *end = last,
            _ => merged.push((first, last, bits)),
        }
    }
    merged
}

/// The iterator [`split`] returns.
pub(super) struct Pieces<'a> {
    scan: Scan<'a>,
    pattern: Pattern,
    at: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let start = self.at;
        if start >= self.scan.text.len() {
            return None;
        }
        let end = match self.pattern {
            Pattern::Cl100k => self.scan.cl100k(start),
            Pattern::O200k => self.scan.o200k(start),
        };
        // Every scanner takes at least one character; this only guards the loop.
        let end = end.max(start + self.scan.width(start));
        self.at = end;
        self.scan.text.get(start..end)
    }
}

/// The scanners, over one text; positions are byte offsets on character boundaries.
struct Scan<'a> {
    text: &'a str,
    classes: &'static Classes,
}

impl Scan<'_> {
    /// The character at `at` and its classes, or `None` at the end.
    fn at(&self, at: usize) -> Option<(char, u8)> {
        let byte = *self.text.as_bytes().get(at)?;
        if byte < 0x80 {
            return Some((byte as char, self.classes.plane0[byte as usize]));
        }
        let c = self.text.get(at..)?.chars().next()?;
        Some((c, self.classes.of(c)))
    }

    /// The UTF-8 length of the character at `at` (1 at the end, to make progress).
    fn width(&self, at: usize) -> usize {
        self.at(at).map_or(1, |(c, _)| c.len_utf8())
    }

    /// Where the run of characters that `take` accepts, from `at`, ends.
    fn run(&self, mut at: usize, take: impl Fn(char, u8) -> bool) -> usize {
        while let Some((c, classes)) = self.at(at) {
            if !take(c, classes) {
                break;
            }
            at += c.len_utf8();
        }
        at
    }

    /// The end of `C`, the contractions (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`,
    /// any case), if one starts at `at`.
    fn contraction(&self, at: usize) -> Option<usize> {
        let (quote, _) = self.at(at)?;
        if quote != '\'' {
            return None;
        }
        let (first, _) = self.at(at + 1)?;
        let after = at + 1 + first.len_utf8();
        // `(?i)` folds the long s (U+017F) to `s` too.
        let second = |expected: char| self.at(after).is_some_and(|(c, _)| c.eq_ignore_ascii_case(&expected));
        match first.to_ascii_lowercase() {
            's' | 't' | 'm' | 'd' | 'ſ' => Some(after),
            'r' | 'v' if second('e') => Some(after + 1),
            'l' if second('l') => Some(after + 1),
            _ => None,
        }
    }

    /// A character `P` accepts: `[^\r\n\p{L}\p{N}]`.
    fn prefix(c: char, classes: u8) -> bool {
        classes & (LETTER | NUMBER) == 0 && c != '\r' && c != '\n'
    }

    /// A character `[^\s\p{L}\p{N}]` accepts.
    fn punctuation(classes: u8) -> bool {
        classes & (LETTER | NUMBER | SPACE) == 0
    }

    /// `\p{N}{1,3}` at `at`.
    fn digits(&self, at: usize) -> Option<usize> {
        let mut end = at;
        for _ in 0..3 {
            match self.at(end) {
                Some((c, classes)) if classes & NUMBER != 0 => end += c.len_utf8(),
                _ => break,
            }
        }
        (end > at).then_some(end)
    }

    /// `␠?[^\s\p{L}\p{N}]+` followed by any run of the characters in `tail`.
    fn punctuation_run(&self, at: usize, tail: &[char]) -> Option<usize> {
        let start = match self.at(at) {
            Some((' ', _)) if self.at(at + 1).is_some_and(|(_, classes)| Self::punctuation(classes)) => {
                at + 1
            }
            _ => at,
        };
        let end = self.run(start, |_, classes| Self::punctuation(classes));
        (end > start).then(|| self.run(end, |c, _| tail.contains(&c)))
    }

    /// `\s*[\r\n]+ | \s+(?!\S) | \s+` at `at`, which is white space.
    fn space(&self, at: usize) -> usize {
        let end = self.run(at, |_, classes| classes & SPACE != 0);
        // `\s*[\r\n]+` backtracks to the last line end of the run.
        if let Some(line_end) = self.text[at..end].rfind(['\r', '\n']) {
            return at + line_end + 1;
        }
        // `\s+(?!\S)`: all of it at the end of the text, else all but its last
        // character, if that leaves any.
        if end == self.text.len() {
            return end;
        }
        let last = self.text[at..end].chars().next_back().map_or(0, char::len_utf8);
        match end - last > at {
            true => end - last,
            false => end,
        }
    }

    fn cl100k(&self, at: usize) -> usize {
        let Some((c, classes)) = self.at(at) else { return at };
        if let Some(end) = self.contraction(at) {
            return end;
        }
        // `P?\p{L}+`
        let letters = |from| self.run(from, |_, classes| classes & LETTER != 0);
        if classes & LETTER != 0 {
            return letters(at);
        }
        let next = at + c.len_utf8();
        if Self::prefix(c, classes) && self.at(next).is_some_and(|(_, classes)| classes & LETTER != 0) {
            return letters(next);
        }
        if let Some(end) = self.digits(at) {
            return end;
        }
        if let Some(end) = self.punctuation_run(at, &['\r', '\n']) {
            return end;
        }
        self.space(at)
    }

    fn o200k(&self, at: usize) -> usize {
        let Some((c, classes)) = self.at(at) else { return at };
        let next = at + c.len_utf8();
        let prefixed = Self::prefix(c, classes);
        // Each word form, with `P?` tried first with its character, then without.
        for word in [Self::mixed_word, Self::upper_word] {
            if prefixed && let Some(end) = word(self, next) {
                return end;
            }
            if let Some(end) = word(self, at) {
                return end;
            }
        }
        if let Some(end) = self.digits(at) {
            return end;
        }
        if let Some(end) = self.punctuation_run(at, &['\r', '\n', '/']) {
            return end;
        }
        self.space(at)
    }

    /// `[UPPER]*[LOWER]+C?` at `at`. The greedy upper run gives back characters, last
    /// first, until a lower one can follow it.
    fn mixed_word(&self, at: usize) -> Option<usize> {
        let mut upper_end = self.run(at, |_, classes| classes & UPPER != 0);
        loop {
            if self.at(upper_end).is_some_and(|(_, classes)| classes & LOWER != 0) {
                let end = self.run(upper_end, |_, classes| classes & LOWER != 0);
                return Some(self.contraction(end).unwrap_or(end));
            }
            if upper_end == at {
                return None;
            }
            upper_end = self.text[..upper_end].char_indices().next_back().map_or(at, |(start, _)| start);
        }
    }

    /// `[UPPER]+[LOWER]*C?` at `at`.
    fn upper_word(&self, at: usize) -> Option<usize> {
        let upper_end = self.run(at, |_, classes| classes & UPPER != 0);
        if upper_end == at {
            return None;
        }
        let end = self.run(upper_end, |_, classes| classes & LOWER != 0);
        Some(self.contraction(end).unwrap_or(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pattern: Pattern, text: &str) -> Vec<&str> {
        split(pattern, text).collect()
    }

    #[test]
    fn splits_like_tiktoken() {
        assert_eq!(
            pieces(Pattern::Cl100k, "Hello world!!\n\n  it's 12345"),
            ["Hello", " world", "!!\n\n", " ", " it", "'s", " ", "123", "45"]
        );
        assert_eq!(
            pieces(Pattern::O200k, "Hello WORLD's x/y\n//z!\n/  "),
            ["Hello", " WORLD's", " x", "/y", "\n", "//", "z", "!\n/", "  "]
        );
        assert_eq!(pieces(Pattern::O200k, "中文テキスト ÀÉÎ"), ["中文テキスト", " ÀÉÎ"]);
    }

    #[test]
    fn classes_come_from_the_unicode_tables() {
        let classes = classes();
        assert_eq!(classes.of('a'), LETTER | LOWER);
        assert_eq!(classes.of('A'), LETTER | UPPER);
        assert_eq!(classes.of('7'), NUMBER);
        assert_eq!(classes.of('\u{3000}'), SPACE);
        assert_eq!(classes.of('\u{0301}'), UPPER | LOWER, "a combining mark");
        assert_eq!(classes.of('\u{1D400}'), LETTER | UPPER, "mathematical bold A, above the BMP");
        assert_eq!(classes.of('\u{1F600}'), 0, "an emoji");
    }
}
