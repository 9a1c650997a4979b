//! Field devices, serial side: an instrument in terminal mode (it echoes every request, takes
//! CR-only requests, prints a status line on its own every 50 ms, answers blocks and text error
//! codes, and is busy every so often), wired with `echo`, `ignore`, `lines`/`until`, `busy` and
//! text `errors`. Each scenario prints its figures.

use anyhow::Result;
use e2e::config::GatewayConfig;
use e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const GW: &str = "site-1";
const ERRORS: &str = r#"errors = ['ERR:(?P<code>[A-Z]+)(?: (?P<text>.*))?']"#;

/// The instrument as an integrator describes it.
fn instrument(path: &str) -> String {
    format!(
        r#"
[serial_ports.bus1]
path = "{path}"
baud = 115200
timeout_ms = 2000
request_terminator = "\r"
echo = true
ignore = ['#STAT .*']
busy = ['BUSY']

[devices.tc-1]
kind = "serial"
port = "bus1"
timeout_ms = 5000

[devices.tc-1.reported_poll]
method = "setpoint"
interval_ms = 1000

[devices.tc-1.methods.temperature]
request = "TEMP?"
response = 'TEMP (?P<temp>-?[0-9.]+)'
fields = {{ temp = "number" }}
{ERRORS}

[devices.tc-1.methods.setpoint]
request = "SETP?"
response = 'SETP (?P<setpoint>-?[0-9.]+)'
fields = {{ setpoint = "number" }}
{ERRORS}

[devices.tc-1.methods.set_setpoint]
request = "SETP {{{{value}}}}"
response = "OK"
{ERRORS}
params = {{ value = {{ type = "number" }} }}

[devices.tc-1.methods.dump]
request = "DUMP?"
until = 'END'
response = 'T=(?P<temp>[0-9.]+)\nSETP=(?P<setpoint>[0-9.]+)\nMODE=(?P<mode>[A-Z]+)\nEND'
fields = {{ temp = "number", setpoint = "number" }}
{ERRORS}

[devices.tc-1.methods.stat]
request = "STAT?"
lines = 3
response = 'T=(?P<temp>[0-9.]+)\nSETP=[0-9.]+\nALARM=(?P<alarm>[A-Z]+)'
fields = {{ temp = "number" }}

[devices.tc-1.twin.setpoint]
request = "SETP {{{{value}}}}"
response = "OK"
{ERRORS}
read_back = "setpoint"
read_back_pointer = "/setpoint"

[devices.tc-1.commands.SETP]
request = "SETP {{{{value}}}}"
response = "OK"
{ERRORS}
params = {{ value = {{ type = "number" }} }}
"#
    )
}

// Field order is drop order: the processes go first, their log directory last.
struct Env {
    _gateway: Gateway,
    sim: SerialSim,
    stub: Stub,
    _dir: TempDir,
}

impl Env {
    async fn start() -> Result<Env> {
        let dir = tempfile::tempdir()?;
        // Room for a burst of 200 messages to one device.
        let (stub, _) = Stub::start_with_args(
            dir.path(),
            &Broker::Embedded("127.0.0.1:0".into()),
            ":memory:",
            &["--max-queue".to_string(), "250".to_string()],
        )
        .await?;
        let sim = SerialSim::start(dir.path(), "ttySIM0", &[]).await?;
        sim.fault(json!({
            "echo": true,
            "request_terminator": "\r",
            "unsolicited_ms": 50,
            "text_errors": true,
        }))
        .await?;
        let store = dir.path().join("gatewayd.db");
        let mut config = GatewayConfig {
            gateway_id: GW,
            broker: &stub.mqtt,
            store: &store,
            devices: &[],
            probe_interval_ms: 100,
        }
        .render();
        config.push_str(&instrument(&sim.path));
        let gateway = Gateway::start(dir.path(), &config).await?;
        await_device_online(&stub.api, "tc-1", true).await?;
        Ok(Env {
            _gateway: gateway,
            sim,
            stub,
            _dir: dir,
        })
    }

    async fn call(&self, method: &str, params: Value) -> Result<(u16, Value)> {
        let (s, b, _) = invoke(&self.stub.api, "tc-1", method, params, 10).await?;
        Ok((s, b))
    }

    async fn executed(&self, command: &str) -> Result<u64> {
        Ok(self.sim.state().await?["executed"][command]
            .as_u64()
            .unwrap_or(0))
    }
}

/// 1,000 RPCs against an echoing device that prints a status line every 50 ms: no call is
/// taken for failed; blocks, 3-line answers and text error codes map as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_lines_and_echo_never_make_a_call_look_failed() -> Result<()> {
    let env = Env::start().await?;
    let started = Instant::now();
    let mut failures = Vec::new();
    for i in 0..1000 {
        let method = ["temperature", "stat", "dump", "setpoint"][i % 4];
        let (s, b) = env.call(method, json!({})).await?;
        if s != 200 {
            failures.push((method, b));
        }
    }
    let took = started.elapsed();
    let unsolicited = env.sim.state().await?["unsolicited_sent"].clone();
    println!(
        "field serial: 1,000 RPCs with echo and a status line every 50 ms: {} failures in {took:?} (unsolicited lines sent: {unsolicited})",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");

    let (s, b) = env.call("dump", json!({})).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["result"]["mode"], "AUTO", "{b}");
    assert_eq!(b["result"]["setpoint"], 20.0, "{b}");
    let (s, b) = env.call("stat", json!({})).await?;
    assert_eq!(
        (s, b["result"]["alarm"].as_str()),
        (200, Some("NONE")),
        "{b}"
    );

    // A text error code stays text.
    let (s, b) = env.call("set_setpoint", json!({"value": 999})).await?;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["code"], "device_error", "{b}");
    assert_eq!(b["device_code"], "RANGE", "{b}");
    Ok(())
}

/// 200 commands in a burst to that device: as many `completed` as the device executed, none
/// run twice; then a device busy on every 5th request: every message still completes exactly
/// once, the twin property ends `applied`, and RPCs succeed or get `device_busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_commands_runs_each_once_busy_or_not() -> Result<()> {
    let env = Env::start().await?;
    let send = |value: u64| {
        let api = env.stub.api.clone();
        async move {
            let (s, b) = post(
                &format!("{api}/api/v1/devices/tc-1/messages"),
                &json!({"payload": {"command": "SETP", "value": value}, "ttl_seconds": 120}),
            )
            .await?;
            anyhow::ensure!(s == 202, "send: {s} {b}");
            Ok::<_, anyhow::Error>(b["id"].as_str().unwrap_or_default().to_string())
        }
    };
    let final_of = |id: String| {
        let api = env.stub.api.clone();
        async move {
            eventually(
                &format!("message {id} final"),
                Duration::from_secs(60),
                || {
                    let (api, id) = (api.clone(), id.clone());
                    async move {
                        let (_, m) =
                            get(&format!("{api}/api/v1/devices/tc-1/messages/{id}")).await?;
                        let done =
                            !matches!(m["status"].as_str(), Some("queued") | Some("delivered"));
                        Ok(done.then_some(m))
                    }
                },
            )
            .await
        }
    };

    for (round, busy_every) in [(1, 0), (2, 5)] {
        env.sim.fault(json!({ "busy_every": busy_every })).await?;
        let before = env.executed("SETP").await?;
        let started = Instant::now();
        let mut ids = Vec::new();
        for i in 0..200 {
            ids.push(send(i % 100).await?);
        }
        let mut completed = 0;
        let mut statuses = std::collections::BTreeMap::<String, u64>::new();
        for id in ids {
            let m = final_of(id).await?;
            let status = m["status"].as_str().unwrap_or("?").to_string();
            completed += u64::from(status == "completed");
            *statuses.entry(status).or_default() += 1;
        }
        let executed = env.executed("SETP").await? - before;
        println!(
            "field serial: round {round} (busy every {busy_every}): 200 commands in {:?}: {statuses:?}, device executed {executed}",
            started.elapsed()
        );
        assert_eq!(completed, 200, "{statuses:?}");
        assert_eq!(executed, completed, "executions against completed");
    }

    // Still busy every 5th: RPCs succeed or say busy, never anything else.
    let (mut ok, mut busy) = (0, 0);
    for _ in 0..50 {
        let (s, b) = env.call("temperature", json!({})).await?;
        match (s, b["code"].as_str()) {
            (200, _) => ok += 1,
            (503, Some("device_busy")) => busy += 1,
            other => panic!("unexpected RPC answer {other:?}: {b}"),
        }
    }
    println!("field serial: busy every 5th: RPCs {ok} ok, {busy} device_busy");
    assert!(busy > 0);

    let (s, b) = patch(
        &format!("{}/api/v1/devices/tc-1/twin/desired", env.stub.api),
        &json!({"setpoint": 42}),
        None,
    )
    .await?;
    anyhow::ensure!(s == 200, "patch: {s} {b}");
    let url = format!("{}/api/v1/devices/tc-1/twin", env.stub.api);
    eventually("setpoint applied", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let (_, t) = get(&url).await?;
            Ok(
                (t["apply"]["setpoint"]["state"] == "applied" && t["reported"]["setpoint"] == 42.0)
                    .then_some(()),
            )
        }
    })
    .await?;
    Ok(())
}

/// A device reset to its defaults while connected is brought back to the desired state within
/// one reported-poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_device_gets_its_desired_state_back() -> Result<()> {
    let env = Env::start().await?;
    let (s, b) = patch(
        &format!("{}/api/v1/devices/tc-1/twin/desired", env.stub.api),
        &json!({"setpoint": 42}),
        None,
    )
    .await?;
    anyhow::ensure!(s == 200, "patch: {s} {b}");
    let url = format!("{}/api/v1/devices/tc-1/twin", env.stub.api);
    let applied = || {
        let url = url.clone();
        async move {
            let (_, t) = get(&url).await?;
            Ok(
                (t["apply"]["setpoint"]["state"] == "applied" && t["reported"]["setpoint"] == 42.0)
                    .then_some(()),
            )
        }
    };
    eventually("setpoint applied", Duration::from_secs(20), applied).await?;
    env.sim.fault(json!({"reset": true})).await?;
    let started = Instant::now();
    eventually("device holds 42 again", Duration::from_secs(10), || async {
        let (s, b) = env.call("setpoint", json!({})).await?;
        Ok((s == 200 && b["result"]["setpoint"] == 42.0).then_some(()))
    })
    .await?;
    let took = started.elapsed();
    println!("field serial: reset to defaults while connected: desired setpoint back on the device after {took:?} (poll interval 1 s)");
    assert!(took < Duration::from_secs(3), "{took:?}");
    eventually("reported 42 again", Duration::from_secs(10), applied).await?;
    Ok(())
}
