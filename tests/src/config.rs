//! gatewayd configurations for simulated AGVs, as the tests and the demo use them.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Settings of a generated configuration.
pub struct GatewayConfig<'a> {
    pub gateway_id: &'a str,
    pub broker: &'a str,
    pub store: &'a Path,
    /// (device id, API base URL).
    pub devices: &'a [(String, String)],
    /// Health probe interval, ms.
    pub probe_interval_ms: u64,
}

/// The AGV mapping: every method the simulator offers, as an integrator would write it.
pub const AGV_METHODS: &str = r#"
[devices.{id}.methods.status]
verb = "GET"
path = "/api/status"

[devices.{id}.methods.battery]
verb = "GET"
path = "/api/status"
result_pointer = "/battery"

[devices.{id}.methods.get_config]
verb = "GET"
path = "/api/config"

[devices.{id}.methods.set_max_speed]
verb = "PUT"
path = "/api/config/maxSpeed"
body = { value = "{{value}}" }
result_pointer = "/value"
params = { value = { type = "number", min = 0 } }

[devices.{id}.methods.move]
verb = "POST"
path = "/api/move"
body = { x = "{{x}}", y = "{{y}}", speed = "{{speed}}" }
params = { x = { type = "number" }, y = { type = "number" }, speed = { type = "number", required = false, min = 0 } }

[devices.{id}.methods.restart]
verb = "POST"
path = "/api/restart"
result = "none"

[devices.{id}.methods.echo]
verb = "POST"
path = "/api/echo"
query = { tag = "{{tag}}" }
headers = { X-Request-Tag = "{{tag}}" }
body = "{{params}}"
params = { tag = { type = "string" }, n = { type = "integer", required = false } }

[devices.{id}.twin.maxSpeed]
verb = "PUT"
path = "/api/config/maxSpeed"
body = { value = "{{value}}" }
result_pointer = "/value"

[devices.{id}.twin.mode]
verb = "PUT"
path = "/api/config/mode"
body = { value = "{{value}}" }
result_pointer = "/value"

[devices.{id}.twin.led]
verb = "PUT"
path = "/api/config/led"
body = { value = "{{value}}" }
result_pointer = "/value"

[devices.{id}.commands.RESTART]
verb = "POST"
path = "/api/restart"
headers = { X-Message-Id = "{{message_id}}" }
result = "none"

[devices.{id}.commands.MOVE]
verb = "POST"
path = "/api/move"
headers = { X-Message-Id = "{{message_id}}" }
body = { x = "{{x}}", y = "{{y}}", speed = "{{speed}}" }
params = { x = { type = "number" }, y = { type = "number" }, speed = { type = "number", required = false } }

[devices.{id}.commands.BEEP]
verb = "POST"
path = "/api/commands"
headers = { X-Message-Id = "{{message_id}}" }
body = "{{params}}"
params = { n = { type = "integer", required = false } }
"#;

/// Where a rendered configuration has gatewayd write its admin address: next to its store.
pub fn admin_address_file(store: &Path) -> PathBuf {
    store.with_extension("admin-addr")
}

impl GatewayConfig<'_> {
    /// Renders the TOML text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "[gateway]\nid = \"{}\"\n\n[cloud]\nbroker = \"{}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n[store]\npath = \"{}\"\n\n[rpc]\nshutdown_grace_ms = 5000\n\n[messages]\nretry_min_ms = 100\nretry_max_ms = 500\n",
            self.gateway_id,
            self.broker,
            self.store.display()
        );
        // The admin API on a free port; gatewayd writes the bound address next to the store.
        let _ = write!(
            s,
            "\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = \"{}\"\n",
            admin_address_file(self.store).display()
        );
        // One profile carries the AGV mapping; every device names it.
        if !self.devices.is_empty() {
            s.push_str("\n[profiles.agv]\nkind = \"http\"\n");
            s.push_str(&AGV_METHODS.replace("devices.{id}", "profiles.agv"));
        }
        for (id, base) in self.devices {
            let _ = write!(
                s,
                "\n[devices.{id}]\nkind = \"http\"\nprofile = \"agv\"\nbase_url = \"{base}\"\ntimeout_ms = 10000\nauth = {{ bearer = {{ token = \"demo-token\" }} }}\n\n[devices.{id}.health]\npath = \"/health\"\ninterval_ms = {}\ntimeout_ms = 2000\nfailures_before_offline = 2\n",
                self.probe_interval_ms
            );
        }
        s
    }
}

/// The temperature controller mapping (`device-fixtures serial`), as an integrator would write
/// it; `{{address}}` is the unit's bus address.
pub const TC_METHODS: &str = r#"
[devices.{id}.methods.temperature]
request = "{{address}}TEMP?"
response = 'TEMP (?P<temp>-?[0-9.]+)'
fields = { temp = "number" }
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']

[devices.{id}.methods.setpoint]
request = "{{address}}SETP?"
response = 'SETP (?P<setpoint>-?[0-9.]+)'
fields = { setpoint = "number" }
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']

[devices.{id}.methods.set_setpoint]
request = "{{address}}SETP {{value}}"
response = "OK"
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']
params = { value = { type = "number" } }

[devices.{id}.methods.identify]
request = "{{address}}*IDN?"
response = '(?P<vendor>[^,]+) (?P<model>[^,]+),(?P<serial>[^,]+),(?P<firmware>[^,]+)'

[devices.{id}.twin.setpoint]
request = "{{address}}SETP {{value}}"
response = "OK"
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']
read_back = "setpoint"
read_back_pointer = "/setpoint"

[devices.{id}.commands.SETP]
request = "{{address}}SETP {{value}}"
response = "OK"
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']
params = { value = { type = "number" } }
"#;

/// A serial port and temperature controllers on it, to append to a rendered
/// [`GatewayConfig`].
pub struct SerialConfig<'a> {
    /// Port name in `[serial_ports]`.
    pub port: &'a str,
    /// Device path (the simulator's link).
    pub path: &'a str,
    /// The port's response timeout, ms.
    pub timeout_ms: u64,
    /// (device id, bus address).
    pub devices: &'a [(&'a str, Option<&'a str>)],
}

impl SerialConfig<'_> {
    /// Renders the TOML text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "\n[serial_ports.{}]\npath = \"{}\"\nbaud = 115200\ntimeout_ms = {}\n# The simulator's own status line, when it prints one.\nignore = ['#STAT .*']\n",
            self.port, self.path, self.timeout_ms
        );
        for (id, address) in self.devices {
            let _ = write!(
                s,
                "\n[devices.{id}]\nkind = \"serial\"\nport = \"{}\"\n",
                self.port
            );
            if let Some(a) = address {
                let _ = writeln!(s, "address = \"{a}\"");
            }
            s.push_str(&TC_METHODS.replace("{id}", id));
        }
        s
    }
}
