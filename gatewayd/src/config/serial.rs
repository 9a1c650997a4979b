//! Serial configuration: the ports (`[serial_ports.<name>]`, one bus each, shared by every
//! device that names it) and the checks of serial devices and of the serial half of an action
//! (request template, response and error patterns, capture types).

use super::{ActionConfig, DeviceConfig, DeviceKind};
use crate::device::serial::frame::Pattern;
use crate::template::Template;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One serial port: an RS-232 line or an RS-485 bus. One task owns it and serves requests one
/// at a time, in arrival order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    /// Device path, e.g. `/dev/ttyUSB0`; prefer a stable `/dev/serial/by-id/...` link.
    pub path: String,
    /// Line speed, bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Data bits per character, 5 to 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// Parity: `none`, `odd` or `even`.
    #[serde(default)]
    pub parity: Parity,
    /// Stop bits: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Flow control: `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Appended to every request.
    #[serde(default = "default_terminator")]
    pub request_terminator: String,
    /// Ends every answer line.
    #[serde(default = "default_terminator")]
    pub response_terminator: String,
    /// Longest answer line, bytes before the terminator; a longer one fails its request with
    /// `device_error` "frame longer than N bytes".
    #[serde(default = "default_max_frame_len")]
    pub max_frame_len: usize,
    /// Quiet time between the end of one exchange and the next request, milliseconds.
    #[serde(default)]
    pub inter_request_gap_ms: u64,
    /// How long a device may take to answer once a request is written, milliseconds (a
    /// method's `timeout_ms` overrides it); never longer than the caller's deadline.
    #[serde(default = "default_response_timeout")]
    pub timeout_ms: u64,
}

/// Parity bit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

/// Flow control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// Declared type of a response capture; undeclared captures are strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A JSON number (float).
    Number,
    /// A JSON integer.
    Integer,
    /// The captured text.
    String,
    /// `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no` (any case).
    Bool,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_terminator() -> String {
    "\r\n".into()
}
fn default_max_frame_len() -> usize {
    256
}
fn default_response_timeout() -> u64 {
    1000
}

impl SerialPortConfig {
    /// Checks one port at `at` (`serial_ports.<name>`).
    pub fn validate(&self, at: &str, p: &mut Vec<String>) {
        if self.path.trim().is_empty() {
            p.push(format!("{at}.path: must name a device, e.g. /dev/ttyUSB0"));
        }
        if self.baud == 0 {
            p.push(format!("{at}.baud: must be at least 1"));
        }
        if !(5..=8).contains(&self.data_bits) {
            p.push(format!("{at}.data_bits: must be 5, 6, 7 or 8"));
        }
        if !(1..=2).contains(&self.stop_bits) {
            p.push(format!("{at}.stop_bits: must be 1 or 2"));
        }
        for (field, t) in [
            ("request_terminator", &self.request_terminator),
            ("response_terminator", &self.response_terminator),
        ] {
            if t.is_empty() || t.len() > 8 {
                p.push(format!("{at}.{field}: must be 1 to 8 bytes"));
            }
        }
        if !(1..=65_536).contains(&self.max_frame_len) {
            p.push(format!("{at}.max_frame_len: must be between 1 and 65536"));
        }
        if self.inter_request_gap_ms > 60_000 {
            p.push(format!("{at}.inter_request_gap_ms: must be at most 60000"));
        }
        if self.timeout_ms == 0 {
            p.push(format!("{at}.timeout_ms: must be at least 1"));
        }
    }
}

/// Checks what only a serial device has (its port and address) and that it sets nothing that
/// only an http device understands.
pub(super) fn check_device(
    dev: &DeviceConfig,
    ports: &BTreeMap<String, SerialPortConfig>,
    at: &str,
    p: &mut Vec<String>,
) {
    match &dev.port {
        None => p.push(format!("{at}.port: required for a serial device")),
        Some(port) if !ports.contains_key(port) => {
            p.push(format!("{at}.port: no [serial_ports.{port}] is configured"))
        }
        Some(_) => {}
    }
    if let Some(a) = &dev.address {
        if a.is_empty() || a.chars().any(char::is_control) {
            p.push(format!(
                "{at}.address: must be non-empty, without control characters"
            ));
        }
    }
    let http_only = [
        ("base_url", dev.base_url.is_some()),
        ("auth", dev.auth.is_some()),
        ("headers", !dev.headers.is_empty()),
        ("health.path", dev.health.path.is_some()),
    ];
    for (field, set) in http_only {
        if set {
            p.push(format!("{at}.{field}: only for http devices"));
        }
    }
}

/// Checks the serial half of an action: the request template (which may also use
/// `{{address}}`), the patterns, and that every declared field is a capture.
pub(super) fn check_action(a: &ActionConfig, at: &str, builtins: &[&str], p: &mut Vec<String>) {
    if let Some(request) = &a.request {
        match Template::parse(request) {
            Ok(t) => {
                for var in t.vars() {
                    let known = var == "address"
                        || var == "params"
                        || builtins.contains(&var)
                        || a.params.contains_key(var);
                    if !known {
                        p.push(format!(
                            "{at}.request: placeholder '{{{{{var}}}}}' names no declared param"
                        ));
                    }
                }
            }
            Err(e) => p.push(format!("{at}.request: {e}")),
        }
        if a.params.contains_key("address") {
            p.push(format!(
                "{at}.params.address: 'address' is the device's bus address in serial requests; use another name"
            ));
        }
    }
    let response = a
        .response
        .as_deref()
        .map(|r| Pattern::parse(r).map_err(|e| p.push(format!("{at}.response: {e}"))));
    match response {
        Some(Ok(pattern)) => {
            let names: Vec<&str> = pattern.names().collect();
            for field in a.fields.keys() {
                if !names.contains(&field.as_str()) {
                    p.push(format!(
                        "{at}.fields.{field}: the response pattern has no capture (?P<{field}>...)"
                    ));
                }
            }
        }
        Some(Err(())) => {}
        None if !a.fields.is_empty() => {
            p.push(format!("{at}.fields: needs a response pattern"));
        }
        None => {}
    }
    for (i, e) in a.errors.iter().enumerate() {
        if let Err(e) = Pattern::parse(e) {
            p.push(format!("{at}.errors[{i}]: {e}"));
        }
    }
}

/// Checks that an action fits the kind of its device: `path` (and the HTTP-only fields) for
/// http, `request` (and the answer patterns) for serial.
pub(super) fn check_kind(a: &ActionConfig, kind: DeviceKind, at: &str, p: &mut Vec<String>) {
    let serial_only = [
        ("request", a.request.is_some()),
        ("response", a.response.is_some()),
        ("fields", !a.fields.is_empty()),
        ("errors", !a.errors.is_empty()),
    ];
    let http_only = [
        ("path", a.path.is_some()),
        ("query", !a.query.is_empty()),
        ("headers", !a.headers.is_empty()),
        ("body", a.body.is_some()),
        ("result_pointer", a.result_pointer.is_some()),
        ("ok_status", !a.ok_status.is_empty()),
    ];
    let (missing, foreign, other) = match kind {
        DeviceKind::Http => (
            a.path
                .is_none()
                .then_some("path: required for an http device"),
            &serial_only[..],
            "serial",
        ),
        DeviceKind::Serial => (
            a.request
                .is_none()
                .then_some("request: required for a serial device"),
            &http_only[..],
            "http",
        ),
    };
    if let Some(missing) = missing {
        p.push(format!("{at}.{missing}"));
    }
    for (field, set) in foreign {
        if *set {
            p.push(format!("{at}.{field}: only for {other} devices"));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, FieldType};

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    const GOOD: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [serial_ports.bus1]
        path = "/dev/ttyUSB0"
        baud = 19200
        parity = "even"
        [devices.tc-1]
        kind = "serial"
        port = "bus1"
        address = "01"
        [devices.tc-1.methods.temperature]
        request = "{{address}}TEMP?"
        response = 'TEMP (?P<temp>-?[0-9.]+)'
        fields = { temp = "number" }
        errors = ['ERR (?P<code>\d+) (?P<text>.*)']
        [devices.tc-1.methods.set_setpoint]
        request = "{{address}}SETP {{value}}"
        response = "OK"
        params = { value = { type = "number" } }
    "#;

    #[test]
    fn a_serial_device_loads_with_port_defaults() {
        let c = load(GOOD).unwrap();
        let port = &c.serial_ports["bus1"];
        assert_eq!((port.baud, port.data_bits, port.stop_bits), (19200, 8, 1));
        assert_eq!(port.request_terminator, "\r\n");
        assert_eq!((port.max_frame_len, port.timeout_ms), (256, 1000));
        let m = &c.devices["tc-1"].methods["temperature"];
        assert_eq!(m.fields["temp"], FieldType::Number);
        assert!(m.path.is_none());
    }

    #[test]
    fn bad_patterns_ports_and_fields_are_reported_with_their_path() {
        let bad = GOOD
            .replace("(?P<temp>-?[0-9.]+)", "(?P<temp-?[0-9.]+)")
            .replace(r"(?P<code>\d+)", r"(?P<code>\d+")
            .replace("port = \"bus1\"", "port = \"bus2\"")
            .replace("baud = 19200", "baud = 19200\ndata_bits = 9\nstop_bits = 3")
            .replace("SETP {{value}}", "SETP {{valeu}}")
            .replace(
                "response = \"OK\"",
                "response = \"OK\"\nfields = { ok = \"bool\" }",
            );
        let all = load(&bad).unwrap_err().problems.join("\n");
        for want in [
            "serial_ports.bus1.data_bits: must be 5, 6, 7 or 8",
            "serial_ports.bus1.stop_bits: must be 1 or 2",
            "devices.tc-1.port: no [serial_ports.bus2] is configured",
            "devices.tc-1.methods.temperature.response: 'TEMP (?P<temp-?[0-9.]+)' is not a valid regex: ",
            "devices.tc-1.methods.temperature.errors[0]: 'ERR (?P<code>\\d+ (?P<text>.*)' is not a valid regex: ",
            "devices.tc-1.methods.set_setpoint.request: placeholder '{{valeu}}' names no declared param",
            "devices.tc-1.methods.set_setpoint.fields.ok: the response pattern has no capture (?P<ok>...)",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        // The temperature field names a capture of a pattern that did not compile: one
        // problem for the pattern, none for the field.
        assert_eq!(all.lines().count(), 7, "{all}");
    }

    #[test]
    fn actions_must_fit_their_device_kind() {
        let bad = GOOD
            .replace(
                "request = \"{{address}}TEMP?\"",
                "path = \"/api/temp\"\nbase_url = \"x\"",
            )
            .replace(
                "kind = \"serial\"",
                "kind = \"serial\"\nheaders = { X = \"1\" }",
            );
        // `base_url` landed inside the method table: an unknown field there.
        let err = load(&bad).unwrap_err().problems.join("\n");
        assert!(err.contains("base_url"), "{err}");
        let bad = GOOD
            .replace("request = \"{{address}}TEMP?\"", "path = \"/api/temp\"")
            .replace(
                "kind = \"serial\"",
                "kind = \"serial\"\nheaders = { X = \"1\" }",
            );
        let all = load(&bad).unwrap_err().problems.join("\n");
        for want in [
            "devices.tc-1.headers: only for http devices",
            "devices.tc-1.methods.temperature.request: required for a serial device",
            "devices.tc-1.methods.temperature.path: only for http devices",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let http = r#"
            [gateway]
            id = "site-1"
            [cloud]
            broker = "mqtt://127.0.0.1:1883"
            [devices.agv-1]
            kind = "http"
            base_url = "http://127.0.0.1:8081"
            [devices.agv-1.methods.status]
            request = "STATUS?"
        "#;
        let all = load(http).unwrap_err().problems.join("\n");
        for want in [
            "devices.agv-1.methods.status.path: required for an http device",
            "devices.agv-1.methods.status.request: only for serial devices",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn a_serial_device_needs_a_port() {
        let all = load(&GOOD.replace("port = \"bus1\"\n", ""))
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains("devices.tc-1.port: required for a serial device"),
            "{all}"
        );
    }
}
