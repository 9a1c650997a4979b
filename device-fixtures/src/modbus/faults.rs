//! Faults of the simulated Modbus units, switched over the control API.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Faults; each applies to every unit, or only to `unit` when it is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Only this unit misbehaves; `null`: all.
    #[serde(default)]
    pub unit: Option<u8>,
    /// Requests are neither acted on nor answered.
    #[serde(default)]
    pub no_reply: bool,
    /// Every request is answered with this exception code and not acted on.
    #[serde(default)]
    pub exception: Option<u8>,
    /// RTU: requests are acted on and answered with a corrupted CRC.
    #[serde(default)]
    pub crc_error: bool,
    /// Requests are acted on and answered as another unit (unit id + 1).
    #[serde(default)]
    pub wrong_unit: bool,
    /// Answers leave this many milliseconds late.
    #[serde(default)]
    pub slow_ms: u64,
    /// The bus goes away: the TCP listener and its connections close, the pty closes and its
    /// link is removed; clearing it brings both back (same TCP port, same link).
    #[serde(default)]
    pub gone: bool,
}

impl Faults {
    /// Applies a JSON patch of fields (`{"no_reply": true}`); unknown fields are refused.
    pub fn apply_patch(&mut self, patch: &Value) -> Result<(), String> {
        let mut current = serde_json::to_value(&*self).map_err(|e| e.to_string())?;
        let (Some(obj), Some(p)) = (current.as_object_mut(), patch.as_object()) else {
            return Err("faults must be a JSON object".into());
        };
        for (k, v) in p {
            obj.insert(k.clone(), v.clone());
        }
        *self = serde_json::from_value(current).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Whether the faults apply to `unit`.
    pub fn hits(&self, unit: u8) -> bool {
        self.unit.is_none_or(|u| u == unit)
    }
}
