//! What a chat or responses body may not ask for while a budget applies to the request
//! (contract, "Request validation" last rule): work whose cost can be neither reserved
//! at admission nor metered from the answer's `usage`. Each is 400
//! `unsupported_parameter` with its own name as `param`:
//! - `background: true`: the answer (and its usage) comes later, to whoever polls;
//! - a `service_tier` other than `auto` or `default` (`flex`, `priority`, `scale`, ...):
//!   priced otherwise than the model's prices say;
//! - audio output (`modalities` naming `audio`, or an `audio` member): audio tokens are
//!   priced otherwise than text.

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::{MaybeBorrowed, ValidationError};

/// Refuses the members above; the rest is left to the other rules.
pub(super) fn check(members: &[(Cow<'_, str>, &RawValue)]) -> Result<(), ValidationError> {
    for (key, value) in members {
        let raw = value.get();
        match key.as_ref() {
            "background" if raw == "true" => return Err(ValidationError::Unsupported("background")),
            "service_tier" if !is_default_tier(raw) => return Err(ValidationError::Unsupported("service_tier")),
            "modalities" if may_name_audio(raw) => return Err(ValidationError::Unsupported("modalities")),
            "audio" if raw != "null" => return Err(ValidationError::Unsupported("audio")),
            _ => {}
        }
    }
    Ok(())
}

/// `null`, `"auto"` or `"default"` (escapes decoded): the tier the model's prices are for.
fn is_default_tier(raw: &str) -> bool {
    raw == "null"
        || serde_json::from_str::<MaybeBorrowed<'_>>(raw)
            .is_ok_and(|tier| matches!(tier.0.as_ref(), "auto" | "default"))
}

/// Anything but `null` or an array of strings without `"audio"`: what cannot be shown
/// free of audio output is refused.
fn may_name_audio(raw: &str) -> bool {
    raw != "null"
        && serde_json::from_str::<Vec<MaybeBorrowed<'_>>>(raw)
            .map_or(true, |modalities| modalities.iter().any(|m| m.0 == "audio"))
}

#[cfg(test)]
mod tests {
    use super::super::Members;
    use super::*;

    fn refused(body: &str) -> Option<&'static str> {
        let Members(members) = serde_json::from_str(body).expect("object");
        match check(&members) {
            Ok(()) => None,
            Err(ValidationError::Unsupported(param)) => Some(param),
            Err(other) => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn background_is_refused_only_when_true() {
        assert_eq!(refused(r#"{"background":true}"#), Some("background"));
        for ok in ["false", "null"] {
            assert_eq!(refused(&format!(r#"{{"background":{ok}}}"#)), None);
        }
    }

    #[test]
    fn only_the_default_service_tiers_pass() {
        for ok in ["null", r#""auto""#, r#""default""#, r#""\u0061uto""#] {
            assert_eq!(refused(&format!(r#"{{"service_tier":{ok}}}"#)), None, "{ok}");
        }
        for bad in [r#""flex""#, r#""priority""#, r#""scale""#, r#""Auto""#, "1", "{}"] {
            assert_eq!(
                refused(&format!(r#"{{"service_tier":{bad}}}"#)),
                Some("service_tier"),
                "{bad}"
            );
        }
    }

    #[test]
    fn audio_output_is_refused() {
        for bad in [r#"["text","audio"]"#, r#"["\u0061udio"]"#, r#""audio""#, "[1]", "{}"] {
            assert_eq!(
                refused(&format!(r#"{{"modalities":{bad}}}"#)),
                Some("modalities"),
                "{bad}"
            );
        }
        for ok in [r#"["text"]"#, "[]", "null"] {
            assert_eq!(refused(&format!(r#"{{"modalities":{ok}}}"#)), None, "{ok}");
        }
        assert_eq!(refused(r#"{"audio":{"voice":"alloy","format":"wav"}}"#), Some("audio"));
        assert_eq!(refused(r#"{"audio":null}"#), None);
    }

    #[test]
    fn the_first_refused_member_is_named() {
        assert_eq!(refused(r#"{"model":"m","audio":{},"background":true}"#), Some("audio"));
    }
}
