//! `POST /v1/responses` bodies: the chat rules where they apply (`model`, `temperature`,
//! the tool and shared-object policy), `input`, and `max_output_tokens` with its default.

use bytes::Bytes;

use super::policy::{self, Api};
use super::{MaybeBorrowed, Members, ValidationError, check_model, check_temperature, check_token_range, with_limit};
use crate::settings::Policy;

const MAX_OUTPUT_TOKENS: &str = "max_output_tokens";
/// The upstream refuses a smaller `max_output_tokens`.
const MIN_OUTPUT_TOKENS: u32 = 16;

/// A validated Responses request, ready to forward.
#[derive(Debug)]
pub struct ResponsesRequest {
    /// The body to send upstream.
    pub body: Bytes,
    /// `stream: true`: the answer is Server-Sent Events.
    pub stream: bool,
    /// The stored response this one continues: the caller must own it.
    pub previous_response_id: Option<String>,
}

/// Checks a Responses body and returns what to forward.
pub fn responses(body: &Bytes, policy: &Policy) -> Result<ResponsesRequest, ValidationError> {
    let Members(members) = serde_json::from_slice(body).map_err(|_| ValidationError::InvalidJson)?;
    let (mut model, mut input, mut limit, mut temperature, mut previous) = (None, None, None, None, None);
    let mut stream = false;
    for (key, value) in &members {
        let raw = value.get();
        match key.as_ref() {
            "model" => model = Some(raw),
            "input" => input = Some(raw),
            "stream" => stream = raw == "true",
            MAX_OUTPUT_TOKENS => limit = Some(raw).filter(|v| *v != "null"),
            "temperature" => temperature = Some(raw),
            "previous_response_id" => previous = Some(raw).filter(|v| *v != "null"),
            _ => {}
        }
    }

    check_model(model, |m| policy.allows_model(m))?;
    let input = input.ok_or(ValidationError::Missing("input"))?;
    if !input.starts_with(['"', '[']) {
        return Err(ValidationError::InvalidType("input"));
    }
    if let Some(raw) = limit {
        check_token_range(MAX_OUTPUT_TOKENS, raw, MIN_OUTPUT_TOKENS, policy)?;
    }
    if let Some(raw) = temperature {
        check_temperature(raw, policy)?;
    }
    let previous_response_id = match previous {
        None => None,
        Some(raw) => Some(
            serde_json::from_str::<MaybeBorrowed<'_>>(raw)
                .map_err(|_| ValidationError::InvalidType("previous_response_id"))?
                .0
                .into_owned(),
        ),
    };
    policy::check(&members, body, policy, Api::Responses)?;
    // Budget seam: the budget rules that apply only while a budget does (`background`,
    // `service_tier`, audio output) belong here, with the budget's settings.

    let body = if limit.is_some() {
        body.clone()
    } else {
        with_limit(&members, body.len(), &[MAX_OUTPUT_TOKENS], MAX_OUTPUT_TOKENS, policy)
    };
    Ok(ResponsesRequest {
        body,
        stream,
        previous_response_id,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_policy;
    use super::*;

    fn check(body: &str) -> Result<ResponsesRequest, ValidationError> {
        responses(&Bytes::copy_from_slice(body.as_bytes()), &test_policy())
    }

    fn text(request: &ResponsesRequest) -> &str {
        std::str::from_utf8(&request.body).expect("utf8")
    }

    #[test]
    fn the_default_limit_is_added_last_and_a_null_one_dropped() {
        let r = check(r#"{"model":"gpt-4o","input":"hi","max_output_tokens":null,"stream":true}"#).expect("valid");
        assert_eq!(
            text(&r),
            r#"{"model":"gpt-4o","input":"hi","stream":true,"max_output_tokens":2048}"#
        );
        assert!(r.stream);
        let body = r#"{ "model":"gpt-4o", "input":[{"role":"user","content":"hi"}], "max_output_tokens": 16 }"#;
        assert_eq!(text(&check(body).expect("valid")), body);
    }

    #[test]
    fn max_output_tokens_rules() {
        let with = |v: &str| check(&format!(r#"{{"model":"gpt-4o","input":"x","max_output_tokens":{v}}}"#));
        let name = MAX_OUTPUT_TOKENS;
        assert!(with("16").is_ok());
        assert!(with("2048").is_ok());
        assert_eq!(with("15").expect_err("x"), ValidationError::TooSmall(name));
        assert_eq!(with("0").expect_err("x"), ValidationError::TooSmall(name));
        assert_eq!(with("2049").expect_err("x"), ValidationError::TooLarge(name));
        assert_eq!(with("16.0").expect_err("x"), ValidationError::InvalidType(name));
        assert_eq!(with("\"16\"").expect_err("x"), ValidationError::InvalidType(name));
    }

    #[test]
    fn model_input_and_previous_response_rules() {
        assert_eq!(
            check(r#"{"input":"x"}"#).expect_err("x"),
            ValidationError::Missing("model")
        );
        assert_eq!(
            check(r#"{"model":"text-embedding-3-small","input":"x"}"#).expect_err("x"),
            ValidationError::ModelNotAllowed
        );
        assert_eq!(
            check(r#"{"model":"gpt-4o"}"#).expect_err("x"),
            ValidationError::Missing("input")
        );
        assert_eq!(
            check(r#"{"model":"gpt-4o","input":{}}"#).expect_err("x"),
            ValidationError::InvalidType("input")
        );
        let r = check(r#"{"model":"gpt-4o","input":"x","previous_response_id":"resp_\u0031"}"#).expect("valid");
        assert_eq!(r.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(
            check(r#"{"model":"gpt-4o","input":"x","previous_response_id":1}"#).expect_err("x"),
            ValidationError::InvalidType("previous_response_id")
        );
        assert!(
            check(r#"{"model":"gpt-4o","input":"x","previous_response_id":null}"#)
                .expect("valid")
                .previous_response_id
                .is_none()
        );
    }
}
