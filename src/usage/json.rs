//! An incremental JSON scanner that finds the few members usage metering needs (the
//! `usage` object's token counts, a response `id`, an event's `type`, whether `choices` is
//! empty) in a document fed in pieces of any size.
//!
//! Its memory is fixed whatever the document: a depth counter and a bit per open
//! container (at most [`MAX_DEPTH`]), the keys of the first four levels, and short
//! buffers for the one key or value being read. It tracks strings (escapes included) and
//! nesting exactly, so text inside a string (a completion that says `"usage"`) is never
//! mistaken for a member. Malformed JSON stops the scan; what was found before stays.

use super::Usage;

/// Deeper documents stop the scan (`serde_json`'s own default recursion limit).
pub const MAX_DEPTH: u32 = 128;
/// A captured string value (an id, a type) longer than this is dropped, not stored.
pub const MAX_CAPTURED: usize = 256;
/// Keys longer than this are none of ours.
const MAX_KEY: usize = 24;
/// Levels whose keys are remembered: `response.usage.input_tokens_details.cached_tokens`.
const PATH_LEVELS: usize = 4;

/// Where the members sit in the documents being scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A JSON answer (chat completion, embeddings, response): top-level `usage`, `id`
    /// and `choices`.
    Body,
    /// A chat stream chunk: as [`Layout::Body`], but the `id` (the same in every chunk,
    /// and not needed) is not copied out of each one.
    ChatChunk,
    /// The data of a Responses stream event: top-level `type`, and `usage` and `id` inside
    /// the top-level `response` object.
    ResponsesEvent,
}

/// One level of the path to the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Other,
    Array,
    Usage,
    Id,
    Type,
    Choices,
    Response,
    Input,
    Output,
    Total,
    InputDetails,
    Cached,
}

fn seg_of(key: &[u8]) -> Seg {
    match key {
        b"usage" => Seg::Usage,
        b"id" => Seg::Id,
        b"type" => Seg::Type,
        b"choices" => Seg::Choices,
        b"response" => Seg::Response,
        b"prompt_tokens" | b"input_tokens" => Seg::Input,
        b"completion_tokens" | b"output_tokens" => Seg::Output,
        b"total_tokens" => Seg::Total,
        b"prompt_tokens_details" | b"input_tokens_details" => Seg::InputDetails,
        b"cached_tokens" => Seg::Cached,
        _ => Seg::Other,
    }
}

/// What the scalar being read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    Key,
    Id,
    Type,
    Input,
    Output,
    Total,
    Cached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value is expected.
    Value,
    /// After `{`: a key or `}`.
    FirstKeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `[`: a value or `]`.
    FirstValueOrEnd,
    /// After a value: `,`, a closer, or the end of the document.
    AfterValue,
    Str,
    Escape,
    /// Inside `\uXXXX`: hex digits read so far and their value.
    Unicode(u8, u16),
    Number,
    /// The bytes of `true`, `false` or `null` still expected.
    Literal(&'static [u8]),
    /// The document ended; only whitespace may follow.
    Done,
    Failed,
}

/// The token counts of the `usage` object being read.
#[derive(Debug, Clone, Copy, Default)]
struct Fields {
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    cached: Option<u64>,
}

/// See the module documentation.
#[derive(Debug)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent flags of a byte-level state machine"
)]
pub struct JsonScanner {
    layout: Layout,
    state: State,
    depth: u32,
    /// Bit `i` set: the container at depth `i + 1` is an array.
    arrays: u128,
    path: [Seg; PATH_LEVELS],
    capture: Capture,
    /// The string being read is a key.
    in_key: bool,
    /// The key being read (only at the remembered levels).
    key: [u8; MAX_KEY],
    key_len: usize,
    key_bad: bool,
    /// The string value being captured.
    text: Vec<u8>,
    text_bad: bool,
    /// A `\uD800`-`\uDBFF` waiting for its low half.
    high_surrogate: Option<u16>,
    number: u64,
    number_ok: bool,
    open_usage: Option<Fields>,
    usage: Option<Usage>,
    id: Option<String>,
    event_type: Option<String>,
    choices_empty: Option<bool>,
}

impl JsonScanner {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            state: State::Value,
            depth: 0,
            arrays: 0,
            path: [Seg::Other; PATH_LEVELS],
            capture: Capture::None,
            in_key: false,
            key: [0; MAX_KEY],
            key_len: 0,
            key_bad: false,
            text: Vec::new(),
            text_bad: false,
            high_surrogate: None,
            number: 0,
            number_ok: false,
            open_usage: None,
            usage: None,
            id: None,
            event_type: None,
            choices_empty: None,
        }
    }

    /// Starts a new document, keeping the buffers' memory.
    pub fn reset(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        *self = Self {
            text,
            ..Self::new(self.layout)
        };
    }

    /// The last complete `usage` object with at least one token count, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The first response id (`id`, or `response.id` for [`Layout::ResponsesEvent`]).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The top-level `type` string.
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    /// `Some(true)` when the top-level `choices` is an empty array, `Some(false)` when it is
    /// a non-empty one, `None` when there is none (yet).
    pub fn choices_empty(&self) -> Option<bool> {
        self.choices_empty
    }

    /// True once the whole document was read without error.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// True once the scan stopped on malformed or too deep JSON.
    pub fn has_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// Reads the next bytes of the document.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Failed => return,
                State::Str if !self.capturing() => {
                    // Fast path through text nobody reads: jump to the next quote or escape.
                    match bytes[i..].iter().position(|b| *b == b'"' || *b == b'\\') {
                        Some(n) => i += n,
                        None => return,
                    }
                }
                _ => {}
            }
            // A number ends at the byte after it, which is then read again as structure.
            if !self.step(bytes[i]) {
                i += 1;
            }
        }
    }

    /// Tells the scanner the document ended (a number at the very end is complete then).
    pub fn finish(&mut self) {
        if self.state == State::Number {
            self.end_number();
        }
    }

    fn capturing(&self) -> bool {
        self.capture != Capture::None
    }

    /// Handles one byte; returns true when the byte must be read again in the new state.
    fn step(&mut self, b: u8) -> bool {
        match self.state {
            State::Value | State::FirstValueOrEnd => {
                if is_space(b) {
                } else if b == b']' && self.state == State::FirstValueOrEnd {
                    self.close(true);
                } else {
                    self.start_value(b);
                }
            }
            State::FirstKeyOrEnd | State::Key => {
                if is_space(b) {
                } else if b == b'"' {
                    self.start_key();
                } else if b == b'}' && self.state == State::FirstKeyOrEnd {
                    self.close(false);
                } else {
                    self.state = State::Failed;
                }
            }
            State::Colon => {
                if b == b':' {
                    self.state = State::Value;
                } else if !is_space(b) {
                    self.state = State::Failed;
                }
            }
            State::AfterValue => {
                if is_space(b) {
                } else if b == b',' && self.depth > 0 {
                    self.state = if self.top_is_array() { State::Value } else { State::Key };
                } else if b == b']' && self.depth > 0 && self.top_is_array() {
                    self.close(true);
                } else if b == b'}' && self.depth > 0 && !self.top_is_array() {
                    self.close(false);
                } else {
                    self.state = State::Failed;
                }
            }
            State::Str => match b {
                b'"' => self.end_string(),
                b'\\' => self.state = State::Escape,
                _ => self.push_text(b),
            },
            State::Escape => self.escape(b),
            State::Unicode(n, code) => {
                let Some(digit) = (b as char).to_digit(16) else {
                    self.state = State::Failed;
                    return false;
                };
                let code = code * 16 + u16::try_from(digit).unwrap_or(0);
                if n == 3 {
                    self.push_code(code);
                    self.state = State::Str;
                } else {
                    self.state = State::Unicode(n + 1, code);
                }
            }
            State::Number => return self.number_byte(b),
            State::Literal(rest) => {
                if rest.first() == Some(&b) {
                    let rest = &rest[1..];
                    if rest.is_empty() {
                        self.end_value();
                    } else {
                        self.state = State::Literal(rest);
                    }
                } else {
                    self.state = State::Failed;
                }
            }
            State::Done => {
                if !is_space(b) {
                    self.state = State::Failed;
                }
            }
            State::Failed => {}
        }
        false
    }

    /// The byte after a backslash in a string.
    fn escape(&mut self, b: u8) {
        let decoded = match b {
            b'"' | b'\\' | b'/' => b,
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                self.state = State::Unicode(0, 0);
                return;
            }
            _ => {
                self.state = State::Failed;
                return;
            }
        };
        self.push_text(decoded);
        self.state = State::Str;
    }

    /// A byte inside a number; true when it ended the number and must be read again.
    fn number_byte(&mut self, b: u8) -> bool {
        if b.is_ascii_digit() {
            if self.number_ok {
                match self
                    .number
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                {
                    Some(n) => self.number = n,
                    None => self.number_ok = false,
                }
            }
        } else if matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
            // Token counts are plain integers; anything else is not one.
            self.number_ok = false;
        } else {
            self.end_number();
            return true;
        }
        false
    }

    fn top_is_array(&self) -> bool {
        self.depth > 0 && self.arrays & (1u128 << (self.depth - 1)) != 0
    }

    /// The path of a value at the current depth, with the layout's prefix removed; `None`
    /// when it lies outside the prefix or below the remembered levels.
    fn rel_path(&self) -> Option<&[Seg]> {
        let depth = self.depth as usize;
        if depth > PATH_LEVELS {
            return None;
        }
        let path = &self.path[..depth];
        match self.layout {
            Layout::Body | Layout::ChatChunk => Some(path),
            Layout::ResponsesEvent => path.strip_prefix(&[Seg::Response]),
        }
    }

    fn start_value(&mut self, b: u8) {
        let path = self.path;
        let depth = self.depth as usize;
        let abs = &path[..depth.min(PATH_LEVELS)];
        if depth <= PATH_LEVELS && abs == [Seg::Choices, Seg::Array] {
            self.choices_empty = Some(false);
        }
        let rel = self.rel_path();
        let at_id = match self.layout {
            Layout::Body => depth == 1 && abs == [Seg::Id],
            Layout::ChatChunk => false,
            Layout::ResponsesEvent => depth == 2 && abs == [Seg::Response, Seg::Id],
        };
        let capture_number = match rel {
            Some([Seg::Usage, Seg::Input]) => Capture::Input,
            Some([Seg::Usage, Seg::Output]) => Capture::Output,
            Some([Seg::Usage, Seg::Total]) => Capture::Total,
            Some([Seg::Usage, Seg::InputDetails, Seg::Cached]) => Capture::Cached,
            _ => Capture::None,
        };
        let usage_object = rel == Some(&[Seg::Usage][..]);
        match b {
            b'{' => {
                if usage_object {
                    self.open_usage = Some(Fields::default());
                }
                self.open(false);
            }
            b'[' => {
                if depth == 1 && abs == [Seg::Choices] {
                    self.choices_empty = Some(true);
                }
                self.open(true);
            }
            b'"' => {
                self.capture = if at_id && self.id.is_none() {
                    Capture::Id
                } else if depth == 1 && abs == [Seg::Type] {
                    Capture::Type
                } else {
                    Capture::None
                };
                self.text.clear();
                self.text_bad = false;
                self.high_surrogate = None;
                self.state = State::Str;
            }
            b'-' | b'0'..=b'9' => {
                self.capture = capture_number;
                self.number = u64::from(b.wrapping_sub(b'0'));
                self.number_ok = b != b'-';
                self.state = State::Number;
            }
            b't' => self.state = State::Literal(b"rue"),
            b'f' => self.state = State::Literal(b"alse"),
            b'n' => self.state = State::Literal(b"ull"),
            _ => self.state = State::Failed,
        }
    }

    fn open(&mut self, array: bool) {
        if self.depth >= MAX_DEPTH - 1 {
            self.state = State::Failed;
            return;
        }
        self.depth += 1;
        let bit = 1u128 << (self.depth - 1);
        if array {
            self.arrays |= bit;
        } else {
            self.arrays &= !bit;
        }
        if let Some(seg) = self.path.get_mut(self.depth as usize - 1) {
            *seg = if array { Seg::Array } else { Seg::Other };
        }
        self.state = if array {
            State::FirstValueOrEnd
        } else {
            State::FirstKeyOrEnd
        };
    }

    fn close(&mut self, array: bool) {
        self.depth -= 1;
        if !array
            && self.rel_path() == Some(&[Seg::Usage][..])
            && let Some(fields) = self.open_usage.take()
            && (fields.input.is_some() || fields.output.is_some() || fields.total.is_some())
        {
            self.usage = Some(Usage {
                input_tokens: fields.input.unwrap_or(0),
                cached_tokens: fields.cached.unwrap_or(0),
                reported_output_tokens: fields.output,
                total_tokens: fields.total,
            });
        }
        self.end_value();
    }

    fn end_value(&mut self) {
        self.capture = Capture::None;
        self.state = if self.depth == 0 {
            State::Done
        } else {
            State::AfterValue
        };
    }

    fn start_key(&mut self) {
        self.capture = if self.depth as usize <= PATH_LEVELS {
            Capture::Key
        } else {
            Capture::None
        };
        self.in_key = true;
        self.key_len = 0;
        self.key_bad = false;
        self.high_surrogate = None;
        self.state = State::Str;
    }

    fn end_string(&mut self) {
        if self.in_key {
            if self.capture == Capture::Key {
                let seg = if self.key_bad || self.high_surrogate.is_some() {
                    Seg::Other
                } else {
                    seg_of(&self.key[..self.key_len])
                };
                self.path[self.depth as usize - 1] = seg;
            }
            self.in_key = false;
            self.capture = Capture::None;
            self.state = State::Colon;
            return;
        }
        match self.capture {
            Capture::Id | Capture::Type
                if !self.text_bad
                    && self.high_surrogate.is_none()
                    && let Ok(text) = std::str::from_utf8(&self.text) =>
            {
                if self.capture == Capture::Id {
                    self.id = Some(text.to_owned());
                } else {
                    self.event_type = Some(text.to_owned());
                }
            }
            _ => {}
        }
        self.end_value();
    }

    fn push_text(&mut self, b: u8) {
        if self.high_surrogate.take().is_some() {
            // A high surrogate not followed by its low half.
            self.key_bad = true;
            self.text_bad = true;
        }
        match self.capture {
            Capture::Key => {
                if self.key_len < MAX_KEY {
                    self.key[self.key_len] = b;
                    self.key_len += 1;
                } else {
                    self.key_bad = true;
                }
            }
            Capture::Id | Capture::Type => {
                if self.text.len() < MAX_CAPTURED {
                    self.text.push(b);
                } else {
                    self.text_bad = true;
                }
            }
            _ => {}
        }
    }

    /// A `\uXXXX` escape: UTF-8 bytes into the capture, surrogate pairs joined.
    fn push_code(&mut self, code: u16) {
        let c = match (self.high_surrogate.take(), code) {
            (None, 0xD800..=0xDBFF) => {
                self.high_surrogate = Some(code);
                return;
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(code) - 0xDC00);
                char::from_u32(c)
            }
            (None, _) => char::from_u32(u32::from(code)),
            (Some(_), _) => None,
        };
        if let Some(c) = c {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                self.push_text(b);
            }
        } else {
            self.key_bad = true;
            self.text_bad = true;
        }
    }

    fn end_number(&mut self) {
        if self.number_ok
            && let Some(fields) = self.open_usage.as_mut()
        {
            let n = Some(self.number);
            match self.capture {
                Capture::Input => fields.input = n,
                Capture::Output => fields.output = n,
                Capture::Total => fields.total = n,
                Capture::Cached => fields.cached = n,
                _ => {}
            }
        }
        self.end_value();
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"say \"usage\": {\"prompt_tokens\": 1} \\ \u00e9"},"usage":{"prompt_tokens":999}}],"usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":5}},"system_fingerprint":null}"#;
    const RESPONSE: &str = r#"{"id":"resp_abc","object":"response","output":[{"type":"message","id":"msg_1","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":2},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":17}}"#;
    const EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-2.5e-3,3]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;

    fn scan(layout: Layout, parts: &[&[u8]]) -> JsonScanner {
        let mut s = JsonScanner::new(layout);
        for part in parts {
            s.feed(part);
        }
        s.finish();
        s
    }

    #[test]
    fn reads_a_chat_completions_usage_and_ignores_lookalikes_in_strings_and_deeper_levels() {
        let s = scan(Layout::Body, &[CHAT.as_bytes()]);
        assert!(s.is_complete());
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 120,
                cached_tokens: 64,
                reported_output_tokens: Some(30),
                total_tokens: Some(150),
            })
        );
        assert_eq!(s.id(), Some("chatcmpl-1"));
        assert_eq!(s.choices_empty(), Some(false));
    }

    #[test]
    fn reads_a_responses_and_an_embeddings_usage() {
        let s = scan(Layout::Body, &[RESPONSE.as_bytes()]);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 10,
                cached_tokens: 2,
                reported_output_tokens: Some(7),
                total_tokens: Some(17),
            })
        );
        assert_eq!(s.id(), Some("resp_abc"));
        let s = scan(Layout::Body, &[EMBEDDINGS.as_bytes()]);
        assert_eq!(
            s.usage(),
            Some(Usage {
                input_tokens: 8,
                cached_tokens: 0,
                reported_output_tokens: None,
                total_tokens: Some(8),
            })
        );
        assert_eq!(s.id(), None);
    }

    #[test]
    fn every_split_of_a_body_reads_the_same() {
        for (layout, doc) in [
            (Layout::Body, CHAT),
            (Layout::Body, RESPONSE),
            (Layout::Body, EMBEDDINGS),
        ] {
            let whole = scan(layout, &[doc.as_bytes()]);
            let bytes = doc.as_bytes();
            for cut in 0..=bytes.len() {
                let split = scan(layout, &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(split.usage(), whole.usage(), "cut at {cut}");
                assert_eq!(split.id(), whole.id(), "cut at {cut}");
                assert!(split.is_complete(), "cut at {cut}");
            }
            let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(scan(layout, &one_by_one).usage(), whole.usage());
        }
    }

    #[test]
    fn escaped_keys_are_read_as_their_text() {
        let doc = r#"{"usag\u0065":{"prompt_tokens":5,"\u0063ompletion_tokens":2}}"#;
        let s = scan(Layout::Body, &[doc.as_bytes()]);
        assert_eq!(
            s.usage().map(|u| (u.input_tokens, u.reported_output_tokens)),
            Some((5, Some(2)))
        );
    }

    #[test]
    fn null_empty_or_non_integer_usage_is_no_usage() {
        assert_eq!(scan(Layout::Body, &[br#"{"usage":null}"#]).usage(), None);
        assert_eq!(scan(Layout::Body, &[br#"{"usage":{}}"#]).usage(), None);
        assert_eq!(
            scan(Layout::Body, &[br#"{"usage":{"prompt_tokens":1.5}}"#]).usage(),
            None
        );
        assert_eq!(
            scan(Layout::Body, &[br#"{"usage":{"prompt_tokens":-1}}"#]).usage(),
            None
        );
        assert_eq!(
            scan(
                Layout::Body,
                &[br#"{"usage":{"prompt_tokens":99999999999999999999999}}"#]
            )
            .usage(),
            None
        );
        // A top-level number right at the end of the document is complete.
        let s = scan(Layout::Body, &[b"12"]);
        assert!(s.is_complete());
    }

    #[test]
    fn the_last_usage_object_counts() {
        let doc = br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
        assert_eq!(scan(Layout::Body, &[doc]).usage().map(|u| u.input_tokens), Some(2));
    }

    #[test]
    fn malformed_or_too_deep_json_stops_the_scan() {
        for bad in [
            &b"[DONE]"[..],
            b"{\"a\" 1}",
            b"{\"a\":tru}",
            b"{]",
            b"{\"a\":1}}",
            b"{\"a\":\"\\x\"}",
        ] {
            let s = scan(Layout::Body, &[bad]);
            assert!(s.has_failed(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = "[".repeat(10_000);
        let s = scan(Layout::Body, &[deep.as_bytes()]);
        assert!(s.has_failed());
        // Usage seen before the document broke still counts.
        let s = scan(Layout::Body, &[br#"{"usage":{"prompt_tokens":3}, oops"#]);
        assert!(s.has_failed());
        assert_eq!(s.usage().map(|u| u.input_tokens), Some(3));
    }

    #[test]
    fn memory_stays_bounded_for_huge_strings_and_ids() {
        let mut s = JsonScanner::new(Layout::Body);
        s.feed(b"{\"id\":\"");
        for _ in 0..1000 {
            s.feed(&[b'x'; 1024]);
        }
        s.feed(br#"","choices":[],"usage":{"prompt_tokens":4}}"#);
        s.finish();
        assert!(s.text.capacity() <= 2 * MAX_CAPTURED);
        assert_eq!(s.id(), None);
        assert_eq!(s.choices_empty(), Some(true));
        assert_eq!(s.usage().map(|u| u.input_tokens), Some(4));
    }

    #[test]
    fn non_ascii_ids_are_decoded() {
        let s = scan(Layout::Body, &[br#"{"id":"r\u00e9\ud83d\ude00"}"#]);
        assert_eq!(s.id(), Some("ré😀"));
        let lone = scan(Layout::Body, &[br#"{"id":"r\ud83d"}"#]);
        assert_eq!(lone.id(), None);
    }

    #[test]
    fn a_responses_event_reads_type_and_the_usage_and_id_inside_response() {
        let data = br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7},"output":[{"usage":{"input_tokens":100}}]},"usage":{"input_tokens":50}}"#;
        let s = scan(Layout::ResponsesEvent, &[data]);
        assert_eq!(s.event_type(), Some("response.completed"));
        assert_eq!(s.id(), Some("resp_1"));
        assert_eq!(s.usage().map(|u| (u.input_tokens, u.output_tokens())), Some((3, 4)));
    }

    #[test]
    fn reset_starts_a_new_document() {
        let mut s = JsonScanner::new(Layout::Body);
        s.feed(CHAT.as_bytes());
        s.reset();
        s.feed(br#"{"choices":[]}"#);
        assert_eq!(s.usage(), None);
        assert_eq!(s.choices_empty(), Some(true));
    }

    proptest! {
        #[test]
        fn any_chunking_reads_the_same(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let bytes = CHAT.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut last = 0;
            for c in cuts {
                parts.push(&bytes[last..c]);
                last = c;
            }
            parts.push(&bytes[last..]);
            let s = scan(Layout::Body, &parts);
            prop_assert_eq!(s.usage(), scan(Layout::Body, &[bytes]).usage());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut s = JsonScanner::new(Layout::ResponsesEvent);
            s.feed(&bytes);
            s.finish();
        }

        #[test]
        fn strings_with_any_content_hide_what_they_hold(content in "[ -~]{0,64}") {
            let escaped = serde_json::to_string(&content).unwrap();
            let doc = format!(r#"{{"a":{escaped},"usage":{{"prompt_tokens":7}},"b":{escaped}}}"#);
            let s = scan(Layout::Body, &[doc.as_bytes()]);
            prop_assert!(s.is_complete());
            prop_assert_eq!(s.usage().map(|u| u.input_tokens), Some(7));
        }
    }
}
