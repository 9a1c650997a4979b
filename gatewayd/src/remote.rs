//! Configuration from the cloud: the gateway's own twin. The local file stays the root of
//! trust. What the cloud sends is an overlay (a merge patch over the file's `devices`,
//! `profiles` and `serial_ports` sections) that the store keeps, so it survives restarts; it is
//! merged over the file at every start and reload, and `gatewayd config drop-remote` removes
//! it. Local limits (`[remote_config]`) decide what the cloud may send: the sections, the hosts
//! of HTTP devices, the serial ports, the size. A desired configuration outside them, or one
//! that would not validate as a file, changes nothing and is answered with every problem.

use crate::config::{Config, RemoteConfig, REMOTE_SECTIONS};
use gatewayd_protocol::twin::merge_patch;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use std::net::IpAddr;

/// The overlay the store holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlay {
    pub version: u64,
    pub config: Value,
    pub at_ms: u64,
}

/// Reads the overlay, if any.
pub fn load(c: &Connection) -> rusqlite::Result<Option<Overlay>> {
    c.query_row(
        "SELECT version, config, at_ms FROM remote_config WHERE id = 1",
        [],
        |r| {
            Ok(Overlay {
                version: r.get::<_, i64>(0)? as u64,
                config: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(Value::Null),
                at_ms: r.get::<_, i64>(2)? as u64,
            })
        },
    )
    .optional()
}

/// Replaces the overlay.
pub fn save(c: &Connection, o: &Overlay) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO remote_config (id, version, config, at_ms) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET version = ?1, config = ?2, at_ms = ?3",
        params![o.version as i64, o.config.to_string(), o.at_ms as i64],
    )?;
    Ok(())
}

/// Removes the overlay; returns whether there was one.
pub fn drop_overlay(c: &Connection) -> rusqlite::Result<bool> {
    Ok(c.execute("DELETE FROM remote_config WHERE id = 1", [])? > 0)
}

/// `address/prefix` as an IP network.
pub fn parse_net(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

fn in_net(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Whether `host` (a name or an address) is allowed by `allow`.
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    allow.iter().any(|a| match parse_net(a) {
        Some(net) => bare.parse::<IpAddr>().is_ok_and(|ip| in_net(ip, net)),
        None => a.eq_ignore_ascii_case(bare),
    })
}

/// Checks a desired configuration against the local limits; every problem, none if it may be
/// applied (it must then still validate as a file).
pub fn check_limits(limits: &RemoteConfig, desired: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if !limits.enabled {
        p.push(
            "remote configuration is off on this gateway ([remote_config] enabled = false)".into(),
        );
        return p;
    }
    let size = desired.to_string().len();
    if size > limits.max_bytes {
        p.push(format!(
            "the configuration is {size} bytes, more than this gateway takes ({} bytes, remote_config.max_bytes)",
            limits.max_bytes
        ));
    }
    let Some(sections) = desired.as_object() else {
        p.push("the configuration must be an object of sections".into());
        return p;
    };
    for (name, section) in sections {
        if !REMOTE_SECTIONS.contains(&name.as_str()) {
            p.push(format!(
                "{name}: not a section a remote configuration may hold ({})",
                REMOTE_SECTIONS.join(", ")
            ));
            continue;
        }
        if !limits.sections.iter().any(|s| s == name) {
            p.push(format!(
                "{name}: this gateway does not let the cloud change it (remote_config.sections)"
            ));
            continue;
        }
        let Some(entries) = section.as_object() else {
            if !section.is_null() {
                p.push(format!("{name}: must be an object of entries"));
            }
            continue;
        };
        for (id, entry) in entries {
            if name == "devices" {
                if let Some(url) = entry.get("base_url").and_then(Value::as_str) {
                    match reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)) {
                        Some(host) if host_allowed(&host, &limits.allow_hosts) => {}
                        Some(host) => p.push(format!(
                            "devices.{id}.base_url: host {host} is not allowed for a remote device (remote_config.allow_hosts)"
                        )),
                        None => p.push(format!("devices.{id}.base_url: not a URL with a host")),
                    }
                }
            }
            if name == "serial_ports" {
                if let Some(path) = entry.get("path").and_then(Value::as_str) {
                    if !limits.allow_serial_ports.iter().any(|a| a == path) {
                        p.push(format!(
                            "serial_ports.{id}.path: {path} is not allowed for a remote port (remote_config.allow_serial_ports)"
                        ));
                    }
                }
            }
        }
    }
    p
}

/// The file's configuration with `overlay` merged over its sections, validated as a file is.
pub fn merge(file: &Config, overlay: &Value) -> Result<Config, Vec<String>> {
    let mut merged = file.clone();
    let Some(sections) = overlay.as_object() else {
        return Ok(merged);
    };
    let mut p = Vec::new();
    macro_rules! section {
        ($name:literal, $field:ident) => {
            if let Some(patch) = sections.get($name) {
                let mut value = serde_json::to_value(&file.$field).unwrap_or(Value::Null);
                merge_patch(&mut value, patch);
                match serde_json::from_value(value) {
                    Ok(v) => merged.$field = v,
                    Err(e) => p.push(format!("{}: {e}", $name)),
                }
            }
        };
    }
    section!("devices", devices);
    section!("profiles", profiles);
    section!("serial_ports", serial_ports);
    if !p.is_empty() {
        return Err(p);
    }
    merged.validate().map_err(|e| e.problems)?;
    Ok(merged)
}

/// The running `devices`, `profiles` and `serial_ports`, with device credentials left out.
pub fn running_sections(config: &Config) -> Value {
    let mut v = serde_json::json!({
        "devices": config.devices,
        "profiles": config.profiles,
        "serial_ports": config.serial_ports,
    });
    if let Some(devices) = v["devices"].as_object_mut() {
        for d in devices.values_mut() {
            if let Some(auth) = d.get_mut("auth").filter(|a| !a.is_null()) {
                *auth = Value::String("***".into());
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [remote_config]
        enabled = true
        allow_hosts = ["10.0.0.0/24", "plc.local"]
        [devices.a]
        kind = "http"
        base_url = "http://10.0.0.5:80"
        auth = { bearer = { token = "secret-token" } }
        [devices.a.methods.m]
        path = "/m"
    "#;

    fn base() -> Config {
        Config::from_text(BASE).unwrap()
    }

    #[test]
    fn hosts_match_names_and_networks() {
        let allow = vec!["10.0.0.0/24".to_string(), "plc.local".to_string()];
        assert!(host_allowed("10.0.0.200", &allow));
        assert!(!host_allowed("10.0.1.1", &allow));
        assert!(host_allowed("PLC.local", &allow));
        assert!(!host_allowed("evil.example", &allow));
        assert!(!host_allowed("::1", &allow));
        assert!(parse_net("10.0.0.0/33").is_none());
    }

    #[test]
    fn limits_name_every_problem() {
        let limits = base().remote_config;
        let desired = json!({
            "devices": {
                "b": {"kind": "http", "base_url": "http://192.168.1.9"},
                "c": {"kind": "http", "base_url": "http://10.0.0.7"},
            },
            "serial_ports": {"p": {"path": "/dev/ttyS0"}},
            "cloud": {"broker": "mqtt://elsewhere"},
        });
        let p = check_limits(&limits, &desired);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p
            .iter()
            .any(|x| x.contains("devices.b.base_url: host 192.168.1.9 is not allowed")));
        assert!(p
            .iter()
            .any(|x| x.contains("serial_ports: this gateway does not let the cloud change it")));
        assert!(p.iter().any(|x| x.contains("cloud: not a section")));
        let off = RemoteConfig::default();
        assert!(check_limits(&off, &json!({}))[0].contains("off"));
    }

    #[test]
    fn an_overlay_adds_replaces_and_removes_entries_and_validates() {
        let file = base();
        let merged = merge(
            &file,
            &json!({"devices": {"b": {"kind": "http", "base_url": "http://10.0.0.8", "methods": {"n": {"path": "/n"}}}}}),
        )
        .unwrap();
        assert_eq!(merged.devices.len(), 2);
        let removed = merge(&file, &json!({"devices": {"a": null}})).unwrap();
        assert!(removed.devices.is_empty());
        let bad = merge(&file, &json!({"devices": {"b": {"kind": "http"}}})).unwrap_err();
        assert!(
            bad.iter().any(|p| p.contains("devices.b.base_url")),
            "{bad:?}"
        );
        let running = running_sections(&merged);
        assert_eq!(running["devices"]["a"]["auth"], "***");
        assert!(!running.to_string().contains("secret-token"));
    }
}
