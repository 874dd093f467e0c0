//! Chat streams and usage (contract "Budgets", Streams; `stream_usage` under Upstreams):
//! a chat stream reports its token usage only when asked (`stream_options.include_usage:
//! true`), so the forwarded body of every chat stream asks, unless the product's upstream
//! refuses `stream_options`. What the client itself asked is remembered: the route takes
//! the usage chunk out of what a client that did not ask receives.
//!
//! The change follows the contract's byte rule: `stream_options` absent or `null` becomes
//! a new last member; inside an existing object, `include_usage` is set to `true` (a
//! `null` one dropped and added last) and every other member keeps its bytes.

use super::{Members, Rewrite, ValidationError, write_key};

const STREAM_OPTIONS: &str = "stream_options";
const INCLUDE_USAGE: &str = "include_usage";

/// Makes the forwarded body ask for usage; returns whether the client asked already.
/// `raw` is the `stream_options` member's value, if the body has one.
pub(super) fn ask_for_usage(raw: Option<&str>, rewrite: &mut Rewrite) -> Result<bool, ValidationError> {
    let raw = match raw {
        None | Some("null") => {
            rewrite.dropped.push(STREAM_OPTIONS);
            rewrite
                .added
                .push((STREAM_OPTIONS, br#"{"include_usage":true}"#.to_vec()));
            return Ok(false);
        }
        Some(raw) => raw,
    };
    if !raw.starts_with('{') {
        return Err(ValidationError::InvalidType(STREAM_OPTIONS));
    }
    // A key twice would leave the upstream to pick one of them.
    let Members(members) = serde_json::from_str(raw)
        .map_err(|_| ValidationError::InvalidValue(STREAM_OPTIONS, "stream_options must not have a key twice."))?;
    let include = members
        .iter()
        .find(|(key, _)| key == INCLUDE_USAGE)
        .map(|(_, v)| v.get());
    match include {
        Some("true") => return Ok(true),
        None | Some("false" | "null") => {}
        Some(_) => return Err(ValidationError::InvalidType(STREAM_OPTIONS)),
    }
    let mut out = Vec::with_capacity(raw.len() + INCLUDE_USAGE.len() + 8);
    out.push(b'{');
    let mut first = true;
    let mut member = |out: &mut Vec<u8>, key: &str, value: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        write_key(out, key);
        out.extend_from_slice(value.as_bytes());
    };
    for (key, value) in &members {
        match (key.as_ref(), value.get()) {
            (INCLUDE_USAGE, "null") => {}
            (INCLUDE_USAGE, _) => member(&mut out, INCLUDE_USAGE, "true"),
            (key, value) => member(&mut out, key, value),
        }
    }
    if include != Some("false") {
        member(&mut out, INCLUDE_USAGE, "true");
    }
    out.push(b'}');
    rewrite.replaced.push((STREAM_OPTIONS, out));
    Ok(false)
}

/// Whether the client asked for usage, when the proxy does not ask (the product's
/// upstream refuses `stream_options`): nothing is refused or changed then.
pub(super) fn client_asked(raw: Option<&str>) -> bool {
    raw.is_some_and(|raw| {
        raw.starts_with('{')
            && serde_json::from_str::<Members<'_>>(raw).is_ok_and(|Members(members)| {
                members
                    .iter()
                    .any(|(key, value)| key == INCLUDE_USAGE && value.get() == "true")
            })
    })
}
