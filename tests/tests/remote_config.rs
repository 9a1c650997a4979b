//! The gateway's own twin: a desired configuration from the cloud, within the gateway's local
//! limits, applied live, kept across `kill -9`, shown and dropped with `gatewayd config`.

use anyhow::Result;
use e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

const LIMITS: &str = "\n[remote_config]\nenabled = true\nallow_hosts = [\"127.0.0.1\"]\n";

/// Merge-patches the gateway's desired configuration through the stub's operator API; returns
/// the desired version.
async fn push(site: &Site, patch: Value) -> Result<u64> {
    let (s, b) = e2e::patch(
        &format!("{}/api/v1/gateways/{SITE_GATEWAY}/config", site.stub.api),
        &patch,
        None,
    )
    .await?;
    anyhow::ensure!(s == 200, "PATCH gateway config: {s} {b}");
    b["desired"]["version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no desired version in {b}"))
}

/// Waits until the stub shows the gateway's report about desired `version`.
async fn report(site: &Site, version: u64) -> Result<Value> {
    let url = format!("{}/api/v1/gateways/{SITE_GATEWAY}/config", site.stub.api);
    eventually(
        &format!("the gateway's report on version {version}"),
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let (s, b) = get(&url).await?;
                Ok((s == 200 && b["reported"]["remote"]["version"] == version).then_some(b))
            }
        },
    )
    .await
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

    // The stub checks the structure before it sends anything.
    let (s, b) = e2e::patch(
        &format!("{}/api/v1/gateways/{SITE_GATEWAY}/config", site.stub.api),
        &json!({"cloud": {"broker": "mqtt://elsewhere:1883"}}),
        None,
    )
    .await?;
    assert_eq!((s, &b["code"]), (400, &json!("bad_request")), "{b}");

    // Outside the allow-list: refused by the gateway with its reason, nothing changes.
    let v = push(
        &site,
        json!({"devices": {"rogue": {"kind": "http", "profile": "agv", "base_url": "http://10.9.9.9:80"}}}),
    )
    .await?;
    let r = report(&site, v).await?;
    let r = &r["reported"];
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
    let v = push(
        &site,
        json!({"devices": {"rogue": null, "agv-9": {"kind": "http", "profile": "agv", "base_url": agv2}}}),
    )
    .await?;
    let twin = report(&site, v).await?;
    assert_eq!(twin["in_sync"], true, "{twin}");
    let r = &twin["reported"];
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
