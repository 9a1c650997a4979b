//! Switchable faults and field-device habits of one simulated device, and the partial updates
//! the control API (and the command line) apply.

use serde::Serialize;
use serde_json::Value;

/// Largest `huge_body_mb`; the body is streamed, never held in memory.
pub const MAX_HUGE_BODY_MB: u64 = 65_536;

/// Faults currently applied to a device's API.
///
/// `latency_ms`, `hang`, `error_status`, `garbage` and `offline` apply to every path,
/// `/health` included. The busy and answer-shaping habits (`busy`, `busy_every`,
/// `drop_after_acting`, `malformed_status`, `huge_header`, `huge_body_mb`) spare `/health`,
/// so a prober keeps seeing the device alive while its real work misbehaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    /// Answer every request busy (see `busy_status`) without acting on it.
    pub busy: bool,
    /// Answer every Nth request busy without acting on it (0: never). Counting starts
    /// again whenever an update names `busy_every`.
    pub busy_every: u64,
    /// Status of a busy answer (with `Retry-After: 1` and `{"error":"busy"}`); 503 unless
    /// set, 429 and 408 are the other usual ones.
    pub busy_status: u16,
    /// `/health` does not exist: it answers 404 like any unknown path.
    pub no_health: bool,
    /// Act on the request, then close the connection without writing a byte of the answer.
    pub drop_after_acting: bool,
    /// Act on the request, then write `HTTP/1.1 2OO OK` (letters O, not zeros) and close.
    pub malformed_status: bool,
    /// Act on the request, then answer with an extra header of about 1 MiB.
    pub huge_header: bool,
    /// Act on the request, then answer 200 with a streamed JSON string body of this many
    /// MiB, chunked, without `Content-Length` (0: off).
    pub huge_body_mb: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_status: None,
            hang: false,
            offline: false,
            garbage: false,
            busy: false,
            busy_every: 0,
            busy_status: 503,
            no_health: false,
            drop_after_acting: false,
            malformed_status: false,
            huge_header: false,
            huge_body_mb: 0,
        }
    }
}

/// One-off actions an update may carry besides the faults it sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// `"reset": true`: the device state goes back to power-up (settings, motion, uptime).
    pub power_cycle: bool,
    /// The update named `busy_every`: its request count starts again.
    pub restart_busy_count: bool,
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
    /// Applies a partial update such as `{"offline": true}` or `{"error_status": null}`, and
    /// returns the one-off actions it asks for (`{"reset": true}`).
    ///
    /// Absent fields stay unchanged. Either the whole update applies or nothing changes.
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
            let status = |range: std::ops::RangeInclusive<u64>, expected| {
                value
                    .as_u64()
                    .filter(|s| range.contains(s))
                    .map(|s| s as u16)
                    .ok_or(invalid(expected))
            };
            match key.as_str() {
                "latency_ms" => next.latency_ms = number()?,
                "error_status" => {
                    next.error_status = match value {
                        Value::Null => None,
                        _ => Some(status(100..=599, "an HTTP status 100-599 or null")?),
                    }
                }
                "hang" => next.hang = flag()?,
                "offline" => next.offline = flag()?,
                "garbage" => next.garbage = flag()?,
                "busy" => next.busy = flag()?,
                "busy_every" => {
                    next.busy_every = number()?;
                    actions.restart_busy_count = true;
                }
                "busy_status" => next.busy_status = status(400..=599, "an HTTP status 400-599")?,
                "no_health" => next.no_health = flag()?,
                "drop_after_acting" => next.drop_after_acting = flag()?,
                "malformed_status" => next.malformed_status = flag()?,
                "huge_header" => next.huge_header = flag()?,
                "huge_body_mb" => {
                    next.huge_body_mb = value
                        .as_u64()
                        .filter(|&mb| mb <= MAX_HUGE_BODY_MB)
                        .ok_or(invalid("a whole number of MiB, at most 65536"))?
                }
                "reset" => actions.power_cycle = flag()?,
                other => return Err(FaultsError::UnknownFault(other.to_owned())),
            }
        }
        *self = next;
        Ok(actions)
    }

    /// Whether the request numbered `seen` (from 1) since `busy_every` was set is answered
    /// busy; `/health` is never counted nor busy.
    pub fn is_busy(&self, seen: u64) -> bool {
        self.busy || seen.checked_rem(self.busy_every) == Some(0)
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
            json!({
                "latency_ms": 500, "error_status": 503, "hang": true, "offline": false,
                "garbage": false, "busy": false, "busy_every": 0, "busy_status": 503,
                "no_health": false, "drop_after_acting": false, "malformed_status": false,
                "huge_header": false, "huge_body_mb": 0
            })
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
            json!({"busy_status": 200}),
            json!({"busy_every": 2, "huge_body_mb": 70000}),
            json!({"busy": true, "reset": "now"}),
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

    #[test]
    fn habits_and_actions() {
        let mut faults = Faults::default();
        let actions = faults
            .apply_patch(&json!({"busy_every": 3, "busy_status": 429, "reset": true}))
            .unwrap();
        assert_eq!(
            actions,
            Actions {
                power_cycle: true,
                restart_busy_count: true
            }
        );
        assert_eq!(faults.busy_status, 429);
        let busy: Vec<u64> = (1..=7).filter(|&n| faults.is_busy(n)).collect();
        assert_eq!(busy, [3, 6]);
        let actions = faults
            .apply_patch(&json!({"busy_every": 0, "busy": true, "reset": false}))
            .unwrap();
        assert!(!actions.power_cycle);
        assert!((1..=3).all(|n| faults.is_busy(n)));
        faults.apply_patch(&json!({"busy": false})).unwrap();
        assert!(!faults.is_busy(1));
    }
}
