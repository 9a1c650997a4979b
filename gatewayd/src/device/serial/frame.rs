//! The serial line protocol core, with no I/O: framing (split on a terminator, bounded
//! length), request rendering (templates whose values cannot inject a command) and answer
//! interpretation (anchored patterns with named captures turned into typed JSON).

use crate::config::serial::FieldType;
use crate::template::{Escape, Template};
use regex::Regex;
use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

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
        let t = self.terminator.len();
        // A terminator can only start within the first max_len + 1 positions.
        let scan = self.buf.len().min(self.max_len + t);
        if let Some(pos) = find(&self.buf[..scan], &self.terminator) {
            let frame = self.buf[..pos].to_vec();
            self.buf.drain(..pos + t);
            return Some(Ok(frame));
        }
        if self.buf.len() >= self.max_len + t {
            self.buf.clear();
            return Some(Err(FrameError::TooLong(self.max_len)));
        }
        None
    }

    /// Bytes received but not yet part of a complete line.
    pub fn pending(&self) -> &[u8] {
        &self.buf
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
/// address, then the terminator. Control characters and the terminator inside a substituted
/// value become spaces, so a value can never end the line early or add a second command.
pub fn render_request(
    template: &Template,
    vars: &Map<String, Value>,
    address: Option<&str>,
    terminator: &str,
) -> Vec<u8> {
    let clean = |text: &str| -> String {
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if terminator.is_empty() {
            text
        } else {
            text.replace(terminator, &" ".repeat(terminator.chars().count()))
        }
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

/// A compiled answer pattern: it must match a whole line.
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
        let regex = Regex::new(&format!("^(?:{text})$"))
            .map_err(|e| format!("'{text}' is not a valid regex: {e}"))?;
        Ok(Pattern { regex })
    }

    /// Names of its captures.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.regex.capture_names().flatten()
    }

    /// The named captures of `line` when the whole line matches; a capture that took no part
    /// in the match is `None`.
    pub fn captures<'l>(&self, line: &'l str) -> Option<Vec<(&str, Option<&'l str>)>> {
        let caps = self.regex.captures(line)?;
        Some(
            self.regex
                .capture_names()
                .flatten()
                .map(|name| (name, caps.name(name).map(|m| m.as_str())))
                .collect(),
        )
    }
}

/// What a device's answer line means.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// It matched the response pattern: the typed captures (or the line itself as a string
    /// when there is no response pattern).
    Ok(Value),
    /// It matched an error pattern: the `code` capture (when an integer) and the `text` capture
    /// (or the whole line).
    Refused { code: Option<i64>, text: String },
}

/// Why an answer line could not be taken as a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("unexpected answer {0:?} (matches neither the response nor an error pattern)")]
    Unexpected(String),
    #[error("capture '{name}' is {value:?}, which is not {ty}")]
    Field {
        name: String,
        value: String,
        ty: &'static str,
    },
}

/// How one action reads answers: its response pattern, declared capture types and error
/// patterns.
#[derive(Debug, Clone, Default)]
pub struct AnswerSpec {
    pub response: Option<Pattern>,
    pub fields: BTreeMap<String, FieldType>,
    pub errors: Vec<Pattern>,
}

impl AnswerSpec {
    /// Interprets one answer line. Error patterns are tried first, so a catch-all response
    /// pattern cannot swallow an error.
    pub fn interpret(&self, line: &str) -> Result<Reply, AnswerError> {
        for e in &self.errors {
            if let Some(caps) = e.captures(line) {
                let get = |n: &str| caps.iter().find(|(k, _)| *k == n).and_then(|(_, v)| *v);
                return Ok(Reply::Refused {
                    code: get("code").and_then(|c| c.trim().parse().ok()),
                    text: get("text").unwrap_or(line).to_string(),
                });
            }
        }
        let Some(response) = &self.response else {
            return Ok(Reply::Ok(Value::String(line.to_string())));
        };
        let caps = response
            .captures(line)
            .ok_or_else(|| AnswerError::Unexpected(line.to_string()))?;
        let mut out = Map::new();
        for (name, value) in caps {
            let typed = match value {
                None => Value::Null,
                Some(v) => typed(name, v, self.fields.get(name).copied())?,
            };
            out.insert(name.to_string(), typed);
        }
        Ok(Reply::Ok(Value::Object(out)))
    }
}

/// A capture converted to its declared type; undeclared captures are strings.
fn typed(name: &str, text: &str, ty: Option<FieldType>) -> Result<Value, AnswerError> {
    let fail = |ty: &'static str| AnswerError::Field {
        name: name.to_string(),
        value: text.to_string(),
        ty,
    };
    let t = text.trim();
    Ok(match ty {
        None | Some(FieldType::String) => Value::String(text.to_string()),
        Some(FieldType::Number) => t
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| fail("a number"))?,
        Some(FieldType::Integer) => t
            .strip_prefix('+')
            .unwrap_or(t)
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| fail("an integer"))?,
        Some(FieldType::Bool) => match t.to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" => Value::Bool(true),
            "0" | "false" | "off" | "no" => Value::Bool(false),
            _ => return Err(fail("a bool (1/0, true/false, on/off, yes/no)")),
        },
    })
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

    fn spec(response: &str, fields: Value, errors: &[&str]) -> AnswerSpec {
        AnswerSpec {
            response: Some(Pattern::parse(response).unwrap()),
            fields: serde_json::from_value(fields).unwrap(),
            errors: errors.iter().map(|e| Pattern::parse(e).unwrap()).collect(),
        }
    }

    #[test]
    fn captures_become_typed_json() {
        let s = spec(
            r"TEMP (?P<temp>\S+)(?: (?P<unit>[CF]))?(?: ALARM=(?P<alarm>\d))?(?: N=(?P<n>\S+))?",
            json!({"temp": "number", "alarm": "bool", "n": "integer"}),
            &[],
        );
        assert_eq!(
            s.interpret("TEMP 21.5"),
            Ok(Reply::Ok(
                json!({"temp": 21.5, "unit": null, "alarm": null, "n": null})
            ))
        );
        assert_eq!(
            s.interpret("TEMP -3 C ALARM=1 N=+7"),
            Ok(Reply::Ok(
                json!({"temp": -3.0, "unit": "C", "alarm": true, "n": 7})
            ))
        );
        assert_eq!(
            s.interpret("TEMP warm"),
            Err(AnswerError::Field {
                name: "temp".into(),
                value: "warm".into(),
                ty: "a number"
            })
        );
        assert_eq!(
            s.interpret("TEMP 1 N=1.5").unwrap_err().to_string(),
            "capture 'n' is \"1.5\", which is not an integer"
        );
    }

    #[test]
    fn patterns_match_whole_lines_only() {
        let s = spec("OK", json!({}), &[]);
        assert_eq!(s.interpret("OK"), Ok(Reply::Ok(json!({}))));
        assert_eq!(
            s.interpret("xOKx"),
            Err(AnswerError::Unexpected("xOKx".into()))
        );
        assert_eq!(
            s.interpret("\u{15}#!~garbage").unwrap_err().to_string(),
            "unexpected answer \"\\u{15}#!~garbage\" (matches neither the response nor an error pattern)"
        );
        // An unbalanced pattern is refused rather than re-parsed inside the anchors.
        assert!(Pattern::parse("a)(b").is_err());
    }

    #[test]
    fn error_patterns_win_and_carry_code_and_text() {
        let s = spec(
            "(?P<any>.*)",
            json!({}),
            &[r"ERR (?P<code>\d+) (?P<text>.*)", "NAK"],
        );
        assert_eq!(
            s.interpret("ERR 3 OUT OF RANGE"),
            Ok(Reply::Refused {
                code: Some(3),
                text: "OUT OF RANGE".into()
            })
        );
        assert_eq!(
            s.interpret("NAK"),
            Ok(Reply::Refused {
                code: None,
                text: "NAK".into()
            })
        );
        assert_eq!(s.interpret("fine"), Ok(Reply::Ok(json!({"any": "fine"}))));
    }

    #[test]
    fn without_a_response_pattern_the_line_is_the_result() {
        let s = AnswerSpec::default();
        assert_eq!(
            s.interpret("ACME TC-100,SN1234,1.0"),
            Ok(Reply::Ok(json!("ACME TC-100,SN1234,1.0")))
        );
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
