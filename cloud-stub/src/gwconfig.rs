//! The gateway's own twin (remote configuration): the desired configuration operators set for a
//! gateway, and the report the gateway publishes (retained `up/config`). The desired half is a
//! merge patch over the gateway's own file, checked here for its structure before it is sent
//! (`down/config/desired`, retained, so a gateway that is offline gets it when it connects);
//! the gateway checks it against its own limits and says what it made of it in its report.
//! Kept in memory: after a restart the stub learns the report again from the retained
//! `up/config`, and the next change continues from the version the gateway reports.

use gatewayd_protocol::{ConfigDesired, ConfigReport, GatewayId, PROTOCOL_VERSION};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sections a desired configuration may hold.
pub const SECTIONS: [&str; 4] = ["devices", "profiles", "serial_ports", "cloud"];

/// Largest desired configuration, bytes of JSON.
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Entry {
    desired: Map<String, Value>,
    version: u64,
    reported: Option<ConfigReport>,
}

/// Every gateway's configuration twin.
#[derive(Clone, Default)]
pub struct GatewayConfigs(Arc<Mutex<HashMap<GatewayId, Entry>>>);

impl GatewayConfigs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GatewayId, Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gateway's report arrived.
    pub fn reported(&self, gateway: &GatewayId, report: ConfigReport) {
        self.lock().entry(gateway.clone()).or_default().reported = Some(report);
    }

    /// Desired and reported halves, and whether the gateway runs the desired version.
    pub fn view(&self, gateway: &GatewayId) -> Value {
        let map = self.lock();
        let entry = map.get(gateway);
        let desired_version = entry.map_or(0, |e| e.version);
        let reported = entry.and_then(|e| e.reported.as_ref());
        let in_sync = reported
            .is_some_and(|r| r.remote.version == desired_version && r.remote.state == "applied")
            || (desired_version == 0);
        json!({
            "gateway": gateway,
            "desired": {
                "version": desired_version,
                "config": Value::Object(entry.map(|e| e.desired.clone()).unwrap_or_default()),
            },
            "reported": reported,
            "in_sync": in_sync,
        })
    }

    /// Merges `patch` into the desired configuration after checking its structure; returns the
    /// message to send the gateway.
    pub fn patch(&self, gateway: &GatewayId, patch: &Value) -> Result<ConfigDesired, Vec<String>> {
        let problems = check(patch);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut map = self.lock();
        let entry = map.entry(gateway.clone()).or_default();
        let mut desired = Value::Object(entry.desired.clone());
        gatewayd_protocol::twin::merge_patch(&mut desired, patch);
        let size = desired.to_string().len();
        if size > MAX_BYTES {
            return Err(vec![format!(
                "the configuration would be {size} bytes, more than {MAX_BYTES}"
            )]);
        }
        let reported = entry.reported.as_ref().map_or(0, |r| r.remote.version);
        entry.version = entry.version.max(reported) + 1;
        entry.desired = desired.as_object().cloned().unwrap_or_default();
        Ok(ConfigDesired {
            v: PROTOCOL_VERSION,
            version: entry.version,
            config: desired,
        })
    }
}

/// The structure a desired configuration must have: an object of known sections, each an
/// object of entries, each an object (or `null` to remove it); `cloud` is an object of
/// fields, each a plain value. What the gateway lets the cloud change is the gateway's call.
pub fn check(patch: &Value) -> Vec<String> {
    let Some(sections) = patch.as_object() else {
        return vec!["the body must be a JSON object of sections (a merge patch)".into()];
    };
    let mut p = Vec::new();
    for (name, section) in sections {
        if !SECTIONS.contains(&name.as_str()) {
            p.push(format!(
                "{name}: not a section a remote configuration may hold ({})",
                SECTIONS.join(", ")
            ));
            continue;
        }
        if name == "cloud" {
            match section {
                Value::Object(fields) => {
                    for (field, value) in fields {
                        if value.is_object() || value.is_array() {
                            p.push(format!(
                                "cloud.{field}: must be a value (or null to unset it)"
                            ));
                        }
                    }
                }
                Value::Null => {}
                _ => p.push("cloud: must be an object of fields (or null to drop it)".into()),
            }
            continue;
        }
        match section {
            Value::Null => {}
            Value::Object(entries) => {
                for (id, entry) in entries {
                    if !(entry.is_object() || entry.is_null()) {
                        p.push(format!(
                            "{name}.{id}: must be an object (or null to remove it)"
                        ));
                    }
                }
            }
            _ => p.push(format!("{name}: must be an object of entries")),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_is_checked_and_versions_grow() {
        let configs = GatewayConfigs::default();
        let gw = GatewayId::new("g").unwrap();
        let bad = configs
            .patch(&gw, &json!({"cloud": {"broker": {}}, "devices": {"a": 3}}))
            .unwrap_err();
        assert_eq!(bad.len(), 2, "{bad:?}");
        let d = configs
            .patch(&gw, &json!({"devices": {"a": {"kind": "http"}}}))
            .unwrap();
        assert_eq!(d.version, 1);
        let d = configs
            .patch(&gw, &json!({"devices": {"b": {"kind": "http"}}}))
            .unwrap();
        assert_eq!(d.version, 2);
        assert_eq!(d.config["devices"].as_object().unwrap().len(), 2);
        let v = configs.view(&gw);
        assert_eq!(v["desired"]["version"], 2);
        assert_eq!(v["in_sync"], false);
    }
}
