//! Config errors as an operator reads them: `file:line:col: error: message`, with an
//! optional `= help:` line.
//!
//! This module owns the [`Diagnostic`] type, turning byte offsets into line and
//! column ([`Locator`]) and the "did you mean" hint. It does not decide what is an
//! error; `interpolate`, `raw` and `validate` do.

use std::{fmt, ops::Range};

use super::interpolate::OffsetMap;

/// One problem in a config file.
///
/// Messages are lower-case, name the offending value (never a secret) and carry a
/// hint where one helps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as given on the command line.
    pub file: String,
    /// 1-based line in the original (not interpolated) file; 0 when the problem is
    /// the file as a whole (e.g. it cannot be read).
    pub line: usize,
    /// 1-based column, in characters; 0 together with `line`.
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A problem at `line:col` of `file`.
    pub fn new(file: &str, (line, col): (usize, usize), message: impl Into<String>) -> Self {
        Self { file: file.to_owned(), line, col, message: message.into(), hint: None }
    }

    /// A problem with the file as a whole.
    pub fn whole_file(file: &str, message: impl Into<String>) -> Self {
        Self::new(file, (0, 0), message)
    }

    /// Adds a `= help:` line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a `= help:` line when there is one.
    pub fn with_hint_opt(mut self, hint: Option<String>) -> Self {
        self.hint = hint.or(self.hint);
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: error: {}", self.file, self.message)?,
            line => write!(f, "{}:{line}:{}: error: {}", self.file, self.col, self.message)?,
        }
        match &self.hint {
            Some(hint) => write!(f, "\n  = help: {hint}"),
            None => Ok(()),
        }
    }
}

/// Every problem found in one config, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Sorts by position, so `spillway check` reads top to bottom.
    pub fn sorted(mut list: Vec<Diagnostic>) -> Self {
        list.sort_by_key(|d| (d.line, d.col));
        Self(list)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(diagnostic: Diagnostic) -> Self {
        Self(vec![diagnostic])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Positions diagnostics in the original file, given byte spans of the
/// interpolated text that TOML and serde saw.
pub(crate) struct Locator<'a> {
    pub file: &'a str,
    pub original: &'a str,
    pub map: &'a OffsetMap,
}

impl Locator<'_> {
    /// A diagnostic at the start of `span` (a span of the interpolated text).
    ///
    /// An empty span at 0 marks a built-in default, which has no position; it is
    /// reported at the top of the file.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.file, self.position(span), message)
    }

    /// 1-based line and column of the start of `span` in the original file.
    pub fn position(&self, span: Range<usize>) -> (usize, usize) {
        line_col(self.original, self.map.to_original(span.start))
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// `did you mean `…`?` for the candidate closest to `given`, if one is close: at
/// most a third of its letters edited (a swap counts once), or sharing most of a
/// long prefix (`admin` → `admin_listen`).
pub(crate) fn did_you_mean<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::damerau_levenshtein(given, candidate), candidate))
        .filter(|&(distance, candidate)| {
            distance <= (candidate.chars().count() / 3).max(1)
                || strsim::jaro_winkler(given, candidate) > 0.85
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| format!("did you mean `{candidate}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_position_and_hint() {
        let diagnostic = Diagnostic::new("spillway.toml", (3, 7), "unknown field `listne`")
            .with_hint("did you mean `listen`?");
        assert_eq!(
            diagnostic.to_string(),
            "spillway.toml:3:7: error: unknown field `listne`\n  = help: did you mean `listen`?"
        );
        let whole = Diagnostic::whole_file("missing.toml", "cannot read file: gone");
        assert_eq!(whole.to_string(), "missing.toml: error: cannot read file: gone");
    }

    #[test]
    fn diagnostics_print_one_per_line_in_file_order() {
        let list = Diagnostics::sorted(vec![
            Diagnostic::new("a.toml", (9, 1), "second"),
            Diagnostic::new("a.toml", (2, 5), "first"),
        ]);
        assert_eq!(list.to_string(), "a.toml:2:5: error: first\na.toml:9:1: error: second");
    }

    #[test]
    fn line_col_counts_characters_from_one() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 4), (1, 5));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 10), (2, 4)); // `=` after the two-byte `é`
        assert_eq!(line_col(text, 999), (3, 1));
    }

    #[test]
    fn did_you_mean_picks_the_closest_name() {
        let fields = ["listen", "admin_listen", "max_request_body"];
        assert_eq!(did_you_mean("listne", fields).as_deref(), Some("did you mean `listen`?"));
        assert_eq!(did_you_mean("admin", fields).as_deref(), Some("did you mean `admin_listen`?"));
        assert_eq!(did_you_mean("kye", ["cert", "key"]).as_deref(), Some("did you mean `key`?"));
        assert_eq!(did_you_mean("zzz", fields), None);
        assert_eq!(did_you_mean("bogus", ["server", "auth", "limits", "keys", "cache"]), None);
    }
}
