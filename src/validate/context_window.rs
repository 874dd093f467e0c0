//! Input parts whose tokens the body's bytes do not bound: an image, a file or audio costs
//! tokens the proxy cannot count from the bytes that carry it (a URL, a file id, a short
//! base64 string), so such a body's input is reserved as the model's context window
//! (contract "Budgets", Reservation). The route decides what that means; this module
//! only finds the parts.
//!
//! One pass over the member's raw text, looking at every `"type"` key at any depth: no
//! tree is built and no stack grows with the client's nesting. A `"type"` key with one of
//! these values anywhere in `messages` or `input` is an input part (a message's parts, a
//! tool output's parts); a false find only makes the reservation larger, never smaller.

use super::policy::{key_text, skip_ws, string_end};

/// Chat message content parts that are not text.
pub(super) const CHAT_PARTS: [&str; 3] = ["image_url", "input_audio", "file"];

/// Responses input items and content parts that are not text.
pub(super) const RESPONSES_PARTS: [&str; 3] = ["input_image", "input_file", "input_audio"];

/// Whether `raw` (valid JSON) holds, at any depth, a `"type"` member whose value is one of
/// `types`.
pub(super) fn has_part(raw: &str, types: &[&str]) -> bool {
    // Unless a `\u` escape spells it, a part's type is in the text as it is (the names
    // are letters and `_`, which no other escape yields): most bodies, text only, need
    // no scan, even with `\n` in their text.
    if !raw.contains("\\u") && !types.iter().any(|kind| raw.contains(kind)) {
        return false;
    }
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let end = string_end(b, i);
        let colon = skip_ws(b, end);
        if b.get(colon) != Some(&b':') {
            // A string value, or an array element: skipped whole.
            i = end;
            continue;
        }
        let value = skip_ws(b, colon + 1);
        if b.get(value) == Some(&b'"') && key_text(&raw[i..end]) == "type" {
            let value_end = string_end(b, value);
            if types.contains(&key_text(&raw[value..value_end]).as_ref()) {
                return true;
            }
            i = value_end;
        } else {
            i = value;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &str) -> bool {
        has_part(messages, &CHAT_PARTS)
    }

    fn responses(input: &str) -> bool {
        has_part(input, &RESPONSES_PARTS)
    }

    #[test]
    fn chat_image_audio_and_file_parts_are_found() {
        for kind in CHAT_PARTS {
            let messages =
                format!(r#"[{{"role":"user","content":[{{"type":"text","text":"a"}},{{"type" : "{kind}"}}]}}]"#);
            assert!(chat(&messages), "{messages}");
        }
        assert!(chat(
            r#"[{"role":"user","content":[{"type":"image\u005furl","image_url":{"url":"u"}}]}]"#
        ));
        assert!(chat(
            r#"[{"role":"user","content":[{"typ\u0065":"file","file":{"file_data":"x"}}]}]"#
        ));
    }

    #[test]
    fn text_that_mentions_a_part_type_is_not_a_part() {
        for messages in [
            r#"[{"role":"user","content":"type: image_url, file"}]"#,
            r#"[{"role":"user","content":"{\"type\":\"image_url\"}"}]"#,
            r#"[{"role":"user","content":[{"type":"text","text":"\"type\":\"file\""}]}]"#,
            r#"[{"role":"user","content":[{"type":"text","text":"image_url"}]}]"#,
            r#"[{"role":"assistant","tool_calls":[{"type":"function","function":{"name":"file","arguments":"{}"}}]}]"#,
            r#"[{"role":"user","content":[{"text":"a","image_url":"type"}]}]"#,
        ] {
            assert!(!chat(messages), "{messages}");
        }
    }

    #[test]
    fn responses_parts_are_found_at_any_depth() {
        for kind in RESPONSES_PARTS {
            let input = format!(r#"[{{"role":"user","content":[{{"type":"{kind}","file_url":"u"}}]}}]"#);
            assert!(responses(&input), "{input}");
            let tool_output =
                format!(r#"[{{"type":"function_call_output","call_id":"c","output":[{{"type":"{kind}"}}]}}]"#);
            assert!(responses(&tool_output), "{tool_output}");
            let item = format!(r#"[{{"type":"{kind}"}}]"#);
            assert!(responses(&item), "{item}");
        }
        assert!(!responses(r#""describe input_image""#));
        assert!(!responses(
            r#"[{"role":"user","content":[{"type":"input_text","text":"input_file"}]}]"#
        ));
        // Chat's names mean nothing in a responses body, and the other way round.
        assert!(!responses(r#"[{"type":"image_url"}]"#));
        assert!(!chat(r#"[{"content":[{"type":"input_image"}]}]"#));
    }

    #[test]
    fn deep_nesting_needs_no_stack() {
        let depth = 100_000;
        let deep = format!(r#"{}{{"type":"input_audio"}}{}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(responses(&deep));
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(!chat(&format!(r#"[{{"content":{deep},"x":"file"}}]"#)));
    }
}
