//! The properties the fuzz targets check, written once: `fuzz/fuzz_targets/*.rs` call
//! them on what libFuzzer generates, and the `fuzz_corpus` integration test calls them
//! on every committed corpus file, on stable, in the normal `cargo test`.
//!
//! Each check takes the raw input bytes and panics when a property fails; an input
//! that is merely invalid (not UTF-8, not JSON) is fine and checked for what still
//! applies. This module owns no behaviour of the gateway; it only calls the parsers
//! that requests, upstreams and config files reach. How to run the fuzzer is in
//! `fuzz/README.md`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::{
    cache::key::canonical_json,
    config::{self, Overrides},
    openai::{self, CallSummary, Usage, sse::StreamWatch},
    pipeline::retry,
};

/// `config`: loading never panics, and every diagnostic points inside the input.
///
/// `${VAR}` is answered by [`fuzz_env`], so interpolation sees set, empty, unset and
/// awkward values without touching the process's environment.
pub fn config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let Err(diagnostics) = config::load_str(text, "fuzz.toml", fuzz_env, &Overrides::default()) else {
        return;
    };
    assert!(!diagnostics.is_empty(), "a config was refused without a reason");
    let lines: Vec<&str> = text.split('\n').collect();
    for diagnostic in diagnostics.iter() {
        let line = diagnostic.line.checked_sub(1).and_then(|index| lines.get(index));
        let Some(line) = line else {
            panic!("{diagnostic}\n  is on line {} of {}", diagnostic.line, lines.len());
        };
        let columns = line.chars().count() + 1;
        assert!(
            (1..=columns).contains(&diagnostic.col),
            "{diagnostic}\n  is at column {} of a line with {columns} positions",
            diagnostic.col
        );
        assert!(!diagnostic.message.is_empty(), "an empty message at {}:{}", diagnostic.line, diagnostic.col);
    }
}

/// The environment of the `config` check: names starting `UNSET` are unset, every
/// other name picks one of a few values (ordinary, empty, and ones that need escaping
/// or cannot sit in every kind of TOML string) by its length.
pub fn fuzz_env(name: &str) -> Option<String> {
    const VALUES: [&str; 12] = [
        "",
        "8080",
        "127.0.0.1:9000",
        "https://api.example.com/v1",
        "sk-\"quoted\"\\back",
        "two\nlines\r\n",
        "it's",
        "'''",
        "} ${NESTED} $${",
        "\u{0}\u{1f}\u{7f}",
        "é✓",
        "[1, 2] # x",
    ];
    if name.starts_with("UNSET") {
        return None;
    }
    VALUES.get(name.len() % VALUES.len()).map(|value| (*value).to_owned())
}

/// `request_fields`: the request-field reader, the `include_usage` rewrite and
/// canonical JSON.
///
/// - A rewritten body still parses, now with `include_usage`, and with the same model
///   and stream; as JSON it is the original with `stream_options.include_usage: true`
///   merged in, and a splice leaves every other byte as sent.
/// - Canonical JSON is valid JSON and its own canonical form; whenever `serde_json`
///   reads the input, it reads the canonical form as the same document.
pub fn request_fields(input: &[u8]) {
    if let Ok(call) = CallSummary::parse(input) {
        let rewritten = call.with_include_usage(input);
        assert_eq!(openai::with_include_usage(input), rewritten, "the two entry points disagree");
        if let Some(rewritten) = rewritten {
            check_rewrite(input, &call, &rewritten);
        }
    }
    if let Ok(canonical) = canonical_json(input) {
        if let Err(error) = serde_json::from_slice::<IgnoredAny>(&canonical) {
            panic!("canonical form is not JSON ({error}): {}", String::from_utf8_lossy(&canonical));
        }
        assert_eq!(canonical_json(&canonical).as_ref(), Ok(&canonical), "canonical form is not idempotent");
    }
    if let Ok(value) = serde_json::from_slice::<Value>(input) {
        let canonical = match canonical_json(input) {
            Ok(canonical) => canonical,
            Err(error) => panic!("serde_json reads what canonical_json refuses: {error}"),
        };
        let reread = serde_json::from_slice::<Value>(&canonical).ok();
        assert_eq!(reread, Some(value), "canonical form means another document");
    }
}

fn check_rewrite(input: &[u8], call: &CallSummary, rewritten: &[u8]) {
    let again = match CallSummary::parse(rewritten) {
        Ok(again) => again,
        Err(error) => {
            panic!("rewritten body does not parse ({error}): {}", String::from_utf8_lossy(rewritten))
        }
    };
    assert!(again.include_usage, "rewritten body does not ask for usage");
    assert_eq!((&again.model, again.stream), (&call.model, call.stream), "model or stream changed");
    assert_eq!(again.with_include_usage(rewritten), None, "a rewritten body would be rewritten again");
    if !call.has_stream_options {
        let inserted = br#""stream_options":{"include_usage":true}"#;
        let at = rewritten.windows(inserted.len()).position(|window| window == inserted);
        let Some(at) = at else { panic!("a splice without the spliced option") };
        let after = &rewritten[at + inserted.len()..];
        let after = after.strip_prefix(b",").unwrap_or(after);
        assert_eq!([&rewritten[..at], after].concat(), input, "a splice changed other bytes");
    }
    // Numbers out of f64's range are JSON that `Value` cannot hold: nothing to compare.
    if let Ok(mut expected) = serde_json::from_slice::<Value>(input) {
        if let Some(object) = expected.as_object_mut() {
            let options = object.entry("stream_options").or_insert_with(|| serde_json::json!({}));
            if !options.is_object() {
                *options = serde_json::json!({});
            }
            options["include_usage"] = Value::Bool(true);
        }
        let actual = serde_json::from_slice::<Value>(rewritten).ok();
        assert_eq!(actual, Some(expected), "the rewrite changed more than stream_options");
    }
}

/// `sse`: the stream watch relays the same bytes and records the same things however
/// the stream is cut into frames (whole, byte by byte, and at points drawn from the
/// input); without stripping it relays the input unchanged, with stripping it drops
/// whole events only, each carrying usage. A single-line body that the watch reads
/// usage from as a `data:` chunk gives the same usage to [`openai::usage_from_json`].
/// Whatever the chunk reader reads from the input as a chunk, serde's derive (the
/// reader it replaced, [`reference_chunk`]) reads alike.
pub fn sse(input: &[u8]) {
    let whole = [input.len()];
    let bytewise: Vec<usize> = (1..=input.len()).collect();
    let drawn = drawn_cuts(input);
    for strip in [false, true] {
        let expected = watch(input, &whole, strip);
        for cuts in [&bytewise, &drawn] {
            let got = watch(input, cuts, strip);
            assert_eq!(got, expected, "split at {cuts:?} (strip: {strip})");
        }
        if strip {
            check_stripped(input, &expected.relayed);
        } else {
            assert_eq!(expected.relayed, input, "relayed bytes differ from the stream without stripping");
        }
    }
    let unstripped = watch(input, &whole, false);
    assert_eq!(watch(input, &whole, true).records, unstripped.records, "stripping changed what was read");

    let mut texts = Vec::new();
    if let Ok(read) = openai::sse::chunk::read(input, |text| texts.push(text.to_owned())) {
        let Some((reference, mut expected)) = reference_chunk(input) else {
            panic!("the derive refuses a chunk the reader reads: {read:?}")
        };
        texts.sort();
        expected.sort();
        assert_eq!((read, texts), (reference, expected), "the chunk readers disagree");
    }
    let _ = openai::usage_from_json(input);
    if !input.contains(&b'\n') && !input.contains(&b'\r') {
        let event = [b"data: ", input, b"\n\n"].concat();
        if let Some(usage) = watch(&event, &[event.len()], false).records.usage {
            assert_eq!(openai::usage_from_json(input), Some(usage), "the two usage readers disagree");
        }
    }
}

/// What one run of a [`StreamWatch`] gave.
#[derive(Debug, PartialEq, Eq)]
struct Watched {
    relayed: Vec<u8>,
    records: Records,
}

#[derive(Debug, PartialEq, Eq)]
struct Records {
    usage: Option<Usage>,
    completion: u64,
    done: bool,
    finish_reason: Option<String>,
    content_filtered: bool,
    error: bool,
    gave_up: bool,
}

/// Relays `input` in frames ending at each of `cuts` (ascending), then the rest.
fn watch(input: &[u8], cuts: &[usize], strip: bool) -> Watched {
    let mut watch = StreamWatch::new(strip, "gpt-4o");
    let mut relayed = Vec::with_capacity(input.len());
    let mut start = 0;
    for &cut in cuts.iter().chain([&input.len()]) {
        let cut = cut.clamp(start, input.len());
        relayed.extend_from_slice(&watch.relay(Bytes::copy_from_slice(&input[start..cut])));
        start = cut;
    }
    relayed.extend_from_slice(watch.finish().as_deref().unwrap_or_default());
    let records = Records {
        usage: watch.usage(),
        completion: watch.completion_tokens(),
        done: watch.done(),
        finish_reason: watch.finish_reason().map(str::to_owned),
        content_filtered: watch.content_filtered(),
        error: watch.error(),
        gave_up: watch.gave_up(),
    };
    Watched { relayed, records }
}

/// Up to 16 ascending cut points, drawn with a generator seeded from the input, so the
/// fuzzer moves them by mutating the stream.
fn drawn_cuts(input: &[u8]) -> Vec<usize> {
    // FNV-1a, then xorshift64.
    let mut state = input.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut cuts: Vec<usize> = (0..state % 17)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % (input.len() as u64 + 1)) as usize
        })
        .collect();
    cuts.sort_unstable();
    cuts
}

/// With stripping, the relayed bytes are the input's events in order, less some that
/// mention `usage`.
fn check_stripped(input: &[u8], relayed: &[u8]) {
    let mut framer = openai::sse::EventFramer::new();
    let mut events = Vec::new();
    framer.push(&Bytes::copy_from_slice(input), |event| events.push(event));
    events.extend(framer.finish());
    let mut at = 0;
    for event in &events {
        if relayed[at..].starts_with(event) {
            at += event.len();
        } else {
            let mentions_usage = event.windows(b"usage".len()).any(|window| window == b"usage");
            assert!(mentions_usage, "stripped an event without usage: {:?}", String::from_utf8_lossy(event));
        }
    }
    assert_eq!(at, relayed.len(), "relayed bytes that are not whole events of the input");
}

/// `retry_after`: reading what an upstream asked to wait never panics and never gives
/// more than [`retry::LONGEST_RETRY_AFTER`], and a plain count up to that is read to
/// the microsecond: `retry-after-ms` (then `x-ms-retry-after-ms`) in milliseconds
/// before `retry-after` in seconds.
///
/// The input is header lines, `name: value`; lines that are not a valid header are
/// skipped.
pub fn retry_after(input: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in input.split(|&byte| byte == b'\n') {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else { continue };
        let value = line[colon + 1..].strip_prefix(b" ").unwrap_or(&line[colon + 1..]);
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let asked = retry::retry_after(&headers);
    let longest = retry::LONGEST_RETRY_AFTER;
    assert!(asked.is_none_or(|asked| asked <= longest), "read {asked:?} for {headers:?}");
    let count = |name: &str| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        value.bytes().all(|byte| byte.is_ascii_digit()).then(|| value.parse::<u32>().ok()).flatten()
    };
    let millis = |name| headers.get(name).and_then(|value| value.to_str().ok()?.trim().parse::<f64>().ok());
    let usable = |ms: Option<f64>| ms.is_some_and(|ms| ms.is_finite() && ms >= 0.0);
    let expected = if let Some(ms) = count("retry-after-ms") {
        Duration::from_millis(ms.into())
    } else if usable(millis("retry-after-ms")) {
        return;
    } else if let Some(ms) = count("x-ms-retry-after-ms") {
        Duration::from_millis(ms.into())
    } else if usable(millis("x-ms-retry-after-ms")) {
        return;
    } else if let Some(seconds) = count("retry-after") {
        Duration::from_secs(seconds.into())
    } else {
        return;
    };
    let expected = expected.min(longest);
    // Milliseconds go through `f64` seconds, which may be a nanosecond off.
    let close = asked.is_some_and(|asked| asked.abs_diff(expected) < Duration::from_micros(1));
    assert!(close, "read {asked:?} for {headers:?}, expected {expected:?}");
}

/// `path`: the path normaliser ([`crate::upstream::path::normalize`]) on any path hyper
/// can hand over.
///
/// - Its normal form means what the path meant: percent-decoded, both are the same
///   bytes, so no upstream that decodes reads another path than the one decided on.
/// - The normal form is final: normalising it again changes nothing; it has no empty,
///   `.` or `..` segment, no `\`, `;`, encoded `/`, `\` or `%`, only visible ASCII, and
///   it is a valid URI path, so ingress can always rebuild the request's URI with it.
pub fn path(input: &[u8]) {
    use crate::upstream::path::normalize;

    let Ok(text) = std::str::from_utf8(input) else { return };
    let Ok(parsed) = http::uri::PathAndQuery::try_from(text) else { return };
    let Ok(normal) = normalize(parsed.path()) else { return };
    assert_eq!(percent_decoded(&normal), percent_decoded(parsed.path()), "{normal:?} means another path");
    assert_eq!(normalize(&normal).as_deref(), Ok(normal.as_str()), "the normal form is not final");
    for segment in normal.split('/').skip(1) {
        assert!(!matches!(segment, "" | "." | ".."), "{normal:?} has segment {segment:?}");
    }
    let upper = normal.to_ascii_uppercase();
    for refused in ["\\", ";", "%2F", "%5C", "%25"] {
        assert!(!upper.contains(refused), "{normal:?} contains {refused}");
    }
    assert!(normal.bytes().all(|byte| byte.is_ascii_graphic()), "{normal:?} has an invisible byte");
    let rebuilt = http::uri::PathAndQuery::try_from(normal.as_str());
    assert_eq!(rebuilt.map(|path| path.path().to_owned()).ok().as_deref(), Some(normal.as_str()));
}

/// Every `%XX` escape decoded; anything else as it is.
fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escape = bytes.get(at + 1..at + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match (bytes[at], escape.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                at += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    decoded
}

/// What the stream watch's reader (`openai::sse::chunk::read`) must make of a chunk:
/// the same fields read by serde's derive, as they were before that reader replaced
/// it. `None` where the derive refuses the chunk. Texts come in the derive's field
/// order, not the document's.
pub fn reference_chunk(data: &[u8]) -> Option<(openai::sse::chunk::Chunk<'_>, Vec<String>)> {
    use std::borrow::Cow;

    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(default, borrow)]
        choices: Option<Vec<Choice<'a>>>,
        #[serde(default)]
        usage: Option<openai::UsagePeek>,
        #[serde(default)]
        error: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        delta: Option<Delta<'a>>,
        #[serde(default, borrow)]
        text: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        finish_reason: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        refusal: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning_content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        tool_calls: Option<Vec<ToolCall<'a>>>,
    }
    #[derive(Deserialize)]
    struct ToolCall<'a> {
        #[serde(default, borrow)]
        function: Option<Function<'a>>,
    }
    #[derive(Deserialize)]
    struct Function<'a> {
        #[serde(default, borrow)]
        arguments: Option<Cow<'a, str>>,
    }

    let chunk: Chunk<'_> = serde_json::from_slice(data).ok()?;
    let choices = chunk.choices.unwrap_or_default();
    let mut read = openai::sse::chunk::Chunk {
        choices: choices.len(),
        usage: chunk.usage.map(Usage::from),
        error: chunk.error.is_some(),
        ..Default::default()
    };
    let mut texts = Vec::new();
    for choice in choices {
        if let Some(delta) = choice.delta {
            texts.extend([delta.content, delta.refusal, delta.reasoning_content].into_iter().flatten());
            let calls = delta.tool_calls.unwrap_or_default();
            texts.extend(calls.into_iter().filter_map(|call| call.function?.arguments));
        }
        texts.extend(choice.text);
        if let Some(reason) = choice.finish_reason {
            read.content_filtered |= reason == "content_filter";
            read.finish_reason = Some(reason);
        }
    }
    Some((read, texts.into_iter().map(Cow::into_owned).collect()))
}
