//! The one-command demo: builds the workspace binaries, starts the cloud stub (embedded
//! broker), two simulated AGVs (HTTP), a simulated temperature controller on a pseudo-terminal
//! (serial) and gatewayd configured for them, checks an RPC, a twin change and a message end to
//! end, and prints what to try. Ctrl-C stops everything.

use anyhow::{Context, Result};
use e2e::config::{GatewayConfig, SerialConfig};
use e2e::*;
use serde_json::json;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<()> {
    build_binaries()?;
    let dir = std::env::current_dir()?.join("target").join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let api_listen = if std::net::TcpListener::bind("127.0.0.1:8080").is_ok() {
        "127.0.0.1:8080"
    } else {
        "127.0.0.1:0"
    };
    let mqtt_listen = if std::net::TcpListener::bind("127.0.0.1:1883").is_ok() {
        "127.0.0.1:1883"
    } else {
        "127.0.0.1:0"
    };
    let stub = start_stub(&dir, api_listen, mqtt_listen).await?;
    let fleet = Fleet::start(&dir, "agv", 2).await?;
    let serial = SerialSim::start(&dir, "ttySIM0", &[]).await?;
    let store = dir.join("gatewayd.db");
    let mut config = GatewayConfig {
        gateway_id: "site-1",
        broker: &stub.mqtt,
        store: &store,
        devices: &fleet.devices,
        probe_interval_ms: 1000,
    }
    .render();
    config.push_str(
        &SerialConfig {
            port: "bus1",
            path: &serial.path,
            timeout_ms: 1000,
            devices: &[("chiller-1", None)],
        }
        .render(),
    );
    let _gateway = Gateway::start(&dir, &config).await?;
    for name in fleet
        .devices
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(["chiller-1"])
    {
        await_device_online(&stub.api, name, true).await?;
    }

    // A quick end-to-end check, and a rough latency figure.
    let mut lat = Vec::new();
    for _ in 0..200 {
        let (s, b, took) = invoke(&stub.api, "agv-1", "status", json!(null), 5).await?;
        anyhow::ensure!(s == 200, "demo RPC failed: {s} {b}");
        lat.push(took);
    }
    lat.sort();
    let mut serial_lat = Vec::new();
    for _ in 0..50 {
        let (s, b, took) = invoke(&stub.api, "chiller-1", "temperature", json!(null), 5).await?;
        anyhow::ensure!(s == 200, "demo serial RPC failed: {s} {b}");
        serial_lat.push(took);
    }
    serial_lat.sort();

    // A twin change: desired maxSpeed 30, which the AGV clamps to its limit 20.
    let twin_url = format!("{}/api/v1/devices/agv-1/twin", stub.api);
    let started = std::time::Instant::now();
    let (s, b) = patch(
        &format!("{twin_url}/desired"),
        &json!({"maxSpeed": 30}),
        None,
    )
    .await?;
    anyhow::ensure!(s == 200, "demo twin patch failed: {s} {b}");
    eventually("reported maxSpeed", Duration::from_secs(10), || {
        let url = twin_url.clone();
        async move {
            let (_, t) = get(&url).await?;
            Ok((t["reported"]["maxSpeed"] == json!(20.0)).then_some(()))
        }
    })
    .await?;
    let twin_took = started.elapsed();

    // A message: RESTART, until its feedback says completed.
    let started = std::time::Instant::now();
    let (s, b) = post(
        &format!("{}/api/v1/devices/agv-1/messages", stub.api),
        &json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
    )
    .await?;
    anyhow::ensure!(s == 202, "demo message failed: {s} {b}");
    let msg_url = format!(
        "{}/api/v1/devices/agv-1/messages/{}",
        stub.api,
        b["id"].as_str().unwrap_or_default()
    );
    eventually("message completed", Duration::from_secs(10), || {
        let url = msg_url.clone();
        async move {
            let (_, m) = get(&url).await?;
            Ok((m["status"] == "completed").then_some(()))
        }
    })
    .await?;
    let msg_took = started.elapsed();
    let api = &stub.api;
    let ctl = &fleet.control;
    println!(
        r#"
gatewayd demo is running
  operator console         {api}/   (open it in a browser: fleet, twins, messages, methods, live)
  cloud stub operator API  {api}   (MQTT broker {mqtt}; GET {api}/api/v1/openapi.json describes it)
  simulated AGVs (HTTP)    agv-1 {a1}, agv-2 {a2}   (fault control {ctl})
  temperature controller   chiller-1 on serial port {tty}   (fault control {sctl})
  gatewayd                 gateway site-1, config {dir}/gatewayd.toml
  logs                     {dir}/*.log
  measured just now (debug build):
    200 RPCs to agv-1      p50 {p50:.2} ms, max {max:.2} ms   (operator HTTP -> stub -> MQTT -> gatewayd -> device and back)
    50 RPCs to chiller-1   p50 {sp50:.2} ms, max {smax:.2} ms   (the same, onto the serial line)
    twin change            desired maxSpeed 30 -> reported 20 (clamped) in {twin:.1} ms
    message RESTART        sent -> completed feedback in {msg:.1} ms

RPC (synchronous; fails at once when anything is offline):
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/status
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/move -H 'content-type: application/json' -d '{{"params":{{"x":3,"y":4}},"timeout_seconds":5}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/move -H 'content-type: application/json' -d '{{"params":{{"x":"left"}}}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/fly
  curl -s -X POST {api}/api/v1/devices/chiller-1/methods/temperature
  curl -s -X POST {api}/api/v1/devices/chiller-1/methods/set_setpoint -H 'content-type: application/json' -d '{{"params":{{"value":150}}}}'

Twins (configuration; the final state reaches the device, operators see the delta):
  curl -s -X PATCH {api}/api/v1/devices/agv-1/twin/desired -H 'content-type: application/json' -d '{{"maxSpeed":25,"mode":"manual"}}'
  curl -s {api}/api/v1/devices/agv-1/twin
  curl -s -X PATCH {api}/api/v1/devices/chiller-1/twin/desired -H 'content-type: application/json' -d '{{"setpoint":42}}'
  curl -s {api}/api/v1/devices/chiller-1/twin

Messages (queued while offline, TTL, feedback, at most once):
  curl -s -X POST {api}/api/v1/devices/agv-1/messages -H 'content-type: application/json' -d '{{"payload":{{"command":"MOVE","x":1,"y":2}},"ttl_seconds":60}}'
  curl -s {api}/api/v1/devices/agv-1/messages
  curl -s -X POST {api}/api/v1/devices/chiller-1/messages -H 'content-type: application/json' -d '{{"payload":{{"command":"SETP","value":35}},"ttl_seconds":60}}'

Break a device, then try again:
  curl -s -X POST {ctl}/_control/devices/agv-2/faults -H 'content-type: application/json' -d '{{"hang":true}}'
  curl -s -X POST {api}/api/v1/devices/agv-2/methods/status -H 'content-type: application/json' -d '{{"timeout_seconds":2}}'
  curl -s -X POST {ctl}/_control/devices/agv-2/faults -H 'content-type: application/json' -d '{{"offline":true}}'
  curl -s -X POST {api}/api/v1/devices/agv-2/messages -H 'content-type: application/json' -d '{{"payload":{{"command":"RESTART"}},"ttl_seconds":600}}'
  curl -s -X POST {ctl}/_control/devices/agv-2/reset      (the queued RESTART then completes)
  curl -s -X POST {sctl}/_control/faults -H 'content-type: application/json' -d '{{"no_reply":true}}'

Field-device habits (docs/devices.md):
  curl -s -X POST {ctl}/_control/devices/agv-1/faults -H 'content-type: application/json' -d '{{"busy_every":2}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/status      (every 2nd call: device_busy; messages and twins are retried)
  curl -s -X POST {ctl}/_control/devices/agv-1/faults -H 'content-type: application/json' -d '{{"busy_every":0,"drop_after_acting":true}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/messages -H 'content-type: application/json' -d '{{"payload":{{"command":"RESTART"}},"ttl_seconds":60}}'
  curl -s {api}/api/v1/devices/agv-1/messages      (may_have_run: the device acted but its answer was lost; never retried)
  curl -s -X POST {sctl}/_control/faults -H 'content-type: application/json' -d '{{"no_reply":false,"unsolicited_ms":200}}'
  curl -s -X POST {api}/api/v1/devices/chiller-1/methods/temperature      (lines it prints on its own never answer a request)

Press Ctrl-C to stop."#,
        mqtt = stub.mqtt,
        a1 = fleet.devices[0].1,
        a2 = fleet.devices[1].1,
        tty = serial.path,
        sctl = serial.control,
        dir = dir.display(),
        p50 = ms(lat[lat.len() / 2]),
        max = ms(lat[lat.len() - 1]),
        sp50 = ms(serial_lat[serial_lat.len() / 2]),
        smax = ms(serial_lat[serial_lat.len() - 1]),
        twin = ms(twin_took),
        msg = ms(msg_took),
    );
    // Ctrl-C, or SIGTERM from a supervisor or `timeout`: either way the processes it started
    // stop with it (killed when dropped), instead of outliving a demo killed by the signal.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("stopping");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn start_stub(dir: &std::path::Path, api: &str, mqtt: &str) -> Result<Stub> {
    let args = vec![
        "--api-listen".to_string(),
        api.into(),
        "--mqtt-listen".into(),
        mqtt.into(),
        "--db".into(),
        dir.join("cloud-stub.db").display().to_string(),
    ];
    let (proc, ready) = Proc::start("cloud-stub", &args, dir, "cloud-stub").await?;
    Ok(Stub {
        api: ready["api"].as_str().context("api")?.to_string(),
        mqtt: ready["mqtt"].as_str().context("mqtt")?.to_string(),
        proc,
    })
}

/// Makes sure the daemon, stub and fixture binaries are current (a no-op when they are).
fn build_binaries() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo")?;
    anyhow::ensure!(status.success(), "building the workspace failed");
    Ok(())
}
