//! SIGHUP: re-read and check the configuration file while the daemon keeps running on the one it
//! started with. gatewayd cannot swap devices, mappings or the cloud session live, so a changed
//! file is reported (with the sections that differ) and applied at the next restart; an invalid
//! one is reported problem by problem. Either way nothing running is touched.
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

/// What a re-read of the configuration found.
#[derive(Debug)]
pub enum Verdict {
    /// The file is invalid; the running configuration stays.
    Invalid(ConfigError),
    /// Valid and identical to the running configuration.
    Unchanged,
    /// Valid and different in these sections; applied at the next restart.
    Changed(Vec<String>),
}

/// Compares a freshly loaded configuration (or its errors) with the running one.
pub fn judge(running: &Fingerprint, loaded: Result<Config, ConfigError>) -> Verdict {
    match loaded {
        Err(e) => Verdict::Invalid(e),
        Ok(c) => {
            let changes = running.changes(&Fingerprint::of(&c));
            if changes.is_empty() {
                Verdict::Unchanged
            } else {
                Verdict::Changed(changes)
            }
        }
    }
}

/// Logs a verdict the way an operator reads it after `systemctl reload gatewayd`.
pub fn log(verdict: &Verdict, path: &std::path::Path) {
    match verdict {
        Verdict::Invalid(e) => {
            for problem in &e.problems {
                tracing::error!(config = %path.display(), problem = %problem, "configuration problem");
            }
            tracing::error!(
                config = %path.display(),
                problems = e.problems.len(),
                "configuration invalid; still running on the configuration gatewayd started with"
            );
        }
        Verdict::Unchanged => {
            tracing::info!(config = %path.display(), "configuration unchanged; nothing to do")
        }
        Verdict::Changed(sections) => tracing::warn!(
            config = %path.display(),
            changed = %sections.join(", "),
            "configuration changed; restart gatewayd to apply it (live reload of devices is not supported)"
        ),
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
        assert!(matches!(judge(&running, load(BASE)), Verdict::Unchanged));
    }

    #[test]
    fn changes_name_the_section_or_entry() {
        let running = Fingerprint::of(&load(BASE).unwrap());
        let edited = BASE.replace("/m", "/n").replace("127.0.0.1:1883", "10.0.0.1:1883")
            + "\n[devices.c]\nkind = \"http\"\nbase_url = \"http://127.0.0.1:3\"\n[rpc]\nshutdown_grace_ms = 1\n";
        match judge(&running, load(&edited)) {
            Verdict::Changed(c) => assert_eq!(c, ["cloud", "devices.a", "devices.c", "rpc"]),
            other => panic!("{other:?}"),
        }
        let removed = BASE.replace("[devices.b]", "[devices.z]");
        match judge(&running, load(&removed)) {
            Verdict::Changed(c) => assert_eq!(c, ["devices.b", "devices.z"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_file_keeps_every_problem() {
        let running = Fingerprint::of(&load(BASE).unwrap());
        let bad = BASE
            .replace("site-1", "site 1")
            .replace("mqtt://", "tcp://");
        match judge(&running, load(&bad)) {
            Verdict::Invalid(e) => assert_eq!(e.problems.len(), 2, "{:?}", e.problems),
            other => panic!("{other:?}"),
        }
    }
}
