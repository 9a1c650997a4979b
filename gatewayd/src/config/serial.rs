//! Serial configuration: the ports (`[serial_ports.<name>]`, one bus each, shared by every
//! device that names it), the checks of serial devices and of the serial half of an action,
//! and their compilation into the serial core's types (`device::serial::rules`), done once at
//! load: validation compiles, so a configuration that passes `check-config` compiles.

use super::{ActionConfig, DeviceConfig, DeviceKind};
use crate::device::serial::answer::ResponseSpec;
use crate::device::serial::frame::Pattern;
use crate::device::serial::rules::{Block, LineRules, ReplyRules, SerialAction, MAX_LINES};
use crate::template::Template;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub use crate::device::serial::answer::FieldType;

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
    /// `device_error` "frame longer than N bytes". A block answer (`lines`, `until`) is
    /// bounded too: 65536 bytes of text in all.
    #[serde(default = "default_max_frame_len")]
    pub max_frame_len: usize,
    /// Quiet time between the end of one exchange and the next request, milliseconds.
    #[serde(default)]
    pub inter_request_gap_ms: u64,
    /// How long a device may take to answer once a request is written, milliseconds (a
    /// method's `timeout_ms` overrides it); never longer than the caller's deadline.
    #[serde(default = "default_response_timeout")]
    pub timeout_ms: u64,
    /// The devices on this port send back every request before answering (local echo, or a
    /// two-wire RS-485 adapter that hears itself): the exact bytes written, terminator
    /// included, are expected first and dropped, whatever the response terminator. Anything
    /// else fails the call with `device_error` "echo mismatch: sent '...', got '...'" (the
    /// device may have acted). A device's own `echo` overrides this.
    #[serde(default)]
    pub echo: bool,
    /// Regexes of lines that are never an answer (unsolicited status lines, prompts), e.g.
    /// `['STATUS .*', '>']`: a line matching one (all of it) is dropped wherever it arrives,
    /// before the echo, between the lines of a block, or with no request at all. A device's
    /// own `ignore` patterns are added to these.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Regexes of answer lines that say the device is busy and did not act, e.g. `['BUSY']`:
    /// the call fails with `device_busy` (a message is tried again later). A `text` capture
    /// is the reason (else the line), an integer `code` capture the device status. A device's
    /// and an action's own `busy` patterns are added to these.
    #[serde(default)]
    pub busy: Vec<String>,
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
        patterns(&self.ignore, &format!("{at}.ignore"), Captures::Any, p);
        patterns(&self.busy, &format!("{at}.busy"), Captures::Said, p);
    }
}

/// A serial device's own line habits, set on `[devices.<id>]`: `echo` overrides its port's,
/// `ignore` and `busy` patterns are added to its port's.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceLines<'a> {
    pub echo: Option<bool>,
    pub ignore: &'a [String],
    pub busy: &'a [String],
}

/// The line habits a serial device's configuration sets.
pub fn device_lines(dev: &DeviceConfig) -> DeviceLines<'_> {
    DeviceLines {
        echo: dev.echo,
        ignore: &dev.ignore,
        busy: &dev.busy,
    }
}

/// How a device's lines are read: its port's habits with its own. Problems name the field
/// under `port_at` or `device_at`.
pub fn compile_lines(
    port: &SerialPortConfig,
    dev: DeviceLines<'_>,
    port_at: &str,
    device_at: &str,
) -> Result<LineRules, Vec<String>> {
    let mut p = Vec::new();
    let mut ignore = patterns(
        &port.ignore,
        &format!("{port_at}.ignore"),
        Captures::Any,
        &mut p,
    );
    ignore.extend(patterns(
        dev.ignore,
        &format!("{device_at}.ignore"),
        Captures::Any,
        &mut p,
    ));
    let mut busy = patterns(
        &port.busy,
        &format!("{port_at}.busy"),
        Captures::Said,
        &mut p,
    );
    busy.extend(patterns(
        dev.busy,
        &format!("{device_at}.busy"),
        Captures::Said,
        &mut p,
    ));
    if !p.is_empty() {
        return Err(p);
    }
    Ok(LineRules {
        echo: dev.echo.unwrap_or(port.echo),
        ignore,
        busy,
    })
}

/// Checks what only a serial device has (its port, address and line habits) and that it
/// sets nothing that only an http device understands.
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
    let own = device_lines(dev);
    patterns(own.ignore, &format!("{at}.ignore"), Captures::Any, p);
    patterns(own.busy, &format!("{at}.busy"), Captures::Said, p);
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

/// The serial half of an action, compiled once and kept with it: by validation, or at the
/// first call of an action that was never validated.
#[derive(Clone, Default)]
pub struct CompiledSerial(OnceLock<Result<Arc<SerialAction>, String>>);

impl CompiledSerial {
    /// The compiled serial half of `action` (whose slot this is), or what is wrong with it.
    pub fn get(&self, action: &ActionConfig) -> Result<Arc<SerialAction>, String> {
        self.0
            .get_or_init(|| {
                let mut p = Vec::new();
                match compile_action(action, "action", &mut p) {
                    Some(a) if p.is_empty() => Ok(Arc::new(a)),
                    _ => Err(p.join("; ")),
                }
            })
            .clone()
    }

    /// Whether the action was compiled.
    pub fn is_compiled(&self) -> bool {
        matches!(self.0.get(), Some(Ok(_)))
    }
}

impl std::fmt::Debug for CompiledSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "CompiledSerial(not yet)",
            Some(Ok(_)) => "CompiledSerial(ok)",
            Some(Err(_)) => "CompiledSerial(invalid)",
        })
    }
}

/// Checks the serial half of an action: the request template (which may also use
/// `{{address}}`), the patterns, the block shape, and that every declared field is a
/// capture. An action that passes is compiled here, once.
pub(super) fn check_action(a: &ActionConfig, at: &str, builtins: &[&str], p: &mut Vec<String>) {
    if let Some(request) = &a.request {
        if let Ok(t) = Template::parse(request) {
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
        if a.params.contains_key("address") {
            p.push(format!(
                "{at}.params.address: 'address' is the device's bus address in serial requests; use another name"
            ));
        }
    }
    let before = p.len();
    let compiled = compile_action(a, at, p);
    if let Some(compiled) = compiled.filter(|_| p.len() == before) {
        let _ = a.compiled_serial.0.set(Ok(Arc::new(compiled)));
    }
}

/// Compiles the serial half of an action, pushing every problem (under `at`) to `p`. `None`
/// when it has no `request` (then it is not a serial action; `check_kind` says whether one
/// is needed) or its template does not parse.
pub fn compile_action(a: &ActionConfig, at: &str, p: &mut Vec<String>) -> Option<SerialAction> {
    let response = a
        .response
        .as_deref()
        .map(|r| Pattern::parse(r).map_err(|e| p.push(format!("{at}.response: {e}"))));
    match &response {
        Some(Ok(pattern)) => {
            let names: Vec<&str> = pattern.names().collect();
            for field in a.capture_fields().keys() {
                if !names.contains(&field.as_str()) {
                    p.push(format!(
                        "{at}.fields.{field}: the response pattern has no capture (?P<{field}>...)"
                    ));
                }
            }
        }
        Some(Err(())) => {}
        None if !a.capture_fields().is_empty() => {
            p.push(format!("{at}.fields: needs a response pattern"));
        }
        None => {}
    }
    let errors = patterns(&a.errors, &format!("{at}.errors"), Captures::Said, p);
    let busy = patterns(&a.busy, &format!("{at}.busy"), Captures::Said, p);
    let block = match (a.lines, &a.until) {
        (Some(_), Some(_)) => {
            p.push(format!("{at}.lines: set lines or until, not both"));
            Block::One
        }
        (Some(n), None) if !(1..=MAX_LINES).contains(&n) => {
            p.push(format!("{at}.lines: must be between 1 and {MAX_LINES}"));
            Block::One
        }
        (Some(1), None) | (None, None) => Block::One,
        (Some(n), None) => Block::Lines(n),
        (None, Some(until)) => match Pattern::parse(until) {
            Ok(last) => Block::Until(last),
            Err(e) => {
                p.push(format!("{at}.until: {e}"));
                Block::One
            }
        },
    };
    let request = match Template::parse(a.request.as_deref()?) {
        Ok(t) => t,
        Err(e) => {
            p.push(format!("{at}.request: {e}"));
            return None;
        }
    };
    Some(SerialAction {
        request,
        reply: ReplyRules {
            errors,
            busy,
            block,
        },
        response: ResponseSpec {
            response: response.and_then(Result::ok),
            fields: a.capture_fields(),
        },
    })
}

/// What the named captures of a pattern list may be.
#[derive(Clone, Copy)]
enum Captures {
    /// Anything: they are not read.
    Any,
    /// A line that says something (an error, busy): `code` and `text` only, and no unnamed
    /// group without a `code` (`ERR (\d+)` meant `ERR (?P<code>\d+)`).
    Said,
}

/// Compiles a list of line patterns at `at` (`...errors`), pushing every problem to `p`.
fn patterns(list: &[String], at: &str, captures: Captures, p: &mut Vec<String>) -> Vec<Pattern> {
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let pattern = match Pattern::parse(text) {
            Ok(pattern) => pattern,
            Err(e) => {
                p.push(format!("{at}[{i}]: {e}"));
                continue;
            }
        };
        if let Captures::Said = captures {
            let has_code = pattern.names().any(|n| n == "code");
            if let Some(other) = pattern.names().find(|n| *n != "code" && *n != "text") {
                p.push(format!(
                    "{at}[{i}]: capture '{other}' is not used: only (?P<code>...) (the device's code) and (?P<text>...) (its reason) are"
                ));
            } else if !has_code && pattern.has_unnamed_groups() {
                p.push(format!(
                    "{at}[{i}]: '{text}' has a group but no (?P<code>...): name the code's group, or make the group non-capturing (?:...)"
                ));
            }
        }
        out.push(pattern);
    }
    out
}

/// Checks that an action fits the kind of its device: `path` (and the HTTP-only fields) for
/// http, `request` (and the answer patterns) for serial.
pub(super) fn check_kind(a: &ActionConfig, kind: DeviceKind, at: &str, p: &mut Vec<String>) {
    let serial_only = [
        ("request", a.request.is_some()),
        ("response", a.response.is_some()),
        ("fields", !a.capture_fields().is_empty()),
        ("errors", !a.errors.is_empty()),
        ("busy", !a.busy.is_empty()),
        ("lines", a.lines.is_some()),
        ("until", a.until.is_some()),
    ];
    let http_only = [
        ("path", a.path.is_some()),
        ("query", !a.query.is_empty()),
        ("headers", !a.headers.is_empty()),
        ("body", a.body.is_some()),
        ("result_pointer", a.result_pointer.is_some()),
        ("ok_status", !a.ok_status.is_empty()),
        ("transient_status", a.transient_status.is_some()),
    ];
    let (missing, foreign, other): (_, Vec<_>, _) = match kind {
        DeviceKind::Http => (
            a.path
                .is_none()
                .then_some("path: required for an http device"),
            serial_only.to_vec(),
            "serial",
        ),
        DeviceKind::Serial => (
            a.request
                .is_none()
                .then_some("request: required for a serial device"),
            http_only.to_vec(),
            "http",
        ),
        // What a Modbus action needs is checked by `config::modbus`.
        DeviceKind::ModbusRtu | DeviceKind::ModbusTcp => (
            None,
            serial_only.iter().chain(&http_only).copied().collect(),
            "http or serial",
        ),
    };
    if let Some(missing) = missing {
        p.push(format!("{at}.{missing}"));
    }
    for (field, set) in foreign {
        if set {
            p.push(format!("{at}.{field}: only for {other} devices"));
        }
    }
    if !kind.is_modbus() && a.has_modbus() {
        p.push(format!(
            "{at}: table, address, type, write and register fields are only for modbus_rtu and modbus_tcp devices"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::{compile_lines, device_lines, DeviceLines};
    use crate::config::{ActionConfig, Config, ConfigError, FieldType, SerialPortConfig};
    use crate::device::serial::rules::Block;

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
        assert_eq!(m.capture_fields()["temp"], FieldType::Number);
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
    fn line_habits_and_blocks_load_and_compile_once() {
        let text = GOOD
            .replace(
                "parity = \"even\"",
                "parity = \"even\"\necho = true\nignore = ['#.*']\nbusy = ['BUSY']",
            )
            .replace(
                "[devices.tc-1.methods.set_setpoint]",
                "[devices.tc-1.methods.dump]\nrequest = 'DUMP?'\nuntil = 'END'\nbusy = ['LOCKED']\n\n[devices.tc-1.methods.stat]\nrequest = 'STAT?'\nlines = 3\nresponse = '(?s)(?P<all>.*)'\n\n[devices.tc-1.methods.set_setpoint]",
            );
        let c = load(&text).unwrap();
        let port = &c.serial_ports["bus1"];
        assert!(port.echo);
        assert_eq!((port.ignore.len(), port.busy.len()), (1, 1));
        let defaults = load(GOOD).unwrap();
        let bare = &defaults.serial_ports["bus1"];
        assert!(!bare.echo && bare.ignore.is_empty() && bare.busy.is_empty());
        // Validation compiled every serial action; a call takes the compiled one.
        let methods = &c.devices["tc-1"].methods;
        for m in methods.values() {
            assert!(m.compiled_serial.is_compiled());
        }
        let stat = methods["stat"]
            .compiled_serial
            .get(&methods["stat"])
            .unwrap();
        assert!(matches!(stat.reply.block, Block::Lines(3)));
        let dump = methods["dump"]
            .compiled_serial
            .get(&methods["dump"])
            .unwrap();
        assert!(matches!(dump.reply.block, Block::Until(_)));
        assert_eq!(dump.reply.busy.len(), 1);
        let temp = &methods["temperature"];
        assert!(matches!(
            temp.compiled_serial.get(temp).unwrap().reply.block,
            Block::One
        ));
        // A copy (a profile's action merged into a device) keeps the compiled form.
        assert!(temp.clone().compiled_serial.is_compiled());
    }

    #[test]
    fn an_action_never_validated_compiles_at_its_first_call() {
        let a: ActionConfig = serde_json::from_value(serde_json::json!({
            "request": "X", "lines": 2
        }))
        .unwrap();
        assert!(!a.compiled_serial.is_compiled());
        assert!(matches!(
            a.compiled_serial.get(&a).unwrap().reply.block,
            Block::Lines(2)
        ));
        assert!(a.compiled_serial.is_compiled());
        let bad: ActionConfig = serde_json::from_value(serde_json::json!({
            "request": "X", "errors": ["ERR (\\d+"]
        }))
        .unwrap();
        let e = bad.compiled_serial.get(&bad).unwrap_err();
        assert!(
            e.starts_with("action.errors[0]: 'ERR (\\d+' is not a valid regex"),
            "{e}"
        );
    }

    #[test]
    fn bad_line_habits_and_blocks_are_reported_with_their_path() {
        let text = GOOD
            .replace(
                "parity = \"even\"",
                "parity = \"even\"\nignore = ['#(']\nbusy = ['BUSY (?P<why>.*)']",
            )
            .replace(
                "[devices.tc-1.methods.set_setpoint]",
                "[devices.tc-1.methods.dump]\nrequest = 'DUMP?'\nuntil = 'END('\n\n[devices.tc-1.methods.both]\nrequest = 'X'\nlines = 2\nuntil = 'END'\n\n[devices.tc-1.methods.none]\nrequest = 'X'\nlines = 0\n\n[devices.tc-1.methods.many]\nrequest = 'X'\nlines = 1001\nbusy = ['(']\n\n[devices.tc-1.methods.set_setpoint]",
            )
            .replace(
                r"errors = ['ERR (?P<code>\d+) (?P<text>.*)']",
                r"errors = ['ERR (?P<code>\d+) (?P<text>.*)', 'ERR (\d+)', 'E(?P<num>\d+)', '(?:NAK|ERR) (?P<code>\w+)?']",
            );
        let all = load(&text).unwrap_err().problems.join("\n");
        for want in [
            "serial_ports.bus1.ignore[0]: '#(' is not a valid regex: ",
            "serial_ports.bus1.busy[0]: capture 'why' is not used: only (?P<code>...) (the device's code) and (?P<text>...) (its reason) are",
            "devices.tc-1.methods.dump.until: 'END(' is not a valid regex: ",
            "devices.tc-1.methods.both.lines: set lines or until, not both",
            "devices.tc-1.methods.none.lines: must be between 1 and 1000",
            "devices.tc-1.methods.many.lines: must be between 1 and 1000",
            "devices.tc-1.methods.many.busy[0]: '(' is not a valid regex: ",
            "devices.tc-1.methods.temperature.errors[1]: 'ERR (\\d+)' has a group but no (?P<code>...): name the code's group, or make the group non-capturing (?:...)",
            "devices.tc-1.methods.temperature.errors[2]: capture 'num' is not used: ",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(all.lines().count(), 9, "errors[3] is fine:\n{all}");
    }

    #[test]
    fn block_and_busy_fields_are_for_serial_actions_only() {
        let http = r#"
            [gateway]
            id = "site-1"
            [cloud]
            broker = "mqtt://127.0.0.1:1883"
            [devices.agv-1]
            kind = "http"
            base_url = "http://127.0.0.1:8081"
            [devices.agv-1.methods.status]
            path = "/status"
            lines = 2
            until = "END"
            busy = ["BUSY"]
        "#;
        let all = load(http).unwrap_err().problems.join("\n");
        for field in ["lines", "until", "busy"] {
            let want = format!("devices.agv-1.methods.status.{field}: only for serial devices");
            assert!(all.contains(&want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn a_device_echo_overrides_its_port_and_its_patterns_add_to_the_port() {
        let port: SerialPortConfig = serde_json::from_value(serde_json::json!({
            "path": "/dev/ttyUSB0", "echo": true, "ignore": ["#.*"], "busy": ["BUSY"]
        }))
        .unwrap();
        let ignore = vec!["STATUS .*".to_string()];
        let busy = vec!["WAIT".to_string()];
        let own = DeviceLines {
            echo: Some(false),
            ignore: &ignore,
            busy: &busy,
        };
        let rules = compile_lines(&port, own, "serial_ports.bus1", "devices.tc-1").unwrap();
        assert!(!rules.echo);
        assert!(rules.ignore.iter().any(|p| p.is_match("# boot")));
        assert!(rules.ignore.iter().any(|p| p.is_match("STATUS 1")));
        assert!(rules.busy.iter().any(|p| p.is_match("BUSY")));
        assert!(rules.busy.iter().any(|p| p.is_match("WAIT")));
        let inherited = compile_lines(&port, DeviceLines::default(), "p", "d").unwrap();
        assert!(inherited.echo);
        assert_eq!((inherited.ignore.len(), inherited.busy.len()), (1, 1));
        let bad = vec!["(".to_string()];
        let own = DeviceLines {
            ignore: &bad,
            ..DeviceLines::default()
        };
        let e = compile_lines(&port, own, "serial_ports.bus1", "devices.tc-1").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("devices.tc-1.ignore[0]: '(' is not a valid regex"),
            "{e:?}"
        );
    }

    #[test]
    fn a_device_sets_its_own_line_habits() {
        let own = "address = \"01\"\necho = true\nignore = ['#.*']\nbusy = ['WAIT']";
        let c = load(&GOOD.replace("address = \"01\"", own)).unwrap();
        let dev = &c.devices["tc-1"];
        let rules = compile_lines(&c.serial_ports["bus1"], device_lines(dev), "p", "d").unwrap();
        assert!(rules.echo);
        assert!(rules.ignore[0].is_match("# boot"));
        assert!(rules.busy[0].is_match("WAIT"));
        let bad = own.replace("'WAIT'", "'WAIT (?P<why>.*)'");
        let all = load(&GOOD.replace("address = \"01\"", &bad))
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains("devices.tc-1.busy[0]: capture 'why' is not used"),
            "{all}"
        );
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
