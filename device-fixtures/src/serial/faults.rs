//! Switchable faults and field-device habits of the simulated serial device, and the partial
//! updates the control API (and the command line) apply.

use serde::Serialize;
use serde_json::Value;

use super::controller::ErrorStyle;
use super::frame::RequestTerminator;

/// Default `busy_text`.
pub const BUSY_TEXT: &str = "BUSY";
/// Default `unsolicited_text`.
pub const UNSOLICITED_TEXT: &str = "#STAT T=21.5 OK";
/// Longest text a fault may set (`busy_text`, `unsolicited_text`, `error_reply`).
const MAX_TEXT: usize = 200;

/// Faults applied to the serial line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Read requests, act on them and never answer.
    pub no_reply: bool,
    /// Answer with a line of noise followed by unterminated junk, instead of the answer.
    pub garbage: bool,
    /// Answer with the first half of the (first) answer line and no terminator.
    pub partial: bool,
    /// Answer with a 1,000-byte line.
    pub long_reply: bool,
    /// Delay between a request and its answer, milliseconds.
    pub slow_ms: u64,
    /// The port is gone: the pty is closed and the link removed; clearing it creates a new
    /// pty and points the link at it.
    pub disappear: bool,
    /// Answer every request `busy_text` without acting on it.
    pub busy: bool,
    /// Answer every Nth addressed request `busy_text` without acting on it (0: never).
    /// Counting starts again whenever an update names `busy_every`.
    pub busy_every: u64,
    /// The busy answer line.
    pub busy_text: String,
    /// Answer every addressed request with this line (e.g. `ERR:RANGE`) without acting.
    pub error_reply: Option<String>,
    /// Word refused commands `ERR:CODE text` instead of `ERR n TEXT`.
    pub text_errors: bool,
    /// Send back every received byte as it arrives, before any answer.
    pub echo: bool,
    /// Send `unsolicited_text` every this many milliseconds, whatever else is going on
    /// (0: never).
    pub unsolicited_ms: u64,
    /// The unsolicited status line.
    pub unsolicited_text: String,
    /// What ends a request: `"any"` (CR, LF or CR LF), `"\r"` or `"\n"`.
    pub request_terminator: RequestTerminator,
    /// What ends every answer line: `"\r\n"`, `"\r"` or `"\n"`.
    pub answer_terminator: String,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            no_reply: false,
            garbage: false,
            partial: false,
            long_reply: false,
            slow_ms: 0,
            disappear: false,
            busy: false,
            busy_every: 0,
            busy_text: BUSY_TEXT.to_owned(),
            error_reply: None,
            text_errors: false,
            echo: false,
            unsolicited_ms: 0,
            unsolicited_text: UNSOLICITED_TEXT.to_owned(),
            request_terminator: RequestTerminator::Any,
            answer_terminator: "\r\n".to_owned(),
        }
    }
}

/// One-off actions an update may carry besides the faults it sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// `"reset": true`: every unit's setpoint back to its power-up value.
    pub power_cycle: bool,
    /// The update named `busy_every`: its request count starts again.
    pub restart_busy_count: bool,
}

/// Why a faults update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultsError {
    #[error("faults update must be a JSON object")]
    NotAnObject,
    #[error("unknown fault '{0}'")]
    UnknownFault(String),
    #[error("fault '{key}' must be {expected}")]
    InvalidValue { key: String, expected: &'static str },
}

impl Faults {
    /// Applies a partial update such as `{"no_reply": true}` and returns the one-off actions
    /// it asks for; absent fields stay unchanged, and either the whole update applies or
    /// nothing changes.
    pub fn apply_patch(&mut self, patch: &Value) -> Result<Actions, FaultsError> {
        let patch = patch.as_object().ok_or(FaultsError::NotAnObject)?;
        let mut next = self.clone();
        let mut actions = Actions::default();
        for (key, value) in patch {
            let invalid = |expected| FaultsError::InvalidValue {
                key: key.clone(),
                expected,
            };
            let flag = || value.as_bool().ok_or(invalid("a boolean"));
            let number = || value.as_u64().ok_or(invalid("a whole number"));
            let text = || {
                value
                    .as_str()
                    .filter(|s| s.len() <= MAX_TEXT && !s.contains(['\r', '\n']))
                    .map(str::to_owned)
                    .ok_or(invalid("a string of at most 200 bytes without CR or LF"))
            };
            match key.as_str() {
                "no_reply" => next.no_reply = flag()?,
                "garbage" => next.garbage = flag()?,
                "partial" => next.partial = flag()?,
                "long_reply" => next.long_reply = flag()?,
                "disappear" => next.disappear = flag()?,
                "slow_ms" => next.slow_ms = number()?,
                "busy" => next.busy = flag()?,
                "busy_every" => {
                    next.busy_every = number()?;
                    actions.restart_busy_count = true;
                }
                "busy_text" => next.busy_text = text()?,
                "error_reply" => {
                    next.error_reply = match value {
                        Value::Null => None,
                        _ => Some(text()?),
                    }
                }
                "text_errors" => next.text_errors = flag()?,
                "echo" => next.echo = flag()?,
                "unsolicited_ms" => next.unsolicited_ms = number()?,
                "unsolicited_text" => next.unsolicited_text = text()?,
                "request_terminator" => {
                    next.request_terminator = value
                        .as_str()
                        .and_then(RequestTerminator::parse)
                        .ok_or(invalid(r#""any", "\r" or "\n""#))?
                }
                "answer_terminator" => {
                    next.answer_terminator = value
                        .as_str()
                        .filter(|t| ["\r\n", "\r", "\n"].contains(t))
                        .map(str::to_owned)
                        .ok_or(invalid(r#""\r\n", "\r" or "\n""#))?
                }
                "reset" => actions.power_cycle = flag()?,
                other => return Err(FaultsError::UnknownFault(other.to_owned())),
            }
        }
        *self = next;
        Ok(actions)
    }

    /// How refused commands are worded.
    pub fn error_style(&self) -> ErrorStyle {
        if self.text_errors {
            ErrorStyle::Text
        } else {
            ErrorStyle::Numeric
        }
    }

    /// Whether the addressed request numbered `seen` (from 1) since `busy_every` was set is
    /// answered busy.
    pub fn is_busy(&self, seen: u64) -> bool {
        self.busy || seen.checked_rem(self.busy_every) == Some(0)
    }

    /// `line` with the answer terminator.
    pub fn terminated(&self, line: &str) -> Vec<u8> {
        format!("{line}{}", self.answer_terminator).into_bytes()
    }

    /// The bytes sent for the answer `lines` (without terminators) under these faults;
    /// `None` for no reply at all.
    pub fn shape(&self, lines: &[String]) -> Option<Vec<u8>> {
        if self.no_reply {
            return None;
        }
        let bytes = if self.garbage {
            b"\x15#!~?GARBAGE\x7f\r\n#~".to_vec()
        } else if self.long_reply {
            self.terminated(&"X".repeat(1000))
        } else if self.partial {
            let first = lines.first().map(String::as_str).unwrap_or_default();
            first.as_bytes()[..first.len().div_ceil(2)].to_vec()
        } else {
            lines.iter().flat_map(|l| self.terminated(l)).collect()
        };
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn updates_are_partial_and_atomic() {
        let mut f = Faults::default();
        f.apply_patch(&json!({"slow_ms": 50, "garbage": true}))
            .unwrap();
        f.apply_patch(&json!({"garbage": false})).unwrap();
        assert_eq!(f.slow_ms, 50);
        for bad in [
            json!({"no_reply": true, "smoke": 1}),
            json!({"no_reply": true, "answer_terminator": "\r\r"}),
            json!({"no_reply": true, "request_terminator": "\r\n"}),
            json!({"no_reply": true, "busy_text": "A\r\nB"}),
            json!({"no_reply": true, "error_reply": 3}),
            json!({"slow_ms": -1}),
            json!([]),
        ] {
            assert!(f.apply_patch(&bad).is_err(), "{bad}");
        }
        assert!(!f.no_reply);
    }

    #[test]
    fn habits_and_actions() {
        let mut f = Faults::default();
        let actions = f
            .apply_patch(&json!({
                "busy_every": 2, "busy_text": "WAIT", "text_errors": true, "echo": true,
                "unsolicited_ms": 100, "unsolicited_text": "#ALIVE",
                "request_terminator": "\r", "answer_terminator": "\r",
                "error_reply": "ERR:RANGE", "reset": true
            }))
            .unwrap();
        assert_eq!(
            actions,
            Actions {
                power_cycle: true,
                restart_busy_count: true
            }
        );
        assert_eq!(f.error_style(), ErrorStyle::Text);
        assert_eq!(f.request_terminator, RequestTerminator::Cr);
        assert_eq!(f.terminated("#ALIVE"), b"#ALIVE\r");
        let busy: Vec<u64> = (1..=5).filter(|&n| f.is_busy(n)).collect();
        assert_eq!(busy, [2, 4]);
        f.apply_patch(&json!({"error_reply": null})).unwrap();
        assert_eq!(f.error_reply, None);
        let view = serde_json::to_value(&f).unwrap();
        assert_eq!(view["request_terminator"], "\r");
        assert_eq!(view["busy_text"], "WAIT");
    }

    #[test]
    fn answers_take_the_shape_of_the_faults() {
        let mut f = Faults::default();
        assert_eq!(
            f.shape(&lines(&["TEMP 21.5"])),
            Some(b"TEMP 21.5\r\n".to_vec())
        );
        assert_eq!(
            f.shape(&lines(&["T=1", "END"])),
            Some(b"T=1\r\nEND\r\n".to_vec())
        );
        f.answer_terminator = "\r".into();
        assert_eq!(
            f.shape(&lines(&["T=1", "END"])),
            Some(b"T=1\rEND\r".to_vec())
        );
        f.partial = true;
        assert_eq!(f.shape(&lines(&["TEMP 21.5"])), Some(b"TEMP ".to_vec()));
        f.long_reply = true;
        assert_eq!(f.shape(&lines(&["OK"])).unwrap().len(), 1001);
        f.garbage = true;
        assert!(f.shape(&lines(&["OK"])).unwrap().ends_with(b"\r\n#~"));
        f.no_reply = true;
        assert_eq!(f.shape(&lines(&["OK"])), None);
    }
}
