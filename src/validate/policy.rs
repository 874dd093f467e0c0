//! The tool and shared-object policy, for chat and responses bodies: `ALLOWED_TOOLS`, and
//! the references to state the upstream keeps under the product's one key (files, vector
//! stores, containers, conversations, prompt templates, stored items), which a body may
//! not name (400 `unsupported_parameter`).
//!
//! The members' raw text is scanned for the forbidden names by one loop over its bytes:
//! a stack that grew with the client's nesting could be exhausted by a body, so only
//! the few labels that locate JSON Schema objects are kept, for the shallowest levels,
//! and deeper containers are merely counted. JSON Schema objects and `metadata` are
//! skipped: a schema may well describe a property named `file_id`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::ValidationError;
use crate::settings::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Chat,
    Responses,
}

/// Forbidden at any depth when not `null`, with their own name as `param`.
const FORBIDDEN: [&str; 4] = ["file_id", "file_ids", "vector_store_ids", "container_id"];

/// Tool types the client runs itself: their input is text the body carries. Any other
/// type is hosted by the upstream, whose input the proxy cannot see (contract "Budgets").
const CLIENT_TOOLS: [&str; 2] = ["function", "custom"];

/// Checks `tools` against `ALLOWED_TOOLS`, then the shared-object references. Returns
/// whether the body uses a hosted tool: a `tools` type other than `function`/`custom`,
/// or chat's `web_search_options`.
pub(super) fn check(
    members: &[(Cow<'_, str>, &RawValue)],
    body: &[u8],
    policy: &Policy,
    api: Api,
) -> Result<bool, ValidationError> {
    let mut hosted = false;
    for (key, value) in members {
        let raw = value.get();
        match key.as_ref() {
            "tools" => hosted |= check_tools(raw, policy)?,
            // Chat's built-in search is a hosted tool by another name.
            "web_search_options" if api == Api::Chat && raw != "null" => {
                if !policy.allows_tool("web_search") {
                    return Err(ValidationError::ToolNotAllowed);
                }
                hosted = true;
            }
            _ => {}
        }
    }
    for (key, value) in members {
        let raw = value.get();
        match key.as_ref() {
            "conversation" if raw != "null" => return Err(ValidationError::Unsupported("conversation")),
            "prompt" if raw != "null" => return Err(ValidationError::Unsupported("prompt")),
            "input" if api == Api::Responses => check_input_items(raw)?,
            _ => {}
        }
    }
    // Every forbidden name holds `_id` or `container`, unless escaped: bodies with none
    // of these (most chat bodies) need no scan.
    let text = body;
    let may_name = contains(text, b"_id") || contains(text, b"container") || text.contains(&b'\\');
    if !may_name {
        return Ok(hosted);
    }
    for (key, value) in members {
        let raw = value.get();
        if key == "metadata" {
            continue;
        }
        if let Some(name) = forbidden(key)
            && raw != "null"
        {
            return Err(ValidationError::Unsupported(name));
        }
        if raw.starts_with(['{', '[']) {
            scan(Label::of(key), raw)?;
        }
    }
    Ok(hosted)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn forbidden(key: &str) -> Option<&'static str> {
    FORBIDDEN.iter().copied().find(|name| *name == key)
}

/// Only what is needed of a tool or an input item: its `type`.
#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// Every entry of `tools` has a `type` in `ALLOWED_TOOLS`. Returns whether one is hosted.
fn check_tools(raw: &str, policy: &Policy) -> Result<bool, ValidationError> {
    if raw == "null" {
        return Ok(false);
    }
    let mut hosted = false;
    let entries: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| ValidationError::InvalidType("tools"))?;
    for entry in entries {
        // An entry that is not an object, or has no string `type` (or two), has no
        // allowed type.
        let kind = serde_json::from_str::<Typed<'_>>(entry.get()).ok().and_then(|t| t.kind);
        match kind {
            Some(kind) if policy.allows_tool(&kind) => hosted |= !CLIENT_TOOLS.contains(&kind.as_ref()),
            _ => return Err(ValidationError::ToolNotAllowed),
        }
    }
    Ok(hosted)
}

/// No input item of type `item_reference` (a stored item, found by id alone).
fn check_input_items(raw: &str) -> Result<(), ValidationError> {
    if !raw.starts_with('[') || !(raw.contains("item_reference") || raw.contains('\\')) {
        return Ok(());
    }
    let items: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| ValidationError::InvalidType("input"))?;
    for item in items {
        if item.get().starts_with('{')
            && let Ok(Typed { kind: Some(kind) }) = serde_json::from_str::<Typed<'_>>(item.get())
            && kind == "item_reference"
        {
            return Err(ValidationError::Unsupported("input"));
        }
    }
    Ok(())
}

/// What the scanner needs to know of the key that opened a container (or that it is an
/// array element), to recognise where JSON Schema objects sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Tools,
    Function,
    Text,
    Format,
    ResponseFormat,
    JsonSchema,
    Element,
    Other,
}

impl Label {
    fn of(key: &str) -> Self {
        match key {
            "tools" => Self::Tools,
            "function" => Self::Function,
            "text" => Self::Text,
            "format" => Self::Format,
            "response_format" => Self::ResponseFormat,
            "json_schema" => Self::JsonSchema,
            _ => Self::Other,
        }
    }
}

/// Containers whose label is kept: enough for the deepest schema path,
/// `tools[].function.parameters`.
const TRACKED: usize = 3;

/// Whether `key`, found inside the containers `labels` (outermost first; `depth` of them
/// open), holds a JSON Schema object.
fn is_schema(labels: [Label; TRACKED], depth: usize, key: &str) -> bool {
    use Label as L;
    match (key, depth) {
        ("parameters", 2) => labels[..2] == [L::Tools, L::Element],
        ("parameters", 3) => labels[..3] == [L::Tools, L::Element, L::Function],
        ("schema", 2) => labels[..2] == [L::Text, L::Format] || labels[..2] == [L::ResponseFormat, L::JsonSchema],
        _ => false,
    }
}

/// Scans one member's raw value (valid JSON, an object or an array) for the forbidden
/// names. One pass, no recursion; memory independent of the nesting.
fn scan(member: Label, raw: &str) -> Result<(), ValidationError> {
    let b = raw.as_bytes();
    let mut labels = [Label::Other; TRACKED];
    let mut depth = 0usize;
    // The label of the next container to open: the member's own, then a key's.
    let mut pending = member;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string_end(b, i);
                let colon = skip_ws(b, end);
                if b.get(colon) == Some(&b':') {
                    let key = key_text(&raw[i..end]);
                    let value = skip_ws(b, colon + 1);
                    if key == "metadata" || is_schema(labels, depth, &key) {
                        i = skip_value(b, value);
                        continue;
                    }
                    if let Some(name) = forbidden(&key)
                        && !b[value..].starts_with(b"null")
                    {
                        return Err(ValidationError::Unsupported(name));
                    }
                    // A tool that names a container the upstream keeps.
                    if key == "container"
                        && depth == 2
                        && labels[..2] == [Label::Tools, Label::Element]
                        && b.get(value) == Some(&b'"')
                    {
                        return Err(ValidationError::Unsupported("tools"));
                    }
                    pending = Label::of(&key);
                    i = value;
                } else {
                    i = end;
                }
            }
            b'{' | b'[' => {
                if depth < TRACKED {
                    labels[depth] = pending;
                }
                depth += 1;
                pending = Label::Element;
                i += 1;
            }
            b'}' | b']' | b',' => {
                if b[i] != b',' {
                    depth = depth.saturating_sub(1);
                }
                pending = Label::Element;
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index after the string that starts (with its quote) at `start`.
pub(super) fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index after the value that starts at `start`.
fn skip_value(b: &[u8], start: usize) -> usize {
    match b.get(start) {
        Some(b'"') => string_end(b, start),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'"' => {
                        i = string_end(b, i);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            b.len()
        }
        _ => {
            let mut i = start;
            while i < b.len() && !matches!(b[i], b',' | b'}' | b']') {
                i += 1;
            }
            i
        }
    }
}

/// A key's text, its escapes decoded (`"file\u005fid"` is `file_id`).
pub(super) fn key_text(quoted: &str) -> Cow<'_, str> {
    let inner = &quoted[1..quoted.len().saturating_sub(1).max(1)];
    if inner.contains('\\') {
        Cow::Owned(serde_json::from_str::<String>(quoted).unwrap_or_default())
    } else {
        Cow::Borrowed(inner)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Members, test_policy};
    use super::*;

    fn run(body: &str, api: Api) -> Result<bool, ValidationError> {
        let Members(members) = serde_json::from_str(body).expect("object");
        check(&members, body.as_bytes(), &test_policy(), api)
    }

    fn unsupported(body: &str) -> Option<&'static str> {
        match run(body, Api::Responses) {
            Err(ValidationError::Unsupported(name)) => Some(name),
            Ok(_) => None,
            Err(other) => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn forbidden_names_are_found_at_any_depth() {
        for name in FORBIDDEN {
            let body = format!(r#"{{"input":[{{"content":[{{"a":[[{{"{name}":"x"}}]]}}]}}]}}"#);
            assert_eq!(unsupported(&body), Some(name), "{body}");
            let top = format!(r#"{{"{name}":"x"}}"#);
            assert_eq!(unsupported(&top), Some(name));
            let null = format!(r#"{{"input":[{{"{name}":null}}]}}"#);
            assert_eq!(unsupported(&null), None);
        }
        assert_eq!(unsupported(r#"{"input":[{"file\u005fid":"f"}]}"#), Some("file_id"));
        assert_eq!(unsupported(r#"{"input":[{"text":"file_id: \"x\""}]}"#), None);
    }

    #[test]
    fn schemas_and_metadata_are_not_scanned() {
        let schema = r#"{"type":"object","properties":{"file_id":{"type":"string"}}}"#;
        for body in [
            format!(r#"{{"tools":[{{"type":"function","name":"f","parameters":{schema}}}]}}"#),
            format!(r#"{{"tools":[{{"type":"function","function":{{"name":"f","parameters":{schema}}}}}]}}"#),
            format!(r#"{{"text":{{"format":{{"type":"json_schema","schema":{schema}}}}}}}"#),
            format!(r#"{{"response_format":{{"type":"json_schema","json_schema":{{"schema":{schema}}}}}}}"#),
            r#"{"metadata":{"file_id":"x"},"input":[{"metadata":{"container_id":"c"}}]}"#.to_owned(),
        ] {
            assert_eq!(unsupported(&body), None, "{body}");
        }
        // The same names outside the schema positions are refused.
        let outside = format!(r#"{{"text":{{"schema":{schema}}}}}"#);
        assert_eq!(unsupported(&outside), Some("file_id"));
        assert_eq!(
            unsupported(r#"{"tools":[{"type":"function","parameters":{},"x":{"file_id":"f"}}]}"#),
            Some("file_id")
        );
    }

    #[test]
    fn string_containers_items_conversations_and_prompts_are_refused() {
        let tools = |t: &str| format!(r#"{{"tools":[{t}]}}"#);
        let mut policy = test_policy();
        policy.allowed_tools.push("code_interpreter".into());
        let body = tools(r#"{"type":"code_interpreter","container":"cntr_1"}"#);
        let Members(m) = serde_json::from_str(&body).expect("x");
        assert_eq!(
            check(&m, body.as_bytes(), &policy, Api::Responses),
            Err(ValidationError::Unsupported("tools"))
        );
        let body = tools(r#"{"type":"code_interpreter","container":{"type":"auto"}}"#);
        let Members(m) = serde_json::from_str(&body).expect("x");
        assert_eq!(check(&m, body.as_bytes(), &policy, Api::Responses), Ok(true));
        assert_eq!(
            unsupported(r#"{"input":[{"type":"item_reference","id":"msg_1"}]}"#),
            Some("input")
        );
        assert_eq!(
            unsupported(r#"{"input":[{"type":"item\u005freference","id":"m"}]}"#),
            Some("input")
        );
        assert_eq!(unsupported(r#"{"conversation":"conv_1"}"#), Some("conversation"));
        assert_eq!(unsupported(r#"{"prompt":{"id":"pmpt_1"}}"#), Some("prompt"));
        assert_eq!(unsupported(r#"{"conversation":null,"prompt":null}"#), None);
    }

    #[test]
    fn tools_must_have_an_allowed_type() {
        assert_eq!(run(r#"{"tools":[{"type":"function"}]}"#, Api::Chat), Ok(false));
        for tools in [
            r#"[{"type":"web_search"}]"#,
            r#"[{"name":"x"}]"#,
            r#"["function"]"#,
            r#"[{"type":"function","type":"file_search"}]"#,
        ] {
            let body = format!(r#"{{"tools":{tools}}}"#);
            assert_eq!(
                run(&body, Api::Responses),
                Err(ValidationError::ToolNotAllowed),
                "{body}"
            );
        }
        assert_eq!(
            run(r#"{"web_search_options":{}}"#, Api::Chat),
            Err(ValidationError::ToolNotAllowed)
        );
        assert_eq!(
            run(r#"{"tools":{}}"#, Api::Chat),
            Err(ValidationError::InvalidType("tools"))
        );
    }

    #[test]
    fn hosted_tools_are_told_from_client_tools() {
        let mut policy = test_policy();
        policy
            .allowed_tools
            .extend(["web_search".into(), "file_search".into(), "mcp".into()]);
        let run = |body: &str, api: Api| {
            let Members(m) = serde_json::from_str(body).expect("object");
            check(&m, body.as_bytes(), &policy, api)
        };
        for (body, hosted) in [
            (r#"{"tools":[{"type":"function"},{"type":"custom"}]}"#, false),
            (r#"{"tools":null,"web_search_options":null}"#, false),
            (r#"{"x":1}"#, false),
            (r#"{"tools":[{"type":"function"},{"type":"web_search"}]}"#, true),
            (r#"{"tools":[{"type":"mcp"}]}"#, true),
            (r#"{"tools":[{"type":"file\u005fsearch"}]}"#, true),
        ] {
            assert_eq!(run(body, Api::Responses), Ok(hosted), "{body}");
            assert_eq!(run(body, Api::Chat), Ok(hosted), "{body}");
        }
        // Chat's built-in search is a hosted tool; in a responses body it means nothing.
        assert_eq!(run(r#"{"web_search_options":{}}"#, Api::Chat), Ok(true));
        assert_eq!(run(r#"{"web_search_options":{}}"#, Api::Responses), Ok(false));
    }

    #[test]
    fn deep_nesting_needs_no_stack() {
        let depth = 100_000;
        let raw = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(scan(Label::Other, &raw), Ok(()));
        let raw = format!(r#"{}{{"file_id":"x"}}{}"#, "[".repeat(depth), "]".repeat(depth));
        assert_eq!(scan(Label::Other, &raw), Err(ValidationError::Unsupported("file_id")));
    }
}
