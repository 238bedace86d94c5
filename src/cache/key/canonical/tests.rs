use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn canon(text: &str) -> String {
    let canonical = canonical_json(text.as_bytes()).expect("valid JSON");
    String::from_utf8(canonical).expect("canonical JSON is UTF-8")
}

#[test]
fn sorts_keys_and_drops_whitespace() {
    let body = " {\n \"b\" : 1 ,\t\"a\" : [ 2 , { \"d\" : null , \"c\" : true } , [ ] , { } ] }\r\n";
    assert_eq!(canon(body), r#"{"a":[2,{"c":true,"d":null},[],{}],"b":1}"#);
}

#[test]
fn numbers_are_kept_as_written() {
    for number in
        ["0.70", "1", "1.0", "1e0", "1E0", "10e-1", "-0", "1e+5", "123456789012345678901234567890", "1e400"]
    {
        assert_eq!(canon(number), number);
        assert_eq!(canon(&format!("[ {number} ]")), format!("[{number}]"));
    }
}

#[test]
fn escapes_are_normalized() {
    assert_eq!(canon(r#""\u00e9""#), canon("\"é\""));
    assert_eq!(canon(r#""\u00E9""#), "\"é\"");
    assert_eq!(canon(r#""\/\u0041\ud83d\ude00""#), "\"/A😀\"");
    assert_eq!(canon(r#""\u001f\u0008\u000C\"\\\u007f""#), "\"\\u001f\\b\\f\\\"\\\\\u{7f}\"");
    assert_eq!(canon(r#"{"\u0061":1}"#), r#"{"a":1}"#);
}

#[test]
fn keys_sort_bytewise_by_their_unescaped_text() {
    assert_eq!(canon(r#"{"é":1,"z":2,"Z":3,"\u0061":4,"":5}"#), r#"{"":5,"Z":3,"a":4,"z":2,"é":1}"#);
}

#[test]
fn a_repeated_key_keeps_its_last_value() {
    assert_eq!(canon(r#"{"a":1,"b":2,"a":3}"#), r#"{"a":3,"b":2}"#);
    assert_eq!(canon(r#"{"a":1,"\u0061":{"x":0},"a":[3]}"#), r#"{"a":[3]}"#);
    let value: Value = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).expect("valid");
    assert_eq!(value["a"], 3, "serde_json keeps the last one too");
}

#[test]
fn invalid_documents_are_refused_as_serde_json_refuses_them() {
    let invalid: &[&[u8]] = &[
        b"",
        b"   ",
        b"{",
        b"[1,]",
        b"{\"a\":1,}",
        b"{\"a\" 1}",
        b"{1:1}",
        b"01",
        b"1.",
        b".5",
        b"+1",
        b"-",
        b"1e",
        b"1e+",
        b"tru",
        b"nul",
        b"NaN",
        b"'a'",
        b"\"abc",
        b"\"a\tb\"",
        b"\"\\x\"",
        b"\"\\u12\"",
        b"\"\\u12g4\"",
        b"\"\\ud800\"",
        b"\"\\ud800\\u0041\"",
        b"\"\\udc00\"",
        b"{} x",
        b"[] []",
        b"\xef\xbb\xbf{}",
        b"\"\xff\"",
        b"[1 2]",
    ];
    for &body in invalid {
        assert!(
            serde_json::from_slice::<Value>(body).is_err(),
            "serde_json accepts {:?}",
            String::from_utf8_lossy(body)
        );
        assert!(canonical_json(body).is_err(), "accepted {:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn errors_say_where() {
    assert_eq!(
        canonical_json(b"[1, x]"),
        Err(CanonicalError::Invalid { offset: 4, reason: "expected a value" })
    );
}

#[test]
fn nesting_is_bounded_without_overflowing_the_stack() {
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert_eq!(canon(&nested(MAX_DEPTH)), nested(MAX_DEPTH));
    assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH)).is_ok(), "serde_json takes this too");
    assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH + 1)).is_err(), "and refuses this too");
    assert_eq!(canonical_json(nested(MAX_DEPTH + 1).as_bytes()), Err(CanonicalError::TooDeep));
    let objects = format!("{}0{}", "{\"a\":".repeat(MAX_DEPTH + 1), "}".repeat(MAX_DEPTH + 1));
    assert_eq!(canonical_json(objects.as_bytes()), Err(CanonicalError::TooDeep));
    // Far deeper than any stack could recurse, and unterminated.
    assert_eq!(canonical_json("[{\"a\":".repeat(1_000_000).as_bytes()), Err(CanonicalError::TooDeep));
}

/// A JSON document with unique keys, numbers as text.
#[derive(Debug, Clone)]
enum Doc {
    Null,
    Bool(bool),
    Number(String),
    Text(String),
    Array(Vec<Doc>),
    Object(BTreeMap<String, Doc>),
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z]{0,6}", any::<String>(), "[\"\\\\/\u{0}-\u{1f}\u{7f}é€😀 aA]{0,6}"]
}

fn doc() -> impl Strategy<Value = Doc> {
    let leaf = prop_oneof![
        Just(Doc::Null),
        any::<bool>().prop_map(Doc::Bool),
        "-?(0|[1-9][0-9]{0,12})(\\.[0-9]{1,6})?([eE][+-]?[0-9]{1,2})?".prop_map(Doc::Number),
        text().prop_map(Doc::Text),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Doc::Array),
            prop::collection::btree_map(text(), inner, 0..6).prop_map(Doc::Object),
        ]
    })
}

/// The canonical form by definition: keys in `BTreeMap` (bytewise) order, strings
/// as `serde_json` writes them.
fn expected(doc: &Doc, out: &mut String) {
    let string = |text: &str| serde_json::to_string(text).expect("a string serializes");
    match doc {
        Doc::Null => out.push_str("null"),
        Doc::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
        Doc::Number(number) => out.push_str(number),
        Doc::Text(text) => out.push_str(&string(text)),
        Doc::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                out.push_str(if index > 0 { "," } else { "" });
                expected(item, out);
            }
            out.push(']');
        }
        Doc::Object(members) => {
            out.push('{');
            for (index, (key, value)) in members.iter().enumerate() {
                out.push_str(if index > 0 { "," } else { "" });
                out.push_str(&string(key));
                out.push(':');
                expected(value, out);
            }
            out.push('}');
        }
    }
}

/// Deterministic choices for one rendering (xorshift).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn whitespace(&mut self, out: &mut String) {
        out.push_str(["", "", " ", "\n\t ", "\r\n  "][(self.next() % 5) as usize]);
    }
}

/// `doc` written one of many equivalent ways: shuffled members, earlier duplicates
/// of a key (the last one wins), whitespace, and strings escaped in various ways.
fn render(doc: &Doc, noise: &mut Noise, out: &mut String) {
    noise.whitespace(out);
    match doc {
        Doc::Null => out.push_str("null"),
        Doc::Bool(value) => out.push_str(if *value { "true" } else { "false" }),
        Doc::Number(number) => out.push_str(number),
        Doc::Text(text) => render_string(text, noise, out),
        Doc::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                out.push_str(if index > 0 { "," } else { "" });
                render(item, noise, out);
            }
            noise.whitespace(out);
            out.push(']');
        }
        Doc::Object(members) => {
            let mut members: Vec<_> = members.iter().collect();
            for index in (1..members.len()).rev() {
                members.swap(index, (noise.next() % (index as u64 + 1)) as usize);
            }
            out.push('{');
            for (index, (key, value)) in members.into_iter().enumerate() {
                out.push_str(if index > 0 { "," } else { "" });
                if noise.next().is_multiple_of(4) {
                    render_string(key, noise, out);
                    out.push_str(":[0,{\"overridden\":true}],");
                }
                noise.whitespace(out);
                render_string(key, noise, out);
                noise.whitespace(out);
                out.push(':');
                render(value, noise, out);
            }
            noise.whitespace(out);
            out.push('}');
        }
    }
    noise.whitespace(out);
}

fn render_string(text: &str, noise: &mut Noise, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\t' => Some("\\t"),
            '/' => Some("\\/"),
            _ => None,
        };
        let must_escape = c == '"' || c == '\\' || c < ' ';
        match (noise.next() % 3, short) {
            (0, Some(short)) => out.push_str(short),
            (0 | 1, _) if !must_escape => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let escape = format!("\\u{unit:04x}");
                    out.push_str(&if noise.next().is_multiple_of(2) {
                        escape
                    } else {
                        escape.to_uppercase().replace("\\U", "\\u")
                    });
                }
            }
        }
    }
    out.push('"');
}

/// Both parsers agree on whether `input` is JSON, and when it is, the canonical form
/// means the same document and is its own canonical form.
fn agrees_with_serde_json(input: &[u8]) -> Result<(), TestCaseError> {
    let ours = canonical_json(input);
    match serde_json::from_slice::<Value>(input) {
        Ok(value) => {
            let canonical =
                ours.map_err(|error| TestCaseError::fail(format!("refused valid JSON: {error}")))?;
            prop_assert_eq!(serde_json::from_slice::<Value>(&canonical).ok(), Some(value));
            prop_assert_eq!(canonical_json(&canonical), Ok(canonical.clone()));
        }
        // serde_json stops at a number it cannot hold in an f64, which is valid JSON
        // (kept as written here), before seeing whatever follows: no verdict to compare.
        Err(error) if error.to_string().contains("out of range") => {}
        Err(error) => prop_assert!(ours.is_err(), "accepted what serde_json refuses: {error}"),
    }
    Ok(())
}

proptest! {
    #[test]
    fn special_bytes_are_found_where_they_are(bytes in prop::collection::vec(prop_oneof![any::<u8>(), 0x1e..0x24u8, 0x5a..0x5eu8], 0..40)) {
        let expected = bytes.iter().position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20);
        prop_assert_eq!(find_special(&bytes), expected);
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them(text in any::<String>()) {
        let mut ours = Vec::new();
        write_string(&mut ours, &text);
        prop_assert_eq!(ours, serde_json::to_vec(&text).expect("a string serializes"));
    }

    #[test]
    fn every_rendering_has_the_same_canonical_form(doc in doc(), seeds in prop::array::uniform2(1..u64::MAX)) {
        let mut canonical = String::new();
        expected(&doc, &mut canonical);
        for seed in seeds {
            let mut rendered = String::new();
            render(&doc, &mut Noise(seed), &mut rendered);
            prop_assert_eq!(canon(&rendered), canonical.clone(), "rendered as {}", rendered);
        }
    }

    #[test]
    fn validity_agrees_with_serde_json(input in "[ \\[\\]{}:,\"\\\\0-9.eE+\\-truefalsn/u\tad]{0,24}") {
        agrees_with_serde_json(input.as_bytes())?;
    }

    #[test]
    fn damaged_documents_are_judged_as_serde_json_judges_them(
        doc in doc(),
        seed in 1..u64::MAX,
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b" []{}:,\"\\0-.e+tu\x01\xff".to_vec()),
        delete in any::<bool>(),
    ) {
        let mut rendered = String::new();
        render(&doc, &mut Noise(seed), &mut rendered);
        let mut input = rendered.into_bytes();
        agrees_with_serde_json(&input)?;
        let at = at.index(input.len() + 1);
        if delete && at < input.len() {
            input.remove(at);
        } else {
            input.insert(at, byte);
        }
        agrees_with_serde_json(&input)?;
    }
}
