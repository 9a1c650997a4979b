//! The Modbus end-to-end checks once more against pymodbus's server, an implementation
//! nobody here wrote, over TCP (MBAP and RTU frames) and over a pseudo-terminal pair: our simulator must not be
//! the only peer that agrees with gatewayd.

use anyhow::Result;
use e2e::modbus::{
    reads_and_writes, rtu_device, rtu_over_tcp_device, rtu_port, tcp_device, unit_map, Pymodbus,
};
use e2e::*;
use serde_json::json;
use std::time::Duration;

fn map() -> serde_json::Value {
    json!({"units": {"1": unit_map(1), "2": unit_map(2), "3": unit_map(3)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_tcp_and_rtu_agree_on_reads_writes_twins_and_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let peer = Pymodbus::start(dir.path(), "pymodbus", &map()).await?;
    // Unit 1 over Modbus TCP, unit 2 over RTU, unit 3 over RTU frames on TCP: each starts
    // from the map's values.
    let devices = format!(
        "{}{}{}{}",
        tcp_device("meter-tcp", &peer, 1),
        rtu_port("rtu", &peer),
        rtu_device("meter-rtu", "rtu", 2),
        rtu_over_tcp_device("meter-rtu-tcp", &peer.host, peer.rtu_tcp_port, 3)
    );
    let site = Site::start_with(1, &devices).await?;
    for device in ["meter-tcp", "meter-rtu", "meter-rtu-tcp"] {
        await_device_online(&site.stub.api, device, true).await?;
        reads_and_writes(&site.stub.api, device).await?;

        // A desired setpoint written (FC 6) and read back: pymodbus holds what it is given.
        site.patch_desired(device, json!({"setpoint": 120.5}), None)
            .await?;
        let twin = site
            .await_twin(device, "setpoint 120.5 applied", |t| {
                t["reported"]["setpoint"] == json!(120.5)
            })
            .await?;
        assert_eq!(twin["delta"], json!([]), "{twin}");

        // A message writing three registers (FC 16).
        let id = site
            .send_ok(
                device,
                json!({"command": "CONFIGURE", "seq": 7, "speed": 300}),
                60,
            )
            .await?;
        let m = site
            .await_final(device, &id, Duration::from_secs(20))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
        let (s, b, _) = invoke(&site.stub.api, device, "config", json!(null), 5).await?;
        assert_eq!((s, b["result"].clone()), (200, json!([7, 300, 1])), "{b}");
    }
    drop(peer);
    Ok(())
}

/// Three pymodbus slaves on one RTU bus, 200 calls in flight: every answer belongs to its
/// unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_rtu_bus_of_three_slaves_under_200_calls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let peer = Pymodbus::start(dir.path(), "pymodbus", &map()).await?;
    let mut devices = rtu_port("rtu", &peer);
    for unit in 1..=3u8 {
        devices.push_str(&rtu_device(&format!("slave-{unit}"), "rtu", unit));
    }
    let site = Site::start_with(1, &devices).await?;
    for unit in 1..=3 {
        await_device_online(&site.stub.api, &format!("slave-{unit}"), true).await?;
    }
    let mut calls = Vec::new();
    for n in 0..200usize {
        let api = site.stub.api.clone();
        calls.push(tokio::spawn(async move {
            let unit = n % 3 + 1;
            let device = format!("slave-{unit}");
            let (s, b, _) = invoke(&api, &device, "unit", json!(null), 60).await?;
            anyhow::ensure!(s == 200 && b["result"] == json!(unit), "{device}: {s} {b}");
            Ok::<_, anyhow::Error>(())
        }));
    }
    for c in calls {
        c.await??;
    }
    Ok(())
}
