//! Modbus configuration: the checks of `modbus_rtu` and `modbus_tcp` devices and of the
//! Modbus half of an action (table, address, type, byte and word order, scale and offset,
//! `write`, `fields`), compiled once at load into a `device::modbus::plan::ModbusAction`.

use super::http::JsonTemplate;
use super::{ActionConfig, DeviceConfig, DeviceKind, FieldType, SerialPortConfig};
use crate::device::modbus::codec::{Codec, Order, Table, ValueType};
use crate::device::modbus::pdu::{MAX_READ_BITS, MAX_READ_REGISTERS};
use crate::device::modbus::plan::{ModbusAction, ReadItem, ReadPlan, Shape, WritePlan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// Default TCP port of a Modbus TCP device.
pub const DEFAULT_TCP_PORT: u16 = 502;

/// One entry of an action's `fields`: a serial capture's type (`"number"`) or, for a Modbus
/// device, a register to read into the result object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FieldSpec {
    Capture(FieldType),
    Register(RegisterSpec),
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        if v.is_string() {
            serde_json::from_value(v)
                .map(FieldSpec::Capture)
                .map_err(D::Error::custom)
        } else {
            serde_json::from_value(v)
                .map(FieldSpec::Register)
                .map_err(D::Error::custom)
        }
    }
}

/// A register (or coil) read into one field of a Modbus result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    /// `coil`, `discrete_input`, `input_register` or `holding_register`.
    pub table: Table,
    /// Address of the first register or bit, 0 to 65535 (the address on the wire, not the
    /// 40001-style register number).
    pub address: u16,
    /// Value type; `u16` by default (`bool` in a bit table).
    #[serde(default, rename = "type")]
    pub ty: Option<ValueType>,
    /// A raw array of this many registers or bits instead of a typed value.
    #[serde(default)]
    pub count: Option<u16>,
    /// `string`: its length in bytes.
    #[serde(default)]
    pub length: Option<u16>,
    /// Byte order within a register: `big` (default) or `little`.
    #[serde(default)]
    pub byte_order: Option<Order>,
    /// Word order across the registers of one value: `big` (default, most significant
    /// register first) or `little`.
    #[serde(default)]
    pub word_order: Option<Order>,
    /// Engineering value = raw * scale + offset.
    #[serde(default)]
    pub scale: Option<f64>,
    /// See `scale`.
    #[serde(default)]
    pub offset: Option<f64>,
}

impl ActionConfig {
    /// The serial captures' declared types (entries of `fields` that are type names).
    pub fn capture_fields(&self) -> BTreeMap<String, FieldType> {
        self.fields
            .iter()
            .filter_map(|(k, f)| match f {
                FieldSpec::Capture(t) => Some((k.clone(), *t)),
                FieldSpec::Register(_) => None,
            })
            .collect()
    }

    fn register_fields(&self) -> impl Iterator<Item = (&String, &RegisterSpec)> {
        self.fields.iter().filter_map(|(k, f)| match f {
            FieldSpec::Register(r) => Some((k, r)),
            FieldSpec::Capture(_) => None,
        })
    }

    /// The register spec written flat on the action (`table`, `address`, ...), if any.
    fn own_register(&self) -> Option<RegisterSpec> {
        Some(RegisterSpec {
            table: self.table?,
            address: self.address.unwrap_or_default(),
            ty: self.ty,
            count: self.count,
            length: self.length,
            byte_order: self.byte_order,
            word_order: self.word_order,
            scale: self.scale,
            offset: self.offset,
        })
    }

    /// Whether any Modbus field is set on this action.
    pub fn has_modbus(&self) -> bool {
        self.table.is_some()
            || self.address.is_some()
            || self.count.is_some()
            || self.ty.is_some()
            || self.length.is_some()
            || self.byte_order.is_some()
            || self.word_order.is_some()
            || self.scale.is_some()
            || self.offset.is_some()
            || self.write.is_some()
            || self.write_multiple
            || self.register_fields().next().is_some()
    }
}

/// What role an action plays, which decides whether it writes by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Method,
    Twin,
    Command,
}

/// The Modbus half of an action, compiled once and kept with it.
#[derive(Clone, Default)]
pub struct CompiledModbus(OnceLock<Result<Arc<ModbusAction>, String>>);

impl CompiledModbus {
    /// The compiled action, or what is wrong with it (an action never validated is compiled
    /// here as a method).
    pub fn get(&self, action: &ActionConfig) -> Result<Arc<ModbusAction>, String> {
        self.0
            .get_or_init(|| {
                let mut p = Vec::new();
                match compile(action, Role::Method, "action", &mut p) {
                    Some(a) if p.is_empty() => Ok(Arc::new(a)),
                    _ => Err(p.join("; ")),
                }
            })
            .clone()
    }
}

impl std::fmt::Debug for CompiledModbus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "CompiledModbus(not yet)",
            Some(Ok(_)) => "CompiledModbus(ok)",
            Some(Err(_)) => "CompiledModbus(invalid)",
        })
    }
}

/// Checks and compiles the Modbus half of an action of a Modbus device.
pub(super) fn check_action(
    a: &ActionConfig,
    role: Role,
    builtins: &[&str],
    at: &str,
    p: &mut Vec<String>,
) {
    if let Some(write) = &a.write {
        let mut strings = Vec::new();
        collect_strings(write, &mut strings);
        for s in strings {
            match crate::template::Template::parse(&s) {
                Ok(t) => {
                    for var in t.vars() {
                        if !(builtins.contains(&var) || a.params.contains_key(var)) {
                            p.push(format!(
                                "{at}.write: placeholder '{{{{{var}}}}}' names no declared param"
                            ));
                        }
                    }
                }
                Err(e) => p.push(format!("{at}.write: {e}")),
            }
        }
    }
    let before = p.len();
    if let Some(compiled) = compile(a, role, at, p) {
        if p.len() == before {
            let _ = a.compiled_modbus.0.set(Ok(Arc::new(compiled)));
        }
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

/// Compiles the Modbus half of an action, pushing every problem (under `at`) to `p`.
pub fn compile(
    a: &ActionConfig,
    role: Role,
    at: &str,
    p: &mut Vec<String>,
) -> Option<ModbusAction> {
    let own = a.own_register();
    let fields: Vec<_> = a.register_fields().collect();
    let writes = a.write.is_some() || role == Role::Twin;
    match (&own, fields.is_empty()) {
        (None, true) => {
            p.push(format!(
                "{at}.table: required for a Modbus device (or `fields` naming registers)"
            ));
            return None;
        }
        (Some(_), false) => {
            p.push(format!(
                "{at}.fields: set either table/address or fields, not both"
            ));
            return None;
        }
        _ => {}
    }
    if own.is_some() && a.address.is_none() {
        p.push(format!("{at}.address: required with table"));
    }
    if !fields.is_empty() {
        if writes {
            p.push(format!(
                "{at}.fields: a write names one table and address, not fields"
            ));
            return None;
        }
        let flat = [
            ("type", a.ty.is_some()),
            ("count", a.count.is_some()),
            ("length", a.length.is_some()),
            ("byte_order", a.byte_order.is_some()),
            ("word_order", a.word_order.is_some()),
            ("scale", a.scale.is_some()),
            ("offset", a.offset.is_some()),
            ("address", a.address.is_some()),
        ];
        for (name, set) in flat {
            if set {
                p.push(format!("{at}.{name}: belongs in each entry of fields"));
            }
        }
        let items: Vec<ReadItem> = fields
            .iter()
            .filter_map(|(name, spec)| {
                let shape = shape(spec, false, &format!("{at}.fields.{name}"), p)?;
                Some(ReadItem {
                    name: Some((*name).clone()),
                    table: spec.table,
                    address: spec.address,
                    shape,
                })
            })
            .collect();
        return Some(ModbusAction::Read(ReadPlan::new(items)));
    }
    let spec = own?;
    let shape = shape(&spec, writes, at, p)?;
    if a.write_multiple && !writes {
        p.push(format!("{at}.write_multiple: only for writes"));
    }
    if !writes {
        return Some(ModbusAction::Read(ReadPlan::new(vec![ReadItem {
            name: None,
            table: spec.table,
            address: spec.address,
            shape,
        }])));
    }
    if !spec.table.is_writable() {
        p.push(format!(
            "{at}.table: {} is read-only; writes go to a coil or holding_register",
            spec.table
        ));
        return None;
    }
    let Shape::Value(codec) = shape else {
        p.push(format!(
            "{at}.count: a write takes its count from its value"
        ));
        return None;
    };
    let value = a
        .write
        .clone()
        .unwrap_or_else(|| serde_json::Value::String("{{value}}".into()));
    let value = match JsonTemplate::compile(&value) {
        Ok(t) => t,
        Err(e) => {
            p.push(format!("{at}.write: {e}"));
            return None;
        }
    };
    Some(ModbusAction::Write(WritePlan {
        table: spec.table,
        address: spec.address,
        codec,
        value,
        multiple: a.write_multiple,
    }))
}

/// The shape of one register spec: a typed value or a raw array.
fn shape(spec: &RegisterSpec, writes: bool, at: &str, p: &mut Vec<String>) -> Option<Shape> {
    let bits = spec.table.is_bits();
    let before = p.len();
    if bits {
        for (name, set) in [
            ("length", spec.length.is_some()),
            ("byte_order", spec.byte_order.is_some()),
            ("word_order", spec.word_order.is_some()),
            ("scale", spec.scale.is_some()),
            ("offset", spec.offset.is_some()),
        ] {
            if set {
                p.push(format!(
                    "{at}.{name}: only for registers, not a {}",
                    spec.table
                ));
            }
        }
        if spec.ty.is_some_and(|t| t != ValueType::Bool) {
            p.push(format!("{at}.type: a {} holds a bool", spec.table));
        }
    }
    if let Some(s) = spec.scale {
        if s == 0.0 || !s.is_finite() {
            p.push(format!("{at}.scale: must be a finite number other than 0"));
        }
    }
    if spec.offset.is_some_and(|o| !o.is_finite()) {
        p.push(format!("{at}.offset: must be a finite number"));
    }
    let ty = spec.ty.unwrap_or(if bits {
        ValueType::Bool
    } else {
        ValueType::U16
    });
    match (ty, spec.length) {
        (ValueType::String, None) => p.push(format!("{at}.length: required for a string")),
        (ValueType::String, Some(n)) if !(1..=240).contains(&n) => {
            p.push(format!("{at}.length: must be between 1 and 240 bytes"))
        }
        (ValueType::String, Some(_)) => {}
        (_, Some(_)) => p.push(format!("{at}.length: only for type string")),
        (_, None) => {}
    }
    if matches!(ty, ValueType::String | ValueType::Bool)
        && (spec.scale.is_some() || spec.offset.is_some())
    {
        p.push(format!("{at}.scale: not for a {ty:?} value"));
    }
    let shape = match spec.count {
        Some(n) => {
            if spec.ty.is_some() || spec.scale.is_some() || spec.offset.is_some() {
                p.push(format!(
                    "{at}.count: a raw array of registers takes no type, scale or offset"
                ));
            }
            if writes {
                p.push(format!(
                    "{at}.count: a write takes its count from its value"
                ));
            }
            let max = if bits {
                MAX_READ_BITS
            } else {
                MAX_READ_REGISTERS
            };
            if n == 0 || n > max {
                p.push(format!("{at}.count: must be between 1 and {max}"));
            }
            Shape::Raw(n)
        }
        None => Shape::Value(Codec {
            ty,
            length: spec.length.unwrap_or(0),
            byte_order: spec.byte_order.unwrap_or_default(),
            word_order: spec.word_order.unwrap_or_default(),
            scale: spec.scale,
            offset: spec.offset,
        }),
    };
    if spec.address as u32 + shape.width() as u32 > 65_536 {
        p.push(format!("{at}.address: the value passes address 65535"));
    }
    (p.len() == before).then_some(shape)
}

/// A Modbus probe register.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRegister {
    /// `coil`, `discrete_input`, `input_register` or `holding_register`.
    pub table: Table,
    /// Address read (one register or bit).
    pub address: u16,
}

/// A port name, or a TCP port number written as a number.
pub(super) fn name_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Name(String),
        Number(u64),
    }
    Ok(Option::<Port>::deserialize(d)?.map(|p| match p {
        Port::Name(s) => s,
        Port::Number(n) => n.to_string(),
    }))
}

/// Checks what only a Modbus device has (unit id, and its serial port or TCP endpoint) and
/// that it sets nothing that another kind uses.
pub(super) fn check_device(
    dev: &DeviceConfig,
    ports: &BTreeMap<String, SerialPortConfig>,
    at: &str,
    p: &mut Vec<String>,
) {
    let foreign = [
        ("base_url", dev.base_url.is_some()),
        ("auth", dev.auth.is_some()),
        ("headers", !dev.headers.is_empty()),
        ("health.path", dev.health.path.is_some()),
        ("address", dev.address.is_some()),
        ("echo", dev.echo.is_some()),
        ("ignore", !dev.ignore.is_empty()),
        ("busy", !dev.busy.is_empty()),
    ];
    for (field, set) in foreign {
        if set {
            p.push(format!("{at}.{field}: not for a {} device", dev.kind));
        }
    }
    match dev.kind {
        DeviceKind::ModbusRtu => {
            match &dev.port {
                None => p.push(format!("{at}.port: required for a modbus_rtu device")),
                Some(port) if !ports.contains_key(port) => {
                    p.push(format!("{at}.port: no [serial_ports.{port}] is configured"))
                }
                Some(_) => {}
            }
            match dev.unit_id {
                None => p.push(format!("{at}.unit_id: required for a modbus_rtu device")),
                Some(u) if !(1..=247).contains(&u) => p.push(format!(
                    "{at}.unit_id: must be between 1 and 247 on an RTU bus"
                )),
                Some(_) => {}
            }
            if dev.host.is_some() {
                p.push(format!("{at}.host: only for modbus_tcp devices"));
            }
            if dev.framing.is_some() {
                p.push(format!("{at}.framing: only for modbus_tcp devices"));
            }
        }
        _ => {
            match dev.host.as_deref() {
                None => p.push(format!("{at}.host: required for a modbus_tcp device")),
                Some(h) if h.is_empty() || h.contains(['/', ' ']) || h.contains("://") => p.push(
                    format!("{at}.host: '{h}' must be a host name or an IP address"),
                ),
                Some(_) => {}
            }
            if let Err(e) = tcp_port(dev) {
                p.push(format!("{at}.port: {e}"));
            }
        }
    }
}

/// The TCP port of a Modbus TCP device: `port`, or 502.
pub fn tcp_port(dev: &DeviceConfig) -> Result<u16, String> {
    match &dev.port {
        None => Ok(DEFAULT_TCP_PORT),
        Some(s) => match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("'{s}' is not a TCP port (1 to 65535)")),
            Ok(n) => Ok(n),
        },
    }
}

/// Checks that every bus carries one protocol, that no two Modbus devices on one bus share a
/// unit id, and that the devices of one TCP endpoint agree on its framing.
pub(super) fn check_buses(devices: &BTreeMap<String, DeviceConfig>, p: &mut Vec<String>) {
    let mut endpoints: BTreeMap<(String, u16), (&str, crate::device::modbus::tcp::Framing)> =
        BTreeMap::new();
    for (id, d) in devices
        .iter()
        .filter(|(_, d)| d.kind == DeviceKind::ModbusTcp)
    {
        let (Some(host), Ok(port)) = (&d.host, tcp_port(d)) else {
            continue;
        };
        let framing = d.framing.unwrap_or_default();
        match endpoints.get(&(host.clone(), port)) {
            Some((other, f)) if *f != framing => p.push(format!(
                "devices.{id}.framing: {host}:{port} is also device {other}'s, with another framing; one connection has one framing"
            )),
            Some(_) => {}
            None => {
                endpoints.insert((host.clone(), port), (id, framing));
            }
        }
    }
    let mut on: BTreeMap<&str, Vec<(&str, &DeviceConfig)>> = BTreeMap::new();
    for (id, d) in devices {
        if matches!(d.kind, DeviceKind::Serial | DeviceKind::ModbusRtu) {
            if let Some(port) = &d.port {
                on.entry(port).or_default().push((id, d));
            }
        }
    }
    for (port, devs) in on {
        let line: Vec<&str> = devs
            .iter()
            .filter(|(_, d)| d.kind == DeviceKind::Serial)
            .map(|(id, _)| *id)
            .collect();
        let modbus: Vec<&str> = devs
            .iter()
            .filter(|(_, d)| d.kind == DeviceKind::ModbusRtu)
            .map(|(id, _)| *id)
            .collect();
        if !line.is_empty() && !modbus.is_empty() {
            p.push(format!(
                "serial_ports.{port}: serial devices ({}) and modbus_rtu devices ({}) share this port; a bus carries one protocol",
                line.join(", "),
                modbus.join(", ")
            ));
        }
        let mut units: BTreeMap<u8, &str> = BTreeMap::new();
        for (id, d) in devs.iter().filter(|(_, d)| d.kind == DeviceKind::ModbusRtu) {
            if let Some(u) = d.unit_id {
                if let Some(other) = units.insert(u, id) {
                    p.push(format!(
                        "devices.{id}.unit_id: unit {u} on serial_ports.{port} is already device {other}"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use crate::device::modbus::plan::ModbusAction;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    const GOOD: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [serial_ports.rs485]
        path = "/dev/ttyUSB0"
        [devices.meter-1]
        kind = "modbus_tcp"
        host = "192.168.10.40"
        unit_id = 3
        [devices.meter-1.methods.energy]
        table = "input_register"
        address = 0
        type = "f32"
        word_order = "little"
        scale = 0.001
        [devices.meter-1.methods.readings.fields]
        voltage = { table = "input_register", address = 10, scale = 0.1 }
        current = { table = "input_register", address = 11, scale = 0.01 }
        [devices.drive-1]
        kind = "modbus_rtu"
        port = "rs485"
        unit_id = 7
        [devices.drive-1.twin.speed]
        table = "holding_register"
        address = 100
        scale = 0.1
        [devices.drive-1.commands.START]
        table = "coil"
        address = 0
        write = true
    "#;

    #[test]
    fn a_meter_and_a_drive_load_and_compile() {
        let c = load(GOOD).unwrap();
        let m = &c.devices["meter-1"];
        assert_eq!(super::tcp_port(m), Ok(502));
        let readings = &m.methods["readings"];
        match &*readings.compiled_modbus.get(readings).unwrap() {
            ModbusAction::Read(plan) => assert_eq!(plan.spans.len(), 1),
            other => panic!("{other:?}"),
        }
        let speed = &c.devices["drive-1"].twin["speed"];
        assert!(matches!(
            &*speed.compiled_modbus.get(speed).unwrap(),
            ModbusAction::Write(_)
        ));
    }

    #[test]
    fn every_modbus_problem_is_reported_with_its_path() {
        let bad = GOOD
            .replace("host = \"192.168.10.40\"", "host = \"http://x\"\nport = 0")
            .replace("unit_id = 7", "unit_id = 0")
            .replace("type = \"f32\"", "type = \"f32\"\ncount = 2")
            .replace(
                "[devices.drive-1.commands.START]\n        table = \"coil\"",
                "[devices.drive-1.commands.START]\n        table = \"discrete_input\"",
            )
            .replace("scale = 0.01 }", "scale = 0 }")
            + r#"
        [devices.tc-1]
        kind = "serial"
        port = "rs485"
        [devices.tc-1.methods.t]
        request = "T?"
        table = "coil"
        "#;
        let all = load(&bad).unwrap_err().problems.join("\n");
        for want in [
            "devices.meter-1.host: 'http://x' must be a host name or an IP address",
            "devices.meter-1.port: '0' is not a TCP port (1 to 65535)",
            "devices.drive-1.unit_id: must be between 1 and 247 on an RTU bus",
            "devices.meter-1.methods.energy.count: a raw array of registers takes no type, scale or offset",
            "devices.drive-1.commands.START.table: discrete_input is read-only; writes go to a coil or holding_register",
            "devices.meter-1.methods.readings.fields.current.scale: must be a finite number other than 0",
            "devices.tc-1.methods.t: table, address, type, write and register fields are only for modbus_rtu and modbus_tcp devices",
            "serial_ports.rs485: serial devices (tc-1) and modbus_rtu devices (drive-1) share this port; a bus carries one protocol",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn units_on_one_bus_must_differ_and_writes_need_a_writable_value() {
        let text = GOOD.to_string()
            + r#"
        [devices.drive-2]
        kind = "modbus_rtu"
        port = "rs485"
        unit_id = 7
        [devices.drive-2.methods.set]
        table = "holding_register"
        address = 1
        write = "{{speed}}"
        [devices.drive-2.methods.none]
        address = 1
        [devices.meter-2]
        kind = "modbus_tcp"
        host = "192.168.10.40"
        framing = "rtu"
        [devices.meter-2.methods.energy]
        table = "input_register"
        address = 0
        "#;
        let all = load(&text).unwrap_err().problems.join("\n");
        assert!(
            all.contains(
                "devices.drive-2.unit_id: unit 7 on serial_ports.rs485 is already device drive-1"
            ),
            "{all}"
        );
        assert!(
            all.contains("devices.drive-2.methods.set.write: placeholder '{{speed}}' names no declared param"),
            "{all}"
        );
        assert!(
            all.contains("devices.drive-2.methods.none.table: required for a Modbus device"),
            "{all}"
        );
        assert!(
            all.contains("devices.meter-2.framing: 192.168.10.40:502 is also device meter-1's, with another framing"),
            "{all}"
        );
    }
}
