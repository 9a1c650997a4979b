//! Cloud-to-device messages end to end: queued while anything is offline, expired by TTL and
//! never executed late, feedback for every outcome, and at most one execution per message even
//! when gatewayd is killed at random points.

use anyhow::Result;
use e2e::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_complete_or_are_rejected_with_feedback() -> Result<()> {
    let site = Site::start(1).await?;
    let id = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 60)
        .await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(executions(&site.fleet.view("agv-1").await?, &id), 1);

    // No mapping for the command: rejected by the gateway, the device is never called.
    let id = site.send_ok("agv-1", json!({"command": "FLY"}), 60).await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "rejected", "{m}");
    assert!(
        m["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no mapping for command 'FLY'"),
        "{m}"
    );
    assert_eq!(executions(&site.fleet.view("agv-1").await?, &id), 0);

    // The device says no (4xx): rejected with its answer.
    let id = site
        .send_ok(
            "agv-1",
            json!({"command": "MOVE", "x": 1, "y": 1, "speed": 500}),
            60,
        )
        .await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(
        (m["status"].as_str(), m["device_status"].as_i64()),
        (Some("rejected"), Some(422)),
        "{m}"
    );
    assert!(
        m["reason"]
            .as_str()
            .unwrap_or("")
            .contains("above maxSpeed"),
        "{m}"
    );

    // Bad requests are refused by the cloud.
    let (s, b) = site.send("agv-1", json!({"command": "BEEP"}), 0).await?;
    assert_eq!((s, b["code"].as_str()), (400, Some("bad_request")), "{b}");
    let (s, b) = site.send("agv-99", json!({"command": "BEEP"}), 10).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (404, Some("device_not_found")),
        "{b}"
    );
    let (s, b) = get(&format!(
        "{}/api/v1/devices/agv-1/messages/nope",
        site.stub.api
    ))
    .await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (404, Some("message_not_found")),
        "{b}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queue_while_gatewayd_is_stopped_and_complete_in_order() -> Result<()> {
    let mut site = Site::start(1).await?;
    site.stop_gatewayd().await?;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            site.send_ok("agv-1", json!({"command": "BEEP", "n": n}), 120)
                .await?,
        );
    }
    // A message whose TTL passes in the cloud queue is expired there and never sent.
    let short = site.send_ok("agv-1", json!({"command": "BEEP"}), 1).await?;
    let m = site
        .await_final("agv-1", &short, Duration::from_secs(10))
        .await?;
    assert_eq!(m["status"], "expired", "{m}");

    site.restart_gatewayd().await?;
    let mut finished = Vec::new();
    for id in &ids {
        let m = site
            .await_final("agv-1", id, Duration::from_secs(20))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
        finished.push(m["finished_at_ms"].as_u64().unwrap_or(0));
    }
    assert!(
        finished.windows(2).all(|w| w[0] <= w[1]),
        "completed in order: {finished:?}"
    );
    let view = site.fleet.view("agv-1").await?;
    assert_eq!(
        executions(&view, &short),
        0,
        "an expired message is never executed"
    );
    for id in &ids {
        assert_eq!(executions(&view, id), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_its_messages_when_it_returns_unless_they_expired() -> Result<()> {
    let site = Site::start(1).await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    let late = site.send_ok("agv-1", json!({"command": "BEEP"}), 1).await?;
    let kept = site
        .send_ok("agv-1", json!({"command": "BEEP"}), 120)
        .await?;
    // The short one expires in the gateway inbox (delivered, never executed).
    let m = site
        .await_final("agv-1", &late, Duration::from_secs(10))
        .await?;
    assert_eq!(m["status"], "expired", "{m}");
    assert!(
        m["delivered_at_ms"].is_u64(),
        "it reached the gateway first: {m}"
    );

    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    let m = site
        .await_final("agv-1", &kept, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "completed", "{m}");
    let view = site.fleet.view("agv-1").await?;
    assert_eq!(executions(&view, &late), 0, "never executed late");
    assert_eq!(executions(&view, &kept), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_and_a_purge_gives_feedback() -> Result<()> {
    let mut site = Site::start(1).await?;
    site.stop_gatewayd().await?;
    for _ in 0..50 {
        site.send_ok("agv-1", json!({"command": "BEEP"}), 600)
            .await?;
    }
    let (s, b) = site.send("agv-1", json!({"command": "BEEP"}), 600).await?;
    assert_eq!((s, b["code"].as_str()), (429, Some("queue_full")), "{b}");

    let (s, b) = delete(&format!("{}/api/v1/devices/agv-1/messages", site.stub.api)).await?;
    assert_eq!((s, b["purged"].as_u64()), (200, Some(50)), "{b}");
    let (_, list) = get(&format!("{}/api/v1/devices/agv-1/messages", site.stub.api)).await?;
    let list = list.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 50);
    assert!(
        list.iter().all(|m| m["status"] == "purged"),
        "every purged message has its status"
    );
    // Room again.
    site.send_ok("agv-1", json!({"command": "BEEP"}), 600)
        .await?;
    Ok(())
}

/// 200 messages while gatewayd is killed with SIGKILL at random points, again and again: every
/// message ends final, and none is executed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_run_never_executes_a_message_twice() -> Result<()> {
    // Five devices, 40 messages each: within the cloud's 50-per-device queue bound.
    let mut site = Site::start(5).await?;
    let devices = ["agv-1", "agv-2", "agv-3", "agv-4", "agv-5"];
    let mut ids = Vec::new();
    for n in 0..200 {
        let device = devices[n % 5];
        ids.push((
            device,
            site.send_ok(device, json!({"command": "BEEP", "n": n}), 600)
                .await?,
        ));
    }
    let mut kills = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    while kills < 10 {
        // A pseudo-random pause of 5-60 ms before each kill, so kills land at different points.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(5 + seed % 56)).await;
        site.kill_gatewayd().await?;
        kills += 1;
        site.restart_gatewayd().await?;
    }
    let mut by_status: std::collections::BTreeMap<String, usize> = Default::default();
    for (device, id) in &ids {
        let m = site
            .await_final(device, id, Duration::from_secs(60))
            .await?;
        *by_status
            .entry(m["status"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let mut twice = 0;
    for device in devices {
        let view = site.fleet.view(device).await?;
        for (d, id) in &ids {
            if *d == device && executions(&view, id) > 1 {
                twice += 1;
            }
        }
    }
    eprintln!("after {kills} kills: {by_status:?}, executed twice: {twice}");
    assert_eq!(twice, 0);
    assert_eq!(by_status.values().sum::<usize>(), 200);
    assert!(
        by_status
            .keys()
            .all(|s| s == "completed" || s == "may_have_run"),
        "{by_status:?}"
    );
    Ok(())
}

/// A burst of messages and twin changes whose commits finish in any order: acknowledgements
/// still leave in arrival order (the embedded broker drops a connection that acknowledges out
/// of order), so the session never breaks and everything completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_keeps_the_session_up() -> Result<()> {
    let site = Site::start(10).await?;
    let mut ids = Vec::new();
    for n in 0..300usize {
        let device = format!("agv-{}", n % 10 + 1);
        ids.push((
            device.clone(),
            site.send_ok(&device, json!({"command": "BEEP", "n": n}), 600)
                .await?,
        ));
        if n % 3 == 0 {
            let (s, b) = site
                .patch_desired(&device, json!({"maxSpeed": (n % 19) as f64 + 1.0}), None)
                .await?;
            anyhow::ensure!(s == 200, "patch: {s} {b}");
        }
    }
    for (device, id) in &ids {
        let m = site
            .await_final(device, id, Duration::from_secs(60))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
    }
    let log = std::fs::read_to_string(&site.gateway.proc.log)?;
    assert!(
        !log.contains("cloud connection lost"),
        "the session broke during the burst"
    );
    Ok(())
}

/// With an external broker the cloud side can restart without the broker: feedback a gateway
/// publishes while the stub is down waits in the stub's persistent session and is applied when
/// it returns, so the message still ends `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_sent_while_the_stub_is_down_is_not_lost() -> Result<()> {
    let mosquitto = Mosquitto::start()?;
    let mut site = Site::start_on(Broker::External(mosquitto.url.clone()), 1, "").await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    let id = site
        .send_ok("agv-1", json!({"command": "BEEP"}), 600)
        .await?;
    eventually("message delivered", Duration::from_secs(20), || async {
        let m = site.message("agv-1", &id).await?;
        Ok((m["status"] == "delivered").then_some(()))
    })
    .await?;

    // The stub goes away; meanwhile the device returns and the gateway completes the message.
    site.stub.proc.kill9().await;
    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    eventually(
        "executed on the device",
        Duration::from_secs(20),
        || async { Ok((executions(&site.fleet.view("agv-1").await?, &id) == 1).then_some(())) },
    )
    .await?;
    site.await_log("message finished").await?;

    site.restart_stub().await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "completed", "{m}");
    Ok(())
}
