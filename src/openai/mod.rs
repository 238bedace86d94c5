//! The few parts of OpenAI's wire format the gateway reads. Bodies are forwarded as
//! sent; only the fields routing, limits and caching need are deserialized, borrowed
//! and partially.
//!
//! This module owns the request summary ([`CallSummary`]), the one request rewrite the
//! spec allows (asking a stream for its usage, [`with_include_usage`]) and reading a
//! non-streamed response's [`Usage`]. Streamed responses are [`sse`]'s business, prompt
//! token estimates [`tokens`]'. Nothing here decides what to do with what it reads.

pub(crate) mod skim;
pub mod sse;
pub mod tokens;

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{
    Deserialize,
    de::{IgnoredAny, MapAccess, Visitor},
};
use serde_json::value::RawValue;

/// The endpoints whose JSON body the gateway must read: the model calls it routes,
/// allowlists and meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelEndpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Moderations,
    ImagesGenerations,
    AudioSpeech,
}

impl ModelEndpoint {
    const PATHS: [(&'static str, Self); 7] = [
        ("/v1/chat/completions", Self::ChatCompletions),
        ("/v1/completions", Self::Completions),
        ("/v1/embeddings", Self::Embeddings),
        ("/v1/responses", Self::Responses),
        ("/v1/moderations", Self::Moderations),
        ("/v1/images/generations", Self::ImagesGenerations),
        ("/v1/audio/speech", Self::AudioSpeech),
    ];

    /// The endpoint a `POST` to `path` (already in normal form) calls. Matched ignoring
    /// ASCII case, since some upstreams route that way: a spelling the gateway would
    /// not recognise must not reach one of them unread.
    pub fn of(path: &str) -> Option<Self> {
        Self::PATHS.iter().find(|(known, _)| known.eq_ignore_ascii_case(path)).map(|(_, endpoint)| *endpoint)
    }

    /// Streams of this endpoint take `stream_options.include_usage`.
    pub fn streams_usage(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Completions)
    }
}

/// What a JSON request body says about the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSummary {
    /// The `model` field, when the body has one.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
    /// `"stream_options": {"include_usage": true}`: the client wants the final usage
    /// chunk of a stream, so the gateway must not strip it.
    pub include_usage: bool,
    /// The body has a `stream_options` key of any value, so asking for usage means
    /// merging into it rather than adding the key.
    pub has_stream_options: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    stream: bool,
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<StreamOptionsPeek>,
}

/// `Some` whenever the key is there, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<StreamOptionsPeek>, D::Error> {
    StreamOptionsPeek::deserialize(deserializer).map(Some)
}

/// `stream_options` of any shape; only an object's `include_usage: true` counts.
struct StreamOptionsPeek {
    include_usage: bool,
}

impl<'de> Deserialize<'de> for StreamOptionsPeek {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Options {
            #[serde(default, deserialize_with = "lenient_bool")]
            include_usage: bool,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum MaybeOptions {
            Options(Options),
            Other(IgnoredAny),
        }
        let include_usage = match MaybeOptions::deserialize(deserializer)? {
            MaybeOptions::Options(options) => options.include_usage,
            MaybeOptions::Other(_) => false,
        };
        Ok(Self { include_usage })
    }
}

/// `stream` of any other type than a boolean is the upstream's business to reject.
fn lenient_bool<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum MaybeBool {
        Bool(bool),
        Other(IgnoredAny),
    }
    Ok(matches!(MaybeBool::deserialize(deserializer)?, MaybeBool::Bool(true)))
}

impl CallSummary {
    /// Reads a JSON request body. The whole body is validated as JSON; `Err` carries
    /// serde's message (with line and column) for a 400 `invalid_json`.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let peek: Peek<'_> = serde_json::from_slice(body).map_err(|error| error.to_string())?;
        Ok(Self {
            model: peek.model.map(Cow::into_owned),
            stream: peek.stream,
            include_usage: peek.stream_options.as_ref().is_some_and(|options| options.include_usage),
            has_stream_options: peek.stream_options.is_some(),
        })
    }

    /// The body to send upstream so that a stream ends with its usage chunk, given the
    /// body this summary was parsed from; `None` when the body can go as it is (not a
    /// stream, or the client already asked for usage).
    ///
    /// Without a `stream_options` key, `"stream_options":{"include_usage":true}` is
    /// spliced in right after the opening `{` and every other byte stays as sent. With
    /// one (rare), the object is written again with `include_usage` merged into it:
    /// members keep their order and values their text (a number is never rounded
    /// through `f64`); keys may be escaped differently and whitespace between members
    /// is dropped. Only
    /// chat/completions and completions streams take this option; which paths to
    /// rewrite is the caller's decision.
    pub fn with_include_usage(&self, body: &[u8]) -> Option<Bytes> {
        if !self.stream || self.include_usage {
            return None;
        }
        if self.has_stream_options { merge_include_usage(body) } else { splice_include_usage(body) }
    }
}

/// [`CallSummary::with_include_usage`] for a body not yet parsed; `None` also when it
/// is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    CallSummary::parse(body).ok()?.with_include_usage(body)
}

const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true}"#;

fn splice_include_usage(body: &[u8]) -> Option<Bytes> {
    let open = body.iter().position(|byte| !byte.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'}');
    let mut spliced = BytesMut::with_capacity(body.len() + INCLUDE_USAGE.len() + 1);
    spliced.put_slice(&body[..=open]);
    spliced.put_slice(INCLUDE_USAGE);
    if !empty {
        spliced.put_u8(b',');
    }
    spliced.put_slice(rest);
    Some(spliced.freeze())
}

fn merge_include_usage(body: &[u8]) -> Option<Bytes> {
    let Members(members) = serde_json::from_slice(body).ok()?;
    let mut merged = BytesMut::with_capacity(body.len() + INCLUDE_USAGE.len());
    merged.put_u8(b'{');
    for (index, (key, value)) in members.iter().enumerate() {
        if index > 0 {
            merged.put_u8(b',');
        }
        serde_json::to_writer((&mut merged).writer(), key).ok()?;
        merged.put_u8(b':');
        if key != "stream_options" {
            merged.put_slice(value.get().as_bytes());
            continue;
        }
        // Not an object (`null`, a list): replaced, as there is nothing to merge into.
        let Members(options) = serde_json::from_str(value.get()).unwrap_or_default();
        merged.put_u8(b'{');
        for (key, value) in options.iter().filter(|(key, _)| key != "include_usage") {
            serde_json::to_writer((&mut merged).writer(), key).ok()?;
            merged.put_u8(b':');
            merged.put_slice(value.get().as_bytes());
            merged.put_u8(b',');
        }
        merged.put_slice(br#""include_usage":true}"#);
    }
    merged.put_u8(b'}');
    Some(merged.freeze())
}

/// A JSON object's members in document order, each value borrowed as written.
#[derive(Default)]
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Tokens an upstream says a call used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The wire shape of `usage`: chat/completions and completions send all three fields,
/// embeddings no `completion_tokens`, the Responses API `input_tokens`/`output_tokens`.
#[derive(Deserialize)]
pub(crate) struct UsagePeek {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl From<UsagePeek> for Usage {
    fn from(peek: UsagePeek) -> Self {
        let sum = peek.prompt_tokens.saturating_add(peek.completion_tokens);
        Self {
            prompt_tokens: peek.prompt_tokens,
            completion_tokens: peek.completion_tokens,
            total_tokens: peek.total_tokens.unwrap_or(sum),
        }
    }
}

/// The top-level `usage` of a non-streamed JSON response; `None` when the body is not
/// a JSON object, has no `usage` (or two), or its counts are not non-negative
/// integers. The body is checked and skipped over, not decoded ([`skim`]); only
/// `usage` is.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    let mut skim = skim::Skim::new(body);
    let (mut usage, mut seen) = (None, false);
    skim.object(|key, skim| {
        if *key.name()? != *b"usage" {
            return skim.value();
        }
        if std::mem::replace(&mut seen, true) {
            return Err(skim::Malformed);
        }
        if !skim.null() {
            let peek = serde_json::from_slice::<UsagePeek>(skim.raw()?).map_err(|_| skim::Malformed)?;
            usage = Some(Usage::from(peek));
        }
        Ok(())
    })
    .ok()?;
    skim.end().ok()?;
    usage
}

/// Whether `body` is JSON (the whole of it).
pub fn is_json(body: &[u8]) -> bool {
    let mut skim = skim::Skim::new(body);
    skim.value().and_then(|()| skim.end()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(model: Option<&str>, stream: bool) -> CallSummary {
        CallSummary { model: model.map(str::to_owned), stream, ..CallSummary::default() }
    }

    #[test]
    fn reads_model_and_stream() {
        let call = CallSummary::parse(br#"{"messages":[],"model":"gpt-4o","stream":true}"#);
        assert_eq!(call, Ok(summary(Some("gpt-4o"), true)));
        let call = CallSummary::parse(br#"{"model":"m\u00e9","stream":"yes"}"#);
        assert_eq!(call, Ok(summary(Some("m\u{e9}"), false)));
    }

    #[test]
    fn refuses_invalid_json() {
        assert!(CallSummary::parse(b"{\"model\": ").is_err());
        assert!(CallSummary::parse(b"").is_err());
        assert!(CallSummary::parse(br#"{"model": 5}"#).is_err());
    }

    #[test]
    fn reads_include_usage_of_any_shape() {
        let parse =
            |body: &[u8]| CallSummary::parse(body).map(|call| (call.include_usage, call.has_stream_options));
        assert_eq!(parse(br#"{"stream":true,"stream_options":{"include_usage":true}}"#), Ok((true, true)));
        assert_eq!(parse(br#"{"stream":true,"stream_options":{"include_usage":false}}"#), Ok((false, true)));
        assert_eq!(parse(br#"{"stream":true,"stream_options":{"include_usage":"yes"}}"#), Ok((false, true)));
        assert_eq!(parse(br#"{"stream":true,"stream_options":null}"#), Ok((false, true)));
        assert_eq!(parse(br#"{"stream":true,"stream_options":[1]}"#), Ok((false, true)));
        assert_eq!(parse(br#"{"stream":true}"#), Ok((false, false)));
    }

    #[test]
    fn splices_include_usage_after_the_opening_brace() {
        let body = br#" {"model":"gpt-4o", "stream":true,"messages":[]}"#;
        let rewritten = with_include_usage(body).expect("a stream without usage is rewritten");
        assert_eq!(
            &rewritten[..],
            br#" {"stream_options":{"include_usage":true},"model":"gpt-4o", "stream":true,"messages":[]}"#
        );
        let call = CallSummary::parse(&rewritten).expect("still JSON");
        assert!(call.include_usage && call.stream);
    }

    #[test]
    fn merges_include_usage_into_existing_options() {
        for body in [
            &br#"{"stream":true,"stream_options":{"include_obfuscation":false},"model":"m"}"#[..],
            br#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            br#"{"stream":true,"stream_options":null}"#,
        ] {
            let rewritten = with_include_usage(body).expect("rewritten");
            let value: serde_json::Value = serde_json::from_slice(&rewritten).expect("JSON");
            assert_eq!(value["stream_options"]["include_usage"], true);
            assert_eq!(value["stream"], true);
        }
        let rewritten =
            with_include_usage(br#"{"stream":true,"stream_options":{"x":1}}"#).expect("rewritten");
        let value: serde_json::Value = serde_json::from_slice(&rewritten).expect("JSON");
        assert_eq!(value["stream_options"]["x"], 1, "other options are kept");
    }

    #[test]
    fn merging_keeps_every_other_value_as_written() {
        // Found by the `request_fields` fuzz target: the merge went through
        // `serde_json::Value`, which sent this seed upstream as 1.2345678901234568e20.
        let body = br#"{"seed":123456789012345678901, "temperature":0.70,"stream":true,
            "stream_options":{"x":1.0E+2,"include_usage":false,"y":[ 1 ]},"n":-0,"seed":1}"#;
        assert_eq!(
            &with_include_usage(body).expect("rewritten")[..],
            br#"{"seed":123456789012345678901,"temperature":0.70,"stream":true,"stream_options":{"x":1.0E+2,"y":[ 1 ],"include_usage":true},"n":-0,"seed":1}"#
        );
    }

    #[test]
    fn leaves_bodies_that_need_nothing() {
        assert_eq!(with_include_usage(br#"{"model":"m"}"#), None);
        assert_eq!(with_include_usage(br#"{"stream":false}"#), None);
        assert_eq!(with_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#), None);
        assert_eq!(with_include_usage(b"[1]"), None);
        assert_eq!(with_include_usage(b"not json"), None);
    }

    #[test]
    fn reads_usage_of_each_endpoint() {
        let chat = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(
            usage_from_json(chat),
            Some(Usage { prompt_tokens: 9, completion_tokens: 12, total_tokens: 21 })
        );
        let embeddings = br#"{"data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            usage_from_json(embeddings),
            Some(Usage { prompt_tokens: 8, completion_tokens: 0, total_tokens: 8 })
        );
        let responses = br#"{"usage":{"input_tokens":5,"output_tokens":7,"input_tokens_details":{}}}"#;
        assert_eq!(
            usage_from_json(responses),
            Some(Usage { prompt_tokens: 5, completion_tokens: 7, total_tokens: 12 })
        );
    }

    #[test]
    fn usage_absent_or_odd_is_none() {
        assert_eq!(usage_from_json(br#"{"choices":[]}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":null}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":{"prompt_tokens":-1}}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":"many"}"#), None);
        assert_eq!(usage_from_json(b"data: {}"), None);
    }
}
