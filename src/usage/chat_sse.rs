//! A chat completions stream (`stream: true`) as it passes: each event forwarded whole as
//! soon as its blank line arrives, the usage read from the chunk that carries it, and that
//! chunk (`"choices": []` with a non-null `usage`) taken out when the client did not ask
//! for it.
//!
//! What it holds is bounded: the bytes of one unfinished event, up to
//! [`MAX_HELD_EVENT`]. A larger event is forwarded as its bytes arrive, without being held
//! whole (it is never the small usage chunk, so it is never taken out; its usage, if any,
//! is still read). Forwarded bytes are slices of the input chunks, not copies (except when
//! an event arrives in many small pieces, which are joined once).

use bytes::{Bytes, BytesMut};

use super::Usage;
use super::json::{JsonScanner, Layout};
use super::sse::{Splitter, Sse};

/// The most bytes of one unfinished event held back; a usage chunk is well under 1 KiB.
pub const MAX_HELD_EVENT: usize = 64 * 1024;
/// An unfinished event held in more pieces than this is joined into one buffer.
const MAX_HELD_PIECES: usize = 32;

/// See the module documentation.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools, reason = "independent flags of the stream's state")]
pub struct ChatStream {
    strip_usage_chunk: bool,
    splitter: Splitter,
    scanner: JsonScanner,
    /// The unfinished event's bytes from earlier chunks.
    held: Vec<Bytes>,
    held_len: usize,
    /// The unfinished event outgrew [`MAX_HELD_EVENT`]: its bytes pass as they come.
    passing: bool,
    /// A removed event ended with `\r` and its `\n` may start the next chunk.
    skip_lf: bool,
    usage: Option<Usage>,
    usage_chunk_removed: bool,
}

impl ChatStream {
    /// `strip_usage_chunk`: take the usage-only chunk out of what the client receives (the
    /// proxy asked for usage, the client did not).
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self {
            strip_usage_chunk,
            splitter: Splitter::new(),
            scanner: JsonScanner::new(Layout::ChatChunk),
            held: Vec::new(),
            held_len: 0,
            passing: false,
            skip_lf: false,
            usage: None,
            usage_chunk_removed: false,
        }
    }

    /// The usage of the last event that carried a complete `usage` object.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// True once a usage chunk was taken out of the stream.
    pub fn usage_chunk_removed(&self) -> bool {
        self.usage_chunk_removed
    }

    /// Reads the next chunk from the upstream; pushes onto `out` what the client gets now,
    /// in order.
    pub fn feed(&mut self, chunk: &Bytes, out: &mut Vec<Bytes>) {
        let bytes = &chunk[..];
        let mut pos = 0;
        // The chunk's bytes from `emit_from` up to `event_start` are whole events to forward.
        let mut emit_from = 0;
        let mut event_start = 0;
        // The `\n` of a `\r\n` that ended the last event belongs to that event: forwarded
        // with the run, or dropped with a removed event.
        let skip_lf = std::mem::take(&mut self.skip_lf);
        if self.splitter.pending_lf() && bytes.first() == Some(&b'\n') {
            event_start = 1;
            if skip_lf {
                emit_from = 1;
            }
        }
        while let Some(step) = self.splitter.next(bytes, &mut pos) {
            match step {
                Sse::Data(data) => self.scanner.feed(data),
                Sse::Joiner => self.scanner.feed(b"\n"),
                Sse::EventEnd => {
                    let remove = self.event_ended();
                    if self.passing {
                        // The rest of an outsized event: it joins the run being forwarded.
                        self.passing = false;
                    } else if remove {
                        if event_start > emit_from {
                            out.push(chunk.slice(emit_from..event_start));
                        }
                        self.held.clear();
                        self.held_len = 0;
                        emit_from = pos;
                        self.skip_lf = self.splitter.pending_lf();
                    } else if !self.held.is_empty() {
                        // Its first bytes came earlier: they go before this chunk's run.
                        out.append(&mut self.held);
                        self.held_len = 0;
                    }
                    event_start = pos;
                }
            }
        }
        if self.passing {
            if bytes.len() > emit_from {
                out.push(chunk.slice(emit_from..));
            }
            return;
        }
        if event_start > emit_from {
            out.push(chunk.slice(emit_from..event_start));
        }
        if bytes.len() > event_start {
            self.hold(chunk.slice(event_start..));
        }
        if self.held_len > MAX_HELD_EVENT {
            out.append(&mut self.held);
            self.held_len = 0;
            self.passing = true;
        }
    }

    /// The upstream's body ended: pushes onto `out` an unfinished last event as it is (an
    /// event without its blank line is not dispatched by clients, and its usage is not read).
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        out.append(&mut self.held);
        self.held_len = 0;
    }

    /// An event ended: reads its usage; true when it is to be taken out.
    fn event_ended(&mut self) -> bool {
        self.scanner.finish();
        let complete = self.scanner.is_complete();
        let usage = self.scanner.usage();
        let usage_chunk = complete && usage.is_some() && self.scanner.choices_empty() == Some(true);
        if usage.is_some() {
            self.usage = usage;
        }
        self.scanner.reset();
        let remove = usage_chunk && self.strip_usage_chunk && !self.passing;
        self.usage_chunk_removed |= remove;
        remove
    }

    fn hold(&mut self, piece: Bytes) {
        self.held_len += piece.len();
        self.held.push(piece);
        if self.held.len() > MAX_HELD_PIECES {
            let mut joined = BytesMut::with_capacity(self.held_len);
            for piece in self.held.drain(..) {
                joined.extend_from_slice(&piece);
            }
            self.held.push(joined.freeze());
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FIRST: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi \\\"usage\\\"\"}}],\"usage\":null}\n\n";
    const FILTER: &str = "data: {\"id\":\"c1\",\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\n";
    const LAST: &str =
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn stream() -> String {
        [FILTER, FIRST, LAST, USAGE, DONE].concat()
    }

    fn expected_usage() -> Usage {
        Usage {
            input_tokens: 12,
            cached_tokens: 4,
            reported_output_tokens: Some(3),
            total_tokens: Some(15),
        }
    }

    /// Feeds `parts`; checks after each that exactly the whole events so far went out.
    fn run(strip: bool, input: &[u8], cuts: &[usize], events: &[&str]) -> (Vec<u8>, ChatStream) {
        let mut reader = ChatStream::new(strip);
        let mut sent = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let mut out = Vec::new();
            reader.feed(&Bytes::copy_from_slice(&input[last..cut]), &mut out);
            for piece in out {
                assert!(!piece.is_empty(), "no empty pieces");
                sent.extend_from_slice(&piece);
            }
            last = cut;
            // Whole events only, each as soon as its blank line arrived.
            let mut whole = Vec::new();
            let mut offset = 0;
            for event in events {
                offset += event.len();
                if offset > cut {
                    break;
                }
                if !(strip && *event == USAGE) {
                    whole.extend_from_slice(event.as_bytes());
                }
            }
            assert_eq!(
                String::from_utf8_lossy(&sent),
                String::from_utf8_lossy(&whole),
                "after {cut}"
            );
        }
        let mut out = Vec::new();
        reader.finish(&mut out);
        assert!(out.is_empty());
        (sent, reader)
    }

    #[test]
    fn the_usage_chunk_is_taken_out_at_every_split_and_its_usage_read() {
        let input = stream();
        let events = [FILTER, FIRST, LAST, USAGE, DONE];
        for cut in 0..=input.len() {
            let (sent, reader) = run(true, input.as_bytes(), &[cut], &events);
            assert_eq!(sent, [FILTER, FIRST, LAST, DONE].concat().as_bytes(), "cut {cut}");
            assert_eq!(reader.usage(), Some(expected_usage()));
            assert!(reader.usage_chunk_removed());
        }
    }

    #[test]
    fn the_usage_chunk_passes_when_the_client_asked_for_it() {
        let input = stream();
        let events = [FILTER, FIRST, LAST, USAGE, DONE];
        for cut in 0..=input.len() {
            let (sent, reader) = run(false, input.as_bytes(), &[cut], &events);
            assert_eq!(sent, input.as_bytes());
            assert_eq!(reader.usage(), Some(expected_usage()));
            assert!(!reader.usage_chunk_removed());
        }
    }

    #[test]
    fn crlf_events_are_split_and_removed_cleanly() {
        let input = stream().replace("\n\n", "\r\n\r\n");
        for cut in 0..=input.len() {
            let mut reader = ChatStream::new(true);
            let mut out = Vec::new();
            reader.feed(&Bytes::copy_from_slice(&input.as_bytes()[..cut]), &mut out);
            reader.feed(&Bytes::copy_from_slice(&input.as_bytes()[cut..]), &mut out);
            reader.finish(&mut out);
            let sent: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
            let expected = [FILTER, FIRST, LAST, DONE].concat().replace("\n\n", "\r\n\r\n");
            assert_eq!(String::from_utf8_lossy(&sent), expected, "cut {cut}");
            assert_eq!(reader.usage(), Some(expected_usage()));
        }
    }

    #[test]
    fn events_within_one_chunk_are_forwarded_as_slices_of_it() {
        let input = Bytes::from(stream());
        let mut reader = ChatStream::new(true);
        let mut out = Vec::new();
        reader.feed(&input, &mut out);
        // Two runs around the removed chunk, both pointing into the input.
        assert_eq!(out.len(), 2);
        let base = input.as_ptr() as usize;
        for piece in &out {
            let at = piece.as_ptr() as usize;
            assert!(at >= base && at + piece.len() <= base + input.len());
        }
    }

    #[test]
    fn a_huge_event_passes_without_being_held_and_the_stream_goes_on() {
        let mut reader = ChatStream::new(true);
        let mut out = Vec::new();
        reader.feed(
            &Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\""),
            &mut out,
        );
        let filler = Bytes::from(vec![b'x'; 8192]);
        let mut passed = 0;
        for _ in 0..200 {
            reader.feed(&filler, &mut out);
            assert!(reader.held_len <= MAX_HELD_EVENT + filler.len());
            passed += out.drain(..).map(|b| b.len()).sum::<usize>();
        }
        assert!(passed >= 200 * 8192 - MAX_HELD_EVENT - filler.len());
        reader.feed(&Bytes::from_static(b"\"}}]}\n\n"), &mut out);
        reader.feed(&Bytes::from(USAGE), &mut out);
        reader.finish(&mut out);
        let tail: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(tail, b"\"}}]}\n\n");
        assert_eq!(reader.usage(), Some(expected_usage()));
    }

    #[test]
    fn usage_in_a_chunk_with_choices_is_read_but_never_removed() {
        let event = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";
        let mut reader = ChatStream::new(true);
        let mut out = Vec::new();
        reader.feed(&Bytes::from(event), &mut out);
        assert_eq!(out.concat(), event.as_bytes());
        assert_eq!(reader.usage().map(|u| u.input_tokens), Some(2));
    }

    #[test]
    fn an_unfinished_last_event_is_forwarded_at_the_end_and_not_read() {
        let mut reader = ChatStream::new(true);
        let mut out = Vec::new();
        let cut = &USAGE[..USAGE.len() - 2];
        reader.feed(&Bytes::from(cut), &mut out);
        assert!(out.is_empty());
        reader.finish(&mut out);
        assert_eq!(out.concat(), cut.as_bytes());
        assert_eq!(reader.usage(), None);
    }

    #[test]
    fn many_tiny_chunks_are_joined_not_held_piece_by_piece() {
        let mut reader = ChatStream::new(true);
        let mut out = Vec::new();
        for b in FIRST.as_bytes() {
            reader.feed(&Bytes::copy_from_slice(&[*b]), &mut out);
            assert!(reader.held.len() <= MAX_HELD_PIECES + 1);
        }
        assert_eq!(out.concat(), FIRST.as_bytes());
    }

    proptest! {
        #[test]
        fn any_chunking_forwards_whole_events_and_removes_only_the_usage_chunk(
            cuts in proptest::collection::vec(0usize..1000, 0..10),
        ) {
            let input = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            let (sent, reader) = run(true, input.as_bytes(), &cuts, &[FILTER, FIRST, LAST, USAGE, DONE]);
            prop_assert_eq!(sent, [FILTER, FIRST, LAST, DONE].concat().into_bytes());
            prop_assert_eq!(reader.usage(), Some(expected_usage()));
        }
    }
}
