//! Finding a created response's id in the upstream's answer as it passes, so that the id
//! is recorded before the bytes that carry it reach the client: the top-level `id` of a
//! JSON body, or the `response.id` of a stream's `response.created` event.
//!
//! Incremental and bounded: a byte at a time, the nesting counted (no stack), only the
//! keys of the two shallowest levels and one short string kept.

/// Longest id kept; a longer one is not recorded (its owner later gets 404, never
/// another owner's answer).
const MAX_ID: usize = 256;
/// Longest key compared; longer keys match nothing.
const MAX_KEY: usize = 32;

/// What the scan has found so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    More,
    Found(String),
    /// The id is not where it should be: stop holding bytes back.
    GiveUp,
}

/// The scanner for one answer.
pub struct IdScanner {
    json: JsonScan,
    sse: Option<SseState>,
    done: bool,
}

impl IdScanner {
    /// For a JSON answer: its top-level `id`.
    pub fn json() -> Self {
        Self {
            json: JsonScan::default(),
            sse: None,
            done: false,
        }
    }

    /// For a Server-Sent Events answer: `response.id` in the `response.created` event.
    pub fn sse() -> Self {
        Self {
            json: JsonScan::default(),
            sse: Some(SseState::default()),
            done: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        if self.done {
            return Scan::GiveUp;
        }
        let result = match &mut self.sse {
            None => feed_json(&mut self.json, chunk),
            Some(sse) => feed_sse(sse, &mut self.json, chunk),
        };
        if result != Scan::More {
            self.done = true;
        }
        result
    }
}

fn feed_json(json: &mut JsonScan, chunk: &[u8]) -> Scan {
    for &b in chunk {
        match json.byte(b) {
            Some(Value { depth: 1, keys, value }) if keys[0] == "id" => return Scan::Found(value),
            _ if json.closed => return Scan::GiveUp,
            _ => {}
        }
    }
    Scan::More
}

// A byte-at-a-time parser's flags; an enum per flag would say no more.
#[allow(clippy::struct_excessive_bools)]
#[derive(Default)]
struct SseState {
    /// In the field name of a line (before its `:`).
    in_value: bool,
    field: Vec<u8>,
    skip_space: bool,
    line_empty: bool,
    event_has_lines: bool,
    event_name: Vec<u8>,
    event_type: Option<String>,
    response_id: Option<String>,
    started: bool,
}

const CREATED: &str = "response.created";

fn feed_sse(sse: &mut SseState, json: &mut JsonScan, chunk: &[u8]) -> Scan {
    if !sse.started {
        sse.started = true;
        sse.line_empty = true;
    }
    for &b in chunk {
        match b {
            b'\r' => {}
            b'\n' => {
                if sse.line_empty {
                    if sse.event_has_lines {
                        // The first event ended without the id: it was not `response.created`.
                        return Scan::GiveUp;
                    }
                } else {
                    sse.event_has_lines = true;
                    if sse.in_value && sse.field == b"data" {
                        json.byte(b'\n');
                    }
                }
                sse.line_empty = true;
                sse.in_value = false;
                sse.field.clear();
            }
            _ if !sse.in_value => {
                sse.line_empty = false;
                if b == b':' {
                    sse.in_value = true;
                    sse.skip_space = true;
                } else if sse.field.len() < 8 {
                    sse.field.push(b);
                }
            }
            _ => {
                if std::mem::take(&mut sse.skip_space) && b == b' ' {
                    continue;
                }
                match sse.field.as_slice() {
                    b"data" => match json.byte(b) {
                        Some(Value { depth: 1, keys, value }) if keys[0] == "type" => sse.event_type = Some(value),
                        Some(Value { depth: 2, keys, value }) if keys[0] == "response" && keys[1] == "id" => {
                            sse.response_id = Some(value);
                        }
                        _ => {}
                    },
                    b"event" if sse.event_name.len() < 64 => sse.event_name.push(b),
                    _ => {}
                }
                let created = sse.event_name == CREATED.as_bytes() || sse.event_type.as_deref() == Some(CREATED);
                if created && let Some(id) = sse.response_id.take() {
                    return Scan::Found(id);
                }
            }
        }
    }
    Scan::More
}

/// A string value found at `depth` (1 = a member of the top-level object), under `keys`.
#[allow(clippy::struct_field_names)]
struct Value {
    depth: usize,
    keys: [String; 2],
    value: String,
}

/// A JSON tokenizer that keeps only the keys of the two shallowest levels.
#[allow(clippy::struct_excessive_bools)]
#[derive(Default)]
struct JsonScan {
    depth: usize,
    /// Whether the containers at depth 1 and 2 are objects.
    object: [bool; 3],
    expect_key: bool,
    in_string: bool,
    escape: bool,
    string_is_key: bool,
    buf: Vec<u8>,
    overflow: bool,
    keys: [String; 2],
    /// The top-level value ended.
    closed: bool,
}

impl JsonScan {
    fn byte(&mut self, b: u8) -> Option<Value> {
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                return self.string_done();
            }
            if self.depth <= 2 {
                let limit = if self.string_is_key { MAX_KEY } else { MAX_ID };
                if self.buf.len() < limit {
                    self.buf.push(b);
                } else {
                    self.overflow = true;
                }
            }
            return None;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.string_is_key = self.expect_key && self.depth <= 2;
                self.buf.clear();
                self.overflow = false;
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth <= 2 {
                    self.object[self.depth] = b == b'{';
                    self.keys[self.depth - 1].clear();
                }
                self.expect_key = b == b'{';
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.expect_key = false;
                if self.depth == 0 {
                    self.closed = true;
                }
            }
            b':' => self.expect_key = false,
            b',' => self.expect_key = self.depth <= 2 && self.object[self.depth.min(2)],
            _ => {}
        }
        None
    }

    fn string_done(&mut self) -> Option<Value> {
        if self.depth == 0 || self.depth > 2 {
            return None;
        }
        let text = if self.overflow {
            String::new()
        } else {
            String::from_utf8_lossy(&self.buf).into_owned()
        };
        if self.string_is_key {
            self.keys[self.depth - 1] = text;
            if self.depth == 1 {
                self.keys[1].clear();
            }
            return None;
        }
        if self.overflow || text.is_empty() {
            return None;
        }
        Some(Value {
            depth: self.depth,
            keys: self.keys.clone(),
            value: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(mut scanner: IdScanner, text: &str, step: usize) -> Scan {
        for chunk in text.as_bytes().chunks(step) {
            match scanner.feed(chunk) {
                Scan::More => {}
                other => return other,
            }
        }
        Scan::More
    }

    #[test]
    fn finds_the_top_level_id_of_a_json_answer_in_any_chunking() {
        let body =
            r#"{"object":"response","nested":{"id":"not_this"},"list":[{"id":"nor_this"}],"id":"resp_abc","x":1}"#;
        for step in [1, 3, 7, body.len()] {
            assert_eq!(scan_all(IdScanner::json(), body, step), Scan::Found("resp_abc".into()));
        }
        assert_eq!(scan_all(IdScanner::json(), r#"{"error":{"id":"x"}} "#, 4), Scan::GiveUp);
        assert_eq!(scan_all(IdScanner::json(), r#"{"a":"id","b":"c"}"#, 1), Scan::GiveUp);
    }

    #[test]
    fn finds_the_created_events_response_id() {
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_9\",\"object\":\"response\"}}\n\nevent: response.completed\ndata: {}\n\n";
        for step in [1, 5, stream.len()] {
            assert_eq!(scan_all(IdScanner::sse(), stream, step), Scan::Found("resp_9".into()));
        }
        let no_event_line = "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_8\"}}\r\n\r\n";
        assert_eq!(
            scan_all(IdScanner::sse(), no_event_line, 2),
            Scan::Found("resp_8".into())
        );
        let other_first = "event: error\ndata: {\"type\":\"error\",\"response\":{\"id\":\"resp_7\"}}\n\nevent: response.created\ndata: {\"response\":{\"id\":\"resp_6\"}}\n\n";
        assert_eq!(scan_all(IdScanner::sse(), other_first, 3), Scan::GiveUp);
    }

    #[test]
    fn deep_nesting_is_counted_not_stacked() {
        let body = format!(
            r#"{{"a":{}{},"id":"resp_1"}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(scan_all(IdScanner::json(), &body, 4096), Scan::Found("resp_1".into()));
    }
}
