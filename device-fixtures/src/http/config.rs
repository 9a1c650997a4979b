//! Device settings (`/api/config`): validation, clamping and top-level merge, with no I/O.

use serde::Serialize;
use serde_json::{Map, Value};

/// Operating mode of the simulated AGV.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The vehicle plans its own routes.
    Auto,
    /// The vehicle only moves when told to.
    Manual,
}

/// The settings a device exposes on `/api/config`, serialized with the device's wire names.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceConfig {
    /// Highest speed a move may ask for; never above the device's hard limit.
    #[serde(rename = "maxSpeed")]
    pub max_speed: f64,
    /// Operating mode.
    pub mode: Mode,
    /// Whether the signal LED is on.
    pub led: bool,
}

/// Why a settings read or write was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The key names no setting of this device.
    #[error("unknown setting '{0}'")]
    UnknownSetting(String),
    /// The value has the wrong type or is out of range.
    #[error("setting '{key}' must be {expected}")]
    InvalidValue {
        /// The setting whose value was refused.
        key: String,
        /// What the setting accepts.
        expected: &'static str,
    },
    /// A whole-config update was not a JSON object.
    #[error("config update must be a JSON object")]
    NotAnObject,
}

/// A validated value for one setting.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Setting {
    MaxSpeed(f64),
    Mode(Mode),
    Led(bool),
}

impl DeviceConfig {
    /// The factory settings, with `maxSpeed` already held to `limit`.
    pub fn initial(limit: f64) -> Self {
        Self {
            max_speed: 10.0_f64.min(limit),
            mode: Mode::Auto,
            led: false,
        }
    }

    /// The current value of one setting.
    pub fn get(&self, key: &str) -> Result<Value, ConfigError> {
        match key {
            "maxSpeed" => Ok(Value::from(self.max_speed)),
            "mode" => Ok(serde_json::to_value(self.mode).expect("mode serializes")),
            "led" => Ok(Value::Bool(self.led)),
            other => Err(ConfigError::UnknownSetting(other.to_owned())),
        }
    }

    /// The whole config as a JSON object.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("config serializes")
    }

    /// Sets one setting, clamping `maxSpeed` to `limit`, and returns the value stored.
    pub fn set(&mut self, key: &str, value: &Value, limit: f64) -> Result<Value, ConfigError> {
        let setting = validate(key, value, limit)?;
        self.store(setting);
        self.get(key)
    }

    /// Merges a JSON object into the config (RFC 7386 at the top level, without deletion).
    ///
    /// Either every key is valid and all are applied, or nothing changes and the first
    /// problem is reported.
    pub fn merge(&mut self, patch: &Value, limit: f64) -> Result<(), ConfigError> {
        let patch: &Map<String, Value> = patch.as_object().ok_or(ConfigError::NotAnObject)?;
        let settings = patch
            .iter()
            .map(|(key, value)| validate(key, value, limit))
            .collect::<Result<Vec<_>, _>>()?;
        for setting in settings {
            self.store(setting);
        }
        Ok(())
    }

    fn store(&mut self, setting: Setting) {
        match setting {
            Setting::MaxSpeed(v) => self.max_speed = v,
            Setting::Mode(m) => self.mode = m,
            Setting::Led(b) => self.led = b,
        }
    }
}

fn validate(key: &str, value: &Value, limit: f64) -> Result<Setting, ConfigError> {
    let invalid = |expected| ConfigError::InvalidValue {
        key: key.to_owned(),
        expected,
    };
    match key {
        "maxSpeed" => match value.as_f64() {
            Some(v) if v >= 0.0 => Ok(Setting::MaxSpeed(v.min(limit))),
            _ => Err(invalid("a number >= 0")),
        },
        "mode" => match value.as_str() {
            Some("auto") => Ok(Setting::Mode(Mode::Auto)),
            Some("manual") => Ok(Setting::Mode(Mode::Manual)),
            _ => Err(invalid("\"auto\" or \"manual\"")),
        },
        "led" => value
            .as_bool()
            .map(Setting::Led)
            .ok_or(invalid("a boolean")),
        other => Err(ConfigError::UnknownSetting(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn initial_config_matches_the_device_manual() {
        assert_eq!(
            DeviceConfig::initial(20.0).to_json(),
            json!({"maxSpeed": 10.0, "mode": "auto", "led": false})
        );
        assert_eq!(DeviceConfig::initial(5.0).max_speed, 5.0);
    }

    #[test]
    fn max_speed_is_clamped_to_the_limit() {
        let mut config = DeviceConfig::initial(20.0);
        assert_eq!(config.set("maxSpeed", &json!(30), 20.0), Ok(json!(20.0)));
        assert_eq!(config.set("maxSpeed", &json!(12.5), 20.0), Ok(json!(12.5)));
        assert_eq!(config.max_speed, 12.5);
    }

    #[test]
    fn wrong_types_and_ranges_are_refused() {
        let mut config = DeviceConfig::initial(20.0);
        for (key, value) in [
            ("maxSpeed", json!(-1)),
            ("maxSpeed", json!("fast")),
            ("maxSpeed", Value::Null),
            ("mode", json!("turbo")),
            ("mode", json!(1)),
            ("led", json!("on")),
        ] {
            let err = config.set(key, &value, 20.0).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidValue { .. }),
                "{key}={value}"
            );
        }
        assert_eq!(config, DeviceConfig::initial(20.0));
    }

    #[test]
    fn unknown_setting_names_the_key() {
        let mut config = DeviceConfig::initial(20.0);
        let err = config.set("colour", &json!("red"), 20.0).unwrap_err();
        assert_eq!(err.to_string(), "unknown setting 'colour'");
        assert_eq!(
            config.get("colour").unwrap_err().to_string(),
            "unknown setting 'colour'"
        );
    }

    #[test]
    fn merge_applies_every_key_and_clamps() {
        let mut config = DeviceConfig::initial(20.0);
        config
            .merge(
                &json!({"maxSpeed": 30, "mode": "manual", "led": true}),
                20.0,
            )
            .unwrap();
        assert_eq!(
            config.to_json(),
            json!({"maxSpeed": 20.0, "mode": "manual", "led": true})
        );
    }

    #[test]
    fn merge_is_all_or_nothing() {
        let mut config = DeviceConfig::initial(20.0);
        let err = config
            .merge(&json!({"led": true, "bogus": 1}), 20.0)
            .unwrap_err();
        assert_eq!(err, ConfigError::UnknownSetting("bogus".into()));
        assert_eq!(config, DeviceConfig::initial(20.0));
        assert_eq!(
            config
                .merge(&json!({"mode": null}), 20.0)
                .unwrap_err()
                .to_string(),
            "setting 'mode' must be \"auto\" or \"manual\""
        );
        assert_eq!(
            config.merge(&json!([1]), 20.0),
            Err(ConfigError::NotAnObject)
        );
    }
}
