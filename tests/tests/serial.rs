//! Serial devices end to end: the real cloud stub, the serial simulator on a real
//! pseudo-terminal and gatewayd, through the operator API.

use anyhow::Result;
use e2e::config::{GatewayConfig, SerialConfig};
use e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const GW: &str = "site-1";

// Field order is drop order: the processes go first, their log directory last.
struct Env {
    gateway: Gateway,
    sim: SerialSim,
    stub: Stub,
    _dir: TempDir,
}

impl Env {
    /// A simulator with units `addresses`, and gatewayd with `devices` (id, address) on it.
    async fn start(addresses: &[&str], devices: &[(&str, Option<&str>)]) -> Result<Env> {
        let dir = tempfile::tempdir()?;
        let stub = Stub::start(
            dir.path(),
            &Broker::Embedded("127.0.0.1:0".into()),
            ":memory:",
        )
        .await?;
        let sim = SerialSim::start(dir.path(), "ttySIM0", addresses).await?;
        let store = dir.path().join("gatewayd.db");
        let mut config = GatewayConfig {
            gateway_id: GW,
            broker: &stub.mqtt,
            store: &store,
            devices: &[],
            probe_interval_ms: 100,
        }
        .render();
        config.push_str(
            &SerialConfig {
                port: "bus1",
                path: &sim.path,
                // Longer than the RPC timeouts used below: the caller's deadline decides.
                timeout_ms: 5000,
                devices,
            }
            .render(),
        );
        let gateway = Gateway::start(dir.path(), &config).await?;
        for (id, _) in devices {
            await_device_online(&stub.api, id, true).await?;
        }
        Ok(Env {
            gateway,
            sim,
            stub,
            _dir: dir,
        })
    }

    async fn call(
        &self,
        device: &str,
        method: &str,
        params: Value,
        timeout_s: u64,
    ) -> Result<(u16, Value, Duration)> {
        invoke(&self.stub.api, device, method, params, timeout_s).await
    }
}

fn within(took: Duration, from_ms: u64, to_ms: u64) -> bool {
    took >= Duration::from_millis(from_ms) && took < Duration::from_millis(to_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_rpcs_map_answers_errors_and_faults() -> Result<()> {
    let env = Env::start(&[], &[("tc-1", None)]).await?;

    // The catalog says what the device is.
    let (_, view) = get(&format!("{}/api/v1/devices/tc-1", env.stub.api)).await?;
    assert_eq!(view["kind"], "serial", "{view}");

    // Captures become a typed result.
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], 200);
    assert_eq!(b["result"], json!({"temp": 21.5}));
    assert!(b["result"]["temp"].is_f64(), "{b}");
    let (s, b, _) = env.call("tc-1", "identify", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["result"],
        json!({"vendor": "ACME", "model": "TC-100", "serial": "SN1234", "firmware": "1.0"})
    );

    // A write with a param, read back through the device and its own state.
    let (s, b, _) = env
        .call("tc-1", "set_setpoint", json!({"value": 30}), 5)
        .await?;
    assert_eq!((s, b["result"].clone()), (200, json!({})), "{b}");
    let (s, b, _) = env.call("tc-1", "setpoint", json!(null), 5).await?;
    assert_eq!(
        (s, b["result"].clone()),
        (200, json!({"setpoint": 30.0})),
        "{b}"
    );
    assert_eq!(env.sim.state().await?["setpoints"][""], 30.0);

    // The device refuses: its error line becomes device_error with its code and text.
    let (s, b, _) = env
        .call("tc-1", "set_setpoint", json!({"value": 140}), 5)
        .await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    assert_eq!(b["device_status"], 3, "{b}");
    assert_eq!(b["detail"], "OUT OF RANGE", "{b}");

    // Silence: timeout at the caller's deadline (2 s), not at a fixed wait.
    env.sim.fault(json!({"no_reply": true})).await?;
    let (s, b, took) = env.call("tc-1", "temperature", json!(null), 2).await?;
    assert_eq!((s, b["code"].as_str()), (504, Some("timeout")), "{b}");
    assert!(within(took, 1900, 2600), "took {took:?}");
    env.sim.fault(json!({"no_reply": false})).await?;

    // Garbage ends its request with device_error; the junk left on the line is discarded, so
    // the next request succeeds.
    env.sim.fault(json!({"garbage": true})).await?;
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    let msg = b["message"].as_str().unwrap_or_default();
    assert!(msg.contains("unexpected answer"), "{b}");
    env.sim.fault(json!({"garbage": false})).await?;
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(
        (s, b["result"].clone()),
        (200, json!({"temp": 21.5})),
        "{b}"
    );

    // A partial line (no terminator): timeout at the deadline; the port stays usable.
    env.sim.fault(json!({"partial": true})).await?;
    let (s, b, took) = env.call("tc-1", "temperature", json!(null), 1).await?;
    assert_eq!((s, b["code"].as_str()), (504, Some("timeout")), "{b}");
    assert!(within(took, 900, 1600), "took {took:?}");
    env.sim.fault(json!({"partial": false})).await?;

    // An over-long line: device_error naming the limit; the port stays usable.
    env.sim.fault(json!({"long_reply": true})).await?;
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("frame longer than 256 bytes"),
        "{b}"
    );
    env.sim.fault(json!({"long_reply": false})).await?;
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    // A slow device within the deadline is fine.
    env.sim.fault(json!({"slow_ms": 300})).await?;
    let (s, b, took) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    env.sim.fault(json!({"slow_ms": 0})).await?;

    // Latency of the whole path (operator API -> MQTT -> gatewayd -> pty -> back).
    let mut samples = Vec::new();
    for _ in 0..50 {
        let (s, b, took) = env.call("tc-1", "temperature", json!(null), 5).await?;
        assert_eq!(s, 200, "{b}");
        samples.push(took);
    }
    samples.sort();
    println!(
        "serial temperature RPC latency over 50 sequential calls: p50 {:?}, p95 {:?}, max {:?}",
        samples[24], samples[47], samples[49]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_port_takes_the_device_offline_until_it_returns() -> Result<()> {
    let mut env = Env::start(&[], &[("tc-1", None)]).await?;
    let pid = env.gateway.proc.child.id();

    env.sim.fault(json!({"disappear": true})).await?;
    let view = await_device_online(&env.stub.api, "tc-1", false).await?;
    let (s, b, took) = env.call("tc-1", "temperature", json!(null), 10).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (503, Some("device_offline")),
        "{b} {view}"
    );
    assert!(
        took < Duration::from_millis(300),
        "offline must fail at once, took {took:?}"
    );

    // The port returns (a new pty behind the same path): online again without a restart.
    env.sim.fault(json!({"disappear": false})).await?;
    await_device_online(&env.stub.api, "tc-1", true).await?;
    let (s, b, _) = env.call("tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(
        (s, b["result"].clone()),
        (200, json!({"temp": 21.5})),
        "{b}"
    );
    assert_eq!(env.gateway.proc.child.id(), pid, "same gatewayd process");
    assert!(
        env.gateway.proc.child.try_wait()?.is_none(),
        "gatewayd still running"
    );

    // An orderly stop with a serial port open exits 0.
    assert_eq!(env.gateway.proc.terminate().await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_on_one_bus_are_served_one_at_a_time() -> Result<()> {
    let env = Env::start(&["01", "02"], &[("tc-a", Some("01")), ("tc-b", Some("02"))]).await?;
    for (id, value) in [("tc-a", 40), ("tc-b", 60)] {
        let (s, b, _) = env
            .call(id, "set_setpoint", json!({"value": value}), 5)
            .await?;
        assert_eq!(s, 200, "{b}");
    }
    let state = env.sim.state().await?;
    assert_eq!(state["setpoints"], json!({"01": 40.0, "02": 60.0}));
    let before = state["requests"].as_u64().unwrap_or_default();

    // Concurrent reads of both units: each answer belongs to its own unit.
    env.sim.fault(json!({"slow_ms": 20})).await?;
    let started = Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let api = env.stub.api.clone();
            let (id, want) = if i % 2 == 0 {
                ("tc-a", 40.0)
            } else {
                ("tc-b", 60.0)
            };
            tokio::spawn(async move {
                let (s, b, _) = invoke(&api, id, "setpoint", json!(null), 10).await?;
                anyhow::ensure!(s == 200, "call {i} to {id}: {s} {b}");
                anyhow::ensure!(b["result"]["setpoint"] == want, "call {i} to {id} got {b}");
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for c in calls {
        c.await??;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(16 * 20), "took {took:?}");
    let after = env.sim.state().await?["requests"]
        .as_u64()
        .unwrap_or_default();
    assert_eq!(after - before, 16, "one request line per call");
    Ok(())
}

#[test]
fn check_config_reports_a_bad_regex() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("g.db");
    let mut config = GatewayConfig {
        gateway_id: GW,
        broker: "mqtt://127.0.0.1:1883",
        store: &store,
        devices: &[],
        probe_interval_ms: 100,
    }
    .render();
    config.push_str(
        &SerialConfig {
            port: "bus1",
            path: "/dev/ttyUSB0",
            timeout_ms: 1000,
            devices: &[("tc-1", None)],
        }
        .render()
        .replace("(?P<temp>-?[0-9.]+)", "(?P<temp-?[0-9.]+)"),
    );
    let path = dir.path().join("gatewayd.toml");
    std::fs::write(&path, config)?;
    let out = std::process::Command::new(bin("gatewayd")?)
        .arg("check-config")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(
            "devices.tc-1.methods.temperature.response: 'TEMP (?P<temp-?[0-9.]+)' is not a valid regex"
        ),
        "{err}"
    );
    Ok(())
}

/// A twin property applied by a serial command and read back, a refused value reported with
/// the device's reason, and a message mapped to a serial command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_and_messages_reach_serial_devices() -> Result<()> {
    let env = Env::start(&[], &[("tc-1", None)]).await?;
    let api = &env.stub.api;
    let twin_url = format!("{api}/api/v1/devices/tc-1/twin");
    let (s, b) = patch(
        &format!("{twin_url}/desired"),
        &json!({"setpoint": 30}),
        None,
    )
    .await?;
    assert_eq!(s, 200, "{b}");
    let twin = eventually("reported setpoint 30", Duration::from_secs(20), || {
        let url = twin_url.clone();
        async move {
            let (_, t) = get(&url).await?;
            Ok((t["reported"]["setpoint"] == json!(30.0)).then_some(t))
        }
    })
    .await?;
    assert_eq!(twin["apply"]["setpoint"]["state"], "applied", "{twin}");
    assert_eq!(twin["delta"], json!([]), "{twin}");

    // Out of the controller's range: refused with its own error text, reported unchanged.
    patch(
        &format!("{twin_url}/desired"),
        &json!({"setpoint": 150}),
        None,
    )
    .await?;
    let twin = eventually("setpoint refused", Duration::from_secs(20), || {
        let url = twin_url.clone();
        async move {
            let (_, t) = get(&url).await?;
            Ok((t["apply"]["setpoint"]["state"] == "refused").then_some(t))
        }
    })
    .await?;
    let reason = twin["apply"]["setpoint"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("OUT OF RANGE"), "{twin}");
    assert_eq!(twin["reported"]["setpoint"], json!(30.0));
    assert_eq!(twin["delta"], json!(["setpoint"]));

    // A message mapped to a serial command.
    let (s, b) = post(
        &format!("{api}/api/v1/devices/tc-1/messages"),
        &json!({"payload": {"command": "SETP", "value": 42}, "ttl_seconds": 60}),
    )
    .await?;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap_or_default().to_string();
    let url = format!("{api}/api/v1/devices/tc-1/messages/{id}");
    let m = eventually("message completed", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let (_, m) = get(&url).await?;
            Ok((m["status"] == "completed").then_some(m))
        }
    })
    .await?;
    assert_eq!(m["status"], "completed");
    let (s, b, _) = env.call("tc-1", "setpoint", json!(null), 5).await?;
    assert_eq!(
        (s, b["result"].clone()),
        (200, json!({"setpoint": 42.0})),
        "{b}"
    );
    Ok(())
}
