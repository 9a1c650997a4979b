//! The `[cloud]` section: broker URL, MQTT identity, TLS files and credentials, and their
//! checks. Secrets (the password) never appear in `Debug` output, in serialized configuration
//! or in an error message; problems name the field and the file, never what a file holds.
//!
//! The files named here are read at start: once by validation (so `check-config` proves they
//! exist and parse) and again by the session when it builds the MQTT options ([`security`]).
//!
//! [`security`]: CloudConfig::security

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The cloud (MQTT) connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Broker URL: `mqtt://host[:port]` (plain TCP, port 1883 by default) or
    /// `mqtts://host[:port]` (TLS, port 8883 by default). Credentials do not belong in the URL:
    /// use `username` and `password_file`.
    pub broker: String,
    /// MQTT client id; defaults to the gateway id. Must be stable: the broker keeps the
    /// persistent session under it. With a client certificate, brokers usually require it to
    /// equal the certificate's common name.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT keep-alive, seconds (5..=600).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// First reconnect delay, milliseconds; doubles (with jitter) up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// TCP connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: u64,
    /// Largest publish gatewayd sends, bytes (16 KiB to 4 MiB; default 128 KiB, what AWS IoT
    /// Core takes; Azure IoT Hub takes 256 KB). The catalog and device presence are split into
    /// parts that fit; an RPC result that would not fit is answered `payload_too_large`.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// `mqtts://` only: PEM file of the CA certificate(s) the broker's certificate must chain
    /// to, instead of the system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `mqtts://` only: PEM file of this gateway's client certificate (chain), for mutual TLS.
    /// Needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// `mqtts://` only: PEM file of the client certificate's private key (PKCS#8, PKCS#1 or
    /// SEC1). Keep it readable by the service user only.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// MQTT user name.
    #[serde(default)]
    pub username: Option<String>,
    /// MQTT password. Prefer `password_file`, so the secret need not sit in this file; the
    /// `GATEWAYD_CLOUD__PASSWORD` environment variable also works. Needs `username`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the MQTT password (one trailing newline is ignored); wins over
    /// `password`. Read at start. Needs `username`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The cloud's wire protocol: `native` (gatewayd's own, what `cloud-stub` speaks) or
    /// `thingsboard` (ThingsBoard's gateway MQTT API; see `docs/thingsboard.md`).
    #[serde(default)]
    pub profile: CloudProfile,
    /// Settings of the `thingsboard` profile.
    #[serde(default)]
    pub thingsboard: ThingsBoardConfig,
}

/// The `[cloud]` fields a running session can move to (a reload or a remote configuration
/// drops the connection and connects with the new ones). The others (`profile`,
/// `thingsboard`, `max_packet_bytes`, and `password`, which never travels in a twin) wait for
/// a restart.
pub const LIVE_FIELDS: [&str; 12] = [
    "broker",
    "client_id",
    "keep_alive_s",
    "reconnect_min_ms",
    "reconnect_max_ms",
    "connect_timeout_s",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "username",
    "password",
    "password_file",
];

impl CloudConfig {
    /// The fields that differ from `other` and cannot change while the session runs.
    pub fn restart_fields(&self, other: &CloudConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.profile != other.profile {
            out.push("profile");
        }
        if self.max_packet_bytes != other.max_packet_bytes {
            out.push("max_packet_bytes");
        }
        if self.thingsboard != other.thingsboard {
            out.push("thingsboard");
        }
        out
    }

    /// This section with the fields [`restart_fields`](Self::restart_fields) names taken from
    /// `running`: what can run before the next restart.
    pub fn keeping_restart_fields_of(mut self, running: &CloudConfig) -> CloudConfig {
        self.profile = running.profile;
        self.max_packet_bytes = running.max_packet_bytes;
        self.thingsboard = running.thingsboard.clone();
        self
    }
}

/// Which cloud adapter maps twins, messages, RPC and presence onto the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudProfile {
    #[default]
    Native,
    Thingsboard,
}

/// `[cloud.thingsboard]`: the ThingsBoard gateway API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingsBoardConfig {
    /// A file holding the gateway device's access token (one trailing newline is ignored);
    /// sent as the MQTT user name. Instead of `cloud.username`, so the token need not sit in
    /// this file.
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
    /// Device type announced with `v1/gateway/connect` (ThingsBoard's device profile) for a
    /// device that names no `profile`; a device naming one announces the profile's name.
    #[serde(default = "default_tb_type")]
    pub device_type: String,
    /// Time to live, seconds, of a command (persistent RPC) that carries no `expirationTime`:
    /// after it the command is never executed. At most 3 days (how long the gateway remembers
    /// finished commands to recognise a redelivery).
    #[serde(default = "default_tb_ttl")]
    pub command_ttl_s: u64,
    /// Also send values read by `reported_poll` (and every reported twin value) as telemetry
    /// on `v1/gateway/telemetry`, so ThingsBoard keeps their history.
    #[serde(default)]
    pub telemetry: bool,
}

impl Default for ThingsBoardConfig {
    fn default() -> Self {
        ThingsBoardConfig {
            access_token_file: None,
            device_type: default_tb_type(),
            command_ttl_s: default_tb_ttl(),
            telemetry: false,
        }
    }
}

fn default_tb_type() -> String {
    "default".into()
}
fn default_tb_ttl() -> u64 {
    24 * 3600
}

fn default_keep_alive() -> u64 {
    10
}
fn default_reconnect_min() -> u64 {
    200
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_max_packet() -> usize {
    gatewayd_protocol::limits::DEFAULT_MAX_PUBLISH
}

fn default_connect_timeout() -> u64 {
    5
}

/// A secret string: shown as `***` by `Debug` and serialization, readable only through
/// [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; hand it to the protocol, never to a log or an error.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// A string; numbers and booleans are taken as their text, because an environment
    /// override such as `GATEWAYD_CLOUD__PASSWORD=1234` arrives parsed as a number.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or IP address (also the name the broker's certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (port 1883) or `mqtts://host[:port]` (port 8883). A URL with
/// credentials (`user:pass@`) is refused without being echoed.
pub fn parse_broker(url: &str) -> Result<Broker, String> {
    if url.contains('@') {
        return Err(
            "must not carry credentials (use cloud.username and cloud.password_file)".into(),
        );
    }
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false, 1883)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else {
        return Err(format!("'{url}' must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port number"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("'{url}' names no host"));
    }
    Ok(Broker {
        host: host.to_string(),
        port,
        tls,
    })
}

/// What the session needs beyond host and port, read from the files the section names.
#[derive(Clone, Default)]
pub struct CloudSecurity {
    /// User name and password for the MQTT CONNECT.
    pub login: Option<(String, Secret)>,
    /// TLS client configuration (`mqtts://`).
    pub tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for CloudSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudSecurity")
            .field("username", &self.login.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl CloudConfig {
    /// Checks every field of the section, reading the files it names; problems are pushed
    /// as `cloud.<field>: ...`.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(16 * 1024..=gatewayd_protocol::limits::MAX_MQTT_PACKET)
            .contains(&self.max_packet_bytes)
        {
            p.push(format!(
                "cloud.max_packet_bytes: must be between 16384 and {}",
                gatewayd_protocol::limits::MAX_MQTT_PACKET
            ));
        }
        let tls = match parse_broker(&self.broker) {
            Ok(b) => Some(b.tls),
            Err(e) => {
                p.push(format!("cloud.broker: {e}"));
                None
            }
        };
        if !(60..=3 * 24 * 3600).contains(&self.thingsboard.command_ttl_s) {
            p.push(
                "cloud.thingsboard.command_ttl_s: must be between 60 and 259200 (3 days)".into(),
            );
        }
        if self.thingsboard.device_type.is_empty() {
            p.push("cloud.thingsboard.device_type: must not be empty".into());
        }
        if !(5..=600).contains(&self.keep_alive_s) {
            p.push("cloud.keep_alive_s: must be between 5 and 600".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            p.push(
                "cloud.reconnect_min_ms: must be at least 1 and at most cloud.reconnect_max_ms"
                    .into(),
            );
        }
        // With an unparsable broker URL, TLS files are still checked as if TLS were meant.
        if let Err(mut problems) = self.load_security(tls.unwrap_or(true)) {
            p.append(&mut problems);
        }
    }

    /// Reads the password file and the TLS files and builds the TLS client configuration.
    /// Every problem is reported, each naming its field.
    pub fn security(&self) -> Result<CloudSecurity, Vec<String>> {
        let broker = parse_broker(&self.broker).map_err(|e| vec![format!("cloud.broker: {e}")])?;
        self.load_security(broker.tls)
    }

    fn load_security(&self, tls: bool) -> Result<CloudSecurity, Vec<String>> {
        let mut p = Vec::new();
        let login = self.login(&mut p);
        let tls = if tls {
            self.tls_config(&mut p)
        } else {
            for (field, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("client_cert_file", self.client_cert_file.is_some()),
                ("client_key_file", self.client_key_file.is_some()),
            ] {
                if set {
                    p.push(format!("cloud.{field}: needs an mqtts:// broker"));
                }
            }
            None
        };
        if p.is_empty() {
            Ok(CloudSecurity { login, tls })
        } else {
            Err(p)
        }
    }

    fn login(&self, p: &mut Vec<String>) -> Option<(String, Secret)> {
        let password = match &self.password_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    if text.is_empty() {
                        p.push(format!("cloud.password_file: {} is empty", path.display()));
                    }
                    Some(Secret::new(text))
                }
                Err(e) => {
                    p.push(format!(
                        "cloud.password_file: cannot read {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
            None => self.password.clone(),
        };
        let token = self
            .thingsboard
            .access_token_file
            .as_ref()
            .and_then(|path| match std::fs::read_to_string(path) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if text.is_empty() {
                        p.push(format!(
                            "cloud.thingsboard.access_token_file: {} is empty",
                            path.display()
                        ));
                    }
                    Some(text)
                }
                Err(e) => {
                    p.push(format!(
                        "cloud.thingsboard.access_token_file: cannot read {}: {e}",
                        path.display()
                    ));
                    None
                }
            });
        if let Some(token) = token {
            if self.username.is_some() {
                p.push("cloud.thingsboard.access_token_file: set together with cloud.username; use one".into());
            }
            return Some((token, password.unwrap_or(Secret::new(""))));
        }
        match &self.username {
            Some(u) if u.is_empty() => {
                p.push("cloud.username: must not be empty".into());
                None
            }
            Some(u) => Some((u.clone(), password.unwrap_or(Secret::new("")))),
            None => {
                if self.password_file.is_some() {
                    p.push("cloud.password_file: set without cloud.username".into());
                } else if self.password.is_some() {
                    p.push("cloud.password: set without cloud.username".into());
                }
                None
            }
        }
    }

    fn tls_config(&self, p: &mut Vec<String>) -> Option<Arc<ClientConfig>> {
        let before = p.len();
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in read_certs("cloud.ca_file", path, p) {
                    if let Err(e) = roots.add(cert) {
                        p.push(format!(
                            "cloud.ca_file: {} holds a certificate that cannot be a trust anchor: {e}",
                            path.display()
                        ));
                    }
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    p.push(
                        "cloud.ca_file: not set, and the system trust store holds no usable CA certificate"
                            .into(),
                    );
                }
            }
        }
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let certs = read_certs("cloud.client_cert_file", cert, p);
                let key = read_key(key, p);
                key.map(|k| (certs, k))
            }
            (Some(_), None) => {
                p.push("cloud.client_cert_file: set without cloud.client_key_file".into());
                None
            }
            (None, Some(_)) => {
                p.push("cloud.client_key_file: set without cloud.client_cert_file".into());
                None
            }
            (None, None) => None,
        };
        if p.len() > before {
            return None;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = match ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b.with_root_certificates(roots),
            Err(e) => {
                p.push(format!("cloud.broker: cannot set up TLS: {e}"));
                return None;
            }
        };
        let config = match client {
            Some((certs, key)) => match builder.with_client_auth_cert(certs, key) {
                Ok(c) => c,
                Err(e) => {
                    p.push(format!(
                        "cloud.client_key_file: does not fit cloud.client_cert_file: {e}"
                    ));
                    return None;
                }
            },
            None => builder.with_no_client_auth(),
        };
        Some(Arc::new(config))
    }
}

/// The certificates of a PEM file; problems name `field` and the path.
fn read_certs(field: &str, path: &Path, p: &mut Vec<String>) -> Vec<CertificateDer<'static>> {
    if let Err(e) = std::fs::metadata(path) {
        p.push(format!("{field}: cannot read {}: {e}", path.display()));
        return Vec::new();
    }
    let certs = match CertificateDer::pem_file_iter(path) {
        Ok(iter) => iter.collect::<Result<Vec<_>, _>>(),
        Err(e) => Err(e),
    };
    match certs {
        Ok(certs) if certs.is_empty() => {
            p.push(format!(
                "{field}: {} holds no PEM certificate",
                path.display()
            ));
            Vec::new()
        }
        Ok(certs) => certs,
        Err(e) => {
            p.push(format!(
                "{field}: {} is not a PEM certificate file: {e}",
                path.display()
            ));
            Vec::new()
        }
    }
}

/// The private key of a PEM file. The parser's own message is left out: it may quote a line
/// of the file.
fn read_key(path: &Path, p: &mut Vec<String>) -> Option<PrivateKeyDer<'static>> {
    if let Err(e) = std::fs::metadata(path) {
        p.push(format!(
            "cloud.client_key_file: cannot read {}: {e}",
            path.display()
        ));
        return None;
    }
    match PrivateKeyDer::from_pem_file(path) {
        Ok(key) => Some(key),
        Err(rustls::pki_types::pem::Error::Io(e)) => {
            p.push(format!(
                "cloud.client_key_file: cannot read {}: {e}",
                path.display()
            ));
            None
        }
        Err(_) => {
            p.push(format!(
                "cloud.client_key_file: {} holds no PEM private key",
                path.display()
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(extra: &str) -> CloudConfig {
        use figment::providers::{Format, Toml};
        let text = format!("broker = \"mqtts://127.0.0.1\"\n{extra}");
        figment::Figment::from(Toml::string(&text))
            .extract()
            .unwrap()
    }

    #[test]
    fn broker_urls() {
        let b = parse_broker("mqtt://h:1").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("h", 1, false));
        assert_eq!(parse_broker("mqtt://h").unwrap().port, 1883);
        let b = parse_broker("mqtts://broker.example").unwrap();
        assert_eq!((b.port, b.tls), (8883, true));
        assert_eq!(parse_broker("mqtts://h:9/").unwrap().port, 9);
        assert!(parse_broker("mqtt://:1").is_err());
        assert!(parse_broker("tcp://h").is_err());
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echo() {
        let e = parse_broker("mqtt://gw:hunter2@h:1883").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn secrets_never_show() {
        let c = section("username = \"u\"\npassword = \"hunter2\"");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
        let s = c.security().unwrap();
        assert_eq!(s.login.as_ref().unwrap().1.expose(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_changed_password_is_a_changed_section() {
        // A live reload compares sections to decide whether to reconnect; the password must
        // count although it never shows.
        let old = section("username = \"u\"\npassword = \"old\"");
        let new = section("username = \"u\"\npassword = \"new\"");
        assert_eq!(
            serde_json::to_value(&old).unwrap(),
            serde_json::to_value(&new).unwrap()
        );
        assert_ne!(old, new);
        assert_eq!(old, old.clone());
    }

    #[test]
    fn password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "from-file\n").unwrap();
        let c = section(&format!(
            "username = \"u\"\npassword = \"inline\"\npassword_file = \"{}\"",
            path.display()
        ));
        let (u, pw) = c.security().unwrap().login.unwrap();
        assert_eq!((u.as_str(), pw.expose()), ("u", "from-file"));
    }

    #[test]
    fn every_file_problem_is_reported_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        let c = section(&format!(
            "ca_file = \"{0}\"\nclient_cert_file = \"{1}/missing.pem\"\npassword_file = \"{1}/nope\"",
            junk.display(),
            dir.path().display()
        ));
        let mut p = Vec::new();
        c.validate(&mut p);
        let all = p.join("\n");
        assert!(
            all.contains("cloud.ca_file:") && all.contains("junk.pem"),
            "{all}"
        );
        assert!(
            all.contains("cloud.client_cert_file: set without cloud.client_key_file"),
            "{all}"
        );
        assert!(all.contains("cloud.password_file: cannot read"), "{all}");
        assert!(
            all.contains("cloud.password_file: set without cloud.username"),
            "{all}"
        );
    }

    #[test]
    fn tls_files_need_mqtts() {
        let mut c = section("ca_file = \"/x.pem\"");
        c.broker = "mqtt://h".into();
        let mut p = Vec::new();
        c.validate(&mut p);
        assert_eq!(p, vec!["cloud.ca_file: needs an mqtts:// broker"]);
    }
}
