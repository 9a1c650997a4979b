//! Configuration from the cloud: the gateway's own twin. The local file stays the root of
//! trust. What the cloud sends is an overlay (a merge patch over the file's `devices`,
//! `profiles`, `serial_ports` and, where allowed, `cloud` sections) that the store keeps, so it
//! survives restarts; it is
//! merged over the file at every start and reload, and `gatewayd config drop-remote` removes
//! it. Local limits (`[remote_config]`) decide what the cloud may send: the sections, the hosts
//! of HTTP devices, the serial ports, the size. A desired configuration outside them, or one
//! that would not validate as a file, changes nothing and is answered with every problem.

use crate::config::cloud::LIVE_FIELDS;
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
    /// False while on probation: applied, but the cloud session has not yet held for the
    /// grace period after it.
    pub confirmed: bool,
    /// What a roll-back restores: the overlay this one replaced (`None`: the file alone).
    /// Kept only while on probation.
    pub previous: Option<Box<Overlay>>,
}

impl Overlay {
    /// A new overlay on probation, replacing `previous`.
    pub fn new(version: u64, config: Value, previous: Option<Overlay>) -> Overlay {
        Overlay {
            version,
            config,
            at_ms: crate::clock::now_ms(),
            confirmed: false,
            previous: previous.map(|p| {
                Box::new(Overlay {
                    confirmed: true,
                    previous: None,
                    ..p
                })
            }),
        }
    }
}

/// Reads the overlay, if any.
pub fn load(c: &Connection) -> rusqlite::Result<Option<Overlay>> {
    c.query_row(
        "SELECT version, config, at_ms, confirmed, previous FROM remote_config WHERE id = 1",
        [],
        |r| {
            let previous: Option<String> = r.get(4)?;
            Ok(Overlay {
                version: r.get::<_, i64>(0)? as u64,
                config: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(Value::Null),
                at_ms: r.get::<_, i64>(2)? as u64,
                confirmed: r.get::<_, i64>(3)? != 0,
                previous: previous
                    .and_then(|p| serde_json::from_str::<Value>(&p).ok())
                    .map(|p| {
                        Box::new(Overlay {
                            version: p["version"].as_u64().unwrap_or(0),
                            config: p["config"].clone(),
                            at_ms: p["at_ms"].as_u64().unwrap_or(0),
                            confirmed: true,
                            previous: None,
                        })
                    }),
            })
        },
    )
    .optional()
}

/// Replaces the overlay.
pub fn save(c: &Connection, o: &Overlay) -> rusqlite::Result<()> {
    let previous = o.previous.as_ref().map(|p| {
        serde_json::json!({"version": p.version, "config": p.config, "at_ms": p.at_ms}).to_string()
    });
    c.execute(
        "INSERT INTO remote_config (id, version, config, at_ms, confirmed, previous)
         VALUES (1, ?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(id) DO UPDATE SET version = ?1, config = ?2, at_ms = ?3, confirmed = ?4,
             previous = ?5",
        params![
            o.version as i64,
            o.config.to_string(),
            o.at_ms as i64,
            o.confirmed,
            previous
        ],
    )?;
    Ok(())
}

/// Ends the probation of overlay `version`: it stays, and nothing is kept to roll back to.
pub fn confirm(c: &Connection, version: u64) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE remote_config SET confirmed = 1, previous = NULL WHERE id = 1 AND version = ?1",
        params![version as i64],
    )?;
    Ok(())
}

/// Puts back what overlay `o` replaced (the file alone when nothing).
fn restore(c: &Connection, o: Option<Overlay>) -> rusqlite::Result<()> {
    match o {
        Some(p) => save(c, &p),
        None => drop_overlay(c).map(|_| ()),
    }
}

/// Removes the overlay; returns whether there was one.
pub fn drop_overlay(c: &Connection) -> rusqlite::Result<bool> {
    Ok(c.execute("DELETE FROM remote_config WHERE id = 1", [])? > 0)
}

/// The outcome of the last remote configuration, kept so that a version refused or rolled
/// back is not applied again when the cloud sends it again after a restart.
pub fn load_state(
    c: &Connection,
) -> rusqlite::Result<Option<gatewayd_protocol::RemoteConfigState>> {
    c.query_row(
        "SELECT state FROM remote_config_state WHERE id = 1",
        [],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map(|s| s.and_then(|s| serde_json::from_str(&s).ok()))
}

fn save_state(c: &Connection, s: &gatewayd_protocol::RemoteConfigState) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO remote_config_state (id, state) VALUES (1, ?1)
         ON CONFLICT(id) DO UPDATE SET state = ?1",
        params![serde_json::to_string(s).unwrap_or_default()],
    )?;
    Ok(())
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
        if name == "cloud" {
            check_cloud(limits, section, &mut p);
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

/// The `[cloud]` part of a desired configuration: connection settings only, a password
/// never (it would sit in the twin), and a broker only on a host `allow_brokers` names.
fn check_cloud(limits: &RemoteConfig, section: &Value, p: &mut Vec<String>) {
    let Some(fields) = section.as_object() else {
        p.push("cloud: must be an object of fields".into());
        return;
    };
    for (field, value) in fields {
        match field.as_str() {
            "password" => p.push(
                "cloud.password: a password never travels in a twin; name a password_file on the gateway"
                    .into(),
            ),
            "broker" => match value.as_str().map(crate::config::parse_broker) {
                Some(Ok(b)) if host_allowed(&b.host, &limits.allow_brokers) => {}
                Some(Ok(b)) => p.push(format!(
                    "cloud.broker: host {} is not allowed for the broker (remote_config.allow_brokers)",
                    b.host
                )),
                Some(Err(e)) => p.push(format!("cloud.broker: {e}")),
                None => p.push("cloud.broker: must be a URL".into()),
            },
            f if LIVE_FIELDS.contains(&f) => {}
            f => p.push(format!(
                "cloud.{f}: cannot be changed remotely (only {})",
                LIVE_FIELDS
                    .iter()
                    .filter(|f| **f != "password")
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
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
    section!("cloud", cloud);
    // The password serializes hidden; it only ever comes from the file.
    merged.cloud.password = file.cloud.password.clone();
    if !p.is_empty() {
        return Err(p);
    }
    merged.validate().map_err(|e| e.problems)?;
    Ok(merged)
}

/// The running `devices`, `profiles`, `serial_ports` and `cloud`, with device credentials
/// and the cloud password left out.
pub fn running_sections(config: &Config) -> Value {
    let mut v = serde_json::json!({
        "devices": config.devices,
        "profiles": config.profiles,
        "serial_ports": config.serial_ports,
        "cloud": config.cloud,
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
        assert!(p
            .iter()
            .any(|x| x.contains("cloud: this gateway does not let the cloud change it")));
        let off = RemoteConfig::default();
        assert!(check_limits(&off, &json!({}))[0].contains("off"));
    }

    #[test]
    fn the_cloud_section_takes_connection_settings_within_the_brokers_allowed() {
        let mut limits = base().remote_config;
        limits.sections.push("cloud".into());
        limits.allow_brokers = vec!["10.1.0.0/16".into()];
        let ok = json!({"cloud": {"broker": "mqtts://10.1.2.3:8883", "keep_alive_s": 30, "client_id": null}});
        assert!(check_limits(&limits, &ok).is_empty());
        let bad = json!({"cloud": {
            "broker": "mqtt://10.2.0.1", "password": "x", "profile": "thingsboard",
            "max_packet_bytes": 1_000_000,
        }});
        let p = check_limits(&limits, &bad);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p
            .iter()
            .any(|x| x.contains("cloud.broker: host 10.2.0.1 is not allowed")));
        assert!(p
            .iter()
            .any(|x| x.contains("cloud.password: a password never travels")));
        assert!(p
            .iter()
            .any(|x| x.starts_with("cloud.profile: cannot be changed remotely")));
        assert!(check_limits(&limits, &json!({"cloud": null}))[0].contains("must be an object"));
    }

    #[test]
    fn a_cloud_overlay_keeps_the_files_password() {
        let mut file = base();
        file.cloud.username = Some("gw".into());
        file.cloud.password = Some(crate::config::cloud::Secret::new("s3cret"));
        let merged = merge(&file, &json!({"cloud": {"broker": "mqtt://10.1.0.9:1884"}})).unwrap();
        assert_eq!(merged.cloud.broker, "mqtt://10.1.0.9:1884");
        assert_eq!(
            merged.cloud.password.as_ref().map(|p| p.expose()),
            Some("s3cret")
        );
        let running = running_sections(&merged);
        assert_eq!(running["cloud"]["broker"], "mqtt://10.1.0.9:1884");
        assert!(!running.to_string().contains("s3cret"));
    }

    #[tokio::test(start_paused = true)]
    async fn probation_holds_only_when_the_session_is_up_through_the_grace_period() {
        use std::time::Duration;
        use tokio::sync::{oneshot, watch};
        let grace = Duration::from_secs(10);
        // Up all along: held.
        let (_up, rx) = watch::channel(true);
        assert_eq!(
            watch_probation(rx, None, grace).await,
            Some(Probation::Held)
        );
        // Lost within the grace period: rolled back.
        let (tx, rx) = watch::channel(true);
        let lost = tokio::spawn(watch_probation(rx, None, grace));
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send_replace(false);
        assert_eq!(lost.await.unwrap(), Some(Probation::Lost));
        // Moved, and the new connection never comes up: rolled back at the end of the grace.
        let (tx, rx) = watch::channel(true);
        let (moved_tx, moved) = oneshot::channel();
        let never = tokio::spawn(watch_probation(rx, Some(moved), grace));
        tx.send_replace(false);
        moved_tx.send(()).unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(never.await.unwrap(), Some(Probation::Lost));
        assert!(
            started.elapsed() >= Duration::from_secs(9),
            "{:?}",
            started.elapsed()
        );
        // Moved, up again within the grace period and kept up: held.
        let (tx, rx) = watch::channel(true);
        let (moved_tx, moved) = oneshot::channel();
        let again = tokio::spawn(watch_probation(rx, Some(moved), grace));
        tx.send_replace(false);
        moved_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send_replace(true);
        assert_eq!(again.await.unwrap(), Some(Probation::Held));
        // The daemon stops (the session is gone) first: no verdict; it resumes at the start.
        let (tx, rx) = watch::channel(false);
        let stopped = tokio::spawn(watch_probation(rx, None, grace));
        drop(tx);
        assert_eq!(stopped.await.unwrap(), None);
    }

    #[test]
    fn an_overlay_on_probation_keeps_what_it_replaced_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut c = rusqlite::Connection::open(&path).unwrap();
        crate::store::migrate(&mut c).unwrap();
        let first = Overlay::new(1, json!({"devices": {}}), None);
        save(&c, &first).unwrap();
        confirm(&c, 1).unwrap();
        let kept = load(&c).unwrap().unwrap();
        assert!(kept.confirmed && kept.previous.is_none());
        let second = Overlay::new(2, json!({"cloud": {"broker": "mqtt://x"}}), Some(kept));
        save(&c, &second).unwrap();
        let on_probation = load(&c).unwrap().unwrap();
        assert!(!on_probation.confirmed);
        assert_eq!(on_probation.previous.as_ref().unwrap().version, 1);
        restore(&c, on_probation.previous.map(|p| *p)).unwrap();
        assert_eq!(load(&c).unwrap().unwrap().version, 1);
        let mut s = State::new(true, None);
        s.refused(2, vec!["no".into()]);
        save_state(&c, &s.0).unwrap();
        assert_eq!(load_state(&c).unwrap().unwrap().state, "refused");
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
/// allow is `refused`, with every problem), unless it is about a later version (one refused
/// or rolled back, which the overlay outlived).
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
    let current = state.0.version <= o.version;
    match merged {
        Ok(m) => {
            tracing::info!(
                version = o.version,
                probation = !o.confirmed,
                "running with the cloud's configuration over the file"
            );
            if current {
                state.applied(o.version, !o.confirmed);
            }
            m
        }
        Err(problems) => {
            for p in &problems {
                tracing::warn!(version = o.version, problem = %p, "the stored remote configuration is not applied");
            }
            if current {
                state.refused(o.version, problems);
            }
            file
        }
    }
}

/// What became of the last remote configuration, as the gateway reports it.
#[derive(Debug, Clone)]
pub struct State(pub gatewayd_protocol::RemoteConfigState);

impl State {
    /// The state kept in the store, or none yet.
    pub fn new(enabled: bool, kept: Option<gatewayd_protocol::RemoteConfigState>) -> State {
        let mut s = kept.unwrap_or_else(|| gatewayd_protocol::RemoteConfigState {
            enabled,
            version: 0,
            state: "none".into(),
            problems: Vec::new(),
            at_ms: 0,
            probation: false,
        });
        s.enabled = enabled;
        State(s)
    }

    pub fn applied(&mut self, version: u64, probation: bool) {
        self.set(version, "applied", Vec::new());
        self.0.probation = probation;
    }

    pub fn refused(&mut self, version: u64, problems: Vec<String>) {
        self.set(version, "refused", problems);
    }

    fn set(&mut self, version: u64, state: &str, problems: Vec<String>) {
        self.0.version = version;
        self.0.state = state.into();
        self.0.problems = problems;
        self.0.probation = false;
        self.0.at_ms = crate::clock::now_ms();
    }
}

/// How a remote configuration's probation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probation {
    /// The cloud session was up at the end of the grace period and not lost since it came up.
    Held,
    /// Never up within the grace period, or lost within it: roll back.
    Lost,
}

/// Watches the cloud session through a probation of `grace`. `moved`: the configuration moved
/// the session to other settings, so the connection it had is dropped on purpose; the new one
/// must come up within the grace period. `None` when the daemon stops first (the probation
/// resumes at the next start).
pub async fn watch_probation(
    mut connected: tokio::sync::watch::Receiver<bool>,
    moved: Option<tokio::sync::oneshot::Receiver<()>>,
    grace: std::time::Duration,
) -> Option<Probation> {
    let deadline = tokio::time::Instant::now() + grace;
    if let Some(moved) = moved {
        let _ = tokio::time::timeout_at(deadline, moved).await;
    }
    match tokio::time::timeout_at(deadline, connected.wait_for(|c| *c)).await {
        Err(_) => return Some(Probation::Lost),
        Ok(Err(_)) => return None,
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout_at(deadline, connected.wait_for(|c| !*c)).await {
        Err(_) => Some(Probation::Held),
        Ok(Ok(_)) => Some(Probation::Lost),
        Ok(Err(_)) => None,
    }
}

/// The daemon's side of remote configuration: takes desired configurations from the session,
/// checks, stores and applies them (through the live reload), keeps each on probation and
/// rolls it back when the cloud session does not hold after it, and keeps the report the
/// session publishes.
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
    /// Where the probation watchers report, with the version they watched.
    pub probations: tokio::sync::mpsc::UnboundedSender<(u64, Probation)>,
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
        self.keep_state().await;
        merged
    }

    /// At start: an overlay still on probation (the daemon stopped during it) gets a new one,
    /// from now.
    pub async fn resume_probation(&self) {
        if self.state.0.state == "applied" && self.state.0.probation {
            tracing::info!(
                version = self.state.0.version,
                grace_s = self.limits.rollback_grace_s,
                "the remote configuration is still on probation"
            );
            self.watch(self.state.0.version, None);
        }
    }

    fn watch(&self, version: u64, moved: Option<tokio::sync::oneshot::Receiver<()>>) {
        let grace = std::time::Duration::from_secs(self.limits.rollback_grace_s);
        let connected = self.connected.clone();
        let probations = self.probations.clone();
        tokio::spawn(async move {
            if let Some(p) = watch_probation(connected, moved, grace).await {
                let _ = probations.send((version, p));
            }
        });
    }

    async fn keep_state(&self) {
        let s = self.state.0.clone();
        if let Err(e) = self.store.call(move |c| save_state(c, &s)).await {
            tracing::warn!(error = %e, "cannot keep the remote configuration's state");
        }
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
    /// stored, acknowledged and applied live, on probation; the outcome of the reload when
    /// there was one.
    pub async fn desired(
        &mut self,
        d: crate::cloud::RemoteDesired,
        reloader: &mut crate::live::Reloader,
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
                self.keep_state().await;
                let _ = d.acked.send(true);
                return None;
            }
        };
        let previous = self.store.call(load).await.ok().flatten();
        let overlay = Overlay::new(version, d.desired.config.clone(), previous.clone());
        let stored = self.store.call(move |c| save(c, &overlay)).await;
        let _ = d.acked.send(stored.is_ok());
        if let Err(e) = stored {
            tracing::warn!(version, error = %e, "remote configuration not stored; the cloud sends it again");
            return None;
        }
        self.running_sections = Some(running_sections(&merged));
        reloader.moved = None;
        let outcome = reloader.apply(merged).await;
        match &outcome {
            crate::reload::Outcome::Failed(why) => {
                self.state.refused(version, vec![why.clone()]);
                let _ = self.store.call(move |c| restore(c, previous)).await;
            }
            _ => {
                tracing::info!(
                    version,
                    grace_s = self.limits.rollback_grace_s,
                    "remote configuration applied; rolled back unless the cloud session holds for the grace period"
                );
                self.state.applied(version, true);
                // A push must never lock a gateway out.
                self.watch(version, reloader.moved.take());
            }
        }
        self.keep_state().await;
        Some(outcome)
    }

    /// The probation of `version` ended: kept when the session held, rolled back (the overlay
    /// it replaced restored and applied) when not.
    pub async fn probation_ended(
        &mut self,
        version: u64,
        how: Probation,
        reloader: &mut crate::live::Reloader,
    ) -> Option<crate::reload::Outcome> {
        if self.state.0.version != version
            || self.state.0.state != "applied"
            || !self.state.0.probation
        {
            return None;
        }
        if how == Probation::Held {
            tracing::info!(version, "the cloud session held: remote configuration kept");
            if let Err(e) = self.store.call(move |c| confirm(c, version)).await {
                tracing::warn!(version, error = %e, "cannot end the probation; it resumes at the next start");
                return None;
            }
            self.state.0.probation = false;
            self.keep_state().await;
            return None;
        }
        tracing::warn!(
            version,
            grace_s = self.limits.rollback_grace_s,
            "the cloud session did not hold after a remote configuration: rolling it back"
        );
        let current = self.store.call(load).await.ok().flatten();
        let previous = current.and_then(|o| o.previous).map(|p| *p);
        if let Err(e) = self.store.call(move |c| restore(c, previous)).await {
            tracing::error!(error = %e, "cannot restore the previous remote configuration");
            return None;
        }
        self.state.set(
            version,
            "rolled_back",
            vec![format!(
                "the cloud session was not up for the {} s after it was applied (remote_config.rollback_grace_s)",
                self.limits.rollback_grace_s
            )],
        );
        let rolled_back = self.state.clone();
        let file = self.load_file().await.ok()?;
        let config = self.over_file(file).await;
        // `over_file` reports the restored overlay; the news is the roll-back.
        self.state = rolled_back;
        self.keep_state().await;
        reloader.moved = None;
        let outcome = reloader.apply(config).await;
        reloader.moved = None;
        Some(outcome)
    }

    /// Publishes (through the session) the report of the running configuration.
    pub fn report(&self, status: &crate::reload::Status) {
        let status = status.get();
        let report = gatewayd_protocol::ConfigReport {
            v: gatewayd_protocol::PROTOCOL_VERSION,
            fingerprint: status.fingerprint.clone(),
            last_reload: status.last_json(),
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
