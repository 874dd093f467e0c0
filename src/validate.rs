//! Request bodies (`POST /v1/chat/completions` here; [`responses`], [`embeddings`]):
//! parsed once, checked against the [`Policy`] (tools and shared objects: [`policy`]),
//! and turned into the exact bytes to forward.
//!
//! The body is read as a list of top-level members whose values stay raw JSON text, so
//! nothing the proxy does not check is ever decoded or re-encoded: unchanged bodies are
//! forwarded as their original bytes, and changed ones are the original members, in
//! order, with the one change.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::settings::Policy;

mod embeddings;
mod policy;
mod responses;

pub use self::embeddings::embeddings;
pub use self::responses::{ResponsesRequest, responses};

/// A validated request, ready to forward.
#[derive(Debug)]
pub struct ChatRequest {
    /// The body to send upstream.
    pub body: Bytes,
    /// `stream: true`.
    pub stream: bool,
}

/// Why a body is refused (400 `invalid_request_error`; codes, messages and `param` in
/// [`crate::error`], the contract's table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// `invalid_json`: not JSON, not an object, or a top-level key twice.
    #[error("invalid json")]
    InvalidJson,
    /// `missing_required_field`: `model` or `messages` absent.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// `invalid_type`: a known field of the wrong JSON type.
    #[error("invalid type of {0}")]
    InvalidType(&'static str),
    /// `model_not_allowed`.
    #[error("model not allowed")]
    ModelNotAllowed,
    /// `invalid_messages`: `messages` is an empty array.
    #[error("empty messages")]
    EmptyMessages,
    /// `invalid_value`: a token limit below 1.
    #[error("invalid value of {0}")]
    TooSmall(&'static str),
    /// `max_tokens_too_large`: a token limit above `MAX_TOKENS`.
    #[error("{0} too large")]
    TooLarge(&'static str),
    /// `temperature_out_of_range`.
    #[error("temperature out of range")]
    TemperatureOutOfRange,
    /// `invalid_value`: a field whose value breaks a rule (param, message).
    #[error("invalid value of {0}")]
    InvalidValue(&'static str, &'static str),
    /// `tool_not_allowed`: a `tools` entry whose `type` is not in `ALLOWED_TOOLS`.
    #[error("tool not allowed")]
    ToolNotAllowed,
    /// `unsupported_parameter`: a reference to state the upstream keeps under the
    /// product's shared key (`file_id`, `conversation`, ...), named as `param`.
    #[error("unsupported parameter {0}")]
    Unsupported(&'static str),
}

const MAX_TOKENS: &str = "max_tokens";
const MAX_COMPLETION_TOKENS: &str = "max_completion_tokens";

/// `model`: a string (escapes decoded) that `allowed` accepts.
fn check_model(model: Option<&str>, allowed: impl Fn(&str) -> bool) -> Result<(), ValidationError> {
    let model = model.ok_or(ValidationError::Missing("model"))?;
    let Ok(MaybeBorrowed(model)) = serde_json::from_str::<MaybeBorrowed<'_>>(model) else {
        return Err(ValidationError::InvalidType("model"));
    };
    if allowed(&model) {
        Ok(())
    } else {
        Err(ValidationError::ModelNotAllowed)
    }
}

/// Checks a chat completion body and returns what to forward.
pub fn chat(body: &Bytes, policy: &Policy) -> Result<ChatRequest, ValidationError> {
    let Members(members) = serde_json::from_slice(body).map_err(|_| ValidationError::InvalidJson)?;

    let (mut model, mut messages, mut temperature) = (None, None, None);
    let (mut max_tokens, mut max_completion_tokens) = (None, None);
    let mut stream = false;
    for (key, value) in &members {
        match key.as_ref() {
            "model" => model = Some(value.get()),
            "messages" => messages = Some(value.get()),
            "stream" => stream = value.get() == "true",
            MAX_TOKENS => max_tokens = Some(value.get()).filter(|v| *v != "null"),
            MAX_COMPLETION_TOKENS => max_completion_tokens = Some(value.get()).filter(|v| *v != "null"),
            "temperature" => temperature = Some(value.get()),
            _ => {}
        }
    }

    check_model(model, |m| policy.allows_model(m))?;
    let messages = messages.ok_or(ValidationError::Missing("messages"))?;
    let Some(inside) = messages.strip_prefix('[') else {
        return Err(ValidationError::InvalidType("messages"));
    };
    if inside.trim_start().starts_with(']') {
        return Err(ValidationError::EmptyMessages);
    }
    if let Some(raw) = max_tokens {
        check_token_limit(MAX_TOKENS, raw, policy)?;
    }
    if let Some(raw) = max_completion_tokens {
        check_token_limit(MAX_COMPLETION_TOKENS, raw, policy)?;
    }
    if let Some(raw) = temperature {
        check_temperature(raw, policy)?;
    }
    policy::check(&members, body, policy, policy::Api::Chat)?;

    if max_tokens.is_some() || max_completion_tokens.is_some() {
        // Nothing to change: forward the bytes the client sent.
        return Ok(ChatRequest {
            body: body.clone(),
            stream,
        });
    }
    Ok(ChatRequest {
        body: with_limit(
            &members,
            body.len(),
            &[MAX_TOKENS, MAX_COMPLETION_TOKENS],
            policy.default_tokens_field.as_str(),
            policy,
        ),
        stream,
    })
}

/// The body without the `null` members named in `dropped` and with `field: MAX_TOKENS`
/// added last.
fn with_limit(
    members: &[(Cow<'_, str>, &RawValue)],
    size: usize,
    dropped: &[&str],
    field: &str,
    policy: &Policy,
) -> Bytes {
    let mut out = BytesMut::with_capacity(size + 40);
    out.put_u8(b'{');
    let mut first = true;
    for (key, value) in members {
        if dropped.contains(&key.as_ref()) && value.get() == "null" {
            continue;
        }
        if !first {
            out.put_u8(b',');
        }
        first = false;
        write_key(&mut out, key);
        out.put_slice(value.get().as_bytes());
    }
    if !first {
        out.put_u8(b',');
    }
    write_key(&mut out, field);
    out.put_slice(policy.max_tokens.get().to_string().as_bytes());
    out.put_u8(b'}');
    out.freeze()
}

pub(crate) fn write_key(out: &mut BytesMut, key: &str) {
    // serde_json escapes exactly as JSON requires; writing into BytesMut cannot fail.
    let _ = serde_json::to_writer(out.writer(), key);
    out.put_u8(b':');
}

/// A token limit must be a JSON integer (no fraction, no exponent) in 1..=`MAX_TOKENS`.
fn check_token_limit(name: &'static str, raw: &str, policy: &Policy) -> Result<(), ValidationError> {
    check_token_range(name, raw, 1, policy)
}

/// A token limit must be a JSON integer (no fraction, no exponent) in `min..=MAX_TOKENS`.
fn check_token_range(name: &'static str, raw: &str, min: u32, policy: &Policy) -> Result<(), ValidationError> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValidationError::InvalidType(name));
    }
    if raw.starts_with('-') || digits.bytes().all(|b| b == b'0') {
        return Err(ValidationError::TooSmall(name));
    }
    // Longer than any u32 means larger than any `MAX_TOKENS`.
    match raw.parse::<u32>() {
        Ok(n) if n < min => Err(ValidationError::TooSmall(name)),
        Ok(n) if n <= policy.max_tokens.get() => Ok(()),
        _ => Err(ValidationError::TooLarge(name)),
    }
}

pub(crate) fn check_temperature(raw: &str, policy: &Policy) -> Result<(), ValidationError> {
    if raw == "null" {
        return Ok(());
    }
    // A JSON number starts with '-' or a digit; anything else is another type.
    if !raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(ValidationError::InvalidType("temperature"));
    }
    let value: f64 = raw.parse().map_err(|_| ValidationError::InvalidType("temperature"))?;
    if value >= policy.temperature_min && value <= policy.temperature_max {
        Ok(())
    } else {
        Err(ValidationError::TemperatureOutOfRange)
    }
}

/// The top-level members of a JSON object, in order, values left as raw text. Refuses a
/// key that appears twice (`serde_json`'s own maps would silently keep the last one).
pub(crate) struct Members<'a>(pub(crate) Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

/// Past this many members, duplicates are found with a set instead of a scan.
const LINEAR_SCAN_MEMBERS: usize = 16;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(16);
        let mut seen: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(MaybeBorrowed(key)) = map.next_key()? {
            let duplicate = match &mut seen {
                Some(set) => !set.insert(key.clone()),
                None => members.iter().any(|(k, _)| *k == key),
            };
            if duplicate {
                return Err(de::Error::custom("duplicate top-level key"));
            }
            let value: &'de RawValue = map.next_value()?;
            members.push((key, value));
            if seen.is_none() && members.len() > LINEAR_SCAN_MEMBERS {
                seen = Some(members.iter().map(|(k, _)| k.clone()).collect());
            }
        }
        Ok(Members(members))
    }
}

/// A string borrowed from the input when it has no escapes, owned otherwise.
pub(crate) struct MaybeBorrowed<'a>(pub(crate) Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for MaybeBorrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeBorrowed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeBorrowed(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeBorrowed(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// The default policy, for the validation tests.
#[cfg(test)]
pub(crate) fn test_policy() -> Policy {
    Policy {
        allowed_models: vec!["gpt-4o".into(), "gpt-4o-mini".into()],
        max_tokens: std::num::NonZeroU32::new(2048).expect("non-zero"),
        default_tokens_field: crate::settings::TokensField::MaxTokens,
        temperature_min: 0.0,
        temperature_max: 2.0,
        embedding_models: vec!["text-embedding-3-small".into()],
        allowed_tools: vec!["function".into(), "custom".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TokensField;

    fn policy() -> Policy {
        super::test_policy()
    }

    fn check(body: &str) -> Result<ChatRequest, ValidationError> {
        chat(&Bytes::copy_from_slice(body.as_bytes()), &policy())
    }

    const MSG: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

    #[test]
    fn unchanged_body_is_forwarded_byte_for_byte() {
        let body = format!(r#"{{ "model" : "gpt-4o", {MSG}, "max_tokens": 10, "x_custom": {{"a": [1, 2.50]}} }}"#);
        let request = check(&body).expect("valid");
        assert_eq!(request.body, body.as_bytes());
    }

    #[test]
    fn missing_limit_adds_the_default_field_at_the_end() {
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"user":"u\u00e9"}}"#);
        let request = check(&body).expect("valid");
        let expected = format!(r#"{{"model":"gpt-4o",{MSG},"user":"u\u00e9","max_tokens":2048}}"#);
        assert_eq!(std::str::from_utf8(&request.body).expect("utf8"), expected);
    }

    #[test]
    fn null_limits_are_dropped_before_adding_the_default() {
        let body =
            format!(r#"{{"max_tokens":null,"model":"gpt-4o",{MSG},"max_completion_tokens":null,"stream":true}}"#);
        let request = check(&body).expect("valid");
        let expected = format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":2048}}"#);
        assert_eq!(std::str::from_utf8(&request.body).expect("utf8"), expected);
        assert!(request.stream);
    }

    #[test]
    fn a_set_limit_with_a_null_other_limit_is_forwarded_unchanged() {
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":null,"max_completion_tokens":5}}"#);
        assert_eq!(check(&body).expect("valid").body, body.as_bytes());
    }

    #[test]
    fn default_field_can_be_max_completion_tokens() {
        let mut p = policy();
        p.default_tokens_field = TokensField::MaxCompletionTokens;
        let body = format!(r#"{{"model":"gpt-4o",{MSG}}}"#);
        let request = chat(&Bytes::from(body), &p).expect("valid");
        assert!(
            std::str::from_utf8(&request.body)
                .expect("utf8")
                .ends_with(r#","max_completion_tokens":2048}"#)
        );
    }

    #[test]
    fn invalid_json_cases() {
        for body in [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"model\":\"gpt-4o\",\"model\":\"gpt-4o\"}",
            "nul",
            "{} x",
        ] {
            assert_eq!(check(body).expect_err(body), ValidationError::InvalidJson, "{body}");
        }
    }

    #[test]
    fn duplicate_keys_are_found_past_the_linear_scan_too() {
        let keys: Vec<String> = (0..40).map(|i| format!("\"k{i}\":1")).collect();
        let body = format!("{{{},\"k3\":2}}", keys.join(","));
        assert_eq!(check(&body).expect_err("duplicate"), ValidationError::InvalidJson);
    }

    #[test]
    fn escaped_duplicate_keys_are_duplicates() {
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"\u006dodel":"gpt-4o"}}"#);
        assert_eq!(check(&body).expect_err("duplicate"), ValidationError::InvalidJson);
    }

    #[test]
    fn model_rules() {
        assert_eq!(
            check(&format!("{{{MSG}}}")).expect_err("x"),
            ValidationError::Missing("model")
        );
        assert_eq!(
            check(&format!(r#"{{"model":4,{MSG}}}"#)).expect_err("x"),
            ValidationError::InvalidType("model")
        );
        assert_eq!(
            check(&format!(r#"{{"model":"gpt-5",{MSG}}}"#)).expect_err("x"),
            ValidationError::ModelNotAllowed
        );
        assert!(check(&format!(r#"{{"model":"gpt-4o-\u006dini",{MSG}}}"#)).is_ok());
    }

    #[test]
    fn messages_rules() {
        assert_eq!(
            check(r#"{"model":"gpt-4o"}"#).expect_err("x"),
            ValidationError::Missing("messages")
        );
        assert_eq!(
            check(r#"{"model":"gpt-4o","messages":[ ]}"#).expect_err("x"),
            ValidationError::EmptyMessages
        );
        assert_eq!(
            check(r#"{"model":"gpt-4o","messages":{}}"#).expect_err("x"),
            ValidationError::InvalidType("messages")
        );
        assert_eq!(
            check(r#"{"model":"gpt-4o","messages":null}"#).expect_err("x"),
            ValidationError::InvalidType("messages")
        );
    }

    #[test]
    fn token_limit_rules() {
        for field in ["max_tokens", "max_completion_tokens"] {
            let with = |v: &str| check(&format!(r#"{{"model":"gpt-4o",{MSG},"{field}":{v}}}"#));
            assert!(with("1").is_ok());
            assert!(with("2048").is_ok());
            let name = if field == "max_tokens" {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            assert_eq!(with("2049").expect_err("x"), ValidationError::TooLarge(name));
            assert_eq!(
                with("99999999999999999999999").expect_err("x"),
                ValidationError::TooLarge(name)
            );
            assert_eq!(with("0").expect_err("x"), ValidationError::TooSmall(name));
            assert_eq!(with("-5").expect_err("x"), ValidationError::TooSmall(name));
            assert_eq!(with("2048.0").expect_err("x"), ValidationError::InvalidType(name));
            assert_eq!(with("1e3").expect_err("x"), ValidationError::InvalidType(name));
            assert_eq!(with("\"100\"").expect_err("x"), ValidationError::InvalidType(name));
            assert_eq!(with("true").expect_err("x"), ValidationError::InvalidType(name));
            assert_eq!(with("-0").expect_err("x"), ValidationError::TooSmall(name));
        }
    }

    #[test]
    fn temperature_rules() {
        let with = |v: &str| check(&format!(r#"{{"model":"gpt-4o",{MSG},"temperature":{v}}}"#));
        for ok in ["0", "2", "1.5", "0.0", "2e0", "null"] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        for bad in ["-0.1", "2.01", "3"] {
            assert_eq!(
                with(bad).expect_err(bad),
                ValidationError::TemperatureOutOfRange,
                "{bad}"
            );
        }
        for bad in ["\"1\"", "true", "[1]", "{}"] {
            assert_eq!(
                with(bad).expect_err(bad),
                ValidationError::InvalidType("temperature"),
                "{bad}"
            );
        }
    }
}
