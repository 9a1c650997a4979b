//! The gateway's own twin: a desired configuration from the cloud, within the gateway's local
//! limits, applied live, kept across `kill -9`, shown and dropped with `gatewayd config`.

use anyhow::{bail, Result};
use e2e::raw::{Raw, RawEvent, RawOptions};
use e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

const LIMITS: &str = "\n[remote_config]\nenabled = true\nallow_hosts = [\"127.0.0.1\"]\n";

/// Publishes a desired configuration on the gateway's topic, as the cloud does.
async fn push(site: &Site, version: u64, config: Value) -> Result<()> {
    let mut raw = Raw::connect("operator", &site.stub.mqtt, RawOptions::default())
        .await?
        .map_err(anyhow::Error::msg)?;
    let ok = raw
        .publish_acked(
            &format!("gw/{SITE_GATEWAY}/down/config/desired"),
            &json!({"v": 1, "version": version, "config": config}),
            false,
        )
        .await?;
    anyhow::ensure!(ok, "the broker refused the desired configuration");
    Ok(())
}

/// Waits for the gateway's retained configuration report with `remote.version == version`.
async fn report(site: &Site, version: u64) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut raw = Raw::connect("watcher", &site.stub.mqtt, RawOptions::default())
            .await?
            .map_err(anyhow::Error::msg)?;
        raw.subscribe(&format!("gw/{SITE_GATEWAY}/up/config"))
            .await?;
        let mut got: Option<Value> = None;
        for (_, p) in raw.received.drain(..) {
            got = serde_json::from_slice(&p).ok();
        }
        while got.is_none() {
            match raw.next().await {
                Ok(RawEvent::Publish(_, p)) => got = serde_json::from_slice(&p).ok(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Some(r) = got.filter(|r| r["remote"]["version"] == version) {
            return Ok(r);
        }
        if std::time::Instant::now() > deadline {
            bail!("no configuration report for version {version}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gatewayd_config(site: &Site, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(bin("gatewayd")?)
        .args(["config"])
        .args(args)
        .arg("--config")
        .arg(&site.gateway.config_path)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "gatewayd config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_device_is_added_refused_outside_the_limits_and_kept_across_kill_9() -> Result<()>
{
    let mut site = Site::start_with(2, LIMITS).await?;
    let agv2 = site.fleet.devices[1].1.clone();

    // Outside the allow-list: refused with its reason, nothing changes.
    push(
        &site,
        1,
        json!({"devices": {"rogue": {"kind": "http", "profile": "agv", "base_url": "http://10.9.9.9:80"}}}),
    )
    .await?;
    let r = report(&site, 1).await?;
    assert_eq!(r["remote"]["state"], "refused", "{r}");
    assert!(
        r["remote"]["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("host 10.9.9.9 is not allowed")),
        "{r}"
    );
    let (s, _, _) = invoke(&site.stub.api, "rogue", "battery", json!(null), 5).await?;
    assert_ne!(s, 200);

    // Within the limits: applied live, and callable.
    push(
        &site,
        2,
        json!({"devices": {"agv-9": {"kind": "http", "profile": "agv", "base_url": agv2}}}),
    )
    .await?;
    let r = report(&site, 2).await?;
    assert_eq!(r["remote"]["state"], "applied", "{r}");
    assert!(r["running"]["devices"]["agv-9"].is_object(), "{r}");
    assert_eq!(
        r["running"]["devices"]["agv-1"]["auth"], "***",
        "device credentials never leave the gateway: {r}"
    );
    await_device_online(&site.stub.api, "agv-9", true).await?;
    let (s, b, _) = invoke(&site.stub.api, "agv-9", "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    // Kept across kill -9: back with the overlay, without the cloud sending it again.
    site.kill_gatewayd().await?;
    site.restart_gatewayd().await?;
    await_device_online(&site.stub.api, "agv-9", true).await?;
    let (s, b, _) = invoke(&site.stub.api, "agv-9", "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    // Listed, diffed and dropped locally.
    let shown = gatewayd_config(&site, &["show"])?;
    assert!(
        shown.contains("agv-9") && shown.contains("\"version\": 2"),
        "{shown}"
    );
    let diff = gatewayd_config(&site, &["diff"])?;
    assert!(diff.lines().any(|l| l == "+ devices.agv-9"), "{diff}");
    let dropped = gatewayd_config(&site, &["drop-remote"])?;
    assert!(dropped.contains("dropped"), "{dropped}");
    site.gateway.proc.signal("HUP")?;
    let admin = site.gateway.admin().await?;
    eventually(
        "agv-9 removed by the reload",
        Duration::from_secs(20),
        || {
            let url = format!("{admin}/api/config");
            async move {
                let (_, c) = get(&url).await?;
                Ok((c["last_reload"]["removed"] == json!(["agv-9"])).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        gatewayd_config(&site, &["show"])?.trim(),
        "no remote configuration"
    );
    Ok(())
}
