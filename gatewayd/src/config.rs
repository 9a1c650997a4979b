//! Configuration: documented structs loaded by figment from a TOML file plus `GATEWAYD_`
//! environment overrides (`__` separates levels, e.g. `GATEWAYD_CLOUD__BROKER`), and a
//! validation pass that reports every problem at once with the path of the bad field.

pub mod action;
pub mod admin;
pub mod cloud;
pub mod http;
pub mod modbus;
pub mod serial;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use gatewayd_protocol::ids::validate_id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use action::validate_actions;
pub use action::{ActionConfig, HttpVerb, ResultMode};
pub use admin::AdminConfig;
pub use cloud::{
    parse_broker, Broker, CloudConfig, CloudProfile, CloudSecurity, Secret, ThingsBoardConfig,
};
pub use modbus::ProbeRegister;
pub use serial::{FieldType, SerialPortConfig};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's identity.
    pub gateway: GatewayConfig,
    /// The cloud connection.
    pub cloud: CloudConfig,
    /// The local SQLite store.
    #[serde(default)]
    pub store: StoreConfig,
    /// RPC handling.
    #[serde(default)]
    pub rpc: RpcConfig,
    /// Cloud-to-device messages.
    #[serde(default)]
    pub messages: MessagesConfig,
    /// The local admin HTTP API: health, readiness, metrics, read-only views.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Reusable action sets by name, for many devices of one model: a device names one with
    /// `profile` instead of repeating its methods, twin properties and commands.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Devices behind this gateway, by device id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceConfig>,
    /// Serial ports (buses) by name; serial devices name theirs with `port`.
    #[serde(default)]
    pub serial_ports: BTreeMap<String, SerialPortConfig>,
    /// Configuration from the cloud (the gateway's own twin), within local limits.
    #[serde(default)]
    pub remote_config: RemoteConfig,
}

/// `[remote_config]`: whether the cloud may add to this file, and the limits it can never
/// change. The file stays the root of trust: what the cloud sends is an overlay kept in the
/// store, merged over the file's sections at every start and reload, and dropped locally with
/// `gatewayd config drop-remote`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Off unless set.
    #[serde(default)]
    pub enabled: bool,
    /// Sections the cloud may change: any of `devices`, `profiles`, `serial_ports`, `cloud`
    /// (its connection settings only; see `cloud::REMOTE_FIELDS`). Off for `cloud` unless
    /// named: a cloud that can move the gateway to another broker is trusted with it.
    #[serde(default = "default_remote_sections")]
    pub sections: Vec<String>,
    /// Hosts an HTTP device's `base_url` may name when it comes from the cloud: host names
    /// (exact) or IP networks (`10.0.0.0/24`). Empty: no remote HTTP device.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Serial device paths a remote serial port may open. Empty: none.
    #[serde(default)]
    pub allow_serial_ports: Vec<String>,
    /// With `cloud` in `sections`: hosts the broker may be moved to, host names (exact) or IP
    /// networks. Empty: the cloud may change the connection's other settings, not the broker.
    #[serde(default)]
    pub allow_brokers: Vec<String>,
    /// Largest desired configuration taken, bytes of JSON.
    #[serde(default = "default_remote_max_bytes")]
    pub max_bytes: usize,
    /// A remote configuration is rolled back if the cloud session is lost within this many
    /// seconds of applying it.
    #[serde(default = "default_rollback_grace")]
    pub rollback_grace_s: u64,
}

fn default_remote_sections() -> Vec<String> {
    vec!["devices".into(), "profiles".into()]
}
fn default_remote_max_bytes() -> usize {
    64 * 1024
}
fn default_rollback_grace() -> u64 {
    60
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            enabled: false,
            sections: default_remote_sections(),
            allow_hosts: Vec::new(),
            allow_serial_ports: Vec::new(),
            allow_brokers: Vec::new(),
            max_bytes: default_remote_max_bytes(),
            rollback_grace_s: default_rollback_grace(),
        }
    }
}

/// Sections a remote configuration may name.
pub const REMOTE_SECTIONS: [&str; 4] = ["devices", "profiles", "serial_ports", "cloud"];

/// This gateway's identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id, unique in the cloud; becomes the topic prefix `gw/{id}/`. Letters, digits,
    /// `-`, `_`, `.`; at most 64 characters.
    pub id: String,
}

/// The local SQLite store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Path of the SQLite database file; created if missing.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: default_store_path(),
        }
    }
}

/// RPC handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    /// Default limit of calls in flight per device (a device may override it); excess calls
    /// wait for a slot within their deadline.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_per_device: usize,
    /// At shutdown, how long in-flight RPCs may take to finish, milliseconds.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            max_in_flight_per_device: default_in_flight(),
            shutdown_grace_ms: default_grace(),
        }
    }
}

/// Logging. `RUST_LOG`, when set, wins over `level`; `--log-format json` picks JSON lines.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: a level (`info`, `debug`, ...) or per-module directives such as
    /// `info,gatewayd::inbox=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Cloud-to-device message handling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesConfig {
    /// Messages held in the inbox (received, not yet final) at most, over all devices. When
    /// full, a new message is not stored and gets `failed` feedback ("gateway inbox full"): the
    /// cloud sees it at once, nothing is dropped silently.
    #[serde(default = "default_max_inbox")]
    pub max_inbox: usize,
    /// First retry delay after a device could not be reached, milliseconds; doubles up to
    /// `retry_max_ms`. Retries stop at the message's expiry.
    #[serde(default = "default_retry_min")]
    pub retry_min_ms: u64,
    /// Longest retry delay, milliseconds.
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// Field of the message payload that names the command, e.g. `{"command": "RESTART"}`.
    #[serde(default = "default_command_field")]
    pub command_field: String,
    /// A message is started only while at least this much of its TTL is left, milliseconds;
    /// closer to its expiry it ends `expired` unexecuted. A started command runs with its full
    /// configured timeout (never cut to the TTL), so a slow command is not reported failed
    /// after the device ran it.
    #[serde(default = "default_min_remaining")]
    pub min_remaining_ms: u64,
}

fn default_min_remaining() -> u64 {
    500
}

impl Default for MessagesConfig {
    fn default() -> Self {
        Self {
            max_inbox: default_max_inbox(),
            retry_min_ms: default_retry_min(),
            retry_max_ms: default_retry_max(),
            command_field: default_command_field(),
            min_remaining_ms: default_min_remaining(),
        }
    }
}

fn default_max_inbox() -> usize {
    10_000
}
fn default_retry_min() -> u64 {
    500
}
fn default_retry_max() -> u64 {
    30_000
}
fn default_command_field() -> String {
    "command".into()
}

/// Methods, twin properties and commands shared by every device that names this profile. A
/// device may add its own entries; on a name clash the device's entry wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// The kind of device these actions are written for; devices using the profile must match.
    pub kind: DeviceKind,
    /// RPC methods by name.
    #[serde(default)]
    pub methods: BTreeMap<String, ActionConfig>,
    /// Desired twin properties by name.
    #[serde(default)]
    pub twin: BTreeMap<String, ActionConfig>,
    /// Message commands by name.
    #[serde(default)]
    pub commands: BTreeMap<String, ActionConfig>,
}

/// Polling of reported properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// A method of the device, called without params.
    pub method: String,
    /// Time between polls, milliseconds (at least 1000).
    pub interval_ms: u64,
    /// A JSON pointer into the result selecting the object to report, e.g. `/config`.
    #[serde(default)]
    pub pointer: Option<String>,
}

/// One device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// How the device is reached: `http`, `serial`, `modbus_rtu` or `modbus_tcp`.
    pub kind: DeviceKind,
    /// Base URL of the device's local API, e.g. `http://192.168.10.21:8080`. Every call goes
    /// to a path under it; the cloud cannot name any other host or port.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Default timeout of one device call, milliseconds (a method may override it). The
    /// effective timeout is never longer than the caller's deadline. For a serial device it
    /// includes the wait for the bus.
    #[serde(default = "default_device_timeout")]
    pub timeout_ms: u64,
    /// Calls in flight at most; defaults to `rpc.max_in_flight_per_device`.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Authentication sent with every call.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Headers sent with every call.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Health probe.
    #[serde(default)]
    pub health: HealthConfig,
    /// A profile from `[profiles]` whose methods, twin properties and commands this device
    /// has (its own entries are added, and win on a name clash).
    #[serde(default)]
    pub profile: Option<String>,
    /// RPC methods by name.
    #[serde(default)]
    pub methods: BTreeMap<String, ActionConfig>,
    /// Desired twin properties by name: the call that applies one. `{{value}}` is the desired
    /// value; the call's result (e.g. via `result_pointer`) is what the device now holds and
    /// becomes the reported value (a `null` or empty-object result, e.g. a bare `OK`, reports
    /// the desired value as applied).
    #[serde(default)]
    pub twin: BTreeMap<String, ActionConfig>,
    /// Message commands by name (the payload's `command` field): the call that executes one.
    /// The other payload fields fill the templates as declared `params`; `{{message_id}}` is
    /// the message id (send it as `X-Message-Id` to let the device de-duplicate too).
    #[serde(default)]
    pub commands: BTreeMap<String, ActionConfig>,
    /// Optional polling of reported properties: a method called on an interval whose result
    /// object (or the object at `pointer`) is merged into the reported half when it changed.
    #[serde(default)]
    pub reported_poll: Option<PollConfig>,
    /// Serial and modbus_rtu devices: the name of their port in `[serial_ports]`.
    /// modbus_tcp devices: the TCP port (default 502).
    #[serde(default, deserialize_with = "modbus::name_or_number")]
    pub port: Option<String>,
    /// modbus_tcp devices: the host name or IP address of the Modbus TCP server (a device,
    /// or a converter in front of an RTU bus). Devices naming the same host and port share
    /// one connection.
    #[serde(default)]
    pub host: Option<String>,
    /// Modbus devices: the unit id (slave address), 1 to 247 on an RTU bus; on TCP 0 to 255,
    /// default 1 (many TCP devices ignore it; a converter routes by it).
    #[serde(default)]
    pub unit_id: Option<u8>,
    /// modbus_tcp devices: `mbap` (Modbus TCP, default) or `rtu` (RTU frames with their CRC
    /// over TCP, for converters that forward them as they are). Every device of one host and
    /// port uses the same.
    #[serde(default)]
    pub framing: Option<crate::device::modbus::tcp::Framing>,
    /// Serial devices: the bus address, `{{address}}` in request templates (RS-485 units
    /// sharing a port are told apart by it).
    #[serde(default)]
    pub address: Option<String>,
    /// Serial devices: whether the device sends back every request before answering; overrides
    /// its port's `echo`.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Serial devices: regexes of lines that never answer a request (unsolicited status lines),
    /// added to its port's `ignore`.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Serial devices: regexes of lines saying the device is busy and did not act, added to
    /// its port's `busy`.
    #[serde(default)]
    pub busy: Vec<String>,
    /// HTTP statuses meaning "busy, did not act" (an action may override it): a message is
    /// retried with backoff until its TTL (honouring `Retry-After`), a twin property stays
    /// `pending` and is retried, an RPC gets `device_busy` at once.
    #[serde(default = "default_transient_status")]
    pub transient_status: Vec<u16>,
    /// Largest device answer read, bytes (body; headers are bounded by the HTTP client at
    /// about 400 KiB). Reading stops at the limit and the call is a `device_error` naming it.
    #[serde(default = "default_max_answer_bytes")]
    pub max_answer_bytes: usize,
    /// When the device comes back after being offline, apply its whole desired state again
    /// (a device that power-cycled to its defaults is brought back to what operators asked).
    #[serde(default = "yes")]
    pub reapply_on_reconnect: bool,
}

fn default_transient_status() -> Vec<u16> {
    vec![408, 429, 503]
}

fn default_max_answer_bytes() -> usize {
    gatewayd_protocol::limits::MAX_RPC_PAYLOAD
}

fn yes() -> bool {
    true
}

/// Kind of device link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A local REST API over HTTP.
    Http,
    /// An ASCII line protocol on a serial port.
    Serial,
    /// Modbus RTU on a serial port (an RS-485 bus shared by several units).
    ModbusRtu,
    /// Modbus TCP (a device, or a TCP-to-RTU converter with units behind it).
    ModbusTcp,
}

impl DeviceKind {
    /// Whether the device speaks Modbus.
    pub fn is_modbus(self) -> bool {
        matches!(self, DeviceKind::ModbusRtu | DeviceKind::ModbusTcp)
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Http => "http",
            DeviceKind::Serial => "serial",
            DeviceKind::ModbusRtu => "modbus_rtu",
            DeviceKind::ModbusTcp => "modbus_tcp",
        })
    }
}

/// Authentication for an HTTP device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AuthConfig {
    /// HTTP basic authentication.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        token: String,
    },
}

/// Health probe of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Path probed with `GET`; any HTTP answer counts as alive, no answer (refused, reset,
    /// timeout) as a failure. Without a path, only call outcomes decide presence.
    #[serde(default)]
    pub path: Option<String>,
    /// Modbus devices: a register (or coil) read as the probe, e.g.
    /// `{ table = "holding_register", address = 0 }`; any reply, an exception too, counts as
    /// alive, no reply (timeout, bad CRC, port or connection down) as a failure. Without it,
    /// call outcomes and the port or connection decide presence.
    #[serde(default)]
    pub register: Option<ProbeRegister>,
    /// Time between probes, milliseconds.
    #[serde(default = "default_probe_interval")]
    pub interval_ms: u64,
    /// Timeout of one probe, milliseconds.
    #[serde(default = "default_probe_timeout")]
    pub timeout_ms: u64,
    /// Consecutive failed probes before the device counts as offline.
    #[serde(default = "default_failures")]
    pub failures_before_offline: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: None,
            register: None,
            interval_ms: default_probe_interval(),
            timeout_ms: default_probe_timeout(),
            failures_before_offline: default_failures(),
        }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/gatewayd/gatewayd.db")
}
fn default_in_flight() -> usize {
    4
}
fn default_grace() -> u64 {
    10_000
}
fn default_device_timeout() -> u64 {
    5_000
}
fn default_probe_interval() -> u64 {
    10_000
}
fn default_probe_timeout() -> u64 {
    2_000
}
fn default_failures() -> u32 {
    2
}
/// Why the configuration could not be loaded; every problem is listed with its path.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigError {
    /// One line per problem: `path: what is wrong`.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads `path` (TOML) with `GATEWAYD_` environment overrides from `env`, then validates.
    pub fn load(path: &Path, env: Env) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError {
                problems: vec![format!("{}: no such file", path.display())],
            });
        }
        let figment = Figment::new().merge(Toml::file(path)).merge(env);
        let config: Config = figment.extract().map_err(|e| ConfigError {
            problems: e
                .into_iter()
                .map(|e| {
                    let path = e.path.join(".");
                    let kind = e.kind.to_string();
                    if path.is_empty() {
                        kind
                    } else {
                        format!("{path}: {kind}")
                    }
                })
                .collect(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The environment provider used by the binary: `GATEWAYD_` prefix, `__` between levels.
    pub fn env() -> Env {
        Env::prefixed("GATEWAYD_").split("__")
    }

    /// Semantic checks that serde cannot express; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if let Err(e) = validate_id(&self.gateway.id) {
            p.push(format!("gateway.id: {e}"));
        }
        self.cloud.validate(&mut p);
        self.admin.validate(&mut p);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!(
                "log.level: '{}' is not a log filter: {e}",
                self.log.level
            ));
        }
        if self.rpc.max_in_flight_per_device == 0 {
            p.push("rpc.max_in_flight_per_device: must be at least 1".into());
        }
        for (name, port) in &self.serial_ports {
            let at = format!("serial_ports.{name}");
            if let Err(e) = validate_id(name) {
                p.push(format!("{at}: port name {e}"));
            }
            port.validate(&at, &mut p);
        }
        for (name, profile) in &self.profiles {
            let at = format!("profiles.{name}");
            validate_actions(
                profile.kind,
                [&profile.methods, &profile.twin, &profile.commands],
                &profile.methods,
                &at,
                &mut p,
            );
        }
        for (id, dev) in &self.devices {
            let at = format!("devices.{id}");
            if let Err(e) = validate_id(id) {
                p.push(format!("{at}: device id {e}"));
            }
            let profile = match &dev.profile {
                None => None,
                Some(name) => match self.profiles.get(name) {
                    None => {
                        p.push(format!("{at}.profile: no profile named '{name}'"));
                        None
                    }
                    Some(pr) if pr.kind != dev.kind => {
                        p.push(format!(
                            "{at}.profile: profile '{name}' is for {} devices, this one is {}",
                            pr.kind, dev.kind
                        ));
                        None
                    }
                    Some(pr) => Some(pr),
                },
            };
            dev.validate(&at, profile, &mut p);
            if self.cloud.profile == CloudProfile::Thingsboard {
                // ThingsBoard sends methods and commands alike as RPCs: the name decides.
                let named = |f: fn(&ProfileConfig) -> &BTreeMap<String, ActionConfig>,
                             own: &BTreeMap<String, ActionConfig>| {
                    let mut names: Vec<String> = profile
                        .map(|pr| f(pr).keys().cloned().collect())
                        .unwrap_or_default();
                    names.extend(own.keys().cloned());
                    names
                };
                let methods = named(|pr| &pr.methods, &dev.methods);
                for command in named(|pr| &pr.commands, &dev.commands) {
                    if methods.contains(&command) {
                        p.push(format!(
                            "{at}: '{command}' is both a method and a command; with cloud.profile = \"thingsboard\" every RPC arrives the same way and the name decides, so a name must be one or the other"
                        ));
                    }
                }
            }
            if dev.kind == DeviceKind::Serial {
                serial::check_device(dev, &self.serial_ports, &at, &mut p);
            }
            if dev.kind.is_modbus() {
                modbus::check_device(dev, &self.serial_ports, &at, &mut p);
            }
        }
        modbus::check_buses(&self.devices, &mut p);
        for section in &self.remote_config.sections {
            if !REMOTE_SECTIONS.contains(&section.as_str()) {
                p.push(format!(
                    "remote_config.sections: '{section}' cannot be changed remotely; choose from {}",
                    REMOTE_SECTIONS.join(", ")
                ));
            }
        }
        for (field, hosts) in [
            ("allow_hosts", &self.remote_config.allow_hosts),
            ("allow_brokers", &self.remote_config.allow_brokers),
        ] {
            for host in hosts {
                if host.is_empty() {
                    p.push(format!("remote_config.{field}: an empty entry"));
                } else if host.contains('/') && crate::remote::parse_net(host).is_none() {
                    p.push(format!(
                        "remote_config.{field}: '{host}' is not an IP network (address/prefix)"
                    ));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

impl DeviceConfig {
    fn validate(&self, at: &str, profile: Option<&ProfileConfig>, p: &mut Vec<String>) {
        match self.kind {
            DeviceKind::Http => match &self.base_url {
                None => p.push(format!("{at}.base_url: required for an http device")),
                Some(url) => {
                    if let Err(e) = check_base_url(url) {
                        p.push(format!("{at}.base_url: {e}"));
                    }
                }
            },
            // Port and address: checked against `serial_ports` by `Config::validate`.
            DeviceKind::Serial | DeviceKind::ModbusRtu | DeviceKind::ModbusTcp => {}
        }
        if !self.kind.is_modbus() {
            if self.health.register.is_some() {
                p.push(format!("{at}.health.register: only for modbus devices"));
            }
            if self.framing.is_some() {
                p.push(format!("{at}.framing: only for modbus_tcp devices"));
            }
            if self.host.is_some() {
                p.push(format!("{at}.host: only for modbus_tcp devices"));
            }
            if self.unit_id.is_some() {
                p.push(format!("{at}.unit_id: only for modbus devices"));
            }
        }
        if self.kind == DeviceKind::Http && self.port.is_some() {
            p.push(format!("{at}.port: only for serial and modbus devices"));
        }
        if self.timeout_ms == 0 {
            p.push(format!("{at}.timeout_ms: must be at least 1"));
        }
        if self.max_answer_bytes < 1024 || self.max_answer_bytes > 16 * 1024 * 1024 {
            p.push(format!(
                "{at}.max_answer_bytes: must be between 1024 and 16777216"
            ));
        }
        if self.max_in_flight == Some(0) {
            p.push(format!("{at}.max_in_flight: must be at least 1"));
        }
        if let Some(path) = &self.health.path {
            if !path.starts_with('/') {
                p.push(format!("{at}.health.path: must start with '/'"));
            }
        }
        if self.health.interval_ms < 50 {
            p.push(format!("{at}.health.interval_ms: must be at least 50"));
        }
        if self.health.failures_before_offline == 0 {
            p.push(format!(
                "{at}.health.failures_before_offline: must be at least 1"
            ));
        }
        let mut methods = profile.map(|p| p.methods.clone()).unwrap_or_default();
        methods.extend(self.methods.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(poll) = &self.reported_poll {
            if !methods.contains_key(&poll.method) {
                p.push(format!(
                    "{at}.reported_poll.method: names no method of this device ('{}')",
                    poll.method
                ));
            }
            if poll.interval_ms < 1000 {
                p.push(format!(
                    "{at}.reported_poll.interval_ms: must be at least 1000"
                ));
            }
        }
        validate_actions(
            self.kind,
            [&self.methods, &self.twin, &self.commands],
            &methods,
            at,
            p,
        );
    }
}

fn check_base_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(format!("'{url}' must be http:// or https://"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("'{url}' must not carry a query or fragment"));
    }
    Ok(())
}

#[cfg(test)]
impl Config {
    /// Loads `text` as a configuration file, with no environment overrides (unit tests).
    pub(crate) fn from_text(text: &str) -> Result<Config, ConfigError> {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("temp file written");
        Config::load(f.path(), Env::prefixed("GATEWAYD_TEST_NEVER_SET_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    const GOOD: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [devices.agv-1]
        kind = "http"
        base_url = "http://127.0.0.1:8081"
        [devices.agv-1.methods.move]
        verb = "POST"
        path = "/api/move"
        body = { x = "{{x}}", y = "{{y}}" }
        params = { x = { type = "number" }, y = { type = "number" } }
    "#;

    #[test]
    fn good_config_loads() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.devices["agv-1"].methods["move"].verb, HttpVerb::Post);
        assert_eq!(c.rpc.max_in_flight_per_device, 4);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = GOOD
            .replace("site-1", "site/1")
            .replace("mqtt://127.0.0.1:1883", "tcp://x")
            .replace("{{y}}", "{{z}}");
        let err = load(&bad).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("gateway.id: id contains '/'"), "{all}");
        assert!(
            all.contains("cloud.broker: 'tcp://x' must start with mqtt://"),
            "{all}"
        );
        assert!(
            all.contains(
                "devices.agv-1.methods.move.body: placeholder '{{z}}' names no declared param"
            ),
            "{all}"
        );
        assert_eq!(err.problems.len(), 3, "{all}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let err = load(&GOOD.replace("kind = \"http\"", "kind = \"http\"\nbase_ulr = \"x\""))
            .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("devices.agv-1"), "{all}");
        assert!(all.contains("base_ulr"), "{all}");
    }

    #[test]
    fn profiles_are_checked_and_must_fit_the_device() {
        let text = r#"
            [gateway]
            id = "site-1"
            [cloud]
            broker = "mqtt://127.0.0.1:1883"
            [profiles.scale]
            kind = "http"
            [profiles.scale.methods.weight]
            path = "/api/{{unit}}"
            [devices.s1]
            kind = "http"
            base_url = "http://127.0.0.1:1"
            profile = "scale"
            [devices.s2]
            kind = "http"
            base_url = "http://127.0.0.1:2"
            profile = "nope"
        "#;
        let all = load(text).unwrap_err().problems.join("\n");
        assert!(
            all.contains("profiles.scale.methods.weight.path: placeholder '{{unit}}' names no declared param"),
            "{all}"
        );
        assert!(
            all.contains("devices.s2.profile: no profile named 'nope'"),
            "{all}"
        );
        let ok = load(
            &text
                .replace("/api/{{unit}}", "/api/weight")
                .replace("\"nope\"", "\"scale\""),
        )
        .unwrap();
        assert_eq!(ok.profiles["scale"].methods.len(), 1);
    }

    #[test]
    fn thingsboard_refuses_a_name_that_is_both_method_and_command() {
        let text = r#"
            [gateway]
            id = "site-1"
            [cloud]
            broker = "mqtt://127.0.0.1:1883"
            profile = "thingsboard"
            [profiles.pump]
            kind = "http"
            [profiles.pump.methods.start]
            verb = "POST"
            path = "/start"
            [devices.p1]
            kind = "http"
            base_url = "http://127.0.0.1:1"
            profile = "pump"
            [devices.p1.commands.start]
            verb = "POST"
            path = "/start"
        "#;
        let all = load(text).unwrap_err().problems.join("\n");
        assert!(
            all.contains("devices.p1: 'start' is both a method and a command"),
            "{all}"
        );
        // The native protocol keeps methods and commands apart on the wire: allowed there.
        load(&text.replace("profile = \"thingsboard\"\n", "")).unwrap();
    }

    #[test]
    fn thingsboard_access_token_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "A1_TEST_TOKEN\n").unwrap();
        let text = format!(
            "[gateway]\nid = \"g\"\n[cloud]\nbroker = \"mqtt://127.0.0.1:1883\"\nprofile = \"thingsboard\"\n[cloud.thingsboard]\naccess_token_file = \"{}\"\n",
            token.display()
        );
        let config = load(&text).unwrap();
        let login = config.cloud.security().unwrap().login.unwrap();
        assert_eq!(login.0, "A1_TEST_TOKEN");
        let missing = text.replace("token\"", "absent\"");
        let all = load(&missing).unwrap_err().problems.join("\n");
        assert!(
            all.contains("cloud.thingsboard.access_token_file: cannot read"),
            "{all}"
        );
    }

    #[test]
    fn misspelt_param_fields_are_refused() {
        let err = load(&GOOD.replace(
            "y = { type = \"number\" }",
            "y = { type = \"number\", requred = false }",
        ))
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("requred"), "{all}");
    }

    #[test]
    fn missing_file_is_reported() {
        let err = Config::load(Path::new("/nonexistent/gatewayd.toml"), Config::env()).unwrap_err();
        assert_eq!(
            err.problems,
            vec!["/nonexistent/gatewayd.toml: no such file"]
        );
    }
}
