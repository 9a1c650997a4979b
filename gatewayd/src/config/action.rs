//! Actions: one call against a device (an RPC method, a twin property or a message command),
//! its templates and result mapping, and the checks that run on it at configuration load.

use super::modbus::{self, FieldSpec, Role};
use super::{serial, DeviceKind};
use crate::device::modbus::codec::{Order, Table, ValueType};
use crate::template::Template;
use gatewayd_protocol::ParamSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One call against a device: an RPC method (and, with the same shape, a twin property or a
/// message command). Templates use `{{name}}` placeholders filled from the params. An http
/// device's action has a `path` (and optionally verb, query, headers, body); a serial device's
/// has a `request` (and optionally response, fields, errors, busy, lines or until).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// HTTP verb.
    #[serde(default = "default_verb")]
    pub verb: HttpVerb,
    /// Path template under the device's base URL, e.g. `/api/config/{{key}}`; placeholders
    /// are percent-encoded. Required for http devices.
    #[serde(default)]
    pub path: Option<String>,
    /// Query parameters; a value that is exactly one placeholder is left out when the param
    /// is absent.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra headers (templates allowed).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body template: a string that is exactly `{{name}}` becomes the param's JSON value
    /// (type kept; left out when absent); `{{params}}` is the whole params object.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Declared params; calls with missing, mistyped or unknown params are refused with
    /// `invalid_params` before any device call.
    #[serde(default, deserialize_with = "strict_params")]
    pub params: BTreeMap<String, ParamSpec>,
    /// How the result is taken from the answer.
    #[serde(default)]
    pub result: ResultMode,
    /// With `result = "json"`: a JSON pointer (RFC 6901) into the body, e.g. `/data/speed`.
    #[serde(default)]
    pub result_pointer: Option<String>,
    /// Device statuses that mean success; default: any 2xx. Others become `device_error`.
    #[serde(default)]
    pub ok_status: Vec<u16>,
    /// HTTP statuses meaning "busy, did not act" for this call; defaults to the device's
    /// `transient_status`.
    #[serde(default)]
    pub transient_status: Option<Vec<u16>>,
    /// Timeout of this call, milliseconds; defaults to the device's `timeout_ms`. For a serial
    /// device it is also the response timeout (instead of the port's `timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Twin properties only: a method of this device called after the property was applied,
    /// whose result is what the device now holds (instead of this call's own result). For
    /// devices that answer a write with a bare `OK`.
    #[serde(default)]
    pub read_back: Option<String>,
    /// Twin properties only: a JSON pointer into the `read_back` result, e.g. `/setpoint`.
    #[serde(default)]
    pub read_back_pointer: Option<String>,
    /// Serial: the request line template, e.g. `"{{address}}SETP {{value}}"`; the port's
    /// request terminator is appended. Control characters in values become spaces.
    #[serde(default)]
    pub request: Option<String>,
    /// Serial: a regex the whole answer must match, e.g. `'TEMP (?P<temp>-?[0-9.]+)'`; its
    /// named captures become the result object. Without it, the result is the answer as a
    /// string. The answer is one line, or with `lines`/`until` the block's lines joined with
    /// `\n`, matched as one text: anchored at its start and end, no flags set, so write line
    /// breaks as `\n`, start with `(?s)` for `.` to cross them or `(?m)` for `^`/`$` at each
    /// line.
    #[serde(default)]
    pub response: Option<String>,
    /// Serial: declared types of the response captures (`number`, `integer`, `string`,
    /// `bool`); undeclared captures are strings. Modbus: registers read into the result
    /// object by name, each `{ table, address, type, ... }` like an action's own; values in
    /// one table whose addresses touch are read in one request.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Serial: regexes of error lines, e.g. `['ERR (?P<code>\d+) (?P<text>.*)', 'NAK']`, tried
    /// on every answer line before it counts as part of the answer (a block ends at an error
    /// line). A match fails the call with `device_error`. The `code` capture is the device's
    /// error code: an integer (`ERR 3`) is its `device_status`, any other text (`ERR:RANGE`
    /// with `'ERR:(?P<code>\w+)'` gives `RANGE`) its `device_code`; without one (`NAK`) the
    /// status is 0. The `text` capture is the detail (else the whole line). No other capture
    /// names are allowed, nor an unnamed group without a `code` one (group with `(?:...)`).
    #[serde(default)]
    pub errors: Vec<String>,
    /// Serial: regexes of busy lines for this action, added to its device's and port's (same
    /// form as theirs): the device did not act, the call fails with `device_busy`.
    #[serde(default)]
    pub busy: Vec<String>,
    /// Serial: the answer is this many lines (1 to 1000; default 1), joined with `\n`. Lines
    /// matching an `ignore` pattern are not counted; empty lines are. At most 65536 bytes of
    /// text in all.
    #[serde(default)]
    pub lines: Option<usize>,
    /// Serial: the answer is every line up to and including the first that matches this
    /// regex (all of that line), e.g. `'END|OK'`; joined with `\n`, at most 65536 bytes of
    /// text. Not with `lines`.
    #[serde(default)]
    pub until: Option<String>,
    /// Modbus: the table, `coil`, `discrete_input`, `input_register` or `holding_register`.
    #[serde(default)]
    pub table: Option<Table>,
    /// Modbus: address of the first register or bit, 0 to 65535 (as on the wire: holding
    /// register "40001" is address 0).
    #[serde(default)]
    pub address: Option<u16>,
    /// Modbus: read a raw array of this many registers or bits (instead of a typed value).
    #[serde(default)]
    pub count: Option<u16>,
    /// Modbus: the value type, `u16` (default), `i16`, `u32`, `i32`, `f32`, `u64`, `i64`,
    /// `f64`, `bool` (the default in a bit table) or `string` (with `length`).
    #[serde(default, rename = "type")]
    pub ty: Option<ValueType>,
    /// Modbus: a string's length in bytes.
    #[serde(default)]
    pub length: Option<u16>,
    /// Modbus: byte order within a register, `big` (default) or `little`.
    #[serde(default)]
    pub byte_order: Option<Order>,
    /// Modbus: word order across the registers of one value, `big` (default: most
    /// significant register first) or `little` (word-swapped).
    #[serde(default)]
    pub word_order: Option<Order>,
    /// Modbus: engineering value = raw * scale + offset; a write computes
    /// raw = (value - offset) / scale, rounded to the nearest integer (halves away from
    /// zero) for integer types and refused when out of the type's range.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Modbus: see `scale`.
    #[serde(default)]
    pub offset: Option<f64>,
    /// Modbus: makes the action a write of this value: a literal (`true`, `1500`), a param
    /// (`"{{speed}}"`), or an array of them written to consecutive registers or coils. Twin
    /// properties write `"{{value}}"` by default.
    #[serde(default)]
    pub write: Option<serde_json::Value>,
    /// Modbus: write one register or coil with FC 16 or 15 (for devices that accept no FC 6
    /// or 5).
    #[serde(default)]
    pub write_multiple: bool,
    /// The Modbus half compiled once; validation fills it.
    #[serde(skip)]
    pub compiled_modbus: modbus::CompiledModbus,
    /// The serial half compiled once (request template, patterns); validation fills it.
    #[serde(skip)]
    pub compiled_serial: serial::CompiledSerial,
    /// The HTTP half compiled once (templates); validation fills it.
    #[serde(skip)]
    pub compiled_http: super::http::CompiledHttp,
}

/// HTTP verbs a mapping may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpVerb {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// How an RPC result is taken from the device's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultMode {
    /// Parse the body as JSON (an empty body is `null`).
    #[default]
    Json,
    /// The body as a string.
    Text,
    /// Ignore the body; the result is `null`.
    None,
}

fn default_verb() -> HttpVerb {
    HttpVerb::Get
}

/// Checks methods, twin properties and commands of one device kind; `methods` are all the
/// methods the device ends up with (for `read_back`).
pub(crate) fn validate_actions(
    kind: DeviceKind,
    [own_methods, twin, commands]: [&BTreeMap<String, ActionConfig>; 3],
    methods: &BTreeMap<String, ActionConfig>,
    at: &str,
    p: &mut Vec<String>,
) {
    let modbus = |m: &ActionConfig, role, builtins: &[&str], at: &str, p: &mut Vec<String>| {
        if kind.is_modbus() {
            modbus::check_action(m, role, builtins, at, p);
        }
    };
    for (name, m) in own_methods {
        let at = format!("{at}.methods.{name}");
        m.validate(&at, &[], p);
        m.validate_kind(kind, &at, p);
        modbus(m, Role::Method, &[], &at, p);
    }
    for (name, m) in twin {
        let at = format!("{at}.twin.{name}");
        m.validate(&at, &["value", "property"], p);
        m.validate_kind(kind, &at, p);
        modbus(m, Role::Twin, &["value", "property"], &at, p);
        if let Some(method) = &m.read_back {
            if !methods.contains_key(method) {
                p.push(format!(
                    "{at}.read_back: names no method of this device ('{method}')"
                ));
            }
        }
    }
    for (name, m) in own_methods.iter().chain(commands) {
        if m.read_back.is_some() || m.read_back_pointer.is_some() {
            p.push(format!(
                "{at}.{name}: read_back is for twin properties only"
            ));
        }
    }
    for (name, m) in commands {
        let at = format!("{at}.commands.{name}");
        m.validate(&at, &["message_id", "command"], p);
        m.validate_kind(kind, &at, p);
        modbus(m, Role::Command, &["message_id", "command"], &at, p);
    }
}

impl ActionConfig {
    /// Checks templates parse and name only declared params (or the given built-in names).
    pub fn validate(&self, at: &str, builtins: &[&str], p: &mut Vec<String>) {
        let known = |name: &str| {
            name == "params" || builtins.contains(&name) || self.params.contains_key(name)
        };
        let mut check = |field: String, text: &str| match Template::parse(text) {
            Ok(t) => {
                for var in t.vars() {
                    if !known(var) {
                        p.push(format!(
                            "{field}: placeholder '{{{{{var}}}}}' names no declared param"
                        ));
                    }
                }
            }
            Err(e) => p.push(format!("{field}: {e}")),
        };
        if let Some(path) = &self.path {
            check(format!("{at}.path"), path);
        }
        for (k, v) in &self.query {
            check(format!("{at}.query.{k}"), v);
        }
        for (k, v) in &self.headers {
            check(format!("{at}.headers.{k}"), v);
        }
        if let Some(body) = &self.body {
            let mut strings = Vec::new();
            collect_strings(body, &mut strings);
            for s in strings {
                check(format!("{at}.body"), &s);
            }
        }
        if self
            .path
            .as_deref()
            .is_some_and(|path| !path.starts_with('/'))
        {
            p.push(format!("{at}.path: must start with '/'"));
        }
        if self
            .path
            .as_deref()
            .is_some_and(|path| path.split('/').any(|s| s == "." || s == ".."))
        {
            p.push(format!("{at}.path: must not have '.' or '..' segments"));
        }
        if let Some(ptr) = &self.result_pointer {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                p.push(format!(
                    "{at}.result_pointer: a JSON pointer must start with '/'"
                ));
            }
        }
        if self.timeout_ms == Some(0) {
            p.push(format!("{at}.timeout_ms: must be at least 1"));
        }
        for s in &self.ok_status {
            if !(100..=599).contains(s) {
                p.push(format!("{at}.ok_status: {s} is not an HTTP status"));
            }
        }
        serial::check_action(self, at, builtins, p);
        if self.path.is_some() {
            if let Err(e) = self.compiled_http.get(self) {
                p.push(format!("{at}: {e}"));
            }
        }
    }

    /// Checks that the action fits a device of `kind`: `path` for http, `request` for serial,
    /// and no field the other kind uses.
    pub fn validate_kind(&self, kind: DeviceKind, at: &str, p: &mut Vec<String>) {
        serial::check_kind(self, kind, at, p);
    }
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(m) => m.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// A param declaration as written in the configuration: like the wire's `ParamSpec`, but a
/// misspelt field (`requred = false`) is an error instead of being ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictParam {
    #[serde(rename = "type")]
    ty: gatewayd_protocol::ParamType,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
}

fn yes() -> bool {
    true
}

fn strict_params<'de, D>(d: D) -> Result<BTreeMap<String, ParamSpec>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let strict = BTreeMap::<String, StrictParam>::deserialize(d)?;
    Ok(strict
        .into_iter()
        .map(|(name, p)| {
            let spec = ParamSpec {
                ty: p.ty,
                required: p.required,
                min: p.min,
                max: p.max,
            };
            (name, spec)
        })
        .collect())
}
