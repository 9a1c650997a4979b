//! Who may use the embedded broker and the operator API: the stub's own MQTT identity,
//! per-gateway passwords, the topic ACL the broker applies, and the API's bearer token.
//!
//! Rules (the embedded broker, when secured by `--credentials` or `--mqtts-listen`):
//! - the stub's own client (client id = user name = its cloud user) may publish and subscribe
//!   anywhere, and must present the cloud password;
//! - any other client is a gateway whose client id is its gateway id: on the plain listener it
//!   logs in with user name = client id and the password of `--credentials`; on the TLS
//!   listener its certificate's common name must equal the client id (patched rumqttd);
//! - a gateway may publish only under `gw/{id}/up/` and subscribe only under `gw/{id}/down/`
//!   ([`GatewayAcl`]).
//!
//! Secrets are compared in constant time and never appear in `Debug` output, logs or errors.

use gatewayd_protocol::{GatewayAcl, GatewayId};
use rumqttd::{Acl, AclAction, AuthHandler};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A secret string, shown as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// A random secret of 32 hex digits.
    pub fn random() -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        Secret(format!(
            "{:016x}{:016x}",
            rng.random::<u64>(),
            rng.random::<u64>()
        ))
    }

    /// Reads a secret from a file; one trailing newline is ignored, an empty secret refused.
    pub fn read_file(path: &Path) -> Result<Secret, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| SecurityError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.is_empty() {
            return Err(SecurityError::Invalid {
                path: path.to_path_buf(),
                reason: "the file is empty".into(),
            });
        }
        Ok(Secret(text.to_string()))
    }

    /// The secret itself, for the protocol only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret, in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a security file could not be used. Never quotes a file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    /// The file could not be read.
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    /// The file was read but is not what it must be.
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// Per-gateway MQTT passwords, from a TOML file:
///
/// ```toml
/// [gateways.site-1]
/// password = "..."
/// ```
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    gateways: HashMap<String, Secret>,
}

impl Credentials {
    /// Reads and checks a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| SecurityError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| SecurityError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses the file's text. Errors give the line, never the parser's message (it may
    /// quote a password).
    pub fn parse(text: &str) -> Result<Credentials, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            gateways: HashMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            password: String,
        }
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            format!(
                "not a credentials file{}; expected [gateways.<id>] sections with password = \"...\"",
                line.map(|l| format!(" (line {l})")).unwrap_or_default()
            )
        })?;
        let mut gateways = HashMap::new();
        for (id, entry) in file.gateways {
            if let Err(e) = GatewayId::new(id.as_str()) {
                return Err(format!("gateways.{id}: gateway {e}"));
            }
            if entry.password.is_empty() {
                return Err(format!("gateways.{id}.password: must not be empty"));
            }
            gateways.insert(id, Secret(entry.password));
        }
        Ok(Credentials { gateways })
    }

    /// Whether `gateway` exists and `password` is its password.
    pub fn check(&self, gateway: &str, password: &str) -> bool {
        self.gateways
            .get(gateway)
            .is_some_and(|secret| secret.matches(password))
    }

    /// How many gateways have a password.
    pub fn len(&self) -> usize {
        self.gateways.len()
    }

    /// Whether the file named no gateway.
    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }
}

/// What the embedded broker enforces when it is secured.
#[derive(Debug, Clone)]
pub struct BrokerSecurity {
    /// The stub's own client id (= user name).
    pub cloud_user: String,
    /// The password the stub's own client presents.
    pub cloud_password: Secret,
    /// Gateways that may log in with a password on the plain listener; without it, gateways
    /// can only connect with a client certificate on the TLS listener.
    pub gateways: Option<Credentials>,
}

impl BrokerSecurity {
    /// The topic ACL: the cloud may do anything, a gateway only in its own namespace, any
    /// other client nothing.
    pub fn acl(&self) -> Acl {
        let cloud = self.cloud_user.clone();
        Acl(Arc::new(
            move |client_id: &str, action: AclAction, topic: &str| {
                allowed(&cloud, client_id, action, topic)
            },
        ))
    }

    /// The login check of the plain listener: the cloud user with the cloud password, or a
    /// gateway whose user name equals its client id, with its password.
    pub fn login_check(&self) -> AuthHandler {
        let security = self.clone();
        Arc::new(move |client_id: String, user: String, password: String| {
            if client_id == security.cloud_user {
                return user == security.cloud_user && security.cloud_password.matches(&password);
            }
            user == client_id
                && security
                    .gateways
                    .as_ref()
                    .is_some_and(|g| g.check(&user, &password))
        })
    }
}

/// The ACL rule; see [`BrokerSecurity::acl`].
pub fn allowed(cloud_user: &str, client_id: &str, action: AclAction, topic: &str) -> bool {
    if client_id == cloud_user {
        return true;
    }
    let Ok(gateway) = GatewayId::new(client_id) else {
        return false;
    };
    match action {
        AclAction::Publish => GatewayAcl::may_publish(&gateway, topic),
        AclAction::Subscribe => GatewayAcl::may_subscribe(&gateway, topic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_and_hide() {
        let s = Secret::new("hunter2");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter"));
        assert!(!s.matches("hunter22"));
        assert!(!s.matches(""));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_ne!(Secret::random(), Secret::random());
    }

    #[test]
    fn credentials_parse_and_check() {
        let c = Credentials::parse(
            "[gateways.site-1]\npassword = \"one\"\n[gateways.site-2]\npassword = \"two\"\n",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert!(c.check("site-1", "one"));
        assert!(!c.check("site-1", "two"));
        assert!(!c.check("site-3", "one"));
    }

    #[test]
    fn credential_errors_never_quote_a_password() {
        for bad in [
            "[gateways.site-1]\npassword = 12345678\n",
            "[gateways.site-1]\npassword = \"s3cret\nx",
            "[gateways.site-1]\npasswd = \"s3cret\"\n",
        ] {
            let e = Credentials::parse(bad).unwrap_err();
            assert!(!e.contains("12345678") && !e.contains("s3cret"), "{e}");
            assert!(e.contains("line"), "{e}");
        }
        let e = Credentials::parse("[gateways.\"a/b\"]\npassword = \"x\"\n").unwrap_err();
        assert!(e.starts_with("gateways.a/b:"), "{e}");
    }

    #[test]
    fn the_acl_gives_the_cloud_everything_and_a_gateway_its_namespace() {
        let ok = |client, action, topic| allowed("cloud-stub", client, action, topic);
        assert!(ok("cloud-stub", AclAction::Subscribe, "gw/+/up/#"));
        assert!(ok(
            "cloud-stub",
            AclAction::Publish,
            "gw/site-2/down/rpc/req"
        ));
        assert!(ok("site-1", AclAction::Publish, "gw/site-1/up/state"));
        assert!(ok("site-1", AclAction::Subscribe, "gw/site-1/down/#"));
        assert!(!ok("site-1", AclAction::Publish, "gw/site-2/up/state"));
        assert!(!ok("site-1", AclAction::Subscribe, "gw/site-2/down/#"));
        assert!(!ok("site-1", AclAction::Subscribe, "gw/+/up/#"));
        assert!(!ok("site-1", AclAction::Publish, "gw/site-1/down/rpc/req"));
        assert!(!ok("not a gateway", AclAction::Publish, "gw/x/up/state"));
    }

    #[test]
    fn logins_bind_the_client_id_to_the_user() {
        let security = BrokerSecurity {
            cloud_user: "cloud-stub".into(),
            cloud_password: Secret::new("cloud-pw"),
            gateways: Some(Credentials::parse("[gateways.site-1]\npassword = \"pw1\"\n").unwrap()),
        };
        let check = security.login_check();
        let login = |c: &str, u: &str, p: &str| check(c.into(), u.into(), p.into());
        assert!(login("cloud-stub", "cloud-stub", "cloud-pw"));
        assert!(!login("cloud-stub", "cloud-stub", "pw1"));
        assert!(!login("cloud-stub", "site-1", "pw1"));
        assert!(login("site-1", "site-1", "pw1"));
        assert!(!login("site-2", "site-1", "pw1"));
        assert!(!login("site-1", "site-1", "wrong"));
    }
}
