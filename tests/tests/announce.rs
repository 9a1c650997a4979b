//! Every publish fits the broker: a gateway whose catalog is far above the broker's packet
//! limit announces it in parts, comes online once, and never reconnects in a loop; a result
//! above the limit is a coded error. Run against Mosquitto with a small `max_packet_size`, as
//! brokers in the field are configured.

use anyhow::{Context, Result};
use e2e::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_above_the_packet_limit_is_announced_in_parts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mosquitto = Mosquitto::run(
        dir.path(),
        &format!("max_packet_size 20000\nlistener {port} 127.0.0.1\nallow_anonymous true\n"),
        &[port],
    )?;
    let devices = 120;
    let site = Site::start_opts(
        Broker::External(mosquitto.url.clone()),
        devices,
        SiteOptions {
            cloud_extra: "max_packet_bytes = 16384".into(),
            ..SiteOptions::default()
        },
    )
    .await?;
    // Site::start_opts waited for every device to be online in the cloud: the catalog arrived
    // whole. It took one connection.
    let log = std::fs::read_to_string(&site.gateway.proc.log)?;
    let connects = log.matches("connected to the cloud").count();
    let parts: u32 = log
        .lines()
        .find(|l| l.contains("announced"))
        .and_then(|l| l.split("catalog_parts=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (s, gws) = get(&format!("{}/api/v1/devices", site.stub.api)).await?;
    let listed = gws.as_array().map_or(0, Vec::len);
    println!(
        "announce: {devices} devices through a broker taking 20,000-byte packets, gatewayd at most 16 KiB per publish: catalog in {parts} parts, {listed} devices in the cloud, {connects} connection(s)"
    );
    assert_eq!(s, 200);
    assert_eq!(listed, devices, "{gws}");
    assert_eq!(connects, 1, "reconnected: {}", site.gateway.proc.tail());
    assert!(parts > 1, "catalog parts: {parts}");

    // An RPC whose answer would not fit is a coded error, and the session stays up.
    let (s, b, _) = invoke(
        &site.stub.api,
        "agv-1",
        "echo",
        // The device echoes the tag back three times (query, header, body): about 36 KB.
        json!({"tag": "x".repeat(12_000)}),
        5,
    )
    .await?;
    println!("announce: oversize answer: {s} {b}");
    assert_eq!(b["code"], "payload_too_large", "{s} {b}");
    let (s, b, _) = invoke(&site.stub.api, "agv-1", "get_config", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    let log = std::fs::read_to_string(&site.gateway.proc.log).context("log")?;
    assert_eq!(log.matches("connected to the cloud").count(), 1);
    Ok(())
}

/// A broker that drops the gateway right after every connect (here: its packet limit is below
/// what the gateway was told it may publish) costs a backoff, not a reconnect storm: a session
/// that dies young counts as a failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_dies_young_backs_off() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mosquitto = Mosquitto::run(
        dir.path(),
        &format!("max_packet_size 2000\nlistener {port} 127.0.0.1\nallow_anonymous true\n"),
        &[port],
    )?;
    let fleet = Fleet::start(dir.path(), "agv", 20).await?;
    let store = dir.path().join("gatewayd.db");
    let mut text = e2e::config::GatewayConfig {
        gateway_id: "young-1",
        broker: &mosquitto.url,
        store: &store,
        devices: &fleet.devices,
        probe_interval_ms: 1000,
    }
    .render();
    // Reconnects from 100 ms up to 1 s.
    text = text.replacen(
        "reconnect_max_ms = 1000\n",
        "reconnect_max_ms = 1000\nmax_packet_bytes = 16384\n",
        1,
    );
    let gateway = Gateway::start(dir.path(), &text).await?;
    let started = std::time::Instant::now();
    let log = gateway.proc.log.clone();
    let connects = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("connected to the cloud")
            .count()
    };
    eventually(
        "a first connect",
        std::time::Duration::from_secs(10),
        || async { Ok((connects() > 0).then_some(())) },
    )
    .await?;
    // Watch the loop for a while: the window is the measurement.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let n = connects();
    let secs = started.elapsed().as_secs_f64();
    println!("announce: broker dropping every session at once: {n} connects in {secs:.1} s (backoff 100 ms to 1 s)");
    // At most 12 with the shortest jitter; reset to 100 ms after every ConnAck it would be
    // 40 or more.
    assert!(n <= 14, "{n} connects in {secs:.1} s");
    Ok(())
}
