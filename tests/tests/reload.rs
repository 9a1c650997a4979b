//! Live reload: devices added, changed and removed by SIGHUP while the cloud session stays up
//! and calls to an untouched device keep succeeding.

use anyhow::Result;
use e2e::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_changes_and_removes_devices_while_rpcs_run_on_another() -> Result<()> {
    let site = Site::start(3).await?;
    let admin = site.gateway.admin().await?;
    let path = site.gateway.config_path.clone();
    let original = std::fs::read_to_string(&path)?;
    let base_of = |name: &str| {
        site.fleet
            .devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .unwrap()
    };

    // A message that cannot run yet: agv-3 is switched off, so it waits in gatewayd's inbox.
    site.fleet.fault("agv-3", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-3", false).await?;
    let waiting = site
        .send_ok("agv-3", json!({"command": "RESTART"}), 120)
        .await?;
    eventually(
        "message delivered to the gateway",
        Duration::from_secs(20),
        || {
            let site = &site;
            let waiting = waiting.clone();
            async move {
                let m = site.message("agv-3", &waiting).await?;
                Ok((m["status"] == "delivered").then_some(()))
            }
        },
    )
    .await?;

    // Calls in a loop against agv-1, which the reload does not touch.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let api = site.stub.api.clone();
    let caller = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match invoke(&api, "agv-1", "status", json!(null), 5).await {
                    Ok((200, _, _)) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!("{other:?}"));
                    }
                }
            }
            errors
        })
    };
    eventually("calls flowing", Duration::from_secs(10), || {
        let ok = ok.clone();
        async move { Ok((ok.load(Ordering::SeqCst) >= 20).then_some(())) }
    })
    .await?;

    // agv-2 changed (a shorter timeout), agv-3 removed, agv-9 added (on agv-3's simulator).
    let agv3 = format!(
        "\n[devices.agv-3]\nkind = \"http\"\nprofile = \"agv\"\nbase_url = \"{}\"",
        base_of("agv-3")
    );
    let at = original.find(&agv3).expect("agv-3's section");
    // Its sections end where another device's begin.
    let end = original[at + 1..]
        .match_indices("\n[devices.")
        .map(|(i, _)| at + 1 + i)
        .find(|&i| !original[i..].starts_with("\n[devices.agv-3"))
        .unwrap_or(original.len());
    let mut edited = format!("{}{}", &original[..at], &original[end..]);
    edited = edited.replacen(
        &format!("base_url = \"{}\"\ntimeout_ms = 10000", base_of("agv-2")),
        &format!("base_url = \"{}\"\ntimeout_ms = 9000", base_of("agv-2")),
        1,
    );
    edited.push_str(&format!(
        "\n[devices.agv-9]\nkind = \"http\"\nprofile = \"agv\"\nbase_url = \"{}\"\ntimeout_ms = 10000\n",
        base_of("agv-3")
    ));
    assert_ne!(edited, original);
    std::fs::write(&path, &edited)?;
    site.gateway.proc.signal("HUP")?;
    site.await_log("configuration applied without a restart")
        .await
        .map_err(|e| e.context(site.gateway.proc.tail()))?;

    // The new device is announced and answers (its simulator is still switched off as agv-3:
    // switch it on).
    site.fleet.fault("agv-3", json!({"offline": false})).await?;
    await_device_online(&site.stub.api, "agv-9", true).await?;
    let (s, b, _) = invoke(&site.stub.api, "agv-9", "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = invoke(&site.stub.api, "agv-2", "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    // The removed device is no longer declared, and its queued message ended with the reason.
    let (s, b, _) = invoke(&site.stub.api, "agv-3", "battery", json!(null), 5).await?;
    assert_ne!(s, 200, "{b}");
    let m = site
        .await_final("agv-3", &waiting, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "failed", "{m}");
    assert!(
        m["reason"].as_str().is_some_and(|r| r.contains("removed")),
        "{m}"
    );
    let runs = executions(&site.fleet.view("agv-3").await?, &waiting);
    assert_eq!(runs, 0, "the removed device's message never ran");

    // The untouched device never failed a call, and the session never dropped.
    let before = ok.load(Ordering::SeqCst);
    eventually("calls still flowing", Duration::from_secs(10), || {
        let ok = ok.clone();
        async move { Ok((ok.load(Ordering::SeqCst) >= before + 20).then_some(())) }
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    let errors = caller.await?;
    println!(
        "calls on the untouched device: {} ok, {} failed",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert!(errors.is_empty(), "{errors:?}");
    let (_, m) = get_text(&format!("{admin}/metrics")).await?;
    assert_eq!(
        metric(&m, "gatewayd_cloud_reconnects_total"),
        Some(0.0),
        "{m}"
    );
    let log = std::fs::read_to_string(&site.gateway.proc.log)?;
    assert!(!log.contains("cloud connection lost"), "{log}");
    assert!(
        !log.contains("still in use at the end of the grace period"),
        "the retired devices were let go of: {log}"
    );

    let (_, c) = get(&format!("{admin}/api/config")).await?;
    let last = &c["last_reload"];
    assert_eq!(last["outcome"], "applied", "{c}");
    assert_eq!(last["added"], json!(["agv-9"]), "{c}");
    assert_eq!(last["removed"], json!(["agv-3"]), "{c}");
    assert_eq!(last["replaced"], json!(["agv-2"]), "{c}");
    assert!(m.contains(&format!(
        "gatewayd_config_info{{fingerprint=\"{}\"}} 1",
        c["fingerprint"].as_str().unwrap_or("?")
    )));
    Ok(())
}

/// A serial bus gains a unit by SIGHUP: the port is rebuilt with both devices on it (one task
/// owns a bus), and both answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_unit_to_a_serial_bus() -> Result<()> {
    use e2e::config::{GatewayConfig, SerialConfig};
    let dir = tempfile::tempdir()?;
    let stub = Stub::start(
        dir.path(),
        &Broker::Embedded("127.0.0.1:0".into()),
        ":memory:",
    )
    .await?;
    let sim = SerialSim::start(dir.path(), "ttySIM0", &["01", "02"]).await?;
    let store = dir.path().join("gatewayd.db");
    let render = |devices: &[(&str, Option<&str>)]| {
        let mut config = GatewayConfig {
            gateway_id: "site-1",
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
                timeout_ms: 2000,
                devices,
            }
            .render(),
        );
        config
    };
    let gateway = Gateway::start(dir.path(), &render(&[("tc-1", Some("01"))])).await?;
    await_device_online(&stub.api, "tc-1", true).await?;
    let (s, b, _) = invoke(&stub.api, "tc-1", "temperature", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    std::fs::write(
        &gateway.config_path,
        render(&[("tc-1", Some("01")), ("tc-2", Some("02"))]),
    )?;
    gateway.proc.signal("HUP")?;
    let admin = gateway.admin().await?;
    let c = eventually("the reload's outcome", Duration::from_secs(20), || {
        let url = format!("{admin}/api/config");
        async move {
            let (_, c) = get(&url).await?;
            Ok((c["last_reload"]["outcome"] == "applied").then_some(c))
        }
    })
    .await?;
    assert_eq!(c["last_reload"]["added"], json!(["tc-2"]), "{c}");
    assert_eq!(c["last_reload"]["replaced"], json!(["tc-1"]), "{c}");
    await_device_online(&stub.api, "tc-2", true).await?;
    for device in ["tc-2", "tc-1"] {
        let (s, b, _) = invoke(&stub.api, device, "temperature", json!(null), 10).await?;
        assert_eq!(s, 200, "{device}: {b}");
    }
    drop(gateway);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_the_cloud_connection_and_names_what_waits_for_a_restart() -> Result<()> {
    let site = Site::start(1).await?;
    let admin = site.gateway.admin().await?;
    let path = site.gateway.config_path.clone();
    let original = std::fs::read_to_string(&path)?;
    // A connection setting (applied live: the session reconnects) and the packet limit (waits
    // for a restart).
    let changed = original.replacen(
        "reconnect_max_ms = 1000\n",
        "reconnect_max_ms = 1000\nkeep_alive_s = 25\nmax_packet_bytes = 65536\n",
        1,
    );
    std::fs::write(&path, changed)?;
    site.gateway.proc.signal("HUP")?;
    let c = eventually("the reload's outcome", Duration::from_secs(20), || {
        let url = format!("{admin}/api/config");
        async move {
            let (_, c) = get(&url).await?;
            Ok((c["last_reload"]["outcome"] == "applied_partly").then_some(c))
        }
    })
    .await?;
    assert_eq!(
        c["last_reload"]["restart_needed"],
        json!(["cloud.max_packet_bytes"]),
        "{c}"
    );
    site.await_log("connecting with the new cloud settings")
        .await?;
    site.await_log("left the cloud connection for the new settings")
        .await?;
    await_gateway_online(&site.stub.api, SITE_GATEWAY, true).await?;
    let device = &site.fleet.devices[0].0;
    let (s, b, _) = invoke(&site.stub.api, device, "status", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    Ok(())
}
