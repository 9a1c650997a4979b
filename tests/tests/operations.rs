//! Operating gatewayd, end to end: the admin API (health, readiness, metrics, views), SIGHUP,
//! graceful shutdown with an RPC in flight, JSON logs, and no secret in the logs.

use anyhow::{ensure, Context, Result};
use e2e::config::GatewayConfig;
use e2e::*;
use serde_json::{json, Value};
use std::time::Duration;

/// The bearer token the harness configures for every simulated AGV.
const SECRET: &str = "demo-token";

fn assert_no_secret(log: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    ensure!(!text.is_empty(), "empty log {}", log.display());
    ensure!(
        !text.contains(SECRET),
        "the device token appears in {}",
        log.display()
    );
    Ok(())
}

#[tokio::test]
async fn admin_api_reports_health_readiness_metrics_and_views() -> Result<()> {
    let mut site = Site::start(2).await?;
    let admin = site.gateway.admin().await?;

    assert_eq!(
        get_text(&format!("{admin}/healthz")).await?,
        (200, r#"{"ok":true}"#.into())
    );
    let (s, b) = get(&format!("{admin}/readyz")).await?;
    assert_eq!((s, &b), (200, &json!({"ready": true})));

    for _ in 0..3 {
        let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!(null), 5).await?;
        assert_eq!(s, 200, "{b}");
    }
    let (s, b, _) = invoke(&site.stub.api, "agv-2", "nope", json!(null), 5).await?;
    assert_eq!(s, 404, "{b}"); // refused by the stub: never reaches the gateway
    let (s, b) = site
        .send("agv-1", json!({"command": "RESTART"}), 60)
        .await?;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().context("message id")?.to_string();
    site.await_final("agv-1", &id, Duration::from_secs(20))
        .await?;

    let (s, m) = get_text(&format!("{admin}/metrics")).await?;
    assert_eq!(s, 200);
    assert_eq!(
        metric(&m, r#"gatewayd_rpc_total{outcome="ok"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"gatewayd_rpc_duration_seconds_count{outcome="ok"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"gatewayd_rpc_duration_seconds_bucket{outcome="ok",le="+Inf"}"#
        ),
        Some(3.0),
        "{m}"
    );
    // The worker counts the outcome right after its commit; the stub may have seen the
    // feedback a moment earlier.
    let m = eventually("message counted", Duration::from_secs(5), || {
        let url = format!("{admin}/metrics");
        async move {
            let (_, m) = get_text(&url).await?;
            Ok(
                (metric(&m, r#"gatewayd_messages_total{outcome="completed"}"#) == Some(1.0))
                    .then_some(m),
            )
        }
    })
    .await?;
    for (series, want) in [
        ("gatewayd_cloud_connected", 1.0),
        ("gatewayd_cloud_reconnects_total", 0.0),
        (r#"gatewayd_device_up{device="agv-1"}"#, 1.0),
        (r#"gatewayd_device_up{device="agv-2"}"#, 1.0),
        ("gatewayd_inbox_depth", 0.0),
        (r#"gatewayd_twin_applies_total{state="applied"}"#, 0.0),
    ] {
        assert_eq!(metric(&m, series), Some(want), "{series} in\n{m}");
    }
    assert!(
        m.contains("# TYPE gatewayd_rpc_duration_seconds histogram"),
        "{m}"
    );
    assert!(m.contains("gatewayd_build_info{version=\""), "{m}");

    let (s, devices) = get(&format!("{admin}/api/devices")).await?;
    assert_eq!(s, 200);
    assert_eq!(devices.as_array().map(Vec::len), Some(2), "{devices}");
    assert_eq!(devices[0]["id"], "agv-1");
    assert_eq!(devices[0]["kind"], "http");
    assert_eq!(devices[0]["online"], true);
    assert!(
        devices[0]["methods"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("status"))),
        "{devices}"
    );
    let (s, inbox) = get(&format!("{admin}/api/inbox")).await?;
    assert_eq!((s, inbox), (200, json!([])));
    let (s, twins) = get(&format!("{admin}/api/twins")).await?;
    assert_eq!(s, 200);
    assert!(twins.is_array(), "{twins}");

    // The cloud goes away: not ready (but alive); it comes back: ready, one reconnect.
    site.stub.proc.kill9().await;
    let reasons = eventually("readyz 503", Duration::from_secs(20), || {
        let url = format!("{admin}/readyz");
        async move {
            let (s, b) = get(&url).await?;
            Ok((s == 503).then_some(b))
        }
    })
    .await?;
    assert_eq!(
        reasons,
        json!({"ready": false, "reasons": ["cloud not connected"]})
    );
    assert_eq!(get_text(&format!("{admin}/healthz")).await?.0, 200);
    let (_, m) = get_text(&format!("{admin}/metrics")).await?;
    assert_eq!(metric(&m, "gatewayd_cloud_connected"), Some(0.0), "{m}");

    site.restart_stub().await?;
    eventually("readyz 200", Duration::from_secs(20), || {
        let url = format!("{admin}/readyz");
        async move { Ok((get(&url).await?.0 == 200).then_some(())) }
    })
    .await?;
    let (_, m) = get_text(&format!("{admin}/metrics")).await?;
    assert_eq!(
        metric(&m, "gatewayd_cloud_reconnects_total"),
        Some(1.0),
        "{m}"
    );

    site.stop_gatewayd().await?;
    assert_no_secret(&site.gateway.proc.log)
}

#[tokio::test]
async fn sighup_names_sections_that_need_a_restart_and_refuses_an_invalid_file() -> Result<()> {
    let site = Site::start(1).await?;
    let admin = site.gateway.admin().await?;
    let path = site.gateway.config_path.clone();
    let original = std::fs::read_to_string(&path)?;

    site.gateway.proc.signal("HUP")?;
    site.await_log("configuration unchanged; nothing to do")
        .await?;

    std::fs::write(
        &path,
        original.replace("shutdown_grace_ms = 5000", "shutdown_grace_ms = 4000"),
    )?;
    site.gateway.proc.signal("HUP")?;
    site.await_log("these sections changed but cannot change live; restart gatewayd to apply them")
        .await?;
    site.await_log("sections=rpc").await?;
    let (_, c) = e2e::get(&format!("{admin}/api/config")).await?;
    assert_eq!(c["last_reload"]["outcome"], "applied_partly", "{c}");
    assert_eq!(c["last_reload"]["restart_needed"], json!(["rpc"]), "{c}");

    std::fs::write(
        &path,
        original
            .replacen("mqtt://", "tcp://", 1)
            .replace("[gateway]\nid = \"site-1\"", "[gateway]\nid = \"site 1\""),
    )?;
    site.gateway.proc.signal("HUP")?;
    site.await_log("configuration invalid; nothing changed")
        .await?;
    site.await_log("must start with mqtt://").await?;
    site.await_log("gateway.id: id contains ' '").await?;

    // Still serving, on the same session.
    let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    let (_, m) = get_text(&format!("{admin}/metrics")).await?;
    assert_eq!(
        metric(&m, "gatewayd_cloud_reconnects_total"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "gatewayd_cloud_connected"), Some(1.0), "{m}");
    assert!(
        m.contains("gatewayd_config_last_reload_success{outcome=\"invalid\"} 0"),
        "{m}"
    );
    let (_, c) = e2e::get(&format!("{admin}/api/config")).await?;
    assert_eq!(c["last_reload"]["outcome"], "invalid", "{c}");
    assert_eq!(
        c["last_reload"]["problems"].as_array().map(Vec::len),
        Some(2),
        "{c}"
    );
    let log = std::fs::read_to_string(&site.gateway.proc.log)?;
    assert!(!log.contains("cloud connection lost"), "{log}");
    assert!(!log.contains("shutting down"), "{log}");
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_an_rpc_in_flight_finish_and_refuses_new_ones() -> Result<()> {
    let mut site = Site::start(2).await?;
    site.fleet
        .fault("agv-1", json!({"latency_ms": 1500}))
        .await?;
    let before = site.fleet.view("agv-1").await?["requests"]["/api/status"]
        .as_u64()
        .unwrap_or(0);
    let api = site.stub.api.clone();
    let slow = tokio::spawn(async move { invoke(&api, "agv-1", "status", json!(null), 10).await });
    // In flight: the device has the request.
    eventually(
        "the slow call reached agv-1",
        Duration::from_secs(5),
        || {
            let fleet = &site.fleet;
            async move {
                let n = fleet.view("agv-1").await?["requests"]["/api/status"]
                    .as_u64()
                    .unwrap_or(0);
                Ok((n > before).then_some(()))
            }
        },
    )
    .await?;

    site.gateway.proc.signal("TERM")?;
    site.await_log("shutting down: draining in-flight calls")
        .await?;
    let (s, b, took) = invoke(&site.stub.api, "agv-2", "status", json!(null), 10).await?;
    assert_eq!(s, 503, "{b}");
    assert!(
        b["code"] == "shutting_down" || b["code"] == "gateway_offline",
        "{b}"
    );
    assert!(
        took < Duration::from_secs(5),
        "refused at once, took {took:?}"
    );

    let (s, b, took) = slow.await??;
    assert_eq!(s, 200, "{b}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    let code = site.gateway.proc.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(code, Some(0));
    await_gateway_online(&site.stub.api, SITE_GATEWAY, false).await?;
    let log = std::fs::read_to_string(&site.gateway.proc.log)?;
    assert!(
        !log.contains("cut off at the end of the grace period"),
        "{log}"
    );
    Ok(())
}

/// A stub, one AGV and gatewayd started with extra arguments and environment.
async fn custom_site(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Gateway, Fleet, Stub)> {
    let stub = Stub::start(dir, &Broker::Embedded("127.0.0.1:0".into()), ":memory:").await?;
    let fleet = Fleet::start(dir, "agv", 1).await?;
    let store = dir.join("gatewayd.db");
    let config = GatewayConfig {
        gateway_id: SITE_GATEWAY,
        broker: &stub.mqtt,
        store: &store,
        devices: &fleet.devices,
        probe_interval_ms: 100,
    }
    .render();
    let config_path = dir.join("gatewayd.toml");
    std::fs::write(&config_path, config)?;
    let gateway = Gateway::spawn(dir, &config_path, args, env)?;
    await_device_online(&stub.api, "agv-1", true).await?;
    Ok((gateway, fleet, stub))
}

/// Plays the service manager's notification socket.
struct Manager {
    socket: tokio::net::UnixDatagram,
    heard: Vec<String>,
}

impl Manager {
    /// Waits for a datagram containing `want` (or finds one already heard), then forgets
    /// everything heard so far.
    async fn until(&mut self, want: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 4096];
        while !self.heard.iter().any(|d| d.contains(want)) {
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .with_context(|| format!("no {want:?} notification; heard {:?}", self.heard))??;
            self.heard
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.heard.clear();
        Ok(())
    }
}

#[tokio::test]
async fn systemd_hears_ready_status_watchdog_reload_and_stopping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("notify.sock");
    let mut manager = Manager {
        socket: tokio::net::UnixDatagram::bind(&socket_path)?,
        heard: Vec::new(),
    };
    let (mut gateway, _fleet, stub) = custom_site(
        dir.path(),
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().context("utf-8 path")?),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await?;
    manager.until("READY=1").await?;
    manager
        .until("STATUS=connected to the cloud; 1 devices, 1 online")
        .await?;
    // Pings keep coming (every 200 ms).
    manager.until("WATCHDOG=1").await?;
    manager.until("WATCHDOG=1").await?;

    gateway.proc.signal("HUP")?;
    manager.until("RELOADING=1\nMONOTONIC_USEC=").await?;
    manager.until("READY=1").await?;

    gateway.proc.signal("TERM")?;
    manager.until("STOPPING=1").await?;
    assert_eq!(
        gateway.proc.wait_exit(Duration::from_secs(20)).await?,
        Some(0)
    );
    await_gateway_online(&stub.api, SITE_GATEWAY, false).await?;
    Ok(())
}

#[tokio::test]
async fn json_logs_are_json_lines_without_secrets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut gateway, fleet, stub) = custom_site(
        dir.path(),
        &["--log-format", "json"],
        &[(
            "RUST_LOG",
            "debug,rumqttc=info,hyper_util=info,reqwest=info",
        )],
    )
    .await?;
    // The token goes to the device on every call; it must never reach the log.
    let (s, b, _) = invoke(&stub.api, "agv-1", "echo", json!({"tag": "t"}), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["result"]["headers"]["authorization"], "Bearer demo-token");
    let (s, b, _) = invoke(&stub.api, "agv-1", "nope", json!(null), 5).await?;
    assert_eq!(s, 404, "{b}");
    gateway.admin().await?;
    assert_eq!(gateway.proc.terminate().await?, Some(0));

    let log = std::fs::read_to_string(&gateway.proc.log)?;
    let mut seen_admin = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON log line: {line}"))?;
        ensure!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        seen_admin |= v["fields"]["message"] == "admin listening";
    }
    ensure!(seen_admin, "no admin listening record in\n{log}");
    assert_no_secret(&gateway.proc.log)?;
    drop((gateway, fleet, stub));
    Ok(())
}
