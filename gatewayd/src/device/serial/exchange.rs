//! One request's answer read off a serial line, with no I/O: the bytes that arrive after the
//! request was written go in, the answer (or why there is none) comes out.
//!
//! In order: the rest of a line that was already arriving when the request was written is
//! dropped (it cannot answer a request it began before); the echo of the request, when the
//! device echoes, is checked and dropped; then every line is, first match wins:
//! - an `ignore` line: dropped, wherever it arrives (before the echo too);
//! - a busy line: the answer is "busy, did not act";
//! - an error line: the answer is that error (a block ends there);
//! - else a line of the answer, which is complete after one line, `lines = N` lines or the
//!   line matching `until`. A block's lines are joined with `\n`.

use super::answer::{quote, said, Said};
use super::frame::{FrameError, Framer};
use super::rules::{Block, LineRules, ReplyRules};

/// What the device answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The answer: one line, or a block's lines joined with `\n`.
    Answer(String),
    /// A busy line: the device did not act.
    Busy(Said),
    /// An error line.
    Error(Said),
}

/// Why no answer could be read. The request was written, so the device may have acted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A line exceeded the port's `max_frame_len`.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The answer's text exceeded the limit.
    #[error("answer longer than {0} bytes")]
    TooLarge(usize),
    /// The device did not send back the request's exact bytes first.
    #[error("echo mismatch: sent '{sent}', got '{got}'")]
    Echo { sent: String, got: String },
}

/// The reading of one answer.
#[derive(Debug)]
pub struct Exchange<'a> {
    /// The request's bytes while its echo is still expected.
    echo: Option<&'a [u8]>,
    line: &'a LineRules,
    reply: &'a ReplyRules,
    framer: Framer,
    /// Leading bytes of the buffer that arrived before the request was written.
    stale: usize,
    answer: String,
    lines: usize,
    max_answer: usize,
    ignored: usize,
}

/// One step of taking the echo.
enum Echo {
    Wait,
    Again,
    Taken,
    Mismatch(ReadError),
}

impl<'a> Exchange<'a> {
    /// Reads the answer to `request` (the bytes written, terminator included) with the
    /// port's `framer`, which holds what arrived before it: complete lines there are dropped
    /// (they came before the request), a line in progress is stale. An answer longer than
    /// `max_answer` bytes is refused.
    pub fn new(
        request: &'a [u8],
        mut framer: Framer,
        line: &'a LineRules,
        reply: &'a ReplyRules,
        max_answer: usize,
    ) -> Self {
        while framer.next_frame().is_some() {}
        Exchange {
            echo: line.echo.then_some(request),
            line,
            reply,
            stale: framer.pending().len(),
            framer,
            answer: String::new(),
            lines: 0,
            max_answer,
            ignored: 0,
        }
    }

    /// Takes received bytes: the outcome once the answer is complete or unreadable, `None`
    /// while more is expected.
    pub fn push(&mut self, bytes: &[u8]) -> Option<Result<Heard, ReadError>> {
        self.framer.push(bytes);
        loop {
            if let Some(echo) = self.echo {
                match self.take_echo(echo) {
                    Echo::Wait => return None,
                    Echo::Again => continue,
                    Echo::Taken => self.echo = None,
                    Echo::Mismatch(e) => return Some(Err(e)),
                }
            }
            let end = match self.framer.line_end()? {
                Ok(end) => end,
                Err(e) => {
                    self.framer.clear();
                    return Some(Err(e.into()));
                }
            };
            let raw = self.framer.pending()[..end].to_vec();
            self.framer.consume(end + self.framer.terminator_len());
            let stale = std::mem::take(&mut self.stale);
            let mut text = lossy(&raw);
            if stale > 0 {
                if end <= stale || self.is_ignored(&text) {
                    self.ignored += 1;
                    continue;
                }
                // Noise before the request, then this line.
                text = lossy(&raw[stale..]);
            }
            if let Some(done) = self.take_line(text) {
                return Some(done);
            }
        }
    }

    /// Bytes received and not yet part of a line (for a timeout's report).
    pub fn pending(&self) -> &[u8] {
        self.framer.pending()
    }

    /// Lines dropped so far as ignored or stale.
    pub fn ignored(&self) -> usize {
        self.ignored
    }

    /// The framer with whatever arrived after the answer, for the port's next exchange.
    pub fn into_framer(self) -> Framer {
        self.framer
    }

    fn take_echo(&mut self, echo: &[u8]) -> Echo {
        let t = self.framer.terminator_len();
        let buf = self.framer.pending();
        if self.stale > 0 {
            // A line already arriving when the request was written ends before the echo.
            match self.framer.line_end() {
                None => return Echo::Wait,
                Some(Ok(end)) if end <= self.stale || self.is_ignored(&lossy(&buf[..end])) => {
                    self.ignored += 1;
                    self.framer.consume(end + t);
                }
                // Noise before the request: the echo may follow it.
                Some(_) => self.framer.consume(self.stale),
            }
            self.stale = 0;
            return Echo::Again;
        }
        if buf.starts_with(echo) {
            self.framer.consume(echo.len());
            return Echo::Taken;
        }
        if echo.starts_with(buf) {
            return Echo::Wait;
        }
        let mismatch = |got: &[u8]| {
            Echo::Mismatch(ReadError::Echo {
                sent: shown(echo),
                got: shown(got),
            })
        };
        // Where the input leaves the echo: a line starting there may be an ignored one (before
        // the echo, or inside an echo sent back byte by byte).
        // Either line (from the start, or from `at`) ends at the first terminator after `at`.
        let at = buf.iter().zip(echo).take_while(|(a, b)| a == b).count();
        match self.framer.line_end_from(at) {
            Some(Ok(end)) if self.is_ignored(&lossy(&buf[..at + end])) => {
                self.ignored += 1;
                self.framer.consume(at + end + t);
                Echo::Again
            }
            Some(Ok(end)) if at > 0 && self.is_ignored(&lossy(&buf[at..at + end])) => {
                self.ignored += 1;
                self.framer.cut(at, end + t);
                Echo::Again
            }
            Some(Ok(end)) => mismatch(&buf[..at + end]),
            Some(Err(_)) => mismatch(buf),
            // Without ignore patterns nothing but the echo may come first.
            None if self.line.ignore.is_empty() && buf.len() >= echo.len() => mismatch(buf),
            None => Echo::Wait,
        }
    }

    /// One line after the echo: dropped, an early end, or part of the answer.
    fn take_line(&mut self, text: String) -> Option<Result<Heard, ReadError>> {
        if self.is_ignored(&text) {
            self.ignored += 1;
            return None;
        }
        if let Some(s) = said(&self.line.busy, &text).or_else(|| said(&self.reply.busy, &text)) {
            return Some(Ok(Heard::Busy(s)));
        }
        if let Some(s) = said(&self.reply.errors, &text) {
            return Some(Ok(Heard::Error(s)));
        }
        let sep = usize::from(self.lines > 0);
        if self.answer.len() + sep + text.len() > self.max_answer {
            return Some(Err(ReadError::TooLarge(self.max_answer)));
        }
        if sep == 1 {
            self.answer.push('\n');
        }
        self.answer.push_str(&text);
        self.lines += 1;
        let complete = match &self.reply.block {
            Block::One => true,
            Block::Lines(n) => self.lines >= *n,
            Block::Until(last) => last.is_match(&text),
        };
        complete.then(|| Ok(Heard::Answer(std::mem::take(&mut self.answer))))
    }

    fn is_ignored(&self, text: &str) -> bool {
        self.line.ignore.iter().any(|p| p.is_match(text))
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes as readable text for a message: control characters escaped (`\r`), cut short.
fn shown(bytes: &[u8]) -> String {
    quote(&String::from_utf8_lossy(bytes).escape_debug().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::serial::answer::DeviceCode;
    use crate::device::serial::frame::Pattern;

    fn patterns(p: &[&str]) -> Vec<Pattern> {
        p.iter().map(|p| Pattern::parse(p).unwrap()).collect()
    }

    fn device(echo: bool, ignore: &[&str], busy: &[&str]) -> LineRules {
        LineRules {
            echo,
            ignore: patterns(ignore),
            busy: patterns(busy),
        }
    }

    fn reply(errors: &[&str], block: Block) -> ReplyRules {
        ReplyRules {
            errors: patterns(errors),
            busy: Vec::new(),
            block,
        }
    }

    /// Feeds `chunks` one after another; the outcome and what the port keeps afterwards.
    fn read(
        request: &[u8],
        before: &[u8],
        chunks: &[&[u8]],
        line: &LineRules,
        reply: &ReplyRules,
    ) -> (Option<Result<Heard, ReadError>>, Vec<u8>) {
        let mut framer = Framer::new(b"\r\n", 32);
        framer.push(before);
        let mut x = Exchange::new(request, framer, line, reply, 64);
        let mut out = None;
        for c in chunks {
            out = x.push(c);
            if out.is_some() {
                break;
            }
        }
        (out, x.into_framer().pending().to_vec())
    }

    fn answer(text: &str) -> Option<Result<Heard, ReadError>> {
        Some(Ok(Heard::Answer(text.into())))
    }

    #[test]
    fn one_line_answers_and_what_follows_stays_with_the_port() {
        let (out, rest) = read(
            b"TEMP?\r\n",
            b"",
            &[b"TEMP 2", b"1.5\r", b"\nextra\r\npart"],
            &LineRules::default(),
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21.5"));
        assert_eq!(rest, b"extra\r\npart");
    }

    #[test]
    fn cr_only_terminators() {
        let mut framer = Framer::new(b"\r", 32);
        framer.push(b"old\rSTA");
        let rules = device(true, &["STATUS .*"], &[]);
        let reply = ReplyRules::default();
        let mut x = Exchange::new(b"SETP 21\r", framer, &rules, &reply, 64);
        assert_eq!(
            x.push(b"TUS 1\rSETP 21\r"),
            None,
            "the echo is not the answer"
        );
        assert_eq!(x.push(b"OK\r"), answer("OK"));
        assert_eq!(x.ignored(), 1);
    }

    #[test]
    fn ignored_lines_never_answer_wherever_they_arrive() {
        let rules = device(false, &[r"#.*", r"STATUS \d+"], &[]);
        // Before the answer, split across reads, and after it.
        let (out, rest) = read(
            b"TEMP?\r\n",
            b"# boot\r\n",
            &[b"# ALARM\r\nSTAT", b"US 7\r\nTEMP 21\r\n# late\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21"));
        assert_eq!(
            rest, b"# late\r\n",
            "kept for the port; dropped before the next request"
        );
        // Only whole lines are ignored.
        let (out, _) = read(
            b"TEMP?\r\n",
            b"",
            &[b"STATUS 7 TEMP 21\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("STATUS 7 TEMP 21"));
    }

    #[test]
    fn lines_complete_before_the_request_are_never_its_answer() {
        let (out, _) = read(
            b"TEMP?\r\n",
            b"TEMP 99\r\nOK\r\n",
            &[b"TEMP 21\r\n"],
            &LineRules::default(),
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21"));
    }

    #[test]
    fn a_line_arriving_when_the_request_is_written_is_not_its_answer() {
        let rules = device(false, &[r"STATUS \w+"], &[]);
        // An unsolicited line half-received before the request: ended after it, ignored.
        let (out, _) = read(
            b"TEMP?\r\n",
            b"STAT",
            &[b"US ALARM\r\nTEMP 21\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21"));
        // Noise without a terminator before the request: the line after it is the answer.
        let (out, _) = read(
            b"TEMP?\r\n",
            b"#~",
            &[b"TEMP 21\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21"));
        // Only the terminator was missing: that line is over, the next one answers.
        let (out, _) = read(
            b"TEMP?\r\n",
            b"TEMP 99\r",
            &[b"\nTEMP 21\r\n"],
            &LineRules::default(),
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("TEMP 21"));
    }

    #[test]
    fn the_echo_is_checked_and_dropped_whatever_the_answer_terminator() {
        let rules = device(true, &[], &[]);
        let reply = ReplyRules::default();
        // Request ends with \r, answers with \r\n; one byte at a time.
        let bytes = b"SETP 21\rOK\r\n";
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let (out, _) = read(b"SETP 21\r", b"", &chunks, &rules, &reply);
        assert_eq!(out, answer("OK"));
        // An answer that happens to start like the request is still read after the echo.
        let (out, _) = read(
            b"SETP?\r\n",
            b"",
            &[b"SETP?\r\nSETP 21\r\n"],
            &rules,
            &reply,
        );
        assert_eq!(out, answer("SETP 21"));
        // Without echo configured, an echo is an (unexpected) answer line.
        let (out, _) = read(
            b"SETP 21\r\n",
            b"",
            &[b"SETP 21\r\nOK\r\n"],
            &LineRules::default(),
            &reply,
        );
        assert_eq!(out, answer("SETP 21"));
    }

    #[test]
    fn a_wrong_or_missing_echo_names_what_came_back() {
        let rules = device(true, &[], &[]);
        let reply = ReplyRules::default();
        let (out, _) = read(b"SETP 21\r", b"", &[b"SETP 12\rOK\r\n"], &rules, &reply);
        let e = out.unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            r"echo mismatch: sent 'SETP 21\r', got 'SETP 12\rOK'"
        );
        let (out, _) = read(b"SETP 21\r", b"", &[b"OK\r\n"], &rules, &reply);
        assert_eq!(
            out,
            Some(Err(ReadError::Echo {
                sent: r"SETP 21\r".into(),
                got: "OK".into()
            }))
        );
        // A prefix of the echo is waited on, not judged.
        let (out, rest) = read(b"SETP 21\r", b"", &[b"SETP 2"], &rules, &reply);
        assert_eq!((out, rest), (None, b"SETP 2".to_vec()));
        // Garbage as long as the echo without a terminator: judged at once.
        let (out, _) = read(b"AB\r", b"", &[b"xyz"], &rules, &reply);
        assert!(matches!(out, Some(Err(ReadError::Echo { .. }))), "{out:?}");
    }

    #[test]
    fn ignored_lines_may_come_before_the_echo() {
        let rules = device(true, &[r"STATUS \d", r"#.*"], &[]);
        let reply = ReplyRules::default();
        let (out, _) = read(
            b"STAT?\r",
            b"",
            // Starts like the request, then turns out to be a status line.
            &[b"STAT", b"US 1\r\n# x\r\nST", b"AT?\r", b"OK\r\n"],
            &rules,
            &reply,
        );
        assert_eq!(out, answer("OK"));
        // A status line half-received before the request, then the echo.
        let (out, _) = read(
            b"SETP 21\r",
            b"STATU",
            &[b"S 1\r\nSETP 21\rOK\r\n"],
            &rules,
            &reply,
        );
        assert_eq!(out, answer("OK"));
        // Noise before the request, then the echo.
        let (out, _) = read(b"SETP 21\r", b"~~", &[b"SETP 21\rOK\r\n"], &rules, &reply);
        assert_eq!(out, answer("OK"));
        // A line that is neither ignored nor the echo.
        let (out, _) = read(b"SETP 21\r", b"", &[b"HELLO\r\n"], &rules, &reply);
        assert_eq!(
            out.unwrap().unwrap_err().to_string(),
            r"echo mismatch: sent 'SETP 21\r', got 'HELLO'"
        );
    }

    #[test]
    fn an_ignored_line_inside_an_echo_sent_byte_by_byte_is_dropped() {
        let rules = device(true, &["#STAT .*"], &[]);
        let (out, _) = read(
            b"DUMP?\r\n",
            b"",
            &[b"DU", b"#STAT T=21.5\r\n", b"MP?\r\nT=21.5\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(out, answer("T=21.5"));
        // Not an ignored line: the echo is wrong, and the message shows where.
        let (out, _) = read(
            b"DUMP?\r\n",
            b"",
            &[b"DU#X\r\nMP?\r\n"],
            &rules,
            &ReplyRules::default(),
        );
        assert_eq!(
            out.unwrap().unwrap_err().to_string(),
            r"echo mismatch: sent 'DUMP?\r\n', got 'DU#X'"
        );
    }

    #[test]
    fn blocks_of_n_lines_skip_ignored_ones() {
        let rules = device(false, &["#.*"], &[]);
        let reply = reply(&[], Block::Lines(3));
        let (out, rest) = read(
            b"LIST?\r\n",
            b"",
            &[b"A\r\n# x\r\n", b"\r\nC\r\nD\r\n"],
            &rules,
            &reply,
        );
        assert_eq!(out, answer("A\n\nC"), "an empty line counts");
        assert_eq!(rest, b"D\r\n");
        let (out, _) = read(b"LIST?\r\n", b"", &[b"A\r\nB\r\n"], &rules, &reply);
        assert_eq!(out, None, "two of three lines");
    }

    #[test]
    fn blocks_until_a_line_include_it() {
        let reply = reply(&[], Block::Until(Pattern::parse("END|OK").unwrap()));
        let (out, rest) = read(
            b"DUMP?\r\n",
            b"",
            &[b"L1\r\nL2 ENDS\r\nEND\r\nnext\r\n"],
            &LineRules::default(),
            &reply,
        );
        assert_eq!(out, answer("L1\nL2 ENDS\nEND"), "whole-line match only");
        assert_eq!(rest, b"next\r\n");
    }

    #[test]
    fn a_block_is_bounded() {
        // max_answer is 64 in `read`: ten lines of seven bytes do not fit.
        let reply = reply(&[], Block::Lines(10));
        let ten: Vec<&[u8]> = vec![b"1234567\r\n"; 10];
        let (out, _) = read(b"X\r\n", b"", &ten, &LineRules::default(), &reply);
        assert_eq!(out, Some(Err(ReadError::TooLarge(64))));
        let reply = super::ReplyRules {
            block: Block::Until(Pattern::parse("END").unwrap()),
            ..ReplyRules::default()
        };
        let (out, _) = read(b"X\r\n", b"", &ten, &LineRules::default(), &reply);
        assert_eq!(out, Some(Err(ReadError::TooLarge(64))));
        // Eight such lines and their separators fit exactly.
        let reply = super::ReplyRules {
            block: Block::Lines(8),
            ..ReplyRules::default()
        };
        let (out, _) = read(b"X\r\n", b"", &ten, &LineRules::default(), &reply);
        assert_eq!(
            out.unwrap().unwrap(),
            Heard::Answer(["1234567"; 8].join("\n"))
        );
    }

    #[test]
    fn over_long_lines_fail_the_exchange() {
        let (out, _) = read(
            b"X\r\n",
            b"",
            &[&[b'x'; 40]],
            &LineRules::default(),
            &ReplyRules::default(),
        );
        assert_eq!(out, Some(Err(ReadError::Frame(FrameError::TooLong(32)))));
    }

    #[test]
    fn busy_lines_say_the_device_did_not_act() {
        let rules = device(false, &[], &["BUSY", r"WAIT (?P<text>.*)"]);
        let mut reply = reply(&[r"ERR (?P<code>\d+)"], Block::Lines(2));
        reply.busy = patterns(&["LOCKED"]);
        for (said, text) in [
            (b"BUSY\r\n".as_slice(), "BUSY"),
            (b"WAIT warming up\r\n", "warming up"),
            (b"LOCKED\r\n", "LOCKED"),
            (b"A\r\nBUSY\r\n", "BUSY"),
        ] {
            let (out, _) = read(b"X\r\n", b"", &[said], &rules, &reply);
            assert_eq!(
                out,
                Some(Ok(Heard::Busy(Said {
                    code: None,
                    text: text.into()
                }))),
                "{said:?}"
            );
        }
    }

    #[test]
    fn error_lines_end_a_block_with_their_code() {
        let reply = reply(
            &[r"ERR:(?P<code>\w+)", r"ERR (?P<code>\d+) (?P<text>.*)"],
            Block::Lines(3),
        );
        let (out, _) = read(
            b"X\r\n",
            b"",
            &[b"A\r\nERR:RANGE\r\n"],
            &LineRules::default(),
            &reply,
        );
        assert_eq!(
            out,
            Some(Ok(Heard::Error(Said {
                code: Some(DeviceCode::Text("RANGE".into())),
                text: "ERR:RANGE".into()
            })))
        );
        let (out, _) = read(
            b"X\r\n",
            b"",
            &[b"ERR 3 OUT OF RANGE\r\n"],
            &LineRules::default(),
            &reply,
        );
        assert_eq!(
            out,
            Some(Ok(Heard::Error(Said {
                code: Some(DeviceCode::Number(3)),
                text: "OUT OF RANGE".into()
            })))
        );
    }

    #[test]
    fn ignore_wins_over_busy_and_errors() {
        let rules = device(false, &["ERR 9.*"], &["ERR 9 BUSY"]);
        let reply = reply(&[r"ERR (?P<code>\d+).*"], Block::One);
        let (out, _) = read(b"X\r\n", b"", &[b"ERR 9 BUSY\r\nERR 1\r\n"], &rules, &reply);
        assert_eq!(
            out,
            Some(Ok(Heard::Error(Said {
                code: Some(DeviceCode::Number(1)),
                text: "ERR 1".into()
            })))
        );
    }
}
