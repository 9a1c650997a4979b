//! The swarm tool against the real cloud stub: 50 simulated gateways of 10 devices (each
//! announcement split into several parts) come online, a call to a swarm device is answered, a
//! message completes, a desired change is reported applied, and an orderly stop takes them all
//! offline; when their broker dies and comes back on the same port, every gateway reconnects
//! by itself and shows online again, and leaving in order leaves nothing retained.

use anyhow::Result;
use e2e::swarm::observe::{await_online, await_stub_session, retained_topics};
use e2e::swarm::{Backoff, Swarm, SwarmOptions};
use e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

const GATEWAYS: usize = 50;
const DEVICES: usize = 10;
const WITHIN: Duration = Duration::from_secs(20);

fn options(broker: &str) -> SwarmOptions {
    let mut opts = SwarmOptions::new(broker, GATEWAYS, DEVICES);
    // Small publishes: every catalog and presence announcement travels in several parts.
    opts.max_publish = 2048;
    opts.backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };
    opts
}

async fn gateways_online(api: &str) -> Result<usize> {
    let (_, list) = get(&format!("{api}/api/v1/gateways")).await?;
    Ok(list
        .as_array()
        .map_or(0, |a| a.iter().filter(|g| g["online"] == true).count()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_gateways_is_served_by_the_stub() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let stub = Stub::start(dir.path(), &broker, ":memory:").await?;
    // The stub subscribes first, so every announcement reaches it live.
    await_stub_session(&stub, 0, WITHIN).await?;
    let swarm = Swarm::start(&options(&stub.mqtt))?;
    let online = await_online(&stub.api, &swarm, WITHIN).await?;
    println!("swarm: {GATEWAYS} x {DEVICES} online after {online:?}");
    assert_eq!(swarm.stats().connected, GATEWAYS as u64);

    // A call, and the stub's own check of the declared params (the catalog arrived whole).
    let device = swarm.device(17, 3);
    let (s, b, _) = invoke(&stub.api, device.as_str(), "move", json!({"x": 1.5}), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["result"]["device"], device.as_str());
    assert_eq!(b["result"]["method"], "move");
    let (s, b, _) = invoke(&stub.api, device.as_str(), "move", json!({"x": "a"}), 5).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("invalid_params")),
        "{b}"
    );

    // A message, until completed.
    let messages = format!("{}/api/v1/devices/{device}/messages", stub.api);
    let (s, b) = post(
        &messages,
        &json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
    )
    .await?;
    assert_eq!(s, 202, "{b}");
    let url = format!("{messages}/{}", b["id"].as_str().unwrap_or_default());
    let m = eventually("the message completed", WITHIN, || {
        let url = url.clone();
        async move {
            let (_, m) = get(&url).await?;
            Ok((m["status"] == "completed").then_some(m))
        }
    })
    .await?;
    assert!(m["delivered_at_ms"].as_u64().is_some(), "{m}");

    // A desired change, until reported applied.
    let twin_device = swarm.device(42, 9);
    let twin = format!("{}/api/v1/devices/{twin_device}/twin", stub.api);
    let (s, b) = patch(&format!("{twin}/desired"), &json!({"maxSpeed": 7}), None).await?;
    assert_eq!(s, 200, "{b}");
    let version = b["desired_version"].as_u64().unwrap_or_default();
    eventually("the desired change reported", WITHIN, || {
        let twin = twin.clone();
        async move {
            let (_, t) = get(&twin).await?;
            let applied = t["reported"]["maxSpeed"] == 7
                && t["delta"] == json!([])
                && t["apply"]["maxSpeed"]["state"] == "applied"
                && t["apply"]["maxSpeed"]["desired_version"] == version;
            Ok(applied.then_some(()))
        }
    })
    .await?;
    let stats = swarm.stats();
    assert_eq!(
        (
            stats.rpc_ok,
            stats.messages_completed,
            stats.desired_applied
        ),
        (1, 1, 1),
        "{stats:?}"
    );

    // An orderly stop takes every gateway offline at once (no will needed).
    swarm.stop().await;
    let api = stub.api.clone();
    eventually("every gateway offline", WITHIN, || {
        let api = api.clone();
        async move { Ok((gateways_online(&api).await? == 0).then_some(())) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_comes_back_by_itself_when_its_broker_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
    let mosquitto = Mosquitto::run(dir.path(), &conf, &[port])?;
    let url = mosquitto.url.clone();
    let stub = Stub::start(dir.path(), &Broker::External(url.clone()), ":memory:").await?;
    await_stub_session(&stub, 0, WITHIN).await?;
    let swarm = Swarm::start(&options(&url))?;
    await_online(&stub.api, &swarm, WITHIN).await?;

    // The broker dies (its retained announcements with it) and comes back on the same port.
    let before = swarm.stats();
    drop(mosquitto);
    swarm
        .until("every connection lost", WITHIN, |s| s.connected == 0)
        .await?;
    let api = stub.api.clone();
    eventually("the stub lost its broker", WITHIN, || {
        let api = api.clone();
        async move { Ok((gateways_online(&api).await? == 0).then_some(())) }
    })
    .await?;
    let _mosquitto = Mosquitto::run(dir.path(), &conf, &[port])?;
    let online = await_online(&stub.api, &swarm, WITHIN).await?;
    println!("swarm: online again {online:?} after the broker's restart");
    let after = swarm.stats();
    assert_eq!(after.connects - before.connects, GATEWAYS as u64);
    let device = swarm.device(GATEWAYS - 1, DEVICES - 1);
    let (s, b, _) = invoke(&stub.api, device.as_str(), "status", Value::Null, 5).await?;
    assert_eq!(s, 200, "{b}");

    // Leaving in order deletes every retained announcement: the broker keeps nothing.
    swarm.stop().await;
    let left = retained_topics(&url, e2e::swarm::DEFAULT_PREFIX, false).await?;
    assert!(
        left.is_empty(),
        "{} left: {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
    Ok(())
}
