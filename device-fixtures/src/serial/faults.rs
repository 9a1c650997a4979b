//! Switchable faults of the simulated serial device and the partial updates the control API
//! applies.

use serde::Serialize;
use serde_json::Value;

/// Faults applied to the serial line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Read requests and never answer.
    pub no_reply: bool,
    /// Answer with a line of noise followed by unterminated junk, instead of the answer.
    pub garbage: bool,
    /// Answer with the first half of the answer and no terminator.
    pub partial: bool,
    /// Answer with a 1,000-byte line.
    pub long_reply: bool,
    /// Delay before each answer, milliseconds.
    pub slow_ms: u64,
    /// The port is gone: the pty is closed and the link removed; clearing it creates a new
    /// pty and points the link at it.
    pub disappear: bool,
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
    /// Applies a partial update such as `{"no_reply": true}`; absent fields stay unchanged,
    /// and either the whole update applies or nothing changes.
    pub fn apply_patch(&mut self, patch: &Value) -> Result<(), FaultsError> {
        let patch = patch.as_object().ok_or(FaultsError::NotAnObject)?;
        let mut next = self.clone();
        for (key, value) in patch {
            let invalid = |expected| FaultsError::InvalidValue {
                key: key.clone(),
                expected,
            };
            let flag = || value.as_bool().ok_or(invalid("a boolean"));
            match key.as_str() {
                "no_reply" => next.no_reply = flag()?,
                "garbage" => next.garbage = flag()?,
                "partial" => next.partial = flag()?,
                "long_reply" => next.long_reply = flag()?,
                "disappear" => next.disappear = flag()?,
                "slow_ms" => next.slow_ms = value.as_u64().ok_or(invalid("a whole number"))?,
                other => return Err(FaultsError::UnknownFault(other.to_owned())),
            }
        }
        *self = next;
        Ok(())
    }

    /// The bytes sent for `answer` (without terminator) under these faults; `None` for no
    /// reply at all.
    pub fn shape(&self, answer: &str) -> Option<Vec<u8>> {
        if self.no_reply {
            return None;
        }
        let bytes = if self.garbage {
            b"\x15#!~?GARBAGE\x7f\r\n#~".to_vec()
        } else if self.long_reply {
            let mut v = vec![b'X'; 1000];
            v.extend_from_slice(b"\r\n");
            v
        } else if self.partial {
            answer.as_bytes()[..answer.len().div_ceil(2)].to_vec()
        } else {
            format!("{answer}\r\n").into_bytes()
        };
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn updates_are_partial_and_atomic() {
        let mut f = Faults::default();
        f.apply_patch(&json!({"slow_ms": 50, "garbage": true}))
            .unwrap();
        f.apply_patch(&json!({"garbage": false})).unwrap();
        assert_eq!(f.slow_ms, 50);
        assert!(f
            .apply_patch(&json!({"no_reply": true, "smoke": 1}))
            .is_err());
        assert!(!f.no_reply);
        assert!(f.apply_patch(&json!({"slow_ms": -1})).is_err());
        assert!(f.apply_patch(&json!([])).is_err());
    }

    #[test]
    fn answers_take_the_shape_of_the_faults() {
        let mut f = Faults::default();
        assert_eq!(f.shape("TEMP 21.5"), Some(b"TEMP 21.5\r\n".to_vec()));
        f.partial = true;
        assert_eq!(f.shape("TEMP 21.5"), Some(b"TEMP ".to_vec()));
        f.long_reply = true;
        assert_eq!(f.shape("OK").unwrap().len(), 1002);
        f.garbage = true;
        assert!(f.shape("OK").unwrap().ends_with(b"\r\n#~"));
        f.no_reply = true;
        assert_eq!(f.shape("OK"), None);
    }
}
