//! SIGHUP (`systemctl reload`): re-read the configuration file and apply what changed while the
//! daemon runs (`live.rs`): devices, profiles and serial ports change live; the other sections
//! (gateway identity, cloud, store, admin, log, rpc, messages) are named and wait for a restart.
//! An invalid file changes nothing and is reported problem by problem.
//!
//! To tell what changed without keeping a second copy of a configuration that may describe
//! thousands of devices, the daemon keeps a [`Fingerprint`]: one hash per section (per entry for
//! `devices`, `profiles` and `serial_ports`), taken from the loaded configuration (environment
//! overrides included) before the daemon consumes it.

use crate::config::{Config, ConfigError};
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// Sections whose entries are fingerprinted one by one, so a change names the entry.
const KEYED: [&str; 3] = ["devices", "profiles", "serial_ports"];

/// One hash per configuration section or keyed entry (`cloud`, `devices.agv-1`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    parts: BTreeMap<String, u64>,
}

impl Fingerprint {
    /// Fingerprints `config`. Values are hashed, never kept or logged (they include secrets).
    pub fn of(config: &Config) -> Fingerprint {
        let mut parts = BTreeMap::new();
        let value = serde_json::to_value(config).unwrap_or_default();
        if let serde_json::Value::Object(sections) = value {
            for (name, section) in sections {
                match (KEYED.contains(&name.as_str()), section) {
                    (true, serde_json::Value::Object(entries)) => {
                        for (key, entry) in entries {
                            parts.insert(format!("{name}.{key}"), hash(&entry));
                        }
                    }
                    (_, section) => {
                        parts.insert(name, hash(&section));
                    }
                }
            }
        }
        Fingerprint { parts }
    }

    /// The running fingerprint after a live reload: `newer`'s entries under the `live`
    /// prefixes, this one's everywhere else (those sections were not applied).
    pub fn with_live(&self, newer: &Fingerprint, live: &[&str]) -> Fingerprint {
        let is_live = |k: &String| live.iter().any(|p| k.starts_with(p));
        let mut parts: BTreeMap<String, u64> = self
            .parts
            .iter()
            .filter(|(k, _)| !is_live(k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        parts.extend(
            newer
                .parts
                .iter()
                .filter(|(k, _)| is_live(k))
                .map(|(k, v)| (k.clone(), *v)),
        );
        Fingerprint { parts }
    }

    /// Whether `entry` (a section or `section.key`) is in the configuration.
    pub fn has(&self, entry: &str) -> bool {
        self.parts.contains_key(entry)
    }

    /// One short hex digest of the whole configuration, to compare gateways and reloads.
    pub fn digest(&self) -> String {
        let mut h = DefaultHasher::new();
        self.parts.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// The sections or entries that differ from `newer` (added, removed or changed), in order.
    pub fn changes(&self, newer: &Fingerprint) -> Vec<String> {
        let mut out: Vec<String> = self
            .parts
            .iter()
            .filter(|(k, v)| newer.parts.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        out.extend(
            newer
                .parts
                .keys()
                .filter(|k| !self.parts.contains_key(*k))
                .cloned(),
        );
        out.sort();
        out
    }
}

fn hash(v: &serde_json::Value) -> u64 {
    // `DefaultHasher::new()` uses fixed keys: stable within one process, which is all we need.
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// A re-read configuration handed to the running daemon, and where its outcome goes.
pub struct Request {
    pub loaded: Result<Config, ConfigError>,
    pub reply: tokio::sync::oneshot::Sender<Outcome>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The file is invalid; nothing changed.
    Invalid(Vec<String>),
    /// Valid and identical to the running configuration.
    Unchanged,
    /// Applied live; `restart_needed` names the sections that differ but wait for a restart.
    Applied {
        added: Vec<String>,
        removed: Vec<String>,
        replaced: Vec<String>,
        restart_needed: Vec<String>,
    },
    /// Valid, but the new devices could not be built; nothing changed.
    Failed(String),
}

impl Outcome {
    /// `invalid`, `unchanged`, `applied`, `applied_partly` (some sections wait for a
    /// restart) or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Invalid(_) => "invalid",
            Outcome::Unchanged => "unchanged",
            Outcome::Applied { restart_needed, .. } if restart_needed.is_empty() => "applied",
            Outcome::Applied { .. } => "applied_partly",
            Outcome::Failed(_) => "failed",
        }
    }

    /// Whether the file was taken (in full or in part).
    pub fn ok(&self) -> bool {
        matches!(self, Outcome::Unchanged | Outcome::Applied { .. })
    }

    /// Logs the outcome the way an operator reads it after `systemctl reload gatewayd`.
    pub fn log(&self, path: &std::path::Path) {
        match self {
            Outcome::Invalid(problems) => {
                for problem in problems {
                    tracing::error!(config = %path.display(), problem = %problem, "configuration problem");
                }
                tracing::error!(
                    config = %path.display(),
                    problems = problems.len(),
                    "configuration invalid; nothing changed"
                );
            }
            Outcome::Unchanged => {
                tracing::info!(config = %path.display(), "configuration unchanged; nothing to do")
            }
            Outcome::Applied {
                added,
                removed,
                replaced,
                restart_needed,
            } => {
                tracing::info!(
                    config = %path.display(),
                    added = %added.join(", "),
                    removed = %removed.join(", "),
                    replaced = %replaced.join(", "),
                    "configuration applied without a restart"
                );
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        config = %path.display(),
                        sections = %restart_needed.join(", "),
                        "these sections changed but cannot change live; restart gatewayd to apply them"
                    );
                }
            }
            Outcome::Failed(why) => tracing::error!(
                config = %path.display(),
                error = %why,
                "configuration not applied; nothing changed"
            ),
        }
    }

    /// The outcome as the admin API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"outcome": self.kind()});
        match self {
            Outcome::Invalid(problems) => v["problems"] = serde_json::json!(problems),
            Outcome::Applied {
                added,
                removed,
                replaced,
                restart_needed,
            } => {
                v["added"] = serde_json::json!(added);
                v["removed"] = serde_json::json!(removed);
                v["replaced"] = serde_json::json!(replaced);
                v["restart_needed"] = serde_json::json!(restart_needed);
            }
            Outcome::Failed(why) => v["error"] = serde_json::json!(why),
            Outcome::Unchanged => {}
        }
        v
    }
}

/// The running configuration's digest and the last reload, for the admin API and metrics.
#[derive(Debug, Default)]
pub struct Status {
    inner: std::sync::Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
pub struct StatusInner {
    pub fingerprint: String,
    /// Unix ms and outcome of the last reload, if any.
    pub last: Option<(u64, Outcome)>,
}

impl Status {
    pub fn new(fingerprint: &Fingerprint) -> Status {
        Status {
            inner: std::sync::Mutex::new(StatusInner {
                fingerprint: fingerprint.digest(),
                last: None,
            }),
        }
    }

    pub fn record(&self, fingerprint: &Fingerprint, outcome: Outcome, at_ms: u64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.fingerprint = fingerprint.digest();
        s.last = Some((at_ms, outcome));
    }

    pub fn get(&self) -> StatusInner {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl StatusInner {
    /// The last reload as the admin API and the gateway's report show it (`null`: none yet).
    pub fn last_json(&self) -> serde_json::Value {
        match &self.last {
            Some((at_ms, outcome)) => {
                let mut v = outcome.to_json();
                v["at_ms"] = serde_json::json!(at_ms);
                v
            }
            None => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [devices.a]
        kind = "http"
        base_url = "http://127.0.0.1:1"
        [devices.a.methods.m]
        path = "/m"
        [devices.b]
        kind = "http"
        base_url = "http://127.0.0.1:2"
    "#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    #[test]
    fn same_file_is_unchanged() {
        let running = Fingerprint::of(&load(BASE).unwrap());
        assert!(running
            .changes(&Fingerprint::of(&load(BASE).unwrap()))
            .is_empty());
    }

    #[test]
    fn changes_name_the_section_or_entry() {
        let running = Fingerprint::of(&load(BASE).unwrap());
        let edited = BASE.replace("/m", "/n").replace("127.0.0.1:1883", "10.0.0.1:1883")
            + "\n[devices.c]\nkind = \"http\"\nbase_url = \"http://127.0.0.1:3\"\n[rpc]\nshutdown_grace_ms = 1\n";
        let newer = Fingerprint::of(&load(&edited).unwrap());
        assert_eq!(
            running.changes(&newer),
            ["cloud", "devices.a", "devices.c", "rpc"]
        );
        let removed = BASE.replace("[devices.b]", "[devices.z]");
        assert_eq!(
            running.changes(&Fingerprint::of(&load(&removed).unwrap())),
            ["devices.b", "devices.z"]
        );
        // After a live reload only the live entries follow the new file.
        let after = running.with_live(&newer, &["devices.", "profiles.", "serial_ports."]);
        assert_eq!(after.changes(&newer), ["cloud", "rpc"]);
        assert_ne!(after.digest(), running.digest());
    }

    #[test]
    fn an_invalid_file_keeps_every_problem() {
        let bad = BASE
            .replace("site-1", "site 1")
            .replace("mqtt://", "tcp://");
        let e = load(&bad).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{:?}", e.problems);
    }
}
