//! Token estimates for admission against `tokens_per_minute`: how many tokens a request
//! may spend before the upstream says how many it did.
//!
//! Prompt text is counted with OpenAI's own BPE encodings, exactly as tiktoken counts
//! them: o200k_base for gpt-4o, gpt-4.1, gpt-4.5, gpt-5, the o-series and chatgpt-4o,
//! cl100k_base for gpt-4, gpt-3.5 and `text-embedding-*` (see [`Encoding::for_model`]).
//! Other models get a cheap estimate: one token per 4 bytes of text, rounded up.
//! The vocabularies are embedded compressed (1.5 MB, `vocab`) and unpacked once, on a
//! thread of their own, by [`warm_up`] at startup or on first use (about 5 MB); the
//! admit stage waits for them with [`ready`], so no estimate is ever made without
//! them. Text is split into pieces by each encoding's pattern (`pieces`).
//!
//! What counts, read in one borrowed pass over the body (no `serde_json::Value`):
//! - `messages` (chat): each message's `role`, text `content` (a string, or the `text`
//!   of its parts), `name` (+1), and the strings of its `tool_calls`, plus 3 tokens per
//!   message and 3 for priming the reply, as OpenAI's cookbook counts;
//! - `prompt` (completions) and `input` (embeddings, Responses API): a string, an
//!   array of strings, or token ids (each id is one token); `input` items that are
//!   objects are counted as messages; Responses' `instructions` as text;
//! - a non-text part (image, audio, file) counts [`NON_TEXT_PART_TOKENS`], the price
//!   of a low-detail image; the upstream's `usage` corrects it afterwards.
//!
//! One body gets at most [`BPE_BUDGET_BYTES`] of BPE counting; text past that is
//! counted by bytes / 4. Above that size (some 250k tokens) the estimate only needs to
//! be in the right range, and a 16 MiB body stays a few tens of milliseconds of CPU.
//!
//! Tool and function definitions (`tools`, `functions`) are not counted. Values of an
//! unexpected type count 0, and a body that is not JSON counts as text. Nothing here
//! panics or fails on a request's shape.
//!
//! The completion allowance is `max_completion_tokens`, `max_output_tokens` or
//! `max_tokens` (first present wins), else the caller's default, times `n` when
//! `n > 1`. Deciding what to do with the estimate is the limiter's business.

mod body;
mod pieces;
mod vocab;

use std::sync::{
    Once,
    atomic::{AtomicBool, Ordering},
};

use self::{pieces::Pattern, vocab::Vocabulary};

/// Tokens charged for one image, audio or file part of a message.
pub const NON_TEXT_PART_TOKENS: u64 = 85;
/// Text of one body counted with BPE; the rest is counted by bytes / 4.
pub const BPE_BUDGET_BYTES: usize = 1024 * 1024;

/// What a request may spend: its prompt, counted, and its completion, capped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenEstimate {
    /// Prompt and completion together: what admission reserves.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// How text is turned into a token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
    /// One token per 4 bytes, rounded up: models whose tokenizer we do not ship.
    Approximate,
}

const O200K_PREFIXES: &[&str] = &["gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
const CL100K_PREFIXES: &[&str] = &["gpt-4", "gpt-3.5", "gpt-35", "text-embedding-"];

impl Encoding {
    /// The encoding of an OpenAI model name, matched by prefix and ignoring ASCII case,
    /// a fine-tune's `ft:` and a router's `openai/` prefix.
    pub fn for_model(model: &str) -> Self {
        let model = strip_prefix_ignore_case(model, "ft:").unwrap_or(model);
        let model = strip_prefix_ignore_case(model, "openai/").unwrap_or(model);
        let has = |prefixes: &[&str]| prefixes.iter().any(|p| strip_prefix_ignore_case(model, p).is_some());
        if has(O200K_PREFIXES) {
            Self::O200kBase
        } else if has(CL100K_PREFIXES) {
            Self::Cl100kBase
        } else {
            Self::Approximate
        }
    }

    /// Tokens in `text`. Unpacks the vocabularies first if nothing has yet (a
    /// blocking wait: on the request path, [`ready`] comes first).
    pub fn count(self, text: &str) -> u64 {
        let tables = tables();
        let tokenizer = match self {
            Self::O200kBase => tables.o200k.as_ref(),
            Self::Cl100kBase => tables.cl100k.as_ref(),
            Self::Approximate => None,
        };
        match tokenizer {
            Some(tokenizer) => tokenizer.count(text),
            None => approximate(text.len()),
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// One token per 4 bytes, rounded up.
fn approximate(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// A vocabulary and the pattern its text is split by.
struct Tokenizer {
    vocabulary: Vocabulary,
    pattern: Pattern,
}

impl Tokenizer {
    fn unpack(name: &str, packed: &[u8], pattern: Pattern) -> Option<Self> {
        match Vocabulary::unpack(packed) {
            Ok(vocabulary) => Some(Self { vocabulary, pattern }),
            Err(error) => {
                // The tests check the embedded data: this would be a broken build.
                tracing::error!(%error, "cannot unpack the {name} vocabulary; its models are estimated at 4 bytes a token");
                None
            }
        }
    }

    fn count(&self, text: &str) -> u64 {
        let pieces = pieces::split(self.pattern, text);
        let tokens: usize = pieces.map(|piece| self.vocabulary.count(piece.as_bytes())).sum();
        u64::try_from(tokens).unwrap_or(u64::MAX)
    }
}

/// Both encodings, once unpacked; `None` for one that could not be.
struct Tables {
    o200k: Option<Tokenizer>,
    cl100k: Option<Tokenizer>,
}

static TABLES: tokio::sync::SetOnce<Tables> = tokio::sync::SetOnce::const_new();

/// The tables: unpacked here if nothing has yet, waited for if another thread is at it.
fn tables() -> &'static Tables {
    static UNPACK: Once = Once::new();
    static NONE: Tables = Tables { o200k: None, cl100k: None };
    UNPACK.call_once(|| {
        let o200k = include_bytes!("tokens/vocab/o200k_base.zlib");
        let cl100k = include_bytes!("tokens/vocab/cl100k_base.zlib");
        pieces::warm_up();
        let _ = TABLES.set(Tables {
            o200k: Tokenizer::unpack("o200k_base", o200k, Pattern::O200k),
            cl100k: Tokenizer::unpack("cl100k_base", cl100k, Pattern::Cl100k),
        });
    });
    TABLES.get().unwrap_or(&NONE)
}

/// Starts unpacking the vocabularies on a thread of their own, once; returns at once.
pub fn warm_up() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let spawned = std::thread::Builder::new().name("spillway-vocab".into()).spawn(|| {
        tables();
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread for the vocabularies; the first estimate unpacks them");
    }
}

/// Waits until the vocabularies are unpacked, starting that if nothing has yet; at
/// once after the first time.
pub async fn ready() {
    if TABLES.initialized() {
        return;
    }
    warm_up();
    TABLES.wait().await;
}

/// Estimates what the JSON request `body` for `model` may spend. `default_completion`
/// is the completion allowance when the body caps none (pass 0 for embeddings).
pub fn estimate(model: &str, body: &[u8], default_completion: u64) -> TokenEstimate {
    let Ok(read) = body::read(Encoding::for_model(model), body) else {
        return TokenEstimate { prompt: approximate(body.len()), completion: default_completion };
    };
    let per_choice = read.max_completion.or(read.max_tokens).unwrap_or(default_completion);
    TokenEstimate { prompt: read.prompt, completion: per_choice.saturating_mul(read.n.max(1)) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn picks_the_encoding_by_model_name() {
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "GPT-4.1-nano",
            "gpt-4.5-preview",
            "gpt-5.1",
            "o1-mini",
            "o3",
            "o4-mini",
        ] {
            assert_eq!(Encoding::for_model(model), Encoding::O200kBase, "{model}");
        }
        for model in ["chatgpt-4o-latest", "ft:gpt-4o-mini:org::x", "openai/gpt-4o"] {
            assert_eq!(Encoding::for_model(model), Encoding::O200kBase, "{model}");
        }
        for model in ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "gpt-35-turbo", "text-embedding-3-small"] {
            assert_eq!(Encoding::for_model(model), Encoding::Cl100kBase, "{model}");
        }
        for model in ["claude-3-5-sonnet", "llama-3", "", "o", "gpt"] {
            assert_eq!(Encoding::for_model(model), Encoding::Approximate, "{model}");
        }
    }

    #[test]
    fn counts_text_with_the_real_encodings() {
        let count = |model, text| Encoding::for_model(model).count(text);
        assert_eq!(count("gpt-4o", "hello world"), 2);
        assert_eq!(count("gpt-4", "hello world"), 2);
        assert_eq!(count("gpt-4o", ""), 0);
        assert_eq!(count("some-local-model", "hello world"), 3, "11 bytes / 4, rounded up");
    }

    /// Characters from every class the split patterns tell apart, and the contraction
    /// letters in both cases (and the long s, which `(?i)` folds to `s`).
    const ALPHABET: &[char] = &[
        'a', 'b', 'Z', 'É', 'é', 'ǅ', 'ʰ', '中', 'テ', '\u{301}', '\u{903}', '𝐀', 's', 'S', 'ſ', 't', 'T',
        'r', 'e', 'E', 'v', 'm', 'l', 'L', 'd', '\'', '0', '7', '٣', 'Ⅻ', '½', '𝟎', ' ', ' ', '\t', '\r',
        '\n', '\u{a0}', '\u{85}', '\u{2028}', '\u{3000}', '!', '/', '.', '-', '"', '😀', '\u{200d}',
        '\u{feff}', '\u{7f}',
    ];

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(ALPHABET), 0..48).prop_map(String::from_iter)
    }

    /// Ours and the reference tokenizer (tiktoken's own patterns, through regex-automata).
    fn encodings() -> [(Encoding, Pattern, &'static bpe_openai::Tokenizer); 2] {
        [
            (Encoding::O200kBase, Pattern::O200k, bpe_openai::o200k_base()),
            (Encoding::Cl100kBase, Pattern::Cl100k, bpe_openai::cl100k_base()),
        ]
    }

    proptest! {
        #[test]
        fn splits_and_counts_exactly_as_tiktoken_does(text in text()) {
            for (encoding, pattern, reference) in encodings() {
                let ours: Vec<&str> = pieces::split(pattern, &text).collect();
                let expected: Vec<&str> = reference.split(&text).collect();
                prop_assert_eq!(ours, expected, "{:?}", encoding);
                prop_assert_eq!(encoding.count(&text), reference.count(&text) as u64, "{:?}", encoding);
            }
        }
    }

    #[test]
    fn counts_real_text_exactly_as_tiktoken_does() {
        let texts = [
            "You are a helpful assistant. Answer in one sentence, please!",
            "fn main() {\n    println!(\"{}\", 42);\n}\n\n\n    // trailing   ",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"It's   12345678 o'clock"}]}"#,
            "Ünïcödé tëxt, ΕΛΛΗΝΙΚΆ κείμενα, русский текст, 日本語のテキスト、中文文本。",
            "I'M SURE YOU'LL SEE IT'S THERE, aren't you? We'd've known. https://example.com/a/b?c=d",
            "  leading spaces\r\n\r\nand CRLF lines\t\ttabs  \u{3000}ideographic space",
            "१२३ ٤٥٦ 七八九 ⅠⅡⅢ ½¾ 🙂🙃 👩‍💻 e\u{301}\u{301}",
        ];
        for text in texts {
            for (encoding, _, reference) in encodings() {
                assert_eq!(encoding.count(text), reference.count(text) as u64, "{encoding:?}: {text}");
            }
        }
        let long = texts.concat().repeat(50);
        for (encoding, _, reference) in encodings() {
            assert_eq!(encoding.count(&long), reference.count(&long) as u64, "{encoding:?}");
        }
    }

    #[test]
    fn long_runs_merge_exactly_as_tiktoken_does() {
        for text in ["a".repeat(3000), " ".repeat(2000), "ab".repeat(700), "1".repeat(500), "!?".repeat(400)]
        {
            for (encoding, _, reference) in encodings() {
                assert_eq!(encoding.count(&text), reference.count(&text) as u64, "{encoding:?}");
            }
        }
    }

    #[test]
    fn completion_allowance() {
        let completion = |body: &[u8]| estimate("gpt-4o", body, 50).completion;
        assert_eq!(completion(br#"{"messages":[]}"#), 50);
        assert_eq!(completion(br#"{"max_tokens":10}"#), 10);
        assert_eq!(completion(br#"{"max_tokens":10,"max_completion_tokens":20}"#), 20);
        assert_eq!(completion(br#"{"max_completion_tokens":20,"n":3}"#), 60);
        assert_eq!(completion(br#"{"n":2}"#), 100);
        assert_eq!(completion(br#"{"max_tokens":-5,"n":0}"#), 50);
        assert_eq!(completion(br#"{"max_output_tokens":9}"#), 9);
        assert_eq!(estimate("gpt-4o", br#"{"max_tokens":3}"#, 0).total(), 3);
    }

    #[test]
    fn odd_shapes_count_zero_and_bad_json_counts_bytes() {
        for body in [
            &br#"{"messages":"hi"}"#[..],
            br#"{"messages":[5,null,"x",[{"content":"deep"}]]}"#,
            br#"{"messages":{"content":"x"}}"#,
            br#"[{"messages":[]}]"#,
            br#""text""#,
            br#"{"max_tokens":"many","n":1.5}"#,
        ] {
            let estimate = estimate("gpt-4o", body, 1);
            assert!(
                estimate.prompt <= 3,
                "only the reply priming: {}: {estimate:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(estimate("gpt-4o", b"{\"messages\": [", 1), TokenEstimate { prompt: 4, completion: 1 });
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            let keys = prop_oneof![
                Just("messages"),
                Just("content"),
                Just("input"),
                Just("type"),
                Just("text"),
                Just("name"),
                Just("tool_calls"),
                Just("n"),
                Just("max_tokens"),
                Just("image_url"),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::vec((keys, inner), 0..5).prop_map(|entries| {
                    serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_is_read_whatever_its_shape_or_spacing(value in json()) {
            let compact = serde_json::to_vec(&value).expect("serializes");
            let pretty = serde_json::to_vec_pretty(&value).expect("serializes");
            // A fall back to counting bytes would tell the two apart.
            prop_assert_eq!(estimate("gpt-4o", &compact, 1), estimate("gpt-4o", &pretty, 1));
        }
    }
}
