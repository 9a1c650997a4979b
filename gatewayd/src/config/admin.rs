//! The `[admin]` section: the local HTTP listener for health, readiness, metrics and read-only
//! views (`admin.rs` serves it).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The local admin HTTP API. It has no authentication: keep it on loopback or a management
/// network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API (`/healthz`, `/readyz`, `/metrics`, `/api/...`).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Listen address, `ip:port`. Port 0 picks a free port (tests); the bound address is
    /// logged and, with `address_file`, written to a file.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A file gatewayd writes the bound address to (e.g. `127.0.0.1:9100` and a newline) once
    /// it listens, for tools and tests that use port 0. Replaced at every start.
    #[serde(default)]
    pub address_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            listen: default_listen(),
            address_file: None,
        }
    }
}

fn default_enabled() -> bool {
    true
}

fn default_listen() -> String {
    "127.0.0.1:9100".into()
}

impl AdminConfig {
    /// The listen address (validated by [`AdminConfig::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse::<SocketAddr>().map_err(|_| {
            format!(
                "'{}' is not an ip:port address (e.g. 127.0.0.1:9100)",
                self.listen
            )
        })
    }

    /// Adds one line per problem to `p`.
    pub fn validate(&self, p: &mut Vec<String>) {
        if let Err(e) = self.listen_addr() {
            p.push(format!("admin.listen: {e}"));
        }
        if let Some(f) = &self.address_file {
            if f.as_os_str().is_empty() || f.file_name().is_none() {
                p.push(format!(
                    "admin.address_file: '{}' names no file",
                    f.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks() {
        let a = AdminConfig::default();
        assert!(a.enabled);
        assert_eq!(a.listen_addr().unwrap().to_string(), "127.0.0.1:9100");
        let mut p = Vec::new();
        a.validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
        let bad = AdminConfig {
            enabled: true,
            listen: "localhost".into(),
            address_file: Some(PathBuf::from("/")),
        };
        bad.validate(&mut p);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("admin.listen: 'localhost' is not an ip:port address"));
        assert!(p[1].starts_with("admin.address_file:"));
    }
}
