//! The one pass over a request body that [`super::estimate`] makes: a
//! `DeserializeSeed` that walks only the fields that count, borrowed, and adds up
//! their tokens as it goes. Which encoding and what the totals mean is
//! [`super`]'s business.

use std::fmt;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use super::{BPE_BUDGET_BYTES, Encoding, NON_TEXT_PART_TOKENS, approximate};

/// OpenAI's per-message overhead (`<|start|>role…<|end|>`).
const PER_MESSAGE: u64 = 3;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;
/// A message's `name` costs one token beyond its text.
const PER_NAME: u64 = 1;

/// Counts a JSON body in one pass; `Err` when it is not JSON.
pub(super) fn read(encoding: Encoding, body: &[u8]) -> Result<Tally, serde_json::Error> {
    let mut tally = Tally::new(encoding);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Seed { tally: &mut tally, role: Role::Body }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(tally)
}

/// What the pass over a body has counted and read.
pub(super) struct Tally {
    encoding: Encoding,
    /// Prompt tokens counted.
    pub prompt: u64,
    messages: u64,
    /// `max_completion_tokens` or `max_output_tokens`.
    pub max_completion: Option<u64>,
    pub max_tokens: Option<u64>,
    pub n: u64,
    /// Bytes of text still to be counted with BPE.
    bpe_left: usize,
    /// The part being read is an image, audio or file.
    non_text_part: bool,
}

impl Tally {
    fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            prompt: 0,
            messages: 0,
            max_completion: None,
            max_tokens: None,
            n: 1,
            bpe_left: BPE_BUDGET_BYTES,
            non_text_part: false,
        }
    }

    fn add(&mut self, tokens: u64) {
        self.prompt = self.prompt.saturating_add(tokens);
    }

    fn text(&mut self, text: &str) {
        let tokens = match self.bpe_left.checked_sub(text.len()) {
            Some(left) => {
                self.bpe_left = left;
                self.encoding.count(text)
            }
            None => approximate(text.len()),
        };
        self.add(tokens);
    }
}

/// Where in the body a value sits, which decides what it counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Body,
    Messages,
    /// A chat message, or an object item of `input`.
    Message,
    Content,
    Part,
    PartType,
    /// `prompt` or `input`.
    Inputs,
    /// An element of `prompt`/`input`: a string, a token id, a token array, an item.
    InputItem,
    TokenIds,
    Text,
    /// Every string inside, at any depth (tool calls).
    AllText,
    MaxCompletion,
    MaxTokens,
    N,
    Ignored,
}

/// The keys the pass looks at; anything else is skipped unread.
enum Key {
    Messages,
    Prompt,
    Input,
    Instructions,
    MaxCompletion,
    MaxTokens,
    N,
    Content,
    Role,
    Name,
    ToolCalls,
    Arguments,
    Output,
    Text,
    Type,
    Media,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "messages" => Key::Messages,
                    "prompt" => Key::Prompt,
                    "input" => Key::Input,
                    "instructions" => Key::Instructions,
                    "max_completion_tokens" | "max_output_tokens" => Key::MaxCompletion,
                    "max_tokens" => Key::MaxTokens,
                    "n" => Key::N,
                    "content" => Key::Content,
                    "role" => Key::Role,
                    "name" => Key::Name,
                    "tool_calls" => Key::ToolCalls,
                    "arguments" => Key::Arguments,
                    "output" => Key::Output,
                    "text" | "refusal" => Key::Text,
                    "type" => Key::Type,
                    "image_url" | "input_audio" | "file" | "image_file" => Key::Media,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl Key {
    /// The role of this key's value inside a value of role `parent`.
    fn role_in(self, parent: Role) -> Role {
        match (parent, self) {
            (Role::Body, Key::Messages) => Role::Messages,
            (Role::Body, Key::Prompt | Key::Input) => Role::Inputs,
            (Role::Body, Key::Instructions) => Role::Text,
            (Role::Body, Key::MaxCompletion) => Role::MaxCompletion,
            (Role::Body, Key::MaxTokens) => Role::MaxTokens,
            (Role::Body, Key::N) => Role::N,
            (Role::Message, Key::Content | Key::Output) => Role::Content,
            (Role::Message, Key::Role | Key::Name | Key::Arguments) => Role::Text,
            (Role::Message, Key::ToolCalls) => Role::AllText,
            (Role::Part, Key::Text) => Role::Text,
            (Role::Part, Key::Type) => Role::PartType,
            (Role::AllText, _) => Role::AllText,
            _ => Role::Ignored,
        }
    }
}

/// Reads one value in its role, adding what it counts to the tally. Accepts a value of
/// any type: one its role does not expect is skipped.
struct Seed<'t> {
    tally: &'t mut Tally,
    role: Role,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.role == Role::Ignored {
            return IgnoredAny::deserialize(deserializer).map(drop);
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        match self.role {
            Role::Content | Role::Part | Role::Inputs | Role::InputItem | Role::Text | Role::AllText => {
                self.tally.text(text);
            }
            Role::PartType => {
                self.tally.non_text_part |= ["image", "audio", "file"].iter().any(|kind| text.contains(kind));
            }
            _ => {}
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<(), E> {
        match self.role {
            Role::Inputs | Role::InputItem | Role::TokenIds => self.tally.add(1),
            Role::MaxCompletion => self.tally.max_completion = Some(number),
            Role::MaxTokens => self.tally.max_tokens = Some(number),
            Role::N => self.tally.n = number,
            _ => {}
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<(), E> {
        match u64::try_from(number) {
            Ok(number) => self.visit_u64(number),
            Err(_) => Ok(()),
        }
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let tally = self.tally;
        let element = match self.role {
            Role::Messages => {
                tally.add(REPLY_PRIMING);
                Role::Message
            }
            Role::Content => Role::Part,
            Role::Inputs => Role::InputItem,
            Role::InputItem => Role::TokenIds,
            Role::AllText => Role::AllText,
            _ => Role::Ignored,
        };
        let messages_before = tally.messages;
        while seq.next_element_seed(Seed { tally: &mut *tally, role: element })?.is_some() {}
        if self.role == Role::Inputs && tally.messages > messages_before {
            tally.add(REPLY_PRIMING);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let tally = self.tally;
        let role = match self.role {
            Role::InputItem | Role::Message => {
                tally.messages += 1;
                tally.add(PER_MESSAGE);
                Role::Message
            }
            Role::Part => {
                tally.non_text_part = false;
                Role::Part
            }
            Role::Body | Role::AllText => self.role,
            _ => Role::Ignored,
        };
        while let Some(key) = map.next_key::<Key>()? {
            match (role, key) {
                (Role::Part, Key::Media) => {
                    tally.non_text_part = true;
                    map.next_value::<IgnoredAny>()?;
                }
                (Role::Message, Key::Name) => {
                    tally.add(PER_NAME);
                    map.next_value_seed(Seed { tally: &mut *tally, role: Role::Text })?;
                }
                (_, key) => map.next_value_seed(Seed { tally: &mut *tally, role: key.role_in(role) })?,
            }
        }
        if role == Role::Part && tally.non_text_part {
            tally.non_text_part = false;
            tally.add(NON_TEXT_PART_TOKENS);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k(text: &str) -> u64 {
        Encoding::O200kBase.count(text)
    }

    #[test]
    fn counts_chat_messages_as_the_cookbook_does() {
        let body = br#"{"model":"gpt-4o","max_tokens":100,"messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","name":"ada","content":[{"type":"text","text":"Hi there"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#;
        let expected = REPLY_PRIMING
            + (PER_MESSAGE + o200k("system") + o200k("You are terse."))
            + (PER_MESSAGE
                + o200k("user")
                + PER_NAME
                + o200k("ada")
                + o200k("Hi there")
                + NON_TEXT_PART_TOKENS);
        assert_eq!(
            read(Encoding::O200kBase, body).map(|tally| (tally.prompt, tally.max_tokens)).ok(),
            Some((expected, Some(100)))
        );
    }

    #[test]
    fn counts_prompts_and_inputs() {
        let prompt =
            |body: &[u8]| read(Encoding::Cl100kBase, body).map(|tally| tally.prompt).unwrap_or(u64::MAX);
        assert_eq!(prompt(br#"{"prompt":"hello world"}"#), 2);
        assert_eq!(prompt(br#"{"prompt":["hello world","hello"]}"#), 3);
        assert_eq!(prompt(br#"{"input":[1,2,3]}"#), 3, "token ids count one each");
        assert_eq!(prompt(br#"{"input":[[1,2],[3,4,5]]}"#), 5);
        let responses = br#"{"instructions":"Be brief.","input":[{"role":"user","content":[{"type":"input_text","text":"hello"}]},
            {"type":"input_image","image_url":"https://x"}]}"#;
        let item = PER_MESSAGE + Encoding::Cl100kBase.count("user") + Encoding::Cl100kBase.count("hello");
        let image_item = PER_MESSAGE;
        assert_eq!(
            prompt(responses),
            Encoding::Cl100kBase.count("Be brief.") + item + image_item + REPLY_PRIMING
        );
    }

    #[test]
    fn text_past_the_budget_is_counted_by_bytes() {
        let big = "word ".repeat(BPE_BUDGET_BYTES / 5 + 1);
        let body = serde_json::to_vec(&serde_json::json!({"prompt": [&big, "hello world"]})).expect("JSON");
        assert_eq!(
            read(Encoding::O200kBase, &body).map(|tally| tally.prompt).ok(),
            Some(approximate(big.len()) + 2)
        );
    }
}
