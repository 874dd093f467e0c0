//! Server-Sent Events split into what the usage readers need: the bytes of `data:` values,
//! the joins between an event's data lines, and the blank lines that end events.
//!
//! Lines end with `\n`, `\r\n` or `\r` (the SSE grammar); a blank line ends an event.
//! The splitter holds no bytes: it hands back slices of the input it is given.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading a field name: its length so far, and whether it is still `data`.
    Name { len: u8, data: bool },
    /// Just after `data:`: one space may follow.
    AfterColon,
    /// Inside a `data` value.
    Data,
    /// Inside a line nobody reads (other fields, comments).
    Ignore,
}

/// What the splitter found next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sse<'a> {
    /// Bytes of a data value (one line may come in several pieces).
    Data(&'a [u8]),
    /// A second or later data line of the event starts: its value joins with `\n`.
    Joiner,
    /// A blank line: the event ended at the current position.
    EventEnd,
}

#[derive(Debug)]
pub(crate) struct Splitter {
    line: Line,
    /// The last byte was a `\r` line end: a `\n` right after it belongs to it.
    after_cr: bool,
    /// That `\r` ended an event (not a line within one).
    cr_ended_event: bool,
    data_lines: u32,
}

impl Splitter {
    pub fn new() -> Self {
        Self {
            line: Line::Start,
            after_cr: false,
            cr_ended_event: false,
            data_lines: 0,
        }
    }

    /// True when the last event ended with a `\r` whose `\n` may still come (at the start
    /// of the next input).
    pub fn pending_lf(&self) -> bool {
        self.after_cr && self.cr_ended_event
    }

    /// The next thing in `bytes` from `*pos`, advancing `*pos` past it; `None` once `bytes`
    /// is used up.
    pub fn next<'a>(&mut self, bytes: &'a [u8], pos: &mut usize) -> Option<Sse<'a>> {
        while *pos < bytes.len() {
            let b = bytes[*pos];
            self.cr_ended_event = false;
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    *pos += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start => {
                    if is_eol(b) {
                        self.end_line(b, pos);
                        self.data_lines = 0;
                        // A `\r\n` blank line belongs whole to the event it ends.
                        if b == b'\r' && bytes.get(*pos) == Some(&b'\n') {
                            *pos += 1;
                            self.after_cr = false;
                        }
                        self.cr_ended_event = self.after_cr;
                        return Some(Sse::EventEnd);
                    }
                    self.line = Line::Name { len: 0, data: true };
                }
                Line::Name { len, data } => {
                    if b == b':' {
                        *pos += 1;
                        self.line = if data && len == 4 {
                            Line::AfterColon
                        } else {
                            Line::Ignore
                        };
                    } else if is_eol(b) {
                        // A `data` line without a colon is a data line with an empty value.
                        let joiner = data && len == 4 && self.data_lines > 0;
                        if data && len == 4 {
                            self.data_lines += 1;
                        }
                        self.end_line(b, pos);
                        if joiner {
                            return Some(Sse::Joiner);
                        }
                    } else {
                        let data = data && usize::from(len) < 4 && b == b"data"[usize::from(len)];
                        self.line = Line::Name {
                            len: len.saturating_add(1).min(5),
                            data,
                        };
                        *pos += 1;
                    }
                }
                Line::AfterColon => {
                    if b == b' ' {
                        *pos += 1;
                    }
                    self.line = Line::Data;
                    self.data_lines += 1;
                    if self.data_lines > 1 {
                        return Some(Sse::Joiner);
                    }
                }
                Line::Data | Line::Ignore => {
                    let rest = &bytes[*pos..];
                    let end = rest.iter().position(|c| is_eol(*c)).unwrap_or(rest.len());
                    if end == 0 {
                        self.end_line(b, pos);
                        continue;
                    }
                    *pos += end;
                    if self.line == Line::Data {
                        return Some(Sse::Data(&rest[..end]));
                    }
                }
            }
        }
        None
    }

    /// Consumes the line end `b` at `*pos`.
    fn end_line(&mut self, b: u8, pos: &mut usize) {
        *pos += 1;
        self.after_cr = b == b'\r';
        self.line = Line::Start;
    }
}

fn is_eol(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(parts: &[&[u8]]) -> Vec<String> {
        let mut s = Splitter::new();
        let mut found = Vec::new();
        for part in parts {
            let mut pos = 0;
            while let Some(step) = s.next(part, &mut pos) {
                found.push(match step {
                    Sse::Data(d) => format!("D:{}", String::from_utf8_lossy(d)),
                    Sse::Joiner => "J".to_owned(),
                    Sse::EventEnd => "E".to_owned(),
                });
            }
        }
        // Data pieces split by input boundaries are joined for comparison.
        let mut merged: Vec<String> = Vec::new();
        for f in found {
            match (merged.last_mut(), f.strip_prefix("D:")) {
                (Some(last), Some(more)) if last.starts_with("D:") => last.push_str(more),
                _ => merged.push(f),
            }
        }
        merged
    }

    #[test]
    fn splits_events_and_data_lines_with_any_line_ending() {
        let lf = b"event: x\ndata: {\"a\":1}\n\n: comment\ndata:b\ndata\ndata:  c\n\n";
        let expected = ["D:{\"a\":1}", "E", "D:b", "J", "J", "D: c", "E"];
        assert_eq!(split(&[lf]), expected);
        let crlf = String::from_utf8_lossy(lf).replace('\n', "\r\n");
        assert_eq!(split(&[crlf.as_bytes()]), expected);
        let cr = String::from_utf8_lossy(lf).replace('\n', "\r");
        assert_eq!(split(&[cr.as_bytes()]), expected);
        for cut in 0..=crlf.len() {
            let b = crlf.as_bytes();
            assert_eq!(split(&[&b[..cut], &b[cut..]]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn fields_that_only_start_like_data_are_ignored() {
        assert_eq!(split(&[b"datum: x\ndat: y\ndataa: z\n\n"]), ["E"]);
    }
}
