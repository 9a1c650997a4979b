//! Device twins end to end: the real stub, gatewayd and simulated AGVs. Desired changes reach
//! the device, what it holds comes back as reported, and the guarantees hold across stops,
//! kills, offline devices and a stub restart.

use anyhow::Result;
use e2e::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn requests(view: &Value, path: &str) -> u64 {
    view["requests"][path].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_changes_are_applied_and_clamped_values_show_a_delta() -> Result<()> {
    let site = Site::start(1).await?;
    let started = Instant::now();
    let (s, b) = site
        .patch_desired("agv-1", json!({"maxSpeed": 30, "mode": "manual"}), None)
        .await?;
    assert_eq!((s, b["desired_version"].as_u64()), (200, Some(1)), "{b}");
    // The device clamps 30 to its limit 20 and says so; mode is applied as asked.
    let twin = site
        .await_twin("agv-1", "reported maxSpeed 20 and mode manual", |t| {
            t["reported"]["maxSpeed"] == json!(20.0) && t["reported"]["mode"] == "manual"
        })
        .await?;
    let took = started.elapsed();
    eprintln!("desired -> reported took {took:?}");
    assert_eq!(twin["delta"], json!(["maxSpeed"]), "{twin}");
    assert_eq!(twin["apply"]["maxSpeed"]["state"], "different", "{twin}");
    assert_eq!(twin["apply"]["mode"]["state"], "applied", "{twin}");
    assert_eq!(
        site.fleet.view("agv-1").await?["config"]["maxSpeed"],
        json!(20.0)
    );

    // null deletes a desired property; nothing is applied for it.
    let (s, b) = site
        .patch_desired("agv-1", json!({"mode": null}), None)
        .await?;
    assert_eq!((s, b["desired_version"].as_u64()), (200, Some(2)), "{b}");
    assert_eq!(b["desired"], json!({"maxSpeed": 30}), "{b}");
    let twin = site.twin("agv-1").await?;
    assert_eq!(twin["desired"], json!({"maxSpeed": 30}));

    // A value the device refuses (wrong type) is reported refused with the device's reason.
    site.patch_desired("agv-1", json!({"led": "blue"}), None)
        .await?;
    let twin = site
        .await_twin("agv-1", "led refused", |t| {
            t["apply"]["led"]["state"] == "refused"
        })
        .await?;
    assert!(
        twin["apply"]["led"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("400"),
        "{twin}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_gatewayd_is_stopped_are_applied_once_in_their_final_state() -> Result<()>
{
    let mut site = Site::start(1).await?;
    site.stop_gatewayd().await?;
    for speed in [11, 12, 13, 14, 15] {
        let (s, b) = site
            .patch_desired("agv-1", json!({"maxSpeed": speed}), None)
            .await?;
        assert_eq!(s, 200, "{b}");
    }
    let before = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    site.restart_gatewayd().await?;
    site.await_twin("agv-1", "reported maxSpeed 15", |t| {
        t["reported"]["maxSpeed"] == json!(15.0)
    })
    .await?;
    let after = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    assert_eq!(
        after - before,
        1,
        "five offline changes reach the device as one application"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_received_before_a_kill_is_applied_after_restart() -> Result<()> {
    let mut site = Site::start(1).await?;
    // The device is down, so the change is stored but cannot be applied yet.
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    site.patch_desired("agv-1", json!({"maxSpeed": 7}), None)
        .await?;
    site.await_log("desired update stored").await?;
    site.kill_gatewayd().await?;
    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    site.restart_gatewayd().await?;
    site.await_twin("agv-1", "reported maxSpeed 7", |t| {
        t["reported"]["maxSpeed"] == json!(7.0)
    })
    .await?;
    assert_eq!(
        site.fleet.view("agv-1").await?["config"]["maxSpeed"],
        json!(7.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_the_latest_state_once_when_it_returns() -> Result<()> {
    let site = Site::start(1).await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    for speed in [3, 4, 5] {
        site.patch_desired("agv-1", json!({"maxSpeed": speed}), None)
            .await?;
    }
    let before = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    site.await_twin("agv-1", "reported maxSpeed 5", |t| {
        t["reported"]["maxSpeed"] == json!(5.0)
    })
    .await?;
    let after = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    assert_eq!(after - before, 1, "applied once, with the final state");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_survive_a_stub_restart_and_sync_resumes() -> Result<()> {
    let mut site = Site::start(1).await?;
    site.patch_desired("agv-1", json!({"maxSpeed": 9}), None)
        .await?;
    site.await_twin("agv-1", "reported maxSpeed 9", |t| {
        t["reported"]["maxSpeed"] == json!(9.0)
    })
    .await?;
    site.restart_stub().await?;
    let twin = site.twin("agv-1").await?;
    assert_eq!(
        (
            twin["desired"]["maxSpeed"].clone(),
            twin["desired_version"].as_u64()
        ),
        (json!(9), Some(1))
    );
    assert_eq!(twin["reported"]["maxSpeed"], json!(9.0));
    await_device_online(&site.stub.api, "agv-1", true).await?;
    site.patch_desired("agv-1", json!({"maxSpeed": 6}), None)
        .await?;
    site.await_twin("agv-1", "reported maxSpeed 6", |t| {
        t["reported"]["maxSpeed"] == json!(6.0)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_concurrent_writers_are_refused_clearly() -> Result<()> {
    let site = Site::start(1).await?;
    let (s, b) = site
        .patch_desired("agv-1", json!({"blob": "x".repeat(40 * 1024)}), None)
        .await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (413, Some("payload_too_large")),
        "{b}"
    );
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let (s, b) = site.patch_desired("agv-1", deep, None).await?;
    assert_eq!((s, b["code"].as_str()), (400, Some("bad_request")), "{b}");
    assert!(b["message"].as_str().unwrap_or("").contains("deep"), "{b}");
    let (s, _) = site.patch_desired("agv-1", json!([1, 2]), None).await?;
    assert_eq!(s, 400);
    let (s, b) = site.patch_desired("agv-99", json!({"a": 1}), None).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (404, Some("device_not_found")),
        "{b}"
    );

    // Two operators both read version 0 and write with If-Match: exactly one wins.
    let (a, b2) = tokio::join!(
        site.patch_desired("agv-1", json!({"maxSpeed": 1}), Some("\"0\"")),
        site.patch_desired("agv-1", json!({"maxSpeed": 2}), Some("\"0\"")),
    );
    let mut statuses = vec![a?.0, b2?.0];
    statuses.sort();
    assert_eq!(statuses, vec![200, 412]);
    let (s, b) = site
        .patch_desired("agv-1", json!({"maxSpeed": 3}), Some("\"0\""))
        .await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (412, Some("precondition_failed")),
        "{b}"
    );
    let (s, _) = site
        .patch_desired("agv-1", json!({"maxSpeed": 3}), Some("\"1\""))
        .await?;
    assert_eq!(s, 200);
    Ok(())
}

/// A desired update whose version is not newer than what the gateway holds (a stale or
/// replayed publish) is ignored: the device is not called and reported does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_desired_versions_are_ignored() -> Result<()> {
    let site = Site::start(1).await?;
    site.patch_desired("agv-1", json!({"maxSpeed": 8}), None)
        .await?;
    site.patch_desired("agv-1", json!({"maxSpeed": 9}), None)
        .await?;
    site.await_twin("agv-1", "reported maxSpeed 9", |t| {
        t["reported"]["maxSpeed"] == json!(9.0)
    })
    .await?;
    let before = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");

    // Replay version 1 straight onto the gateway's topic, as a confused cloud would.
    let port: u16 = site.stub.mqtt.rsplit(':').next().unwrap().parse()?;
    let mut opts = rumqttc::MqttOptions::new("replayer", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let stale = json!({"v": 1, "device": "agv-1", "version": 1, "patch": {"maxSpeed": 2}});
    client
        .publish(
            "gw/site-1/down/twin/desired",
            rumqttc::QoS::AtLeastOnce,
            false,
            stale.to_string(),
        )
        .await?;
    site.await_log("stale desired update ignored").await?;
    poller.abort();

    let after = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    assert_eq!(after, before, "the device was not called");
    assert_eq!(
        site.twin("agv-1").await?["reported"]["maxSpeed"],
        json!(9.0)
    );
    Ok(())
}

/// Reported properties polled from the device: a setting changed on the device itself (by a
/// local operator) shows up in the reported half, and the delta tells the cloud it drifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_reported_properties_catch_a_local_change_and_the_desired_state_wins() -> Result<()>
{
    let poll = "\n[devices.agv-1.reported_poll]\nmethod = \"get_config\"\ninterval_ms = 1000\n";
    let site = Site::start_with(1, poll).await?;
    site.patch_desired("agv-1", json!({"mode": "auto"}), None)
        .await?;
    site.await_twin("agv-1", "reported mode auto", |t| {
        t["reported"]["mode"] == "auto"
    })
    .await?;
    // Someone switches the AGV to manual on its own panel (its local API): the poll sees the
    // device no longer holds what was applied, and the desired state is applied again.
    let (_, api) = &site.fleet.devices[0];
    let (s, b) = put_json(
        &format!("{api}/api/config/mode"),
        &json!({"value": "manual"}),
    )
    .await?;
    assert_eq!(s, 200, "{b}");
    site.await_log("the device no longer holds its desired state")
        .await?;
    eventually("device back to auto", Duration::from_secs(10), || async {
        let v = site.fleet.view("agv-1").await?;
        Ok((v["config"]["mode"] == "auto").then_some(()))
    })
    .await?;
    let twin = site
        .await_twin("agv-1", "reported mode auto again", |t| {
            t["reported"]["mode"] == "auto" && t["reported"]["led"] == json!(false)
        })
        .await?;
    assert_eq!(twin["delta"], json!([]), "{twin}");
    Ok(())
}
