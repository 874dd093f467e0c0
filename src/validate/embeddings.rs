//! `POST /v1/embeddings` bodies: `model` among the embedding models, `input`,
//! `dimensions` and `encoding_format`. Nothing is changed: a valid body is forwarded as
//! its original bytes.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{Members, Metering, Options, ValidationError, check_model, check_temperature};
use crate::settings::Policy;

/// The most items `input` may hold.
const MAX_INPUTS: usize = 2048;

/// A validated embeddings request, ready to forward.
#[derive(Debug)]
pub struct EmbeddingsRequest {
    /// The body to send upstream: always the one the client sent.
    pub body: Bytes,
    /// What the meter and the budget need of it (input only: no output, one "choice").
    pub metering: Metering,
}

/// Checks an embeddings body and returns what to forward (the body itself). No option
/// changes what an embeddings body may hold: it has no output to limit, no stream, no
/// tool, and nothing a budget must refuse.
pub fn embeddings(body: &Bytes, policy: &Policy, _: Options) -> Result<EmbeddingsRequest, ValidationError> {
    let Members(members) = serde_json::from_slice(body).map_err(|_| ValidationError::InvalidJson)?;
    let (mut model, mut input, mut dimensions, mut format, mut temperature) = (None, None, None, None, None);
    for (key, value) in &members {
        let raw = value.get();
        match key.as_ref() {
            "model" => model = Some(raw),
            "input" => input = Some(raw),
            "dimensions" => dimensions = Some(raw),
            "encoding_format" => format = Some(raw).filter(|v| *v != "null"),
            "temperature" => temperature = Some(raw),
            _ => {}
        }
    }
    let model = check_model(model, |m| policy.allows_embedding_model(m))?;
    check_input(input.ok_or(ValidationError::Missing("input"))?)?;
    if let Some(raw) = dimensions
        && !(is_integer(raw) && !raw.starts_with('-') && !raw.bytes().all(|b| b == b'0'))
    {
        return Err(ValidationError::InvalidValue(
            "dimensions",
            "dimensions must be an integer of at least 1.",
        ));
    }
    if let Some(raw) = format
        && raw != r#""float""#
        && raw != r#""base64""#
    {
        return Err(ValidationError::InvalidValue(
            "encoding_format",
            "encoding_format must be \"float\" or \"base64\".",
        ));
    }
    if let Some(raw) = temperature {
        check_temperature(raw, policy)?;
    }
    Ok(EmbeddingsRequest {
        body: body.clone(),
        metering: Metering {
            model,
            output_limit: 0,
            n: 1,
            needs_context_window: false,
            client_asked_usage: false,
        },
    })
}

const INPUT_RULE: &str = "input must be a non-empty string, or a non-empty array of at most 2048 non-empty strings, integers or non-empty arrays of integers, all of one kind.";

fn bad_input() -> ValidationError {
    ValidationError::InvalidValue("input", INPUT_RULE)
}

/// A JSON integer: digits with an optional minus, no fraction or exponent.
fn is_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `"..."` with at least one character (an escape counts).
fn is_non_empty_string(raw: &str) -> bool {
    raw.len() > 2 && raw.starts_with('"')
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Kind {
    Strings,
    Integers,
    Arrays,
}

fn check_input(raw: &str) -> Result<(), ValidationError> {
    if raw.starts_with('"') {
        return if is_non_empty_string(raw) {
            Ok(())
        } else {
            Err(bad_input())
        };
    }
    if !raw.starts_with('[') {
        return Err(ValidationError::InvalidType("input"));
    }
    let items: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| bad_input())?;
    if items.is_empty() || items.len() > MAX_INPUTS {
        return Err(bad_input());
    }
    let mut kind = None;
    for item in items {
        let raw = item.get();
        let this = if raw.starts_with('"') {
            if !is_non_empty_string(raw) {
                return Err(bad_input());
            }
            Kind::Strings
        } else if raw.starts_with('[') {
            let tokens: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| bad_input())?;
            if tokens.is_empty() || !tokens.iter().all(|t| is_integer(t.get())) {
                return Err(bad_input());
            }
            Kind::Arrays
        } else if is_integer(raw) {
            Kind::Integers
        } else {
            return Err(bad_input());
        };
        if *kind.get_or_insert(this) != this {
            return Err(bad_input());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_policy;
    use super::*;

    fn check(body: &str) -> Result<Bytes, ValidationError> {
        embeddings(
            &Bytes::copy_from_slice(body.as_bytes()),
            &test_policy(),
            Options::default(),
        )
        .map(|r| r.body)
    }

    fn input(value: &str) -> Result<Bytes, ValidationError> {
        check(&format!(r#"{{"model":"text-embedding-3-small","input":{value}}}"#))
    }

    #[test]
    fn valid_bodies_are_forwarded_unchanged() {
        let body = r#"{"model":"text-embedding-3-small", "input":["a","b"],"dimensions":8,"encoding_format":null}"#;
        assert_eq!(check(body).expect("valid"), body.as_bytes());
        for ok in [r#""a""#, "[1,2]", "[[1],[2,3]]", r#"["\n"]"#] {
            assert!(input(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn metering_is_the_decoded_model_and_input_only() {
        let body = r#"{"model":"text-embedding-3-\u0073mall","input":"a","max_tokens":9,"n":4}"#;
        let budgeted = Options {
            budgeted: true,
            stream_usage: true,
        };
        let request = embeddings(&Bytes::from_static(body.as_bytes()), &test_policy(), budgeted).expect("valid");
        assert_eq!(request.body, body.as_bytes());
        assert_eq!(
            request.metering,
            Metering {
                model: "text-embedding-3-small".into(),
                output_limit: 0,
                n: 1,
                needs_context_window: false,
                client_asked_usage: false,
            }
        );
    }

    #[test]
    fn input_rules() {
        let many = format!("[{}]", vec!["1"; 2049].join(","));
        for bad in [
            r#""""#,
            "[]",
            r#"[""]"#,
            "[[]]",
            r#"["a",1]"#,
            "[1,[1]]",
            "[1.5]",
            "[[1.5]]",
            "[null]",
            many.as_str(),
        ] {
            assert_eq!(input(bad).expect_err(bad), bad_input(), "{bad}");
        }
        assert!(input(&format!("[{}]", vec!["1"; 2048].join(","))).is_ok());
        assert_eq!(input("{}").expect_err("x"), ValidationError::InvalidType("input"));
        assert_eq!(
            check(r#"{"model":"text-embedding-3-small"}"#).expect_err("x"),
            ValidationError::Missing("input")
        );
    }

    #[test]
    fn model_dimensions_and_format_rules() {
        assert_eq!(
            check(r#"{"model":"gpt-4o","input":"a"}"#).expect_err("x"),
            ValidationError::ModelNotAllowed
        );
        let with = |m: &str| check(&format!(r#"{{"model":"text-embedding-3-small","input":"a",{m}}}"#));
        assert!(with(r#""dimensions":1"#).is_ok());
        for bad in ["0", "-1", "1.0", "\"8\"", "null"] {
            assert!(matches!(
                with(&format!(r#""dimensions":{bad}"#)),
                Err(ValidationError::InvalidValue("dimensions", _))
            ));
        }
        assert!(with(r#""encoding_format":"base64""#).is_ok());
        assert!(matches!(
            with(r#""encoding_format":"int8""#),
            Err(ValidationError::InvalidValue("encoding_format", _))
        ));
    }
}
