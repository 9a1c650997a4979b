//! Switchable faults of one simulated device and the partial updates the control API applies.

use serde::Serialize;
use serde_json::Value;

/// Faults currently applied to a device's whole API, `/health` included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Delay before every answer, in milliseconds.
    pub latency_ms: u64,
    /// Answer every request with this status and `{"error":"injected fault"}`.
    pub error_status: Option<u16>,
    /// Accept requests and never answer them while set.
    pub hang: bool,
    /// Close the API listener (connections are refused) and abort open connections.
    pub offline: bool,
    /// Answer 200 `application/json` with a body that is not JSON.
    pub garbage: bool,
}

/// Why a faults update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultsError {
    /// The update was not a JSON object.
    #[error("faults update must be a JSON object")]
    NotAnObject,
    /// The key names no fault.
    #[error("unknown fault '{0}'")]
    UnknownFault(String),
    /// The value has the wrong type or is out of range.
    #[error("fault '{key}' must be {expected}")]
    InvalidValue {
        /// The fault whose value was refused.
        key: String,
        /// What the fault accepts.
        expected: &'static str,
    },
}

impl Faults {
    /// Applies a partial update such as `{"offline": true}` or `{"error_status": null}`.
    ///
    /// Absent fields stay unchanged. Either the whole update applies or nothing changes.
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
                "latency_ms" => {
                    next.latency_ms = value.as_u64().ok_or(invalid("a whole number"))?
                }
                "error_status" => {
                    next.error_status = match value {
                        Value::Null => None,
                        v => Some(
                            v.as_u64()
                                .filter(|s| (100..=599).contains(s))
                                .map(|s| s as u16)
                                .ok_or(invalid("an HTTP status 100-599 or null"))?,
                        ),
                    }
                }
                "hang" => next.hang = flag()?,
                "offline" => next.offline = flag()?,
                "garbage" => next.garbage = flag()?,
                other => return Err(FaultsError::UnknownFault(other.to_owned())),
            }
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_fields_stay_unchanged() {
        let mut faults = Faults::default();
        faults.apply_patch(&json!({"latency_ms": 500})).unwrap();
        faults
            .apply_patch(&json!({"error_status": 503, "hang": true}))
            .unwrap();
        assert_eq!(
            serde_json::to_value(&faults).unwrap(),
            json!({"latency_ms": 500, "error_status": 503, "hang": true, "offline": false, "garbage": false})
        );
        faults.apply_patch(&json!({"error_status": null})).unwrap();
        assert_eq!(faults.error_status, None);
        assert_eq!(faults.latency_ms, 500);
    }

    #[test]
    fn bad_updates_change_nothing() {
        let mut faults = Faults::default();
        for patch in [
            json!({"offline": true, "smoke": true}),
            json!({"offline": "yes"}),
            json!({"error_status": 42}),
            json!({"latency_ms": -1}),
            json!(true),
        ] {
            assert!(faults.apply_patch(&patch).is_err(), "{patch}");
        }
        assert_eq!(faults, Faults::default());
        assert_eq!(
            faults
                .apply_patch(&json!({"smoke": true}))
                .unwrap_err()
                .to_string(),
            "unknown fault 'smoke'"
        );
    }
}
