//! A Responses stream (`stream: true` on `POST /v1/responses`) as it passes: the bytes go
//! to the client as they arrive (this reader only looks); the usage comes from the
//! `response.completed`, `response.incomplete` or `response.failed` event (matched on the
//! data's `type`), the response id from the first event that carries `response.id`
//! (`response.created`).
//!
//! Every event is read incrementally by a [`JsonScanner`]: no event is held, however large
//! (a `response.completed` repeats the whole output), and memory stays bounded.

use super::Usage;
use super::json::{JsonScanner, Layout};
use super::sse::{Splitter, Sse};

/// The events whose `response.usage` is the request's usage.
const FINAL_TYPES: [&str; 3] = ["response.completed", "response.incomplete", "response.failed"];

/// See the module documentation.
#[derive(Debug)]
pub struct ResponsesStream {
    splitter: Splitter,
    scanner: JsonScanner,
    usage: Option<Usage>,
    id: Option<String>,
}

impl Default for ResponsesStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponsesStream {
    pub fn new() -> Self {
        Self {
            splitter: Splitter::new(),
            scanner: JsonScanner::new(Layout::ResponsesEvent),
            usage: None,
            id: None,
        }
    }

    /// Reads the next chunk. True when the response id became known within it: the caller
    /// that must record the id before the client sees it holds this chunk back until then
    /// (earlier chunks carry at most the first bytes of the id).
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let had_id = self.id.is_some();
        let mut pos = 0;
        while let Some(step) = self.splitter.next(chunk, &mut pos) {
            match step {
                Sse::Data(data) => {
                    self.scanner.feed(data);
                    if self.id.is_none() {
                        self.id = self.scanner.id().map(str::to_owned);
                    }
                }
                Sse::Joiner => self.scanner.feed(b"\n"),
                Sse::EventEnd => {
                    self.scanner.finish();
                    let is_final = self.scanner.event_type().is_some_and(|t| FINAL_TYPES.contains(&t));
                    if is_final
                        && self.scanner.is_complete()
                        && let Some(usage) = self.scanner.usage()
                    {
                        self.usage = Some(usage);
                    }
                    self.scanner.reset();
                }
            }
        }
        !had_id && self.id.is_some()
    }

    /// The usage from the final event, once it has ended.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The response id, once seen.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_123\",\"status\":\"in_progress\",\"usage\":null,\"output\":[]}}\n\n";
    const DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"\\\"usage\\\":{\\\"input_tokens\\\":9}\"}\n\n";
    const COMPLETED: &str = "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":5,\"response\":{\"id\":\"resp_123\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"a \\\"b\\\"\"}]}],\"usage\":{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens\":10},\"output_tokens\":20,\"output_tokens_details\":{\"reasoning_tokens\":8},\"total_tokens\":50}}}\n\n";

    fn expected() -> Usage {
        Usage {
            input_tokens: 30,
            cached_tokens: 10,
            reported_output_tokens: Some(20),
            total_tokens: Some(50),
        }
    }

    #[test]
    fn reads_id_and_final_usage_at_every_split() {
        let input = [CREATED, DELTA, COMPLETED].concat();
        let bytes = input.as_bytes();
        let id_end = input.find("resp_123").unwrap() + "resp_123\"".len();
        for cut in 0..=bytes.len() {
            let mut reader = ResponsesStream::new();
            let first = reader.feed(&bytes[..cut]);
            // The id is known in the chunk that holds its closing quote.
            assert_eq!(first, cut >= id_end, "cut {cut}");
            let second = reader.feed(&bytes[cut..]);
            assert_eq!(second, cut < id_end, "cut {cut}");
            assert_eq!(reader.id(), Some("resp_123"));
            assert_eq!(reader.usage(), Some(expected()), "cut {cut}");
        }
    }

    #[test]
    fn byte_by_byte_and_crlf_read_the_same() {
        let input = [CREATED, DELTA, COMPLETED].concat().replace('\n', "\r\n");
        let mut reader = ResponsesStream::new();
        for b in input.as_bytes() {
            reader.feed(&[*b]);
        }
        assert_eq!(reader.usage(), Some(expected()));
        assert_eq!(reader.id(), Some("resp_123"));
    }

    #[test]
    fn incomplete_and_failed_events_carry_the_usage_too_and_others_do_not() {
        for final_type in ["response.incomplete", "response.failed"] {
            let event = COMPLETED.replace("response.completed", final_type);
            let mut reader = ResponsesStream::new();
            reader.feed(event.as_bytes());
            assert_eq!(reader.usage(), Some(expected()), "{final_type}");
        }
        let other = COMPLETED.replace("response.completed", "response.in_progress");
        let mut reader = ResponsesStream::new();
        reader.feed(other.as_bytes());
        assert_eq!(reader.usage(), None);
    }

    #[test]
    fn the_type_is_read_even_when_it_comes_after_the_response() {
        let event = "data: {\"response\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":2}},\"type\":\"response.completed\"}\n\n";
        let mut reader = ResponsesStream::new();
        reader.feed(event.as_bytes());
        assert_eq!(reader.usage().map(|u| u.output_tokens()), Some(2));
    }

    #[test]
    fn a_final_event_cut_before_its_blank_line_gives_no_usage() {
        let mut reader = ResponsesStream::new();
        reader.feed(&COMPLETED.as_bytes()[..COMPLETED.len() - 1]);
        assert_eq!(reader.usage(), None);
    }

    #[test]
    fn a_huge_final_event_is_read_in_bounded_memory() {
        let mut reader = ResponsesStream::new();
        reader.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_9\",\"output\":[{\"text\":\"");
        let filler = vec![b'y'; 64 * 1024];
        for _ in 0..100 {
            reader.feed(&filler);
        }
        reader.feed(b"\"}],\"usage\":{\"input_tokens\":7,\"output_tokens\":1000}}}\n\n");
        assert_eq!(
            reader.usage().map(|u| (u.input_tokens, u.output_tokens())),
            Some((7, 1000))
        );
        assert_eq!(reader.id(), Some("resp_9"));
    }
}
