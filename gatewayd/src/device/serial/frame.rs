//! The serial line protocol core, with no I/O: framing (split on a terminator, bounded
//! length), request rendering (templates whose values cannot inject a command) and the
//! patterns answers are matched with.

use crate::template::{Escape, Template};
use regex::Regex;
use serde_json::{Map, Value};

/// Splits incoming bytes into lines ended by a terminator, refusing lines longer than a limit.
#[derive(Debug, Clone)]
pub struct Framer {
    terminator: Vec<u8>,
    max_len: usize,
    buf: Vec<u8>,
}

/// Why no line could be taken from the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than the limit arrived without a terminator, or the terminator came too late.
    #[error("frame longer than {0} bytes")]
    TooLong(usize),
}

impl Framer {
    /// Lines end with `terminator` (not empty) and hold at most `max_len` bytes before it.
    pub fn new(terminator: &[u8], max_len: usize) -> Self {
        Self {
            terminator: terminator.to_vec(),
            max_len,
            buf: Vec::new(),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its terminator, an error for an over-long one (the
    /// buffered input is dropped then), or `None` until more input arrives.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        match self.line_end()? {
            Ok(end) => {
                let frame = self.buf[..end].to_vec();
                self.consume(end + self.terminator.len());
                Some(Ok(frame))
            }
            Err(e) => {
                self.buf.clear();
                Some(Err(e))
            }
        }
    }

    /// Where the first complete line ends (its length, the terminator not counted), an error
    /// when the limit passed without a terminator, or `None` until more input arrives. Takes
    /// nothing from the buffer.
    pub fn line_end(&self) -> Option<Result<usize, FrameError>> {
        self.line_end_from(0)
    }

    /// Like [`Framer::line_end`] for a line starting at `start` in the buffer; the length
    /// counts from `start`.
    pub fn line_end_from(&self, start: usize) -> Option<Result<usize, FrameError>> {
        let t = self.terminator.len();
        let buf = self.buf.get(start..).unwrap_or_default();
        // A terminator can only start within the first max_len + 1 positions.
        let scan = buf.len().min(self.max_len + t);
        if let Some(pos) = find(&buf[..scan], &self.terminator) {
            return Some(Ok(pos));
        }
        (buf.len() >= self.max_len + t).then_some(Err(FrameError::TooLong(self.max_len)))
    }

    /// The terminator's length.
    pub fn terminator_len(&self) -> usize {
        self.terminator.len()
    }

    /// Bytes received but not yet part of a complete line.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the first `n` buffered bytes (all of them when fewer are buffered).
    pub fn consume(&mut self, n: usize) {
        self.cut(0, n);
    }

    /// Drops `n` buffered bytes from `start` on (fewer when fewer are buffered).
    pub fn cut(&mut self, start: usize, n: usize) {
        let start = start.min(self.buf.len());
        let end = start.saturating_add(n).min(self.buf.len());
        self.buf.drain(start..end);
    }

    /// Forgets buffered input.
    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Renders a request line: `{{name}}` placeholders from `vars`, `{{address}}` the device's bus
/// address, then the terminator. Control characters and the terminator's characters inside a
/// substituted value become spaces (another printable character when the terminator holds a
/// space), so a value can never end the line early or add a second command.
pub fn render_request(
    template: &Template,
    vars: &Map<String, Value>,
    address: Option<&str>,
    terminator: &str,
) -> Vec<u8> {
    // A value may hold no control character and no character of the terminator, so no value
    // (nor two values side by side) can end the line early or start a second command.
    // What such a character becomes: a space, or (when the terminator holds one) the first
    // printable character it does not hold; dropped if it holds them all.
    let blank = (' '..='~').find(|c| !terminator.contains(*c));
    let clean = |text: &str| -> String {
        text.chars()
            .filter_map(|c| {
                if c.is_control() || terminator.contains(c) {
                    blank
                } else {
                    Some(c)
                }
            })
            .collect()
    };
    let mut safe: Map<String, Value> = vars
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Null => Value::Null,
                Value::String(s) => Value::String(clean(s)),
                other => Value::String(clean(&other.to_string())),
            };
            (k.clone(), v)
        })
        .collect();
    match address {
        Some(a) => safe.insert("address".into(), Value::String(clean(a))),
        None => safe.remove("address"),
    };
    let mut line = template.render(&safe, Escape::None).into_bytes();
    line.extend_from_slice(terminator.as_bytes());
    line
}

/// A compiled answer pattern: it must match a whole text (one line, or a block of lines
/// joined with `\n`). It is anchored at the text's start and end (`\A`, `\z`) and sets no
/// flag: `.` does not match a line break unless the pattern sets `(?s)`, and `^`/`$` match
/// at every line only with `(?m)`.
#[derive(Debug, Clone)]
pub struct Pattern {
    regex: Regex,
}

impl Pattern {
    /// Compiles `text` (regex syntax, named captures `(?P<name>...)`), anchored at both ends.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        // Compiled alone first, so wrapping it cannot change its meaning (an unbalanced `)`).
        Regex::new(text).map_err(|e| {
            let why = e.to_string();
            let last = why.lines().last().unwrap_or_default();
            let last = last.strip_prefix("error: ").unwrap_or(last);
            format!("'{text}' is not a valid regex: {last}")
        })?;
        let regex = Regex::new(&format!(r"\A(?:{text})\z"))
            .map_err(|e| format!("'{text}' is not a valid regex: {e}"))?;
        Ok(Pattern { regex })
    }

    /// Names of its captures.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.regex.capture_names().flatten()
    }

    /// Whether it has a capture group without a name (`(a|b)` rather than `(?:a|b)`).
    pub fn has_unnamed_groups(&self) -> bool {
        self.regex.capture_names().skip(1).any(|n| n.is_none())
    }

    /// Whether the whole `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }

    /// The named captures of `text` when the whole text matches; a capture that took no part
    /// in the match is `None`.
    pub fn captures<'l>(&self, text: &'l str) -> Option<Vec<(&str, Option<&'l str>)>> {
        let caps = self.regex.captures(text)?;
        Some(
            self.regex
                .capture_names()
                .flatten()
                .map(|name| (name, caps.name(name).map(|m| m.as_str())))
                .collect(),
        )
    }

    /// The capture `name` of `text` when the whole text matches (`Some(None)`: it matched,
    /// without that capture).
    pub fn capture<'l>(&self, text: &'l str, name: &str) -> Option<Option<&'l str>> {
        let caps = self.regex.captures(text)?;
        Some(caps.name(name).map(|m| m.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(f: &mut Framer) -> Vec<Result<Vec<u8>, FrameError>> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    #[test]
    fn lines_split_on_the_terminator_across_reads() {
        let mut f = Framer::new(b"\r\n", 16);
        f.push(b"TEMP 2");
        assert_eq!(f.next_frame(), None);
        f.push(b"1.5\r");
        assert_eq!(f.next_frame(), None, "half a terminator is not an end");
        f.push(b"\nOK\r\n\r\nrest");
        assert_eq!(
            frames(&mut f),
            vec![
                Ok(b"TEMP 21.5".to_vec()),
                Ok(b"OK".to_vec()),
                Ok(Vec::new())
            ]
        );
        assert_eq!(f.pending(), b"rest");
        f.clear();
        assert_eq!(f.pending(), b"");
    }

    #[test]
    fn over_long_lines_are_refused() {
        let mut f = Framer::new(b"\r\n", 4);
        f.push(b"ABCD\r\n");
        assert_eq!(
            f.next_frame(),
            Some(Ok(b"ABCD".to_vec())),
            "exactly the limit"
        );
        f.push(b"ABCDE");
        assert_eq!(f.next_frame(), None, "the terminator may still come");
        f.push(b"F");
        assert_eq!(f.next_frame(), Some(Err(FrameError::TooLong(4))));
        assert_eq!(f.pending(), b"", "the over-long input is dropped");
        f.push(b"ABCDE\r\n");
        assert_eq!(f.next_frame(), Some(Err(FrameError::TooLong(4))));
        assert_eq!(
            FrameError::TooLong(256).to_string(),
            "frame longer than 256 bytes"
        );
    }

    #[test]
    fn single_byte_terminators() {
        let mut f = Framer::new(b"\n", 8);
        f.push(b"a\nb\n\n");
        assert_eq!(
            frames(&mut f),
            vec![Ok(b"a".to_vec()), Ok(b"b".to_vec()), Ok(Vec::new())]
        );
    }

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn requests_render_with_address_and_terminator() {
        let t = Template::parse("{{address}}SETP {{value}}").unwrap();
        let out = render_request(&t, &vars(json!({"value": 30})), Some("01"), "\r\n");
        assert_eq!(out, b"01SETP 30\r\n");
        let out = render_request(&t, &vars(json!({"value": 2.5})), None, "\r\n");
        assert_eq!(out, b"SETP 2.5\r\n");
        let t = Template::parse("*IDN?").unwrap();
        assert_eq!(render_request(&t, &Map::new(), None, "\n"), b"*IDN?\n");
    }

    #[test]
    fn values_cannot_inject_a_second_command() {
        let t = Template::parse("NAME {{v}}").unwrap();
        let out = render_request(&t, &vars(json!({"v": "a\r\nRESET"})), None, "\r\n");
        assert_eq!(out, b"NAME a  RESET\r\n");
        let out = render_request(&t, &vars(json!({"v": "a;RESET"})), None, ";");
        assert_eq!(out, b"NAME a RESET;");
        let out = render_request(&t, &vars(json!({"v": "x\u{7f}\u{1b}y"})), None, "\r");
        assert_eq!(out, b"NAME x  y\r");
        // The address is built in: a param cannot replace it.
        let t = Template::parse("{{address}}X").unwrap();
        let out = render_request(&t, &vars(json!({"address": "99"})), None, "\r");
        assert_eq!(out, b"X\r");
    }

    #[test]
    fn bad_patterns_say_why() {
        let e = Pattern::parse("TEMP (?P<temp[0-9.]+)").unwrap_err();
        assert!(
            e.starts_with("'TEMP (?P<temp[0-9.]+)' is not a valid regex: "),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let p = Pattern::parse(r"(?P<code>\d+) (?P<text>.*)").unwrap();
        assert_eq!(p.names().collect::<Vec<_>>(), vec!["code", "text"]);
    }
}
