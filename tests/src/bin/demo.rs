//! The one-command demo: builds the workspace binaries, starts the cloud stub (embedded
//! broker), two simulated AGVs and gatewayd configured for them, checks an RPC end to end,
//! and prints what to try. Ctrl-C stops everything.

use anyhow::{Context, Result};
use e2e::config::GatewayConfig;
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
    let store = dir.join("gatewayd.db");
    let config = GatewayConfig {
        gateway_id: "site-1",
        broker: &stub.mqtt,
        store: &store,
        devices: &fleet.devices,
        probe_interval_ms: 1000,
    }
    .render();
    let _gateway = Gateway::start(&dir, &config).await?;
    for (name, _) in &fleet.devices {
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
    let api = &stub.api;
    let ctl = &fleet.control;
    println!(
        r#"
gatewayd demo is running
  cloud stub operator API  {api}   (MQTT broker {mqtt})
  simulated AGVs           agv-1 {a1}, agv-2 {a2}   (fault control {ctl})
  gatewayd                 gateway site-1, config {dir}/gatewayd.toml
  logs                     {dir}/*.log
  200 status RPCs through the whole chain: p50 {p50:.2} ms, max {max:.2} ms (operator HTTP -> MQTT -> gatewayd -> device and back)

Try:
  curl -s {api}/api/v1/gateways
  curl -s {api}/api/v1/devices/agv-1
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/status
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/move -H 'content-type: application/json' -d '{{"params":{{"x":3,"y":4}},"timeout_seconds":5}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/set_max_speed -H 'content-type: application/json' -d '{{"params":{{"value":30}}}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/move -H 'content-type: application/json' -d '{{"params":{{"x":"left"}}}}'
  curl -s -X POST {api}/api/v1/devices/agv-1/methods/fly

Break a device, then call it again:
  curl -s -X POST {ctl}/_control/devices/agv-2/faults -H 'content-type: application/json' -d '{{"hang":true}}'
  curl -s -X POST {api}/api/v1/devices/agv-2/methods/status -H 'content-type: application/json' -d '{{"timeout_seconds":2}}'
  curl -s -X POST {ctl}/_control/devices/agv-2/faults -H 'content-type: application/json' -d '{{"offline":true}}'
  curl -s -X POST {api}/api/v1/devices/agv-2/methods/status
  curl -s -X POST {ctl}/_control/devices/agv-2/reset

Press Ctrl-C to stop."#,
        mqtt = stub.mqtt,
        a1 = fleet.devices[0].1,
        a2 = fleet.devices[1].1,
        dir = dir.display(),
        p50 = ms(lat[lat.len() / 2]),
        max = ms(lat[lat.len() - 1]),
    );
    tokio::signal::ctrl_c().await?;
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
