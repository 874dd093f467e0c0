//! Request bodies (`POST /v1/chat/completions` here; [`responses`], [`embeddings`]):
//! parsed once, checked against the [`Policy`] (tools and shared objects: [`policy`]),
//! and turned into the exact bytes to forward, with the [`Metering`] facts the meter and
//! the budget need.
//!
//! The body is read as a list of top-level members whose values stay raw JSON text, so
//! nothing the proxy does not check is ever decoded or re-encoded: unchanged bodies are
//! forwarded as their original bytes, and changed ones are the original members, in
//! order, with the changes the contract names (`Rewrite`).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::settings::Policy;

mod budgeted;
mod context_window;
mod embeddings;
mod policy;
mod responses;
mod stream_usage;

pub use self::embeddings::{EmbeddingsRequest, embeddings};
pub use self::responses::{ResponsesRequest, responses};

/// A validated request, ready to forward.
#[derive(Debug)]
pub struct ChatRequest {
    /// The body to send upstream.
    pub body: Bytes,
    /// `stream: true`.
    pub stream: bool,
    /// What the meter and the budget need of it.
    pub metering: Metering,
}

/// What the meter and the budget need of a validated request (contract "Budgets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metering {
    /// `model`, decoded (escapes resolved).
    pub model: String,
    /// Chat: the larger of `max_tokens` and `max_completion_tokens` as forwarded (the default
    /// added by the proxy counts); responses: `max_output_tokens` as forwarded; embeddings: 0.
    pub output_limit: u64,
    /// Chat `n` (1 when absent or null); 1 for responses and embeddings.
    pub n: u64,
    /// The body has an image, file or audio input part, or a tool whose type is not
    /// `function`/`custom` (chat `web_search_options` counts as a `web_search` tool):
    /// its input can only be reserved as the model's context window.
    pub needs_context_window: bool,
    /// Chat streams: the client itself asked for usage (`stream_options.include_usage: true`
    /// in what it sent). false otherwise.
    pub client_asked_usage: bool,
}

/// How to validate: what depends on the product and on whether a budget applies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A budget applies to the request: `background`, a non-default `service_tier` and
    /// audio output are refused, their cost being neither reservable nor metered.
    pub budgeted: bool,
    /// The product's upstream takes `stream_options` (its `stream_usage`): the forwarded
    /// body of a chat stream asks for usage.
    pub stream_usage: bool,
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
    /// `unsupported_parameter`, named as `param`: a reference to state the upstream keeps
    /// under the product's shared key (`file_id`, `conversation`, ...), or, while a budget
    /// applies, a parameter whose cost cannot be reserved (`background`, `service_tier`,
    /// `modalities`, `audio`).
    #[error("unsupported parameter {0}")]
    Unsupported(&'static str),
}

const MAX_TOKENS: &str = "max_tokens";
const MAX_COMPLETION_TOKENS: &str = "max_completion_tokens";
/// OpenAI's own API accepts `n` in 1..=128; a larger `n` would multiply the reservation
/// for choices no upstream returns.
const MAX_N: u64 = 128;

/// `model`: a string (escapes decoded) that `allowed` accepts; returned decoded.
fn check_model(model: Option<&str>, allowed: impl Fn(&str) -> bool) -> Result<String, ValidationError> {
    let model = model.ok_or(ValidationError::Missing("model"))?;
    let Ok(MaybeBorrowed(model)) = serde_json::from_str::<MaybeBorrowed<'_>>(model) else {
        return Err(ValidationError::InvalidType("model"));
    };
    if allowed(&model) {
        Ok(model.into_owned())
    } else {
        Err(ValidationError::ModelNotAllowed)
    }
}

/// Checks a chat completion body and returns what to forward.
pub fn chat(body: &Bytes, policy: &Policy, options: Options) -> Result<ChatRequest, ValidationError> {
    let Members(members) = serde_json::from_slice(body).map_err(|_| ValidationError::InvalidJson)?;

    let (mut model, mut messages, mut temperature, mut n) = (None, None, None, None);
    let (mut max_tokens, mut max_completion_tokens) = (None, None);
    let (mut stream, mut stream_options) = (false, None);
    for (key, value) in &members {
        match key.as_ref() {
            "model" => model = Some(value.get()),
            "messages" => messages = Some(value.get()),
            "stream" => stream = value.get() == "true",
            "stream_options" => stream_options = Some(value.get()),
            MAX_TOKENS => max_tokens = Some(value.get()).filter(|v| *v != "null"),
            MAX_COMPLETION_TOKENS => max_completion_tokens = Some(value.get()).filter(|v| *v != "null"),
            "temperature" => temperature = Some(value.get()),
            "n" => n = Some(value.get()).filter(|v| *v != "null"),
            _ => {}
        }
    }

    let model = check_model(model, |m| policy.allows_model(m))?;
    let messages = messages.ok_or(ValidationError::Missing("messages"))?;
    let Some(inside) = messages.strip_prefix('[') else {
        return Err(ValidationError::InvalidType("messages"));
    };
    if inside.trim_start().starts_with(']') {
        return Err(ValidationError::EmptyMessages);
    }
    let max_tokens = max_tokens
        .map(|raw| check_token_limit(MAX_TOKENS, raw, policy))
        .transpose()?;
    let max_completion_tokens = max_completion_tokens
        .map(|raw| check_token_limit(MAX_COMPLETION_TOKENS, raw, policy))
        .transpose()?;
    let n = n.map_or(Ok(1), check_n)?;
    if let Some(raw) = temperature {
        check_temperature(raw, policy)?;
    }
    let hosted_tool = policy::check(&members, body, policy, policy::Api::Chat)?;
    if options.budgeted {
        budgeted::check(&members)?;
    }

    let mut rewrite = Rewrite::default();
    let output_limit = if let Some(limit) = max_tokens.max(max_completion_tokens) {
        limit
    } else {
        // Both absent or `null`: the `null`s go, the default is added.
        rewrite.dropped.extend([MAX_TOKENS, MAX_COMPLETION_TOKENS]);
        rewrite.added.push((
            policy.default_tokens_field.as_str(),
            policy.max_tokens.get().to_string().into_bytes(),
        ));
        policy.max_tokens.get()
    };
    let client_asked_usage = match (stream, options.stream_usage) {
        (true, true) => stream_usage::ask_for_usage(stream_options, &mut rewrite)?,
        (true, false) => stream_usage::client_asked(stream_options),
        (false, _) => false,
    };
    Ok(ChatRequest {
        body: rewrite.apply(&members, body),
        stream,
        metering: Metering {
            model,
            output_limit: u64::from(output_limit),
            n,
            needs_context_window: hosted_tool || context_window::has_part(messages, &context_window::CHAT_PARTS),
            client_asked_usage,
        },
    })
}

/// `n`: a JSON integer in 1..=[`MAX_N`].
fn check_n(raw: &str) -> Result<u64, ValidationError> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValidationError::InvalidType("n"));
    }
    // Negative, or longer than any u64: out of range too.
    match raw.parse::<u64>() {
        Ok(n) if (1..=MAX_N).contains(&n) => Ok(n),
        _ => Err(ValidationError::InvalidValue(
            "n",
            "n must be an integer from 1 to 128.",
        )),
    }
}

/// The changes the proxy makes to a body, which the contract names one by one: a `null`
/// member it replaces is dropped, a replaced member keeps its place, an added member goes
/// last, and every other member keeps its bytes.
#[derive(Debug, Default)]
struct Rewrite {
    /// Members dropped when `null` (the proxy adds its own value for them).
    dropped: Vec<&'static str>,
    /// Members whose value is replaced, in their place.
    replaced: Vec<(&'static str, Vec<u8>)>,
    /// Members added after the others, in this order.
    added: Vec<(&'static str, Vec<u8>)>,
}

impl Rewrite {
    /// The body to forward: the original bytes when nothing changes, else the members
    /// rebuilt with the changes.
    fn apply(&self, members: &[(Cow<'_, str>, &RawValue)], body: &Bytes) -> Bytes {
        if self.replaced.is_empty() && self.added.is_empty() {
            // Nothing to change: forward the bytes the client sent.
            return body.clone();
        }
        let extra: usize = self
            .replaced
            .iter()
            .chain(&self.added)
            .map(|(key, value)| key.len() + value.len() + 4)
            .sum();
        let mut out = BytesMut::with_capacity(body.len() + extra);
        out.put_u8(b'{');
        let mut first = true;
        let mut member = |out: &mut BytesMut, key: &str, value: &[u8]| {
            if !first {
                out.put_u8(b',');
            }
            first = false;
            write_key(out, key);
            out.put_slice(value);
        };
        for (key, value) in members {
            let key = key.as_ref();
            if self.dropped.contains(&key) && value.get() == "null" {
                continue;
            }
            match self.replaced.iter().find(|(name, _)| *name == key) {
                Some((_, new)) => member(&mut out, key, new),
                None => member(&mut out, key, value.get().as_bytes()),
            }
        }
        for (key, value) in &self.added {
            member(&mut out, key, value);
        }
        out.put_u8(b'}');
        out.freeze()
    }
}

pub(crate) fn write_key(out: &mut impl BufMut, key: &str) {
    // serde_json escapes exactly as JSON requires; writing into a buffer cannot fail.
    let _ = serde_json::to_writer(out.writer(), key);
    out.put_u8(b':');
}

/// A token limit must be a JSON integer (no fraction, no exponent) in 1..=`MAX_TOKENS`.
fn check_token_limit(name: &'static str, raw: &str, policy: &Policy) -> Result<u32, ValidationError> {
    check_token_range(name, raw, 1, policy)
}

/// A token limit must be a JSON integer (no fraction, no exponent) in `min..=MAX_TOKENS`;
/// returns it.
fn check_token_range(name: &'static str, raw: &str, min: u32, policy: &Policy) -> Result<u32, ValidationError> {
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
        Ok(n) if n <= policy.max_tokens.get() => Ok(n),
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
        chat(&Bytes::copy_from_slice(body.as_bytes()), &policy(), Options::default())
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
        let request = chat(&Bytes::from(body), &p, Options::default()).expect("valid");
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

    fn with(body: &str, options: Options) -> Result<ChatRequest, ValidationError> {
        chat(&Bytes::copy_from_slice(body.as_bytes()), &policy(), options)
    }

    fn text(request: &ChatRequest) -> &str {
        std::str::from_utf8(&request.body).expect("utf8")
    }

    const USAGE: Options = Options {
        budgeted: false,
        stream_usage: true,
    };
    const BUDGETED: Options = Options {
        budgeted: true,
        stream_usage: true,
    };

    #[test]
    fn metering_has_the_decoded_model_the_larger_limit_and_n() {
        let body = format!(r#"{{"model":"gpt-4o-\u006dini",{MSG},"max_tokens":10,"max_completion_tokens":300,"n":3}}"#);
        assert_eq!(
            check(&body).expect("valid").metering,
            Metering {
                model: "gpt-4o-mini".into(),
                output_limit: 300,
                n: 3,
                needs_context_window: false,
                client_asked_usage: false,
            }
        );
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":null,"max_completion_tokens":7}}"#);
        assert_eq!(check(&body).expect("valid").metering.output_limit, 7);
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"n":null}}"#);
        let metering = check(&body).expect("valid").metering;
        assert_eq!(metering.output_limit, 2048, "the default added counts");
        assert_eq!(metering.n, 1);
    }

    #[test]
    fn n_rules() {
        let with = |v: &str| check(&format!(r#"{{"model":"gpt-4o",{MSG},"n":{v}}}"#));
        assert_eq!(with("1").expect("valid").metering.n, 1);
        assert_eq!(with("128").expect("valid").metering.n, 128);
        for bad in ["1.0", "1e2", "\"2\"", "true", "[1]"] {
            assert_eq!(with(bad).expect_err(bad), ValidationError::InvalidType("n"), "{bad}");
        }
        for bad in ["0", "-0", "-1", "129", "99999999999999999999999"] {
            assert!(matches!(with(bad), Err(ValidationError::InvalidValue("n", _))), "{bad}");
        }
        // `n` is checked, never changed.
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"n": 2,"max_tokens":5}}"#);
        assert_eq!(check(&body).expect("valid").body, body.as_bytes());
    }

    #[test]
    fn a_stream_without_stream_options_asks_for_usage_last() {
        let body = format!(r#"{{"model":"gpt-4o", {MSG}, "stream": true, "max_tokens": 5, "x": [1, 2.50]}}"#);
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"x":[1, 2.50],"stream_options":{{"include_usage":true}}}}"#
            )
        );
        assert!(!r.metering.client_asked_usage);
    }

    #[test]
    fn a_null_stream_options_is_dropped_and_added_last_with_the_default_limit() {
        let body = format!(
            r#"{{"stream_options":null,"model":"gpt-4o",{MSG},"max_tokens":null,"stream":true,"user":"u\u00e9"}}"#
        );
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"user":"u\u00e9","max_tokens":2048,"stream_options":{{"include_usage":true}}}}"#
            )
        );
        assert_eq!(r.metering.output_limit, 2048);
        assert!(!r.metering.client_asked_usage);
    }

    #[test]
    fn include_usage_is_added_inside_an_existing_object_in_its_place() {
        let body = format!(
            r#"{{"model":"gpt-4o",{MSG},"stream_options": {{ "x_opt" : [ 1 ], "include_obfuscation":false }},"stream":true,"max_tokens":5}}"#
        );
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream_options":{{"x_opt":[ 1 ],"include_obfuscation":false,"include_usage":true}},"stream":true,"max_tokens":5}}"#
            )
        );
        let r = with(
            &format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{{}}}}"#),
            USAGE,
        )
        .expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{{"include_usage":true}},"max_tokens":2048}}"#
            )
        );
    }

    #[test]
    fn a_false_include_usage_becomes_true_and_a_null_one_goes_last() {
        let body = format!(
            r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"stream_options":{{"include_usage":false,"a":1}}}}"#
        );
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"stream_options":{{"include_usage":true,"a":1}}}}"#
            )
        );
        assert!(!r.metering.client_asked_usage);
        let body = format!(
            r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"stream_options":{{"include_usage":null,"a":1}}}}"#
        );
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"max_tokens":5,"stream_options":{{"a":1,"include_usage":true}}}}"#
            )
        );
        assert!(!r.metering.client_asked_usage);
    }

    #[test]
    fn a_client_that_asked_for_usage_is_forwarded_unchanged() {
        let body = format!(
            r#"{{"model":"gpt-4o", {MSG},"stream":true,"max_tokens":5,"stream_options":{{ "include_usage" : true }}}}"#
        );
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(r.body, body.as_bytes());
        assert!(r.metering.client_asked_usage);
        // With the default limit added, stream_options keeps its bytes.
        let body = format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{{ "include_usage" : true }}}}"#);
        let r = with(&body, USAGE).expect("valid");
        assert_eq!(
            text(&r),
            format!(
                r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{{ "include_usage" : true }},"max_tokens":2048}}"#
            )
        );
        assert!(r.metering.client_asked_usage);
    }

    #[test]
    fn stream_options_of_another_type_is_refused_on_streams() {
        for bad in [
            "true",
            "[]",
            "\"x\"",
            "1",
            r#"{"include_usage":"yes"}"#,
            r#"{"include_usage":1}"#,
        ] {
            let body = format!(r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{bad}}}"#);
            assert_eq!(
                with(&body, USAGE).expect_err(&body),
                ValidationError::InvalidType("stream_options"),
                "{bad}"
            );
        }
        let body = format!(
            r#"{{"model":"gpt-4o",{MSG},"stream":true,"stream_options":{{"include_usage":false,"include_usage":true}}}}"#
        );
        assert!(matches!(
            with(&body, USAGE),
            Err(ValidationError::InvalidValue("stream_options", _))
        ));
    }

    #[test]
    fn nothing_is_asked_without_a_stream_or_without_stream_usage() {
        for body in [
            format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5}}"#),
            format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"stream":false,"stream_options":null}}"#),
            format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"stream":"true","stream_options":7}}"#),
            format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"stream_options":{{"include_usage":true}}}}"#),
        ] {
            let r = with(&body, BUDGETED).expect(&body);
            assert_eq!(r.body, body.as_bytes(), "{body}");
            assert!(!r.metering.client_asked_usage, "{body}");
        }
        let no_usage = Options {
            budgeted: true,
            stream_usage: false,
        };
        for (options_member, asked) in [
            ("", false),
            (r#","stream_options":{"include_usage":true}"#, true),
            (r#","stream_options":{"include_usage":false}"#, false),
            (r#","stream_options":[]"#, false),
        ] {
            let body = format!(r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"stream":true{options_member}}}"#);
            let r = with(&body, no_usage).expect(&body);
            assert_eq!(r.body, body.as_bytes(), "{body}");
            assert_eq!(r.metering.client_asked_usage, asked, "{body}");
        }
    }

    #[test]
    fn what_a_budget_cannot_reserve_is_refused_only_while_one_applies() {
        for (member, param) in [
            (r#""background":true"#, "background"),
            (r#""service_tier":"flex""#, "service_tier"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"alloy","format":"mp3"}"#, "audio"),
        ] {
            let body = format!(r#"{{"model":"gpt-4o",{MSG},{member}}}"#);
            assert_eq!(
                with(&body, BUDGETED).expect_err(&body),
                ValidationError::Unsupported(param)
            );
            assert!(with(&body, USAGE).is_ok(), "{body}");
        }
        let body = format!(
            r#"{{"model":"gpt-4o",{MSG},"max_tokens":5,"service_tier":"default","modalities":["text"],"audio":null,"background":false}}"#
        );
        assert_eq!(with(&body, BUDGETED).expect("valid").body, body.as_bytes());
    }

    #[test]
    fn images_audio_files_and_hosted_tools_need_the_context_window() {
        let mut p = policy();
        p.allowed_tools.extend(["web_search".into(), "file_search".into()]);
        let needs = |body: &str| {
            chat(&Bytes::copy_from_slice(body.as_bytes()), &p, Options::default())
                .expect(body)
                .metering
                .needs_context_window
        };
        for kind in ["image_url", "input_audio", "file"] {
            let body = format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"text","text":"a"}},{{"type":"{kind}"}}]}}]}}"#
            );
            assert!(needs(&body), "{body}");
        }
        assert!(needs(&format!(
            r#"{{"model":"gpt-4o",{MSG},"web_search_options":{{}}}}"#
        )));
        assert!(needs(&format!(
            r#"{{"model":"gpt-4o",{MSG},"tools":[{{"type":"function"}},{{"type":"file_search"}}]}}"#
        )));
        assert!(!needs(&format!(
            r#"{{"model":"gpt-4o",{MSG},"web_search_options":null,"tools":[{{"type":"custom"}}]}}"#
        )));
        assert!(!needs(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"an image_url and a file"}]}"#
        ));
    }
}
