//! What one SSE event of a chat/completions or completions stream says: its `data`
//! field and, for a JSON chunk, the few fields [`super::StreamWatch`] records, read
//! borrowed and partially. Where events end is [`super::framer`]'s business.

use std::borrow::Cow;

use crate::openai::{
    Usage, UsagePeek,
    skim::{Malformed, Skim},
};

/// The fields of one event that matter to the watch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Fields<'a> {
    /// The `data` lines, joined with `\n` when there are several.
    pub data: Option<Cow<'a, [u8]>>,
    /// `event: error`.
    pub error_event: bool,
}

/// Reads the field lines of one event (comments and unknown fields are skipped).
pub(super) fn fields(event: &[u8]) -> Fields<'_> {
    let mut fields = Fields::default();
    for line in Lines(event) {
        if let Some(value) = field(line, b"data") {
            fields.data = Some(match fields.data.take() {
                None => Cow::Borrowed(value),
                Some(joined) => Cow::Owned([&joined[..], b"\n", value].concat()),
            });
        } else if field(line, b"event") == Some(b"error") {
            fields.error_event = true;
        }
    }
    fields
}

/// The lines of one event, without their terminators.
struct Lines<'a>(&'a [u8]);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let end = memchr::memchr2(b'\n', b'\r', self.0).unwrap_or(self.0.len());
        let (line, rest) = self.0.split_at(end);
        let terminator = if rest.starts_with(b"\r\n") { 2 } else { rest.len().min(1) };
        self.0 = &rest[terminator..];
        Some(line)
    }
}

/// The value of an SSE field line `name: value` (one leading space dropped).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    match line.strip_prefix(name)? {
        [] => Some(&[]),
        [b':', b' ', value @ ..] | [b':', value @ ..] => Some(value),
        _ => None,
    }
}

/// What one chunk says that the watch records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// How many choices it has (none when `choices` is absent or `null`).
    pub choices: usize,
    pub usage: Option<Usage>,
    /// It carries an `error` (anything but `null`).
    pub error: bool,
    /// The last non-null `finish_reason` of its choices.
    pub finish_reason: Option<Cow<'a, str>>,
    /// Some choice finished with `content_filter`.
    pub content_filtered: bool,
}

/// Reads a chunk (one event's `data`), calling `text` with each piece of completion
/// text it carries: `choices[].delta.content`, `refusal`, `reasoning_content` (not
/// OpenAI's, but common among compatible upstreams) and tool calls' `arguments`, and
/// `choices[].text` for completions. `Err` when it is not JSON, not an object, or
/// one of those fields has a type serde would refuse (or comes twice): the fields are
/// read exactly as `#[derive(Deserialize)]` with `#[serde(default)]` reads them
/// (`fuzzing::reference_chunk` is that derive, and the tests hold the two together).
pub fn read<'a>(data: &'a [u8], mut text: impl FnMut(&str)) -> Result<Chunk<'a>, Malformed> {
    let mut chunk = Chunk::default();
    let mut skim = Skim::new(data);
    let mut seen = Seen::default();
    skim.object(|key, skim| {
        match &*key.name()? {
            b"choices" => {
                seen.once(0)?;
                if !skim.null() {
                    skim.array(|skim| {
                        chunk.choices += 1;
                        choice(skim, &mut chunk, &mut text)
                    })?;
                }
            }
            b"usage" => {
                seen.once(1)?;
                if !skim.null() {
                    let peek = serde_json::from_slice::<UsagePeek>(skim.raw()?).map_err(|_| Malformed)?;
                    chunk.usage = Some(peek.into());
                }
            }
            b"error" => {
                seen.once(2)?;
                chunk.error = !skim.null();
                if chunk.error {
                    skim.value()?;
                }
            }
            _ => skim.value()?,
        }
        Ok(())
    })?;
    skim.end()?;
    Ok(chunk)
}

/// One element of `choices`.
fn choice<'a>(
    skim: &mut Skim<'a>,
    chunk: &mut Chunk<'a>,
    text: &mut impl FnMut(&str),
) -> Result<(), Malformed> {
    let mut seen = Seen::default();
    skim.object(|key, skim| {
        match &*key.name()? {
            b"delta" => {
                seen.once(0)?;
                if !skim.null() {
                    delta(skim, text)?;
                }
            }
            b"text" => {
                seen.once(1)?;
                optional_text(skim, text)?;
            }
            b"finish_reason" => {
                seen.once(2)?;
                if !skim.null() {
                    let reason = skim.string()?.text()?;
                    chunk.content_filtered |= reason == "content_filter";
                    chunk.finish_reason = Some(reason);
                }
            }
            _ => skim.value()?,
        }
        Ok(())
    })
}

/// A choice's `delta`.
fn delta(skim: &mut Skim<'_>, text: &mut impl FnMut(&str)) -> Result<(), Malformed> {
    let mut seen = Seen::default();
    skim.object(|key, skim| {
        let field = match &*key.name()? {
            b"content" => 0,
            b"refusal" => 1,
            b"reasoning_content" => 2,
            b"tool_calls" => {
                seen.once(3)?;
                return tool_calls(skim, text);
            }
            _ => return skim.value(),
        };
        seen.once(field)?;
        optional_text(skim, text)
    })
}

/// `tool_calls`: `null`, or calls whose `function.arguments` are text.
fn tool_calls(skim: &mut Skim<'_>, text: &mut impl FnMut(&str)) -> Result<(), Malformed> {
    if skim.null() {
        return Ok(());
    }
    skim.array(|skim| {
        let mut seen = Seen::default();
        skim.object(|key, skim| {
            if *key.name()? != *b"function" {
                return skim.value();
            }
            seen.once(0)?;
            if skim.null() {
                return Ok(());
            }
            let mut seen = Seen::default();
            skim.object(|key, skim| match *key.name()? == *b"arguments" {
                true => {
                    seen.once(0)?;
                    optional_text(skim, text)
                }
                false => skim.value(),
            })
        })
    })
}

/// A field that is `null` or text, given to `text`.
fn optional_text(skim: &mut Skim<'_>, text: &mut impl FnMut(&str)) -> Result<(), Malformed> {
    if !skim.null() {
        text(&skim.string()?.text()?);
    }
    Ok(())
}

/// The known fields of one object seen so far, by number: serde refuses one twice.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    fn once(&mut self, field: usize) -> Result<(), Malformed> {
        let bit = 1 << field;
        if self.0 & bit != 0 {
            return Err(Malformed);
        }
        self.0 |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_data_and_error_fields() {
        let data = |event: &'static [u8]| fields(event).data.map(|data| data.into_owned());
        assert_eq!(data(b"data: {}\n\n"), Some(b"{}".to_vec()));
        assert_eq!(data(b"data:{}\r\n\r\n"), Some(b"{}".to_vec()));
        assert_eq!(data(b": keep-alive\nid: 7\ndata:  x\r\r"), Some(b" x".to_vec()));
        assert_eq!(data(b"data: a\ndata\ndata: b\n\n"), Some(b"a\n\nb".to_vec()));
        assert_eq!(data(b"datum: a\n\n"), None);
        assert_eq!(data(b"\n"), None);
        assert!(fields(b"event: error\ndata: {}\n\n").error_event);
        assert!(!fields(b"event: message\ndata: {}\n\n").error_event);
    }

    #[test]
    fn reads_chunk_fields() {
        let json = br#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hel","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},"finish_reason":null},{"index":1,"text":"lo","finish_reason":"stop"}],"usage":null}"#;
        let mut texts = Vec::new();
        let chunk = read(json, |text| texts.push(text.to_owned())).expect("a chunk");
        assert_eq!(texts, ["Hel", "{\"a\":1}", "lo"]);
        assert_eq!(chunk, Chunk { choices: 2, finish_reason: Some("stop".into()), ..Chunk::default() });
        let usage = read(
            br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            |_| {},
        );
        assert_eq!(
            usage.map(|chunk| chunk.usage),
            Ok(Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }))
        );
    }

    #[test]
    fn refuses_what_serde_refuses() {
        for data in [
            &br#"[]"#[..],
            br#"{"choices":{}}"#,
            br#"{"choices":[{"text":5}]}"#,
            br#"{"choices":[],"choices":[]}"#,
            br#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            br#"{"usage":{"prompt_tokens":-1}}"#,
            br#"{"choices":[{"finish_reason":"\ud800"}]}"#,
            br#"{"id":"x"#,
            b"<html>",
        ] {
            assert_eq!(read(data, |_| {}), Err(Malformed), "{}", String::from_utf8_lossy(data));
        }
        assert_eq!(read(br#"{"ch\u006fices":[{}],"error":null}"#, |_| {}).map(|chunk| chunk.choices), Ok(1));
        assert_eq!(read(br#"{"error":{"message":"x"}}"#, |_| {}).map(|chunk| chunk.error), Ok(true));
    }

    /// Any JSON made of the keys the reader knows, at any place, of every type,
    /// sometimes twice, sometimes with escaped keys.
    fn any_json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop::sample::select(KEYS.to_vec());
        leaf().prop_recursive(5, 48, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((key.clone(), inner), 0..4).prop_map(object),
            ]
        })
    }

    const KEYS: &[&str] = &[
        "\"choices\"",
        "\"usage\"",
        "\"error\"",
        "\"delta\"",
        "\"text\"",
        "\"finish_reason\"",
        "\"content\"",
        "\"refusal\"",
        "\"reasoning_content\"",
        "\"tool_calls\"",
        "\"function\"",
        "\"arguments\"",
        "\"prompt_tokens\"",
        "\"completion_tokens\"",
        "\"total_tokens\"",
        "\"input_tokens\"",
        "\"id\"",
        "\"c\\u006fntent\"",
        "\"ch\\u006fices\"",
    ];

    fn leaf() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop::sample::select(vec![
            "null",
            "true",
            "0",
            "7",
            "-1",
            "1.5",
            "1e400",
            "\"\"",
            "\"hi\"",
            "\"content_filter\"",
            "\"stop\"",
            "\"a\\nb\"",
            "\"\\ud83d\\ude00\"",
            "\"\\ud800\"",
            "[]",
            "{}",
        ])
        .prop_map(str::to_owned)
    }

    /// A leaf where the derive expects a struct: anything but an array (which it would
    /// read as the struct's fields in order).
    fn not_array() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        leaf().prop_filter("not an array", |leaf| leaf != "[]")
    }

    fn object(members: Vec<(&str, String)>) -> String {
        let members: Vec<String> = members.into_iter().map(|(key, value)| format!("{key}:{value}")).collect();
        format!("{{{}}}", members.join(","))
    }

    /// Chunks shaped as the derive's structs are (objects where it expects a struct),
    /// with leaves of every type in every field, unknown members, and known ones
    /// twice now and then.
    fn chunk_shaped() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let members = |fields: Vec<(&'static str, BoxedStrategy<String>)>| {
            let choices: Vec<_> = fields
                .into_iter()
                .map(|(key, value)| value.prop_map(move |value| (key, value)).boxed())
                .collect();
            prop::collection::vec(prop::strategy::Union::new(choices), 0..5).prop_map(object).boxed()
        };
        let text = leaf().boxed();
        let any = any_json().boxed();
        let function = prop_oneof![
            not_array(),
            members(vec![("\"arguments\"", text.clone()), ("\"name\"", any.clone())])
        ]
        .boxed();
        let call =
            prop_oneof![not_array(), members(vec![("\"function\"", function), ("\"id\"", any.clone())])]
                .boxed();
        let calls = prop_oneof![
            leaf(),
            prop::collection::vec(call, 0..3).prop_map(|calls| format!("[{}]", calls.join(",")))
        ]
        .boxed();
        let delta = prop_oneof![
            not_array(),
            members(vec![
                ("\"content\"", text.clone()),
                ("\"c\\u006fntent\"", text.clone()),
                ("\"refusal\"", text.clone()),
                ("\"reasoning_content\"", text.clone()),
                ("\"tool_calls\"", calls),
                ("\"role\"", any.clone()),
            ])
        ]
        .boxed();
        let choice = prop_oneof![
            not_array(),
            members(vec![
                ("\"delta\"", delta),
                ("\"text\"", text.clone()),
                ("\"finish_reason\"", text.clone()),
                ("\"index\"", any.clone()),
            ])
        ]
        .boxed();
        let choices = prop_oneof![
            leaf(),
            prop::collection::vec(choice, 0..3).prop_map(|choices| format!("[{}]", choices.join(",")))
        ]
        .boxed();
        let count =
            prop::sample::select(vec!["0", "3", "-1", "1.5", "\"2\"", "null", "18446744073709551615"])
                .prop_map(str::to_owned)
                .boxed();
        let usage = prop_oneof![
            not_array(),
            members(vec![
                ("\"prompt_tokens\"", count.clone()),
                ("\"input_tokens\"", count.clone()),
                ("\"completion_tokens\"", count.clone()),
                ("\"total_tokens\"", count),
                ("\"details\"", any.clone()),
            ])
        ]
        .boxed();
        members(vec![
            ("\"choices\"", choices),
            ("\"usage\"", usage),
            ("\"error\"", any.clone()),
            ("\"id\"", any),
        ])
    }

    /// What a reader found in a chunk: its fields and texts.
    type Found = Option<(Chunk<'static>, Vec<String>)>;

    /// Both readers' findings, texts sorted (the derive gives them in its field order).
    fn findings(chunk: &str) -> (Found, Found) {
        let mut texts = Vec::new();
        let ours = read(chunk.as_bytes(), |text| texts.push(text.to_owned())).ok().map(|read| (read, texts));
        let reference = crate::fuzzing::reference_chunk(chunk.as_bytes());
        let sorted = |found: Found| {
            found.map(|(read, mut texts)| {
                texts.sort();
                (read, texts)
            })
        };
        (sorted(ours.map(owned)), sorted(reference.map(owned)))
    }

    fn owned((read, texts): (Chunk<'_>, Vec<String>)) -> (Chunk<'static>, Vec<String>) {
        let finish_reason = read.finish_reason.map(|reason| std::borrow::Cow::Owned(reason.into_owned()));
        (Chunk { finish_reason, ..read }, texts)
    }

    proptest::proptest! {
        #[test]
        fn reads_chunks_as_the_derive_does(chunk in chunk_shaped()) {
            let (ours, reference) = findings(&chunk);
            proptest::prop_assert_eq!(ours, reference, "{}", chunk);
        }

        #[test]
        fn what_it_reads_anywhere_the_derive_reads_alike(json in any_json()) {
            // The derive also reads a struct from an array of its fields, which this
            // reader refuses (a chunk is an object); whatever this one reads, it reads
            // as the derive does.
            let (ours, reference) = findings(&json);
            if ours.is_some() {
                proptest::prop_assert_eq!(ours, reference, "{}", json);
            }
        }
    }
}
