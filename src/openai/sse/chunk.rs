//! What one SSE event of a chat/completions or completions stream says: its `data`
//! field and, for a JSON chunk, the few fields [`super::StreamWatch`] records, read
//! borrowed and partially. Where events end is [`super::framer`]'s business.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, de::IgnoredAny};

use crate::openai::UsagePeek;

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

/// A string, borrowed from the chunk when it has no escapes.
#[derive(Debug)]
pub(super) struct Text<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The fields of a streamed chunk the watch reads.
#[derive(Deserialize)]
pub(super) struct Chunk<'a> {
    #[serde(default, borrow)]
    pub choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    pub usage: Option<UsagePeek>,
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub(super) struct Choice<'a> {
    #[serde(default, borrow)]
    pub delta: Option<Delta<'a>>,
    /// Completions stream their text here.
    #[serde(default, borrow)]
    pub text: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize)]
pub(super) struct Delta<'a> {
    #[serde(default, borrow)]
    pub content: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub refusal: Option<Text<'a>>,
    /// Not OpenAI's, but common among OpenAI-compatible upstreams.
    #[serde(default, borrow)]
    pub reasoning_content: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
pub(super) struct ToolCall<'a> {
    #[serde(default, borrow)]
    pub function: Option<Function<'a>>,
}

#[derive(Deserialize)]
pub(super) struct Function<'a> {
    #[serde(default, borrow)]
    pub arguments: Option<Text<'a>>,
}

impl<'a> Choice<'a> {
    /// Every piece of completion text this choice carries.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let delta = self.delta.as_ref();
        let own = [
            delta.and_then(|delta| delta.content.as_ref()),
            delta.and_then(|delta| delta.refusal.as_ref()),
            delta.and_then(|delta| delta.reasoning_content.as_ref()),
            self.text.as_ref(),
        ];
        let calls = delta.and_then(|delta| delta.tool_calls.as_deref()).unwrap_or_default();
        let arguments = calls.iter().filter_map(|call| call.function.as_ref()?.arguments.as_ref());
        own.into_iter().flatten().chain(arguments).map(|Text(text)| text.as_ref())
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
    fn reads_chunk_fields_borrowed() {
        let json = br#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hel","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},"finish_reason":null},{"index":1,"text":"lo","finish_reason":"stop"}],"usage":null}"#;
        let chunk: Chunk<'_> = serde_json::from_slice(json).expect("a chunk");
        let choices = chunk.choices.expect("choices");
        let texts: Vec<&str> = choices.iter().flat_map(Choice::texts).collect();
        assert_eq!(texts, ["Hel", "{\"a\":1}", "lo"]);
        assert!(matches!(
            choices[0].delta.as_ref().and_then(|d| d.content.as_ref()),
            Some(Text(Cow::Borrowed(_)))
        ));
        assert!(choices[0].finish_reason.is_none());
        assert!(chunk.usage.is_none() && chunk.error.is_none());
    }
}
