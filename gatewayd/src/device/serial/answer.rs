//! What a serial answer means, with no I/O: a device error line's code and text, and a
//! complete answer (one line, or a block joined with `\n`) matched by the response pattern,
//! its named captures turned into typed JSON.

use super::frame::Pattern;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

/// Declared type of a response capture; undeclared captures are strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A JSON number (float).
    Number,
    /// A JSON integer.
    Integer,
    /// The captured text.
    String,
    /// `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no` (any case).
    Bool,
}

/// A device's own error code, from the `code` capture of an error pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCode {
    /// An integer (`ERR 3`, `E-12`).
    Number(i64),
    /// Anything else, as the device wrote it (`ERR:RANGE` gives `RANGE`).
    Text(String),
}

impl DeviceCode {
    /// The code a capture holds: an integer when it reads as one (sign allowed, spaces
    /// around ignored), else its trimmed text; `None` when it is empty.
    pub fn of(capture: &str) -> Option<DeviceCode> {
        let t = capture.trim();
        if t.is_empty() {
            return None;
        }
        Some(match t.strip_prefix('+').unwrap_or(t).parse::<i64>() {
            Ok(n) => DeviceCode::Number(n),
            Err(_) => DeviceCode::Text(t.to_string()),
        })
    }
}

/// A line that matched a pattern with meaning (a busy or error line): its `code` capture and
/// its `text` capture, or the whole line without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Said {
    pub code: Option<DeviceCode>,
    pub text: String,
}

/// The first of `patterns` that matches all of `line`, read as a [`Said`].
pub fn said(patterns: &[Pattern], line: &str) -> Option<Said> {
    patterns.iter().find_map(|p| {
        let caps = p.captures(line)?;
        let get = |n: &str| caps.iter().find(|(k, _)| *k == n).and_then(|(_, v)| *v);
        Some(Said {
            code: get("code").and_then(DeviceCode::of),
            text: get("text").unwrap_or(line).to_string(),
        })
    })
}

/// Why a complete answer could not be taken as a result.
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

/// Longest piece of an answer quoted in an error message, characters.
const QUOTE: usize = 200;

/// `text` cut to [`QUOTE`] characters, marked when cut.
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE) {
        None => text.to_string(),
        Some((at, _)) => format!("{}...", &text[..at]),
    }
}

/// How one action turns a complete answer into its result: the response pattern and the
/// declared capture types.
#[derive(Debug, Clone, Default)]
pub struct ResponseSpec {
    pub response: Option<Pattern>,
    pub fields: BTreeMap<String, FieldType>,
}

impl ResponseSpec {
    /// The result of a complete answer: the typed named captures of the response pattern,
    /// or the answer itself as a string when there is none.
    pub fn interpret(&self, answer: &str) -> Result<Value, AnswerError> {
        let Some(response) = &self.response else {
            return Ok(Value::String(answer.to_string()));
        };
        let caps = response
            .captures(answer)
            .ok_or_else(|| AnswerError::Unexpected(quote(answer)))?;
        let mut out = Map::new();
        for (name, value) in caps {
            let typed = match value {
                None => Value::Null,
                Some(v) => typed(name, v, self.fields.get(name).copied())?,
            };
            out.insert(name.to_string(), typed);
        }
        Ok(Value::Object(out))
    }
}

/// A capture converted to its declared type; undeclared captures are strings.
fn typed(name: &str, text: &str, ty: Option<FieldType>) -> Result<Value, AnswerError> {
    let fail = |ty: &'static str| AnswerError::Field {
        name: name.to_string(),
        value: quote(text),
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

    fn spec(response: &str, fields: Value) -> ResponseSpec {
        ResponseSpec {
            response: Some(Pattern::parse(response).unwrap()),
            fields: serde_json::from_value(fields).unwrap(),
        }
    }

    fn patterns(p: &[&str]) -> Vec<Pattern> {
        p.iter().map(|p| Pattern::parse(p).unwrap()).collect()
    }

    #[test]
    fn captures_become_typed_json() {
        let s = spec(
            r"TEMP (?P<temp>\S+)(?: (?P<unit>[CF]))?(?: ALARM=(?P<alarm>\d))?(?: N=(?P<n>\S+))?",
            json!({"temp": "number", "alarm": "bool", "n": "integer"}),
        );
        assert_eq!(
            s.interpret("TEMP 21.5"),
            Ok(json!({"temp": 21.5, "unit": null, "alarm": null, "n": null}))
        );
        assert_eq!(
            s.interpret("TEMP -3 C ALARM=1 N=+7"),
            Ok(json!({"temp": -3.0, "unit": "C", "alarm": true, "n": 7}))
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
    fn patterns_match_whole_answers_only() {
        let s = spec("OK", json!({}));
        assert_eq!(s.interpret("OK"), Ok(json!({})));
        assert_eq!(
            s.interpret("xOKx"),
            Err(AnswerError::Unexpected("xOKx".into()))
        );
        assert_eq!(
            s.interpret("OK\n"),
            Err(AnswerError::Unexpected("OK\n".into()))
        );
        assert_eq!(
            s.interpret("\u{15}#!~garbage").unwrap_err().to_string(),
            "unexpected answer \"\\u{15}#!~garbage\" (matches neither the response nor an error pattern)"
        );
        // An unbalanced pattern is refused rather than re-parsed inside the anchors.
        assert!(Pattern::parse("a)(b").is_err());
    }

    #[test]
    fn a_block_is_matched_as_one_text() {
        // Line breaks are written as \n; `.` stops at them without (?s).
        let s = spec(
            r"CH1 (?P<ch1>\S+)\nCH2 (?P<ch2>\S+)\nEND",
            json!({"ch1": "number", "ch2": "number"}),
        );
        assert_eq!(
            s.interpret("CH1 1.5\nCH2 -2\nEND"),
            Ok(json!({"ch1": 1.5, "ch2": -2.0}))
        );
        assert!(
            s.interpret("CH1 1.5\nCH2 -2").is_err(),
            "all of it must match"
        );
        let s = spec(r"(?P<all>.*)", json!({}));
        assert!(s.interpret("a\nb").is_err(), "no (?s): . stops at \\n");
        let s = spec(r"(?s)(?P<all>.*)", json!({}));
        assert_eq!(s.interpret("a\nb"), Ok(json!({"all": "a\nb"})));
        // (?m) inside the pattern cannot loosen the anchoring of the whole text.
        let s = spec(r"(?m)^b$", json!({}));
        assert!(s.interpret("a\nb").is_err());
        let s = spec(r"(?m)^a$\n^(?P<second>b)$", json!({}));
        assert_eq!(s.interpret("a\nb"), Ok(json!({"second": "b"})));
    }

    #[test]
    fn unexpected_answers_are_quoted_short() {
        let s = spec("OK", json!({}));
        let long = "x".repeat(5000);
        let e = s.interpret(&long).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
        assert!(e.contains(&format!("{}...", "x".repeat(200))), "{e}");
    }

    #[test]
    fn error_lines_carry_integer_or_text_codes() {
        let errors = patterns(&[
            r"ERR (?P<code>\S+) (?P<text>.*)",
            r"ERR:(?P<code>[A-Z]+)",
            "NAK",
        ]);
        assert_eq!(
            said(&errors, "ERR 3 OUT OF RANGE"),
            Some(Said {
                code: Some(DeviceCode::Number(3)),
                text: "OUT OF RANGE".into()
            })
        );
        assert_eq!(
            said(&errors, "ERR -12 low"),
            Some(Said {
                code: Some(DeviceCode::Number(-12)),
                text: "low".into()
            })
        );
        assert_eq!(
            said(&errors, "ERR:RANGE"),
            Some(Said {
                code: Some(DeviceCode::Text("RANGE".into())),
                text: "ERR:RANGE".into()
            })
        );
        assert_eq!(
            said(&errors, "ERR 1.5 half"),
            Some(Said {
                code: Some(DeviceCode::Text("1.5".into())),
                text: "half".into()
            }),
            "not an integer: kept as text"
        );
        assert_eq!(
            said(&errors, "NAK"),
            Some(Said {
                code: None,
                text: "NAK".into()
            })
        );
        assert_eq!(said(&errors, "OK"), None);
        assert_eq!(said(&errors, "xNAK"), None, "whole lines only");
    }

    #[test]
    fn device_codes_read_integers_first() {
        assert_eq!(DeviceCode::of(" +7 "), Some(DeviceCode::Number(7)));
        assert_eq!(DeviceCode::of("007"), Some(DeviceCode::Number(7)));
        assert_eq!(DeviceCode::of("E7"), Some(DeviceCode::Text("E7".into())));
        assert_eq!(
            DeviceCode::of("99999999999999999999"),
            Some(DeviceCode::Text("99999999999999999999".into())),
            "too large for an integer: text"
        );
        assert_eq!(DeviceCode::of("  "), None);
    }

    #[test]
    fn without_a_response_pattern_the_answer_is_the_result() {
        let s = ResponseSpec::default();
        assert_eq!(
            s.interpret("ACME TC-100,SN1234,1.0"),
            Ok(json!("ACME TC-100,SN1234,1.0"))
        );
        assert_eq!(s.interpret("a\nb"), Ok(json!("a\nb")));
    }
}
