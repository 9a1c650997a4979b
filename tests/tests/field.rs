//! Field devices, HTTP side: devices without a health endpoint, devices that are busy every
//! so often, devices that reset to their defaults, and operators asking the same value again.
//! Each scenario prints its figures.

use anyhow::Result;
use e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn apply_state<'a>(twin: &'a Value, property: &str) -> &'a str {
    twin["apply"][property]["state"].as_str().unwrap_or("")
}

/// Without a health path, a device taken offline by a refused call comes back on its own
/// once it accepts connections again: the next RPC succeeds and the pending message completes
/// within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_health_path_comes_back_by_itself() -> Result<()> {
    let site = Site::start_opts(
        Broker::Embedded(format!("127.0.0.1:{}", free_port()?)),
        1,
        SiteOptions {
            health_path: false,
            ..SiteOptions::default()
        },
    )
    .await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    let started = Instant::now();
    let (s, b, took) = invoke(&site.stub.api, "agv-1", "status", json!({}), 10).await?;
    assert_eq!(b["code"], "device_offline", "{s} {b}");
    assert!(took < Duration::from_secs(2), "failed in {took:?}");
    println!("field: no health path: RPC to a stopped device failed in {took:?}");
    await_device_online(&site.stub.api, "agv-1", false).await?;
    let id = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 60)
        .await?;
    // The message reaches the gateway and waits there.
    eventually("message delivered", Duration::from_secs(10), || async {
        let m = site.message("agv-1", &id).await?;
        Ok((m["status"] == "delivered").then_some(()))
    })
    .await?;

    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    let back = Instant::now();
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(10))
        .await?;
    let message_took = back.elapsed();
    assert_eq!(m["status"], "completed", "{m}");
    // The cloud refuses RPCs to a device it sees offline: wait for the presence update (it
    // may trail the message's feedback by a few milliseconds), then call.
    await_device_online(&site.stub.api, "agv-1", true).await?;
    let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!({}), 10).await?;
    assert_eq!(s, 200, "{b}");
    let rpc_took = back.elapsed();
    println!(
        "field: no health path: device back, pending message completed after {message_took:?}, next RPC ok after {rpc_took:?} (offline for {:?})",
        back - started
    );
    assert!(message_took < Duration::from_secs(2), "{message_took:?}");
    assert!(rpc_took < Duration::from_secs(2), "{rpc_took:?}");
    assert_eq!(executions(&site.fleet.view("agv-1").await?, &id), 1);
    Ok(())
}

/// A device busy on every 5th request: every message completes exactly once, every twin
/// property ends `applied`, every RPC either succeeds or gets `device_busy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_device_is_retried_where_that_is_safe() -> Result<()> {
    let site = Site::start(1).await?;
    site.fleet.fault("agv-1", json!({"busy_every": 5})).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            site.send_ok("agv-1", json!({"command": "RESTART"}), 60)
                .await?,
        );
    }
    let (s, b) = site
        .patch_desired(
            "agv-1",
            json!({"maxSpeed": 12, "mode": "manual", "led": true}),
            None,
        )
        .await?;
    anyhow::ensure!(s == 200, "patch: {s} {b}");
    let (mut ok, mut busy) = (0, 0);
    for _ in 0..30 {
        let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!({}), 10).await?;
        match (s, b["code"].as_str()) {
            (200, _) => ok += 1,
            (503, Some("device_busy")) => busy += 1,
            other => panic!("unexpected RPC answer {other:?}: {b}"),
        }
    }
    for id in &ids {
        let m = site
            .await_final("agv-1", id, Duration::from_secs(60))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
    }
    let twin = site
        .await_twin("agv-1", "every property applied", |t| {
            ["maxSpeed", "mode", "led"]
                .iter()
                .all(|p| apply_state(t, p) == "applied")
        })
        .await?;
    let view = site.fleet.view("agv-1").await?;
    let runs: Vec<u64> = ids.iter().map(|id| executions(&view, id)).collect();
    println!(
        "field: busy every 5th: 20 messages completed, executions {runs:?}; RPCs {ok} ok, {busy} device_busy; twin {}",
        twin["apply"]
    );
    assert!(runs.iter().all(|&n| n == 1), "{runs:?}");
    assert!(busy > 0, "the device was never busy for an RPC");
    Ok(())
}

/// A refused value asked again is applied again (a new desired version is the operator asking
/// again), and a device reset to its defaults is brought back to the desired state when it
/// returns from offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desired_state_is_applied_again_when_asked_or_lost() -> Result<()> {
    let site = Site::start(1).await?;
    // Refused while the device answers errors; the same value asked again once it is fixed.
    site.fleet
        .fault("agv-1", json!({"error_status": 500}))
        .await?;
    site.patch_desired("agv-1", json!({"mode": "manual"}), None)
        .await?;
    site.await_twin("agv-1", "mode refused", |t| {
        apply_state(t, "mode") == "refused"
    })
    .await?;
    site.fleet
        .fault("agv-1", json!({"error_status": null}))
        .await?;
    site.patch_desired("agv-1", json!({"mode": "manual"}), None)
        .await?;
    site.await_twin("agv-1", "mode applied after asking again", |t| {
        apply_state(t, "mode") == "applied" && t["reported"]["mode"] == "manual"
    })
    .await?;

    // Reset to defaults while offline: on return the desired state is applied again.
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    site.fleet.fault("agv-1", json!({"reset": true})).await?;
    let started = Instant::now();
    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    eventually(
        "device holds mode manual again",
        Duration::from_secs(20),
        || async {
            let v = site.fleet.view("agv-1").await?;
            Ok((v["config"]["mode"] == "manual").then_some(()))
        },
    )
    .await?;
    println!(
        "field: reset to defaults while offline: desired state back on the device {:?} after it returned",
        started.elapsed()
    );
    Ok(())
}
