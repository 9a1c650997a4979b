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
        &json!({"store": {"path": "/tmp/elsewhere.db"}}),
        None,
    )
    .await?;
    assert_eq!((s, &b["code"]), (400, &json!("bad_request")), "{b}");

    // A section this gateway keeps to itself (`cloud` is not in its remote_config.sections).
    let v = push(&site, json!({"cloud": {"keep_alive_s": 30}})).await?;
    let r = report(&site, v).await?;
    assert_eq!(r["reported"]["remote"]["state"], "refused", "{r}");
    assert!(
        r["reported"]["remote"]["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("cloud: this gateway does not let the cloud change it")),
        "{r}"
    );

    // Outside the allow-list: refused by the gateway with its reason, nothing changes.
    let v = push(
        &site,
        json!({"cloud": null, "devices": {"rogue": {"kind": "http", "profile": "agv", "base_url": "http://10.9.9.9:80"}}}),
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
    assert_eq!(r["last_reload"]["outcome"], "applied", "{r}");
    assert_eq!(r["last_reload"]["added"], json!(["agv-9"]), "{r}");
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
        shown.contains("agv-9") && shown.contains(&format!("\"version\": {v}")),
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

/// Limits that let the cloud change the connection too, with a short probation.
const CLOUD_LIMITS: &str = "\n[remote_config]\nenabled = true\nallow_hosts = [\"127.0.0.1\"]\nsections = [\"devices\", \"profiles\", \"cloud\"]\nallow_brokers = [\"127.0.0.0/8\"]\nrollback_grace_s = 5\n";

/// Waits until the stub shows a report about desired `version` that satisfies `check`.
async fn report_where(
    site: &Site,
    version: u64,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let url = format!("{}/api/v1/gateways/{SITE_GATEWAY}/config", site.stub.api);
    eventually(what, Duration::from_secs(30), || {
        let url = url.clone();
        let check = &check;
        async move {
            let (s, b) = get(&url).await?;
            let r = &b["reported"]["remote"];
            Ok((s == 200 && r["version"] == version && check(r)).then_some(b))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_broker_change_that_cuts_the_gateway_off_is_rolled_back() -> Result<()> {
    let mut site = Site::start_with(1, CLOUD_LIMITS).await?;
    let agv = site.fleet.devices[0].0.clone();

    // A connection setting the cloud may change: the session reconnects with it, holds for the
    // probation, and the configuration is kept.
    let v1 = push(&site, json!({"cloud": {"keep_alive_s": 20}})).await?;
    let kept = report_where(&site, v1, "version 1 kept after its probation", |r| {
        r["state"] == "applied" && r.get("probation").is_none()
    })
    .await?;
    assert_eq!(
        kept["reported"]["running"]["cloud"]["keep_alive_s"], 20,
        "{kept}"
    );
    site.await_log("connecting with the new cloud settings")
        .await?;

    // Outside the local limits: refused, the connection untouched.
    let v2 = push(
        &site,
        json!({"cloud": {"broker": "mqtt://10.9.9.9:1883", "profile": "thingsboard"}}),
    )
    .await?;
    let refused = report_where(&site, v2, "version 2 refused", |r| r["state"] == "refused").await?;
    let problems = refused["reported"]["remote"]["problems"].to_string();
    assert!(
        problems.contains("host 10.9.9.9 is not allowed for the broker"),
        "{problems}"
    );
    assert!(
        problems.contains("cloud.profile: cannot be changed remotely"),
        "{problems}"
    );

    // A broker nobody answers on: the gateway leaves, and is back on its old broker once the
    // grace period is over, with the reason reported.
    let wrong = format!("mqtt://127.0.0.1:{}", free_port()?);
    let pushed = std::time::Instant::now();
    let v3 = push(&site, json!({"cloud": {"broker": wrong, "profile": null}})).await?;
    await_gateway_online(&site.stub.api, SITE_GATEWAY, false)
        .await
        .map_err(|e| {
            e.context(format!(
                "{}\n{}",
                site.gateway.proc.tail(),
                site.stub.proc.tail()
            ))
        })?;
    await_gateway_online(&site.stub.api, SITE_GATEWAY, true)
        .await
        .map_err(|e| e.context(site.gateway.proc.tail()))?;
    assert!(
        pushed.elapsed() >= Duration::from_secs(5),
        "back before the grace period ended: {:?}",
        pushed.elapsed()
    );
    let back = report_where(&site, v3, "version 3 rolled back", |r| {
        r["state"] == "rolled_back"
    })
    .await?;
    let r = &back["reported"];
    assert!(
        r["remote"]["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("rollback_grace_s")),
        "{r}"
    );
    assert_ne!(r["running"]["cloud"]["broker"], json!(wrong), "{r}");
    assert_eq!(
        r["running"]["cloud"]["keep_alive_s"], 20,
        "version 1 is what runs: {r}"
    );
    let (s, b, _) = invoke(&site.stub.api, &agv, "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    // The same, with a power cut during the probation: the gateway starts on the stored wrong
    // broker, and the probation, resumed at the start, still brings it back.
    let v4 = push(
        &site,
        json!({"cloud": {"broker": wrong, "keep_alive_s": 30}}),
    )
    .await?;
    await_gateway_online(&site.stub.api, SITE_GATEWAY, false).await?;
    site.gateway.proc.kill9().await;
    let shown = gatewayd_config(&site, &["show"])?;
    assert!(
        shown.contains(&format!("\"version\": {v4}")) && shown.contains("\"on_probation\": true"),
        "{shown}"
    );
    site.restart_gatewayd().await?;
    site.await_log("the remote configuration is still on probation")
        .await?;
    let back = report_where(&site, v4, "version 4 rolled back", |r| {
        r["state"] == "rolled_back"
    })
    .await?;
    assert_eq!(
        back["reported"]["running"]["cloud"]["keep_alive_s"], 20,
        "{back}"
    );
    let (s, b, _) = invoke(&site.stub.api, &agv, "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    let shown = gatewayd_config(&site, &["show"])?;
    assert!(
        shown.contains(&format!("\"version\": {v1}")) && shown.contains("\"on_probation\": false"),
        "{shown}"
    );

    // A version rolled back stays so: the cloud repeats it (retained) at every connect, and a
    // restart does not take it again.
    site.stop_gatewayd().await?;
    site.restart_gatewayd().await?;
    let (s, b, _) = invoke(&site.stub.api, &agv, "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    let again = report_where(&site, v4, "version 4 still rolled back", |r| {
        r["state"] == "rolled_back"
    })
    .await?;
    assert_eq!(
        again["reported"]["running"]["cloud"]["keep_alive_s"], 20,
        "{again}"
    );
    Ok(())
}
