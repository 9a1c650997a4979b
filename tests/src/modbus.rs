//! The Modbus slave simulator (`device-fixtures modbus`) as the tests start it, and the
//! register map and mappings they share.

use crate::{get, invoke, post, Proc};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A running Modbus simulator: TCP on a free port, RTU on a pty behind a stable link.
pub struct ModbusSim {
    pub proc: Proc,
    /// Control API base.
    pub control: String,
    /// `127.0.0.1`.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The RTU-over-TCP port.
    pub rtu_tcp_port: u16,
    /// The stable link to the current pty.
    pub path: String,
}

impl ModbusSim {
    /// Starts the simulator on `map` (written to `dir/<name>.json`), its pty linked at
    /// `dir/<name>`.
    pub async fn start(dir: &Path, name: &str, map: &Value) -> Result<ModbusSim> {
        let map_path = dir.join(format!("{name}.json"));
        std::fs::write(&map_path, serde_json::to_vec_pretty(map)?)?;
        let link = dir.join(name);
        let args = vec![
            "modbus".to_string(),
            "--map".into(),
            map_path.display().to_string(),
            "--link".into(),
            link.display().to_string(),
            "--tcp".into(),
            "127.0.0.1:0".into(),
            "--control".into(),
            "127.0.0.1:0".into(),
        ];
        let (proc, ready) = Proc::start("device-fixtures", &args, dir, name).await?;
        let tcp: std::net::SocketAddr = ready["tcp"].as_str().context("tcp")?.parse()?;
        let rtu_tcp: std::net::SocketAddr =
            ready["rtu_tcp"].as_str().context("rtu_tcp")?.parse()?;
        Ok(ModbusSim {
            proc,
            control: ready["control"].as_str().context("control")?.to_string(),
            host: tcp.ip().to_string(),
            port: tcp.port(),
            rtu_tcp_port: rtu_tcp.port(),
            path: link.display().to_string(),
        })
    }

    /// Sets faults, e.g. `{"no_reply": true}`; answers once a `gone` change took effect.
    pub async fn fault(&self, faults: Value) -> Result<Value> {
        let (status, body) = post(&format!("{}/_control/faults", self.control), &faults).await?;
        if status != 200 {
            bail!("setting modbus faults: {status} {body}");
        }
        Ok(body)
    }

    /// Clears every fault (but `gone`) and restores the map's values and counters.
    pub async fn reset(&self) -> Result<Value> {
        let (status, body) = post(&format!("{}/_control/reset", self.control), &json!({})).await?;
        if status != 200 {
            bail!("resetting modbus simulator: {status} {body}");
        }
        Ok(body)
    }

    /// Sets values as a local operator would (`table` is e.g. `holding_registers`).
    pub async fn panel(&self, unit: u8, table: &str, address: u16, values: Value) -> Result<()> {
        let body = json!({"unit": unit, "table": table, "address": address, "values": values});
        let (status, b) = post(&format!("{}/_control/registers", self.control), &body).await?;
        if status != 200 {
            bail!("setting registers: {status} {b}");
        }
        Ok(())
    }

    /// Units (tables, counters, write log), collisions and faults.
    pub async fn state(&self) -> Result<Value> {
        let (status, body) = get(&format!("{}/_control/state", self.control)).await?;
        if status != 200 {
            bail!("modbus state: {status} {body}");
        }
        Ok(body)
    }
}

/// A unit as the tests map it: an energy counter (f32, word-swapped, Wh read as kWh), a
/// temperature (i16, scale 0.1), a block of 10 registers, a clamped setpoint, three
/// configuration registers, eight coils, and register 300 holding the unit's own id (so an
/// answer from the wrong unit shows).
pub fn unit_map(unit: u8) -> Value {
    json!({
        // 12345.0 f32 = 0x4640E400, low word first.
        "holding_registers": {
            "0": 0xE400, "1": 0x4640,
            "10": 2301, "11": 0xFFFB, "12": 1, "13": 2, "14": 0x4148, "15": 0,
            "16": 16, "17": 17, "18": 18, "19": 19,
            "100": 500,
            "200-202": 0,
            "300": unit
        },
        "input_registers": {"0": 215},
        "coils": {"0-7": false},
        "discrete_inputs": {"0": true},
        "clamp": {"100": [0, 1500]}
    })
}

/// The mapping of [`unit_map`], as an integrator would write it, for device `id`.
pub const METER_ACTIONS: &str = r#"
[devices.{id}.methods.energy]
table = "holding_register"
address = 0
type = "f32"
word_order = "little"
scale = 0.001

[devices.{id}.methods.temperature]
table = "input_register"
address = 0
type = "i16"
scale = 0.1

[devices.{id}.methods.unit]
table = "holding_register"
address = 300

[devices.{id}.methods.block.fields]
voltage = { table = "holding_register", address = 10, scale = 0.1 }
delta = { table = "holding_register", address = 11, type = "i16" }
count = { table = "holding_register", address = 12, type = "u32" }
flow = { table = "holding_register", address = 14, type = "f32" }
r16 = { table = "holding_register", address = 16 }
r17 = { table = "holding_register", address = 17 }
r18 = { table = "holding_register", address = 18 }
r19 = { table = "holding_register", address = 19 }

[devices.{id}.methods.missing]
table = "holding_register"
address = 999

[devices.{id}.methods.start]
table = "coil"
address = 0
write = true

[devices.{id}.methods.running]
table = "coil"
address = 0

[devices.{id}.methods.set_raw]
table = "holding_register"
address = 200
write = "{{value}}"
params = { value = { type = "integer" } }

[devices.{id}.methods.config]
table = "holding_register"
address = 200
count = 3

[devices.{id}.methods.setpoint]
table = "holding_register"
address = 100
scale = 0.1

[devices.{id}.twin.setpoint]
table = "holding_register"
address = 100
scale = 0.1
read_back = "setpoint"

[devices.{id}.commands.CONFIGURE]
table = "holding_register"
address = 200
write = ["{{seq}}", "{{speed}}", 1]
params = { seq = { type = "integer" }, speed = { type = "integer" } }
"#;

/// A modbus_tcp device `id` for unit `unit` of `peer`, with [`METER_ACTIONS`].
pub fn tcp_device(id: &str, peer: &dyn Peer, unit: u8) -> String {
    format!(
        "\n[devices.{id}]\nkind = \"modbus_tcp\"\nhost = \"{}\"\nport = {}\nunit_id = {unit}\n{}",
        peer.host(),
        peer.port(),
        METER_ACTIONS.replace("{id}", id)
    )
}

/// A modbus_tcp device `id` with RTU framing on `port` of `host`, with [`METER_ACTIONS`].
pub fn rtu_over_tcp_device(id: &str, host: &str, port: u16, unit: u8) -> String {
    format!(
        "\n[devices.{id}]\nkind = \"modbus_tcp\"\nframing = \"rtu\"\nhost = \"{host}\"\nport = {port}\nunit_id = {unit}\n{}",
        METER_ACTIONS.replace("{id}", id)
    )
}

/// A serial port `port` on `peer`'s pty.
pub fn rtu_port(port: &str, peer: &dyn Peer) -> String {
    format!(
        "\n[serial_ports.{port}]\npath = \"{}\"\nbaud = 115200\ntimeout_ms = 5000\n",
        peer.path()
    )
}

/// A modbus_rtu device `id` for unit `unit` on serial port `port`, with [`METER_ACTIONS`].
pub fn rtu_device(id: &str, port: &str, unit: u8) -> String {
    format!(
        "\n[devices.{id}]\nkind = \"modbus_rtu\"\nport = \"{port}\"\nunit_id = {unit}\n{}",
        METER_ACTIONS.replace("{id}", id)
    )
}

/// A Modbus slave built on pymodbus (`tests/pymodbus/server.py`, run by the virtual
/// environment `.ci/run` installs at `target/pymodbus-venv`): TCP on a free port, RTU on a
/// pty pair behind a stable link. No faults, no clamps: an implementation nobody here wrote.
pub struct Pymodbus {
    pub proc: Proc,
    pub host: String,
    pub port: u16,
    /// The RTU-over-TCP port.
    pub rtu_tcp_port: u16,
    pub path: String,
}

/// The pymodbus virtual environment's Python, found above the running test executable.
fn pymodbus_python() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .map(|d| d.join("pymodbus-venv/bin/python"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no pymodbus virtual environment above {}; .ci/run installs it (python3 -m venv target/pymodbus-venv && target/pymodbus-venv/bin/pip install 'pymodbus[serial]==3.8.6')",
                exe.display()
            )
        })
}

impl Pymodbus {
    /// Starts the pymodbus server on `map`, its pty linked at `dir/<name>`.
    pub async fn start(dir: &Path, name: &str, map: &Value) -> Result<Pymodbus> {
        let map_path = dir.join(format!("{name}.json"));
        std::fs::write(&map_path, serde_json::to_vec_pretty(map)?)?;
        let link = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pymodbus/server.py");
        let mut child = Command::new(pymodbus_python()?)
            .arg(&script)
            .arg("--map")
            .arg(&map_path)
            .arg("--link")
            .arg(&link)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the pymodbus server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let proc = Proc {
            child,
            log,
            name: name.to_string(),
        };
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "pymodbus printed no ready line within 30 s:\n{}",
                    proc.tail()
                )
            })??
            .ok_or_else(|| anyhow!("pymodbus exited before its ready line:\n{}", proc.tail()))?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        let tcp: std::net::SocketAddr = ready["tcp"].as_str().context("tcp")?.parse()?;
        let rtu_tcp: std::net::SocketAddr =
            ready["rtu_tcp"].as_str().context("rtu_tcp")?.parse()?;
        Ok(Pymodbus {
            proc,
            host: tcp.ip().to_string(),
            port: tcp.port(),
            rtu_tcp_port: rtu_tcp.port(),
            path: link.display().to_string(),
        })
    }
}

/// A peer gatewayd's Modbus devices can reach: the simulator or pymodbus.
pub trait Peer {
    fn host(&self) -> &str;
    fn port(&self) -> u16;
    fn path(&self) -> &str;
}

impl Peer for ModbusSim {
    fn host(&self) -> &str {
        &self.host
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn path(&self) -> &str {
        &self.path
    }
}

impl Peer for Pymodbus {
    fn host(&self) -> &str {
        &self.host
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn path(&self) -> &str {
        &self.path
    }
}

async fn ok(api: &str, device: &str, method: &str, params: Value) -> Result<Value> {
    let (s, b, _) = invoke(api, device, method, params, 5).await?;
    ensure!(s == 200, "{device} {method}: {s} {b}");
    Ok(b["result"].clone())
}

/// What every peer must agree on, on a fresh unit of [`unit_map`]: a word-swapped scaled
/// float, a scaled signed value, a block of 10 registers into fields, a coil written and read
/// back, a value out of range refused, and an address the unit lacks (exception 2).
pub async fn reads_and_writes(api: &str, device: &str) -> Result<()> {
    let energy = ok(api, device, "energy", json!(null)).await?;
    ensure!(
        (energy.as_f64().unwrap_or_default() - 12.345).abs() < 1e-9,
        "energy {energy}"
    );
    let t = ok(api, device, "temperature", json!(null)).await?;
    ensure!(t == json!(21.5), "temperature {t}");
    let block = ok(api, device, "block", json!(null)).await?;
    let want = json!({"voltage": 230.1, "delta": -5, "count": 65538, "flow": 12.5,
                      "r16": 16, "r17": 17, "r18": 18, "r19": 19});
    ensure!(block == want, "block {block}, want {want}");
    let r = ok(api, device, "running", json!(null)).await?;
    ensure!(r == json!(false), "running before start: {r}");
    let r = ok(api, device, "start", json!(null)).await?;
    ensure!(r == Value::Null, "start: {r}");
    let r = ok(api, device, "running", json!(null)).await?;
    ensure!(r == json!(true), "running after start: {r}");
    let r = ok(api, device, "set_raw", json!({"value": 65535})).await?;
    ensure!(r == Value::Null, "set_raw: {r}");
    let r = ok(api, device, "config", json!(null)).await?;
    ensure!(r == json!([65535, 0, 0]), "config: {r}");
    let (s, b, _) = invoke(api, device, "set_raw", json!({"value": 70000}), 5).await?;
    ensure!(
        s == 400 && b["code"] == "invalid_params",
        "out of range: {s} {b}"
    );
    let (s, b, _) = invoke(api, device, "missing", json!(null), 5).await?;
    ensure!(
        s == 502
            && b["code"] == "device_error"
            && b["device_status"] == 2
            && b["detail"] == "modbus exception 2 (illegal data address)",
        "missing address: {s} {b}"
    );
    Ok(())
}
