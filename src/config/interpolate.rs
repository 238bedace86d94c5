//! `${VAR}` and `${VAR:-default}` substitution, done on the config text before TOML
//! parsing, and the [`OffsetMap`] that maps positions in the result back to the file.
//!
//! `$${` writes a literal `${`. Comments are left alone, so a commented-out
//! `${VAR}` is never required. Inside a `"…"` / `"""…"""` string a value is escaped
//! so that it arrives verbatim (a password may contain `"` or `\`); a `'…'` string
//! cannot hold every value, so a value that does not fit is an error. Elsewhere
//! the value is inserted as TOML text (`weight = ${WEIGHT:-1}`). `:-` uses the
//! default when the variable is unset or empty, as in the shell. A default is
//! TOML text as written in the file and cannot contain `}`.
//!
//! This module does not parse TOML beyond telling strings and comments apart.

use super::diagnostic::{Diagnostic, line_col};

/// The interpolated text and how to map its positions back to the original.
#[derive(Debug)]
pub(crate) struct Interpolated {
    pub text: String,
    pub map: OffsetMap,
}

/// Maps byte offsets of the interpolated text to byte offsets of the original file.
/// Empty, it is the identity.
#[derive(Debug, Default)]
pub(crate) struct OffsetMap {
    /// Sorted by `out`: from `out` on, the text comes from `src` (verbatim) or was
    /// substituted for the `${…}` whose `$` is at `src`.
    pieces: Vec<Piece>,
}

#[derive(Debug)]
struct Piece {
    out: usize,
    src: usize,
    verbatim: bool,
}

impl OffsetMap {
    /// The original offset of interpolated offset `offset`; a position inside a
    /// substituted value maps to the `$` of its `${`.
    pub fn to_original(&self, offset: usize) -> usize {
        let index = self.pieces.partition_point(|piece| piece.out <= offset);
        match index.checked_sub(1).and_then(|i| self.pieces.get(i)) {
            None => offset,
            Some(piece) if piece.verbatim => piece.src + (offset - piece.out),
            Some(piece) => piece.src,
        }
    }
}

/// The lexical context of a position: where `#` starts a comment and how a
/// substituted value must be escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Code,
    Basic,
    Literal,
    MultiBasic,
    MultiLiteral,
}

/// Replaces every `${…}` outside comments with its value from `env`.
///
/// Also returns every missing variable and malformed reference, positioned in `text`
/// (the original file named `file`). Those are replaced by nothing, so the rest of
/// the file can still be checked and every problem reported in one run.
pub(crate) fn interpolate(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> (Interpolated, Vec<Diagnostic>) {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut map = OffsetMap::default();
    let mut errors = Vec::new();
    let mut context = Context::Code;
    let (mut i, mut copied) = (0, 0);

    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("$${") || rest.starts_with("${") {
            let (len, value) = match rest.strip_prefix('$') {
                Some(unescaped) if unescaped.starts_with("${") => (3, Ok("${".to_owned())),
                _ => reference(rest, context, &env),
            };
            match value {
                Ok(value) => {
                    out.push_str(&text[copied..i]);
                    map.pieces.push(Piece { out: out.len(), src: i, verbatim: false });
                    out.push_str(&value);
                    map.pieces.push(Piece { out: out.len(), src: i + len, verbatim: true });
                }
                Err((message, hint)) => {
                    out.push_str(&text[copied..i]);
                    map.pieces.push(Piece { out: out.len(), src: i + len, verbatim: true });
                    errors.push(Diagnostic::new(file, line_col(text, i), message).with_hint(hint))
                }
            }
            (i, copied) = (i + len, i + len);
            continue;
        }
        // Offset of the `n`th character of `rest`: steps stay on character boundaries.
        let chars = |n| rest.char_indices().nth(n).map_or(rest.len(), |(at, _)| at);
        let run = |quote| 1 + rest[1..].bytes().take_while(|&b| b == quote).count().min(4);
        (context, i) = match (context, bytes[i]) {
            (Context::Code, b'#') => (context, rest.find('\n').map_or(bytes.len(), |n| i + n)),
            (Context::Code, b'"') if rest.starts_with(r#"""""#) => (Context::MultiBasic, i + 3),
            (Context::Code, b'"') => (Context::Basic, i + 1),
            (Context::Code, b'\'') if rest.starts_with("'''") => (Context::MultiLiteral, i + 3),
            (Context::Code, b'\'') => (Context::Literal, i + 1),
            (Context::Basic | Context::MultiBasic, b'\\') => (context, i + chars(2)),
            (Context::Basic, b'"' | b'\n') | (Context::Literal, b'\'' | b'\n') => (Context::Code, i + 1),
            (Context::MultiBasic, b'"') if rest.starts_with(r#"""""#) => (Context::Code, i + run(b'"')),
            (Context::MultiLiteral, b'\'') if rest.starts_with("'''") => (Context::Code, i + run(b'\'')),
            _ => (context, i + chars(1)),
        };
    }
    out.push_str(&text[copied.min(text.len())..]);
    (Interpolated { text: out, map }, errors)
}

/// A message and a hint.
type Problem = (String, String);

/// Resolves the `${…}` at the start of `rest`: its length, and its value escaped
/// for `context` or what is wrong with it.
fn reference(
    rest: &str,
    context: Context,
    env: &impl Fn(&str) -> Option<String>,
) -> (usize, Result<String, Problem>) {
    let line = rest.split('\n').next().unwrap_or_default();
    let Some(close) = line.find('}') else {
        let hint = "close it with `}`, or write `$${` for a literal `${`".to_owned();
        return (line.len(), Err(("unterminated `${`".to_owned(), hint)));
    };
    let end = close + 1;
    let body = &line[2..close];
    let (name, default) = match body.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (body, None),
    };
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        let message = format!("not a valid variable reference: `${{{body}}}`");
        let hint = "write ${VAR} or ${VAR:-default}, or $${ for a literal ${".to_owned();
        return (end, Err((message, hint)));
    }
    let value = match (env(name), default) {
        (Some(value), Some(default)) if value.is_empty() => return (end, Ok(default.to_owned())),
        (Some(value), _) => value,
        (None, Some(default)) => return (end, Ok(default.to_owned())),
        (None, None) => {
            let hint = format!("set it or use ${{{name}:-…}}");
            return (end, Err((format!("${{{name}}} is not set"), hint)));
        }
    };
    (end, escape(name, &value, context))
}

/// Makes `value` arrive verbatim once TOML has parsed the string it sits in.
fn escape(name: &str, value: &str, context: Context) -> Result<String, Problem> {
    let fits_literal = match context {
        Context::Literal => !value.contains(['\'', '\n', '\r']),
        Context::MultiLiteral => !value.contains("'''"),
        Context::Code | Context::Basic | Context::MultiBasic => true,
    };
    if !fits_literal {
        let message = format!("the value of ${{{name}}} cannot be written inside a '…' string");
        return Err((message, "use a \"…\" string, where values are escaped".to_owned()));
    }
    if !matches!(context, Context::Basic | Context::MultiBasic) {
        return Ok(value.to_owned());
    }
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' if context == Context::MultiBasic => escaped.push('\n'),
            '\n' => escaped.push_str("\\n"),
            '\t' => escaped.push('\t'),
            c if c.is_control() => escaped.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => escaped.push(c),
        }
    }
    Ok(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            "TRICKY" => Some(r#"pa"ss\word"#.into()),
            "QUOTE" => Some("it's".into()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<String>> {
        match interpolate("t.toml", text, env) {
            (done, errors) if errors.is_empty() => Ok(done.text),
            (_, errors) => Err(errors.iter().map(ToString::to_string).collect()),
        }
    }

    #[test]
    fn substitutes_values_and_defaults() {
        assert_eq!(run(r#"a = "${HOST}:8080" # x"#).as_deref(), Ok(r#"a = "10.0.0.1:8080" # x"#));
        assert_eq!(run("a = '${NOPE:-x y}'").as_deref(), Ok("a = 'x y'"));
        assert_eq!(run("w = ${NOPE:-3}").as_deref(), Ok("w = 3"));
        assert_eq!(run("a = \"é\\é${HOST}ü\" # ${NOPE}").as_deref(), Ok("a = \"é\\é10.0.0.1ü\" # ${NOPE}"));
        assert_eq!(run(r#"a = "${EMPTY:-d}""#).as_deref(), Ok(r#"a = "d""#));
        assert_eq!(run(r#"a = "${EMPTY}""#).as_deref(), Ok(r#"a = """#));
        assert_eq!(run(r#"a = "${NOPE:-}""#).as_deref(), Ok(r#"a = """#));
    }

    #[test]
    fn missing_variables_are_all_reported_at_their_dollar() {
        let errors = run("a = 1\nb = \"${ONE}\"\n  c = \"x${TWO:-}${THREE}\"\n").unwrap_err();
        assert_eq!(
            errors,
            [
                "t.toml:2:6: error: ${ONE} is not set\n  = help: set it or use ${ONE:-…}",
                "t.toml:3:17: error: ${THREE} is not set\n  = help: set it or use ${THREE:-…}",
            ]
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        let errors = run("a = \"${}\"\nb = \"${A-b}\"\nc = \"${OPEN\"\n").unwrap_err();
        assert_eq!(errors.len(), 3);
        assert!(errors[0].starts_with("t.toml:1:6: error: not a valid variable reference: `${}`"));
        assert!(errors[1].contains("`${A-b}`"));
        assert!(errors[2].starts_with("t.toml:3:6: error: unterminated `${`"));
    }

    #[test]
    fn double_dollar_escapes_a_literal_reference() {
        assert_eq!(run(r#"a = "$${NOPE} costs $5""#).as_deref(), Ok(r#"a = "${NOPE} costs $5""#));
    }

    #[test]
    fn comments_are_skipped_but_hashes_in_strings_are_not_comments() {
        let text = "# ${NOPE}\na = \"#${HOST}\" # ${NOPE}\nb = 'x#' # ${NOPE}\n\
                    c = \"\"\"\n# ${HOST} \"\" \\\" \"\"\" # ${NOPE}\n\
                    d = '''it's # ${HOST}''''' # ${NOPE}\n\"k#${HOST}\" = 1";
        let done = run(text).unwrap();
        assert!(!done.contains("${HOST}"), "{done}");
        assert_eq!(done.matches("${NOPE}").count(), 5);
    }

    #[test]
    fn values_are_escaped_for_the_string_they_land_in() {
        #[derive(serde::Deserialize)]
        struct Doc {
            basic: String,
            multi: String,
        }
        let text = "basic = \"${TRICKY}\"\nmulti = \"\"\"${TRICKY}\"\"\"";
        let doc: Doc = toml::from_str(&run(text).unwrap()).unwrap();
        assert_eq!(doc.basic, r#"pa"ss\word"#);
        assert_eq!(doc.multi, r#"pa"ss\word"#);
        assert_eq!(run("a = '''${QUOTE}'''").as_deref(), Ok("a = '''it's'''"));
        let errors = run("a = '${QUOTE}'").unwrap_err();
        assert!(errors[0].contains("the value of ${QUOTE} cannot be written inside a '…' string"));
    }

    #[test]
    fn offsets_map_back_to_the_original() {
        let text = "a = \"${HOST}\"\nb = ${NOPE:-12345678} # é\nc = 1";
        let (done, _) = interpolate("t.toml", text, env);
        let find = |needle: &str| done.text.find(needle).unwrap();
        // Before any substitution: identity.
        assert_eq!(done.map.to_original(0), 0);
        // Inside a substituted value: its `$`.
        assert_eq!(done.map.to_original(find("0.0.1")), text.find("${HOST}").unwrap());
        assert_eq!(done.map.to_original(find("2345")), text.find("${NOPE").unwrap());
        // After substitutions: shifted back.
        assert_eq!(done.map.to_original(find("c = 1")), text.find("c = 1").unwrap());
        assert_eq!(done.map.to_original(find("# é")), text.find("# é").unwrap());
        assert_eq!(done.map.to_original(done.text.len()), text.len());
    }
}
