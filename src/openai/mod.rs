//! The few parts of OpenAI's wire format the gateway reads. Bodies are forwarded as
//! sent; only the fields routing, limits and caching need are deserialized, borrowed
//! and partially.

use serde::Deserialize;

/// What a JSON request body says about the call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSummary {
    /// The `model` field, when the body has one.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "lenient_bool")]
    stream: bool,
}

/// `stream` of any other type than a boolean is the upstream's business to reject.
fn lenient_bool<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum MaybeBool {
        Bool(bool),
        Other(serde::de::IgnoredAny),
    }
    Ok(matches!(MaybeBool::deserialize(deserializer)?, MaybeBool::Bool(true)))
}

impl CallSummary {
    /// Reads a JSON request body. The whole body is validated as JSON; `Err` carries
    /// serde's message (with line and column) for a 400 `invalid_json`.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let peek: Peek<'_> = serde_json::from_slice(body).map_err(|error| error.to_string())?;
        Ok(Self { model: peek.model.map(|model| model.into_owned()), stream: peek.stream })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream() {
        let call = CallSummary::parse(br#"{"messages":[],"model":"gpt-4o","stream":true}"#);
        assert_eq!(call, Ok(CallSummary { model: Some("gpt-4o".into()), stream: true }));
        let call = CallSummary::parse(br#"{"model":"m\u00e9","stream":"yes"}"#);
        assert_eq!(call, Ok(CallSummary { model: Some("m\u{e9}".into()), stream: false }));
    }

    #[test]
    fn refuses_invalid_json() {
        assert!(CallSummary::parse(b"{\"model\": ").is_err());
        assert!(CallSummary::parse(b"").is_err());
        assert!(CallSummary::parse(br#"{"model": 5}"#).is_err());
    }
}
