//! Watches the HTTP/1.1 request bytes a client sends for a chunked body that declares
//! more than `MAX_BODY_BYTES`, so that it gets its 413 without the rest being waited for.
//!
//! hyper hands a chunk's data over as it arrives and keeps the declared chunk size to
//! itself: a client that declares a huge chunk and sends a few bytes would hold the
//! request until the client timeout (408). This observer follows the framing of each
//! request (head, then `Content-Length` bytes or chunks) in the bytes as they are read,
//! without copying them; when the chunk sizes declared so far exceed the limit, the next
//! read of the connection fails with [`DeclaredTooLarge`], which hyper hands to the body
//! reader as the body's error (see `proxy::read_body`).
//!
//! It must never flag a body that is not over the limit: anything it does not follow
//! exactly as hyper does (HTTP/2, HTTP/1.0, several or unusual `Transfer-Encoding`
//! values, conflicting lengths, folded lines) makes it stop watching the connection,
//! which then behaves as before (408 at the client timeout). hyper ends a connection on
//! any framing error, so a request it refuses never leaves this observer out of step.

use std::fmt;

/// The error a read fails with once a chunked body declared more than the limit.
#[derive(Debug)]
pub struct DeclaredTooLarge;

impl fmt::Display for DeclaredTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the chunk sizes declared exceed the body limit")
    }
}

impl std::error::Error for DeclaredTooLarge {}

impl DeclaredTooLarge {
    /// `error` (a request body's) comes from this one, through hyper's and the socket's.
    pub fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && io
                    .get_ref()
                    .is_some_and(<dyn std::error::Error + Send + Sync>::is::<Self>)
            {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

/// The first bytes of a header line kept to recognise the two framing headers.
const LINE: usize = 48;
/// The last bytes of a request line kept: its version and the CR.
const TAIL: usize = 10;

/// Where the observer is in the connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Stopped watching (HTTP/2, or something not followed exactly).
    Off,
    /// In a request head.
    Head,
    /// In a body of known length: the bytes left.
    Length(u64),
    /// In a chunk-size line: its value so far, its digits, and whether the digits ended.
    Size { value: u64, digits: u8, ended: bool },
    /// In a chunk's data: the bytes left.
    Data(u64),
    /// After a chunk's data, up to its line end.
    DataEnd { seen: u8 },
    /// In the trailer section; `empty`: the current line is empty so far.
    Trailers { empty: bool },
}

/// One connection's observer.
pub(super) struct Framing {
    limit: u64,
    state: State,
    /// The current head line's first bytes, and its full length.
    line: [u8; LINE],
    line_len: usize,
    /// The current line's last bytes (a request line's version).
    tail: [u8; TAIL],
    /// The head being read: a request line was seen; its framing headers so far.
    request_line: bool,
    transfer_encodings: u8,
    chunked: bool,
    length: Option<u64>,
    /// The chunk sizes declared so far by the current body.
    declared: u64,
}

impl Framing {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            state: State::Head,
            line: [0; LINE],
            line_len: 0,
            tail: [0; TAIL],
            request_line: false,
            transfer_encodings: 0,
            chunked: false,
            length: None,
            declared: 0,
        }
    }

    /// Follows `bytes`, the next bytes read from the client. `true` when the current
    /// request's chunk sizes declare more than the limit (the observer stops there).
    pub(super) fn observe(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return false,
                State::Head => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let part = &bytes[..end.unwrap_or(bytes.len())];
                    let keep = part.len().min(LINE.saturating_sub(self.line_len));
                    if keep > 0 {
                        self.line[self.line_len..self.line_len + keep].copy_from_slice(&part[..keep]);
                    }
                    self.line_len += part.len();
                    if part.len() >= TAIL {
                        self.tail.copy_from_slice(&part[part.len() - TAIL..]);
                    } else {
                        self.tail.rotate_left(part.len());
                        self.tail[TAIL - part.len()..].copy_from_slice(part);
                    }
                    let Some(end) = end else { return false };
                    bytes = &bytes[end + 1..];
                    self.head_line();
                    self.line_len = 0;
                }
                State::Length(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Length(left - n)
                    };
                }
                State::Size { value, digits, ended } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    if b == b'\n' {
                        if digits == 0 {
                            self.state = State::Off;
                        } else if value == 0 {
                            self.state = State::Trailers { empty: true };
                        } else {
                            self.declared = self.declared.saturating_add(value);
                            if self.declared > self.limit {
                                self.state = State::Off;
                                return true;
                            }
                            self.state = State::Data(value);
                        }
                    } else if let (false, Some(d)) = (ended, char::from(b).to_digit(16)) {
                        // hyper refuses sizes that overflow a u64: so does this.
                        if digits >= 15 {
                            self.state = State::Off;
                        } else {
                            self.state = State::Size {
                                value: value << 4 | u64::from(d),
                                digits: digits + 1,
                                ended,
                            };
                        }
                    } else {
                        // Whitespace, an extension or the CR: hyper checks them.
                        self.state = State::Size {
                            value,
                            digits,
                            ended: true,
                        };
                    }
                }
                State::Data(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[usize::try_from(n).unwrap_or(bytes.len())..];
                    self.state = if n == left {
                        State::DataEnd { seen: 0 }
                    } else {
                        State::Data(left - n)
                    };
                }
                State::DataEnd { seen } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match (b, seen) {
                        (b'\n', _) => State::Size {
                            value: 0,
                            digits: 0,
                            ended: false,
                        },
                        (b'\r', 0) => State::DataEnd { seen: 1 },
                        _ => State::Off,
                    };
                }
                State::Trailers { empty } => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match b {
                        b'\n' if empty => self.next_request(),
                        b'\n' => State::Trailers { empty: true },
                        b'\r' => State::Trailers { empty },
                        _ => State::Trailers { empty: false },
                    };
                }
            }
        }
        false
    }

    fn next_request(&mut self) -> State {
        self.request_line = false;
        self.transfer_encodings = 0;
        self.chunked = false;
        self.length = None;
        self.declared = 0;
        State::Head
    }

    /// One whole head line (without its LF) is in `line` (its first bytes) and `line_len`.
    fn head_line(&mut self) {
        let kept = &self.line[..self.line_len.min(LINE)];
        let line = kept.strip_suffix(b"\r").unwrap_or(kept);
        let whole = self.line_len <= LINE;
        if !self.request_line {
            // Empty lines before a request line are skipped, as hyper does.
            if line.is_empty() && whole {
                return;
            }
            // HTTP/2's preface and HTTP/1.0 are not followed.
            let tail = self.tail.strip_suffix(b"\r").unwrap_or(&self.tail);
            if self.line_len < TAIL || !tail.ends_with(b" HTTP/1.1") {
                self.state = State::Off;
            }
            self.request_line = true;
            return;
        }
        if line.is_empty() && whole {
            self.state = match (self.transfer_encodings, self.chunked, self.length) {
                (0, _, Some(0) | None) => self.next_request(),
                (0, _, Some(n)) => {
                    self.next_request();
                    State::Length(n)
                }
                (1, true, None) => State::Size {
                    value: 0,
                    digits: 0,
                    ended: false,
                },
                _ => State::Off,
            };
            return;
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            self.state = State::Off;
            return;
        }
        if let Some(value) = header_value(line, b"transfer-encoding:") {
            self.transfer_encodings += 1;
            self.chunked = whole && value.eq_ignore_ascii_case(b"chunked");
        } else if let Some(value) = header_value(line, b"content-length:") {
            let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
            match (whole, parsed, self.length) {
                (true, Some(n), None) => self.length = Some(n),
                (true, Some(n), Some(m)) if n == m => {}
                _ => self.state = State::Off,
            }
        }
    }
}

/// The trimmed value of `line` when its name is `name` (given lowercase, with the colon).
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (head, value) = line.split_at_checked(name.len())?;
    head.eq_ignore_ascii_case(name).then(|| value.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 100;

    /// Feeds `bytes` whole and byte by byte; both must agree.
    fn flags(bytes: &[u8]) -> bool {
        let whole = Framing::new(LIMIT).observe(bytes);
        let mut framing = Framing::new(LIMIT);
        let split = bytes.iter().any(|b| framing.observe(std::slice::from_ref(b)));
        assert_eq!(whole, split, "{}", String::from_utf8_lossy(bytes));
        whole
    }

    const CHUNKED: &str = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn a_declared_chunk_over_the_limit_is_flagged() {
        assert!(flags(format!("{CHUNKED}65\r\nab").as_bytes()));
        assert!(flags(format!("{CHUNKED}65;ext=1\r\n").as_bytes()));
        // The sizes add up: 60 + 41 > 100.
        assert!(flags(format!("{CHUNKED}3c\r\n{}\r\n29\r\n", "a".repeat(60)).as_bytes()));
        // Lowercase names, bare LF line ends.
        assert!(flags(b"POST / HTTP/1.1\ntransfer-encoding:chunked\n\nFFFFFF\n"));
    }

    #[test]
    fn bodies_within_the_limit_are_not_flagged() {
        assert!(!flags(
            format!("{CHUNKED}64\r\n{}\r\n0\r\n\r\n", "a".repeat(100)).as_bytes()
        ));
        assert!(!flags(format!("{CHUNKED}0\r\nx-trailer: 1\r\n\r\n").as_bytes()));
        // A Content-Length body whose bytes look like chunk sizes is skipped whole.
        assert!(!flags(b"POST / HTTP/1.1\r\ncontent-length: 9\r\n\r\nFFFFFF\r\n\r\n"));
    }

    #[test]
    fn pipelined_requests_are_followed() {
        let first = format!("{CHUNKED}5\r\nhello\r\n0\r\n\r\n");
        let second = "POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc";
        assert!(flags(format!("{first}{second}{CHUNKED}fff\r\n").as_bytes()));
        assert!(!flags(format!("{first}{second}{CHUNKED}5\r\n").as_bytes()));
        // Long request lines: only their version is looked at.
        let long = format!(
            "POST /v1/chat/completions?{} HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "q".repeat(300)
        );
        assert!(flags(format!("{long}fff\r\n").as_bytes()));
    }

    /// Chunked requests with these chunk sizes, one after another, fed in pieces cut at
    /// `cuts` (positions modulo the length).
    fn feed(sizes: &[Vec<usize>], cuts: &[usize]) -> bool {
        let mut bytes = Vec::new();
        for request in sizes {
            bytes.extend_from_slice(CHUNKED.as_bytes());
            for size in request {
                bytes.extend_from_slice(format!("{size:X}\r\n{}\r\n", "\r".repeat(*size)).as_bytes());
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut framing = Framing::new(LIMIT);
        let mut from = 0;
        let mut flagged = false;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            flagged |= framing.observe(&bytes[from..cut]);
            from = cut;
        }
        flagged
    }

    proptest::proptest! {
        #[test]
        fn bodies_are_flagged_exactly_when_their_chunks_add_up_past_the_limit(
            sizes in proptest::collection::vec(proptest::collection::vec(1usize..60, 0..5), 1..4),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let over = sizes.iter().any(|r| r.iter().sum::<usize>() > LIMIT);
            // The observer stops at the first body over the limit, and flags it.
            proptest::prop_assert_eq!(feed(&sizes, &cuts), over);
        }
    }

    #[test]
    fn what_is_not_followed_exactly_is_left_alone() {
        for bytes in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nFFFFFF\r\n".to_owned(),
            "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\nFFFFFF\r\n".to_owned(),
            "POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\nFFFFFF\r\n".to_owned(),
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\nFFFFFF\r\n".to_owned(),
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nFFFFFF\r\n".to_owned(),
            "POST / HTTP/1.1\r\nx: a\r\n b\r\ntransfer-encoding: chunked\r\n\r\nFFFFFF\r\n".to_owned(),
            format!("{CHUNKED}1234567890abcdef0\r\n"),
        ] {
            assert!(!flags(bytes.as_bytes()), "{bytes}");
        }
    }
}
