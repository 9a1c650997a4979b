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

/// `file` with `overlay` merged over it, when the file's limits allow it and the result
/// validates; otherwise `file` alone. `state` says which (a stored overlay the limits no longer
/// allow is `refused`, with every problem).
pub fn overlay_file(file: Config, overlay: Option<&Overlay>, state: &mut State) -> Config {
    let Some(o) = overlay else {
        return file;
    };
    let problems = check_limits(&file.remote_config, &o.config);
    let merged = if problems.is_empty() {
        merge(&file, &o.config)
    } else {
        Err(problems)
    };
    match merged {
        Ok(m) => {
            tracing::info!(
                version = o.version,
                "running with the cloud's configuration over the file"
            );
            state.applied(o.version);
            m
        }
        Err(problems) => {
            for p in &problems {
                tracing::warn!(version = o.version, problem = %p, "the stored remote configuration is not applied");
            }
            state.refused(o.version, problems);
            file
        }
    }
}

/// What became of the last remote configuration, as the gateway reports it.
#[derive(Debug, Clone)]
pub struct State(pub gatewayd_protocol::RemoteConfigState);

impl State {
    pub fn new(enabled: bool) -> State {
        State(gatewayd_protocol::RemoteConfigState {
            enabled,
            version: 0,
            state: "none".into(),
            problems: Vec::new(),
            at_ms: 0,
        })
    }

    pub fn applied(&mut self, version: u64) {
        self.set(version, "applied", Vec::new());
    }

    pub fn refused(&mut self, version: u64, problems: Vec<String>) {
        self.set(version, "refused", problems);
    }

    fn set(&mut self, version: u64, state: &str, problems: Vec<String>) {
        self.0.version = version;
        self.0.state = state.into();
        self.0.problems = problems;
        self.0.at_ms = crate::clock::now_ms();
    }
}

/// The daemon's side of remote configuration: takes desired configurations from the session,
/// checks, stores and applies them (through the live reload), rolls back a configuration
/// after which the cloud session was lost, and keeps the report the session publishes.
pub struct Remote {
    /// The limits of the file the daemon runs on (a reload re-reads them).
    pub limits: RemoteConfig,
    pub state: State,
    pub config_path: Option<std::path::PathBuf>,
    pub store: crate::store::Store,
    pub reports: crate::cloud::ConfigReports,
    pub boot_id: String,
    pub connected: tokio::sync::watch::Receiver<bool>,
    /// The running sections as last reported (only kept when remote configuration is on).
    pub running_sections: Option<Value>,
    /// The overlay before the last one applied, for a roll-back.
    pub previous: Option<Overlay>,
    /// Largest publish (`cloud.max_packet_bytes`): a report with the running sections larger
    /// than this goes without them.
    pub max_publish: usize,
}

impl Remote {
    /// `file` with the stored overlay merged over it when this gateway takes one (a reload):
    /// the overlay is applied only while it still fits the file's limits and validates.
    pub async fn over_file(&mut self, file: Config) -> Config {
        self.limits = file.remote_config.clone();
        self.state.0.enabled = self.limits.enabled;
        let overlay = self.store.call(load).await.ok().flatten();
        let merged = overlay_file(file, overlay.as_ref(), &mut self.state);
        self.running_sections = self.limits.enabled.then(|| running_sections(&merged));
        merged
    }

    /// The configuration file, loaded off the runtime; its problems when it is invalid now.
    async fn load_file(&self) -> Result<Config, Vec<String>> {
        let Some(path) = self.config_path.clone() else {
            return Err(vec![
                "this daemon was started without a configuration file".into()
            ]);
        };
        match tokio::task::spawn_blocking(move || Config::load(&path, Config::env())).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e
                .problems
                .into_iter()
                .map(|p| format!("the gateway's own file is invalid: {p}"))
                .collect()),
            Err(e) => Err(vec![format!("cannot read the gateway's file: {e}")]),
        }
    }

    /// A desired configuration arrived. Refused (nothing changes, every problem reported) or
    /// stored, acknowledged and applied live; the outcome of the reload when there was one.
    pub async fn desired(
        &mut self,
        d: crate::cloud::RemoteDesired,
        reloader: &mut crate::live::Reloader,
        rollbacks: &tokio::sync::mpsc::UnboundedSender<u64>,
    ) -> Option<crate::reload::Outcome> {
        let version = d.desired.version;
        if version <= self.state.0.version && self.state.0.state != "none" {
            tracing::debug!(version, "desired configuration already handled");
            let _ = d.acked.send(true);
            return None;
        }
        let file = self.load_file().await;
        let merged = file.and_then(|file| {
            self.limits = file.remote_config.clone();
            self.state.0.enabled = self.limits.enabled;
            let p = check_limits(&self.limits, &d.desired.config);
            if p.is_empty() {
                merge(&file, &d.desired.config)
            } else {
                Err(p)
            }
        });
        let merged = match merged {
            Ok(m) => m,
            Err(problems) => {
                for p in &problems {
                    tracing::warn!(version, problem = %p, "remote configuration refused");
                }
                self.state.refused(version, problems);
                let _ = d.acked.send(true);
                return None;
            }
        };
        let overlay = Overlay {
            version,
            config: d.desired.config.clone(),
            at_ms: crate::clock::now_ms(),
        };
        let previous = self.store.call(load).await.ok().flatten();
        let stored = self.store.call(move |c| save(c, &overlay)).await;
        let _ = d.acked.send(stored.is_ok());
        if let Err(e) = stored {
            tracing::warn!(version, error = %e, "remote configuration not stored; the cloud sends it again");
            return None;
        }
        self.running_sections = Some(running_sections(&merged));
        let outcome = reloader.apply(merged).await;
        match &outcome {
            crate::reload::Outcome::Failed(why) => {
                self.state.refused(version, vec![why.clone()]);
                let _ = self
                    .store
                    .call(move |c| match previous {
                        Some(p) => save(c, &p),
                        None => drop_overlay(c).map(|_| ()),
                    })
                    .await;
            }
            _ => {
                tracing::info!(version, "remote configuration applied");
                self.state.applied(version);
                // Lost the cloud within the grace period: roll back (a push must never lock a
                // gateway out).
                let grace = std::time::Duration::from_secs(self.limits.rollback_grace_s);
                let mut connected = self.connected.clone();
                let rollbacks = rollbacks.clone();
                tokio::spawn(async move {
                    let lost = tokio::time::timeout(grace, connected.wait_for(|c| !*c)).await;
                    if matches!(lost, Ok(Ok(_))) {
                        let _ = rollbacks.send(version);
                    }
                });
                // Keep what rolling back needs.
                self.previous = previous;
            }
        }
        Some(outcome)
    }

    /// The cloud session was lost within the grace period after `version` was applied: the
    /// previous overlay is restored and applied.
    pub async fn roll_back(
        &mut self,
        version: u64,
        reloader: &mut crate::live::Reloader,
    ) -> Option<crate::reload::Outcome> {
        if self.state.0.version != version || self.state.0.state != "applied" {
            return None;
        }
        tracing::warn!(
            version,
            grace_s = self.limits.rollback_grace_s,
            "cloud session lost after a remote configuration: rolling it back"
        );
        let previous = self.previous.take();
        let restored = self
            .store
            .call(move |c| match previous {
                Some(p) => save(c, &p),
                None => drop_overlay(c).map(|_| ()),
            })
            .await;
        if let Err(e) = restored {
            tracing::error!(error = %e, "cannot restore the previous remote configuration");
            return None;
        }
        let file = self.load_file().await.ok()?;
        let config = self.over_file(file).await;
        let outcome = reloader.apply(config).await;
        let problems = vec![format!(
            "the cloud session was lost within {} s of applying it (remote_config.rollback_grace_s)",
            self.limits.rollback_grace_s
        )];
        self.state.set(version, "rolled_back", problems);
        Some(outcome)
    }

    /// Publishes (through the session) the report of the running configuration.
    pub fn report(&self, running: &crate::reload::Fingerprint) {
        let report = gatewayd_protocol::ConfigReport {
            v: gatewayd_protocol::PROTOCOL_VERSION,
            fingerprint: running.digest(),
            software: concat!("gatewayd ", env!("CARGO_PKG_VERSION")).to_string(),
            boot_id: self.boot_id.clone(),
            running: self.running_sections.clone().unwrap_or(Value::Null),
            remote: self.state.0.clone(),
        };
        let mut body = serde_json::to_vec(&report).expect("report serializes");
        if body.len() > self.max_publish {
            let mut report = report;
            report.running = serde_json::json!({
                "omitted": format!(
                    "{} bytes, more than one publish carries (cloud.max_packet_bytes)",
                    body.len()
                )
            });
            body = serde_json::to_vec(&report).expect("report serializes");
        }
        self.reports.set(body);
    }
}
