//! gatewayd configurations for simulated AGVs, as the tests and the demo use them.

use std::fmt::Write;
use std::path::Path;

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
"#;

impl GatewayConfig<'_> {
    /// Renders the TOML text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "[gateway]\nid = \"{}\"\n\n[cloud]\nbroker = \"{}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n[store]\npath = \"{}\"\n\n[rpc]\nshutdown_grace_ms = 5000\n",
            self.gateway_id,
            self.broker,
            self.store.display()
        );
        for (id, base) in self.devices {
            let _ = write!(
                s,
                "\n[devices.{id}]\nkind = \"http\"\nbase_url = \"{base}\"\ntimeout_ms = 10000\nauth = {{ bearer = {{ token = \"demo-token\" }} }}\n\n[devices.{id}.health]\npath = \"/health\"\ninterval_ms = {}\ntimeout_ms = 500\nfailures_before_offline = 1\n",
                self.probe_interval_ms
            );
            s.push_str(&AGV_METHODS.replace("{id}", id));
        }
        s
    }
}
