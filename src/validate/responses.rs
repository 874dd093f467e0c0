//! `POST /v1/responses` bodies: the chat rules where they apply (`model`, `temperature`,
//! the tool and shared-object policy, the refusals while a budget applies), `input`, and
//! `max_output_tokens` with its default.

use bytes::Bytes;

use super::policy::{self, Api};
use super::{
    MaybeBorrowed, Members, Metering, Options, Rewrite, ValidationError, budgeted, check_model, check_temperature,
    check_token_range, context_window,
};
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
    /// What the meter and the budget need of it.
    pub metering: Metering,
}

/// Checks a Responses body and returns what to forward.
pub fn responses(body: &Bytes, policy: &Policy, options: Options) -> Result<ResponsesRequest, ValidationError> {
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

    let model = check_model(model, |m| policy.allows_model(m))?;
    let input = input.ok_or(ValidationError::Missing("input"))?;
    if !input.starts_with(['"', '[']) {
        return Err(ValidationError::InvalidType("input"));
    }
    let limit = limit
        .map(|raw| check_token_range(MAX_OUTPUT_TOKENS, raw, MIN_OUTPUT_TOKENS, policy))
        .transpose()?;
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
    let hosted_tool = policy::check(&members, body, policy, Api::Responses)?;
    if options.budgeted {
        budgeted::check(&members)?;
    }

    let mut rewrite = Rewrite::default();
    let output_limit = limit.unwrap_or_else(|| {
        rewrite.dropped.push(MAX_OUTPUT_TOKENS);
        rewrite
            .added
            .push((MAX_OUTPUT_TOKENS, policy.max_tokens.get().to_string().into_bytes()));
        policy.max_tokens.get()
    });
    Ok(ResponsesRequest {
        body: rewrite.apply(&members, body),
        stream,
        previous_response_id,
        metering: Metering {
            model,
            output_limit: u64::from(output_limit),
            n: 1,
            needs_context_window: hosted_tool || context_window::has_part(input, &context_window::RESPONSES_PARTS),
            client_asked_usage: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_policy;
    use super::*;

    fn check(body: &str) -> Result<ResponsesRequest, ValidationError> {
        responses(
            &Bytes::copy_from_slice(body.as_bytes()),
            &test_policy(),
            Options::default(),
        )
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

    fn with(body: &str, options: Options) -> Result<ResponsesRequest, ValidationError> {
        responses(&Bytes::copy_from_slice(body.as_bytes()), &test_policy(), options)
    }

    const BUDGETED: Options = Options {
        budgeted: true,
        stream_usage: true,
    };

    #[test]
    fn metering_has_the_decoded_model_and_the_forwarded_limit() {
        let r = check(r#"{"model":"gpt-4o-\u006dini","input":"x","max_output_tokens":100,"n":3}"#).expect("valid");
        assert_eq!(
            r.metering,
            Metering {
                model: "gpt-4o-mini".into(),
                output_limit: 100,
                n: 1,
                needs_context_window: false,
                client_asked_usage: false,
            }
        );
        let r = check(r#"{"model":"gpt-4o","input":"x"}"#).expect("valid");
        assert_eq!(r.metering.output_limit, 2048, "the default added counts");
    }

    #[test]
    fn images_files_audio_and_hosted_tools_need_the_context_window() {
        let needs = |body: &str| {
            let mut policy = test_policy();
            policy.allowed_tools.push("web_search".into());
            responses(&Bytes::copy_from_slice(body.as_bytes()), &policy, Options::default())
                .expect(body)
                .metering
                .needs_context_window
        };
        for kind in ["input_image", "input_file", "input_audio"] {
            let body = format!(
                r#"{{"model":"gpt-4o","input":[{{"role":"user","content":[{{"type":"{kind}","image_url":"u"}}]}}]}}"#
            );
            assert!(needs(&body), "{body}");
        }
        assert!(needs(
            r#"{"model":"gpt-4o","input":"x","tools":[{"type":"web_search"}]}"#
        ));
        assert!(!needs(
            r#"{"model":"gpt-4o","input":"x","tools":[{"type":"function","name":"f"}]}"#
        ));
        assert!(!needs(
            r#"{"model":"gpt-4o","input":[{"role":"user","content":[{"type":"input_text","text":"input_image"}]}]}"#
        ));
        // A part type named outside `input` is no input part.
        assert!(!needs(r#"{"model":"gpt-4o","input":"x","x":{"type":"input_image"}}"#));
    }

    #[test]
    fn what_a_budget_cannot_reserve_is_refused_only_while_one_applies() {
        for (member, param) in [
            (r#""background":true"#, "background"),
            (r#""service_tier":"priority""#, "service_tier"),
            (r#""modalities":["audio"]"#, "modalities"),
            (r#""audio":{"voice":"alloy"}"#, "audio"),
        ] {
            let body = format!(r#"{{"model":"gpt-4o","input":"x",{member}}}"#);
            assert_eq!(
                with(&body, BUDGETED).expect_err(&body),
                ValidationError::Unsupported(param)
            );
            assert!(with(&body, Options::default()).is_ok(), "{body}");
        }
        let body = r#"{"model":"gpt-4o","input":"x","background":false,"service_tier":"auto","max_output_tokens":16}"#;
        assert_eq!(with(body, BUDGETED).expect("valid").body, body.as_bytes());
    }

    #[test]
    fn streams_are_not_rewritten_for_usage() {
        // Responses streams carry usage in their last event, unasked.
        let body = r#"{"model":"gpt-4o","input":"x","stream":true,"max_output_tokens":16}"#;
        let r = with(body, BUDGETED).expect("valid");
        assert_eq!(r.body, body.as_bytes());
        assert!(!r.metering.client_asked_usage);
    }
}
