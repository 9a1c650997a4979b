//! gatewayd with `cloud.profile = "thingsboard"` against the ThingsBoard server emulator
//! (`tb-emulator`, itself checked against ThingsBoard's own Python client in
//! `thingsboard_emulator.rs`): the same guarantees as the native profile. RPC with a deadline
//! and coded errors; the twin's offline merge (changes made while gatewayd is down reach the
//! device as one application of the final state); persistent RPC (messages) queued while
//! gatewayd is down, run at most once across `kill -9`, expired ones never run; presence
//! follows the devices.

use anyhow::Result;
use e2e::thingsboard::TbEmulator;
use e2e::{config, eventually, Fleet, Gateway};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

const GATEWAY: &str = "tb-gw";
const TOKEN: &str = "gw-access-token";

struct TbSite {
    gateway: Gateway,
    fleet: Fleet,
    tb: TbEmulator,
    config_path: PathBuf,
    /// Field order is drop order: processes first, their log directory last.
    dir: tempfile::TempDir,
}

impl TbSite {
    async fn start(n: usize) -> Result<TbSite> {
        let dir = tempfile::tempdir()?;
        let tb = TbEmulator::start(dir.path(), &[(GATEWAY, TOKEN)]).await?;
        let fleet = Fleet::start(dir.path(), "agv", n).await?;
        let store = dir.path().join("gatewayd.db");
        let broker = format!("mqtt://{}", tb.mqtt_addr);
        let text = config::GatewayConfig {
            gateway_id: GATEWAY,
            broker: &broker,
            store: &store,
            devices: &fleet.devices,
            probe_interval_ms: 100,
        }
        .render()
        .replacen(
            "reconnect_max_ms = 1000\n",
            &format!(
                "reconnect_max_ms = 1000\nprofile = \"thingsboard\"\nusername = \"{TOKEN}\"\n"
            ),
            1,
        );
        let config_path = dir.path().join("gatewayd.toml");
        std::fs::write(&config_path, text)?;
        let gateway = Self::gatewayd(dir.path(), &config_path)?;
        let site = TbSite {
            gateway,
            fleet,
            tb,
            config_path,
            dir,
        };
        for (name, _) in &site.fleet.devices {
            site.tb.await_active(name, true).await?;
        }
        Ok(site)
    }

    fn gatewayd(dir: &std::path::Path, config_path: &std::path::Path) -> Result<Gateway> {
        Gateway::spawn(
            dir,
            config_path,
            &[],
            &[("RUST_LOG", "info,gatewayd=debug")],
        )
    }

    async fn restart_gatewayd(&mut self) -> Result<()> {
        self.gateway = Self::gatewayd(self.dir.path(), &self.config_path)?;
        eventually("gateway connected", Duration::from_secs(20), || async {
            let gws = self.tb.gateways().await?;
            Ok(gws
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|g| g["name"] == GATEWAY && g["connected"] == true)
                })
                .cloned())
        })
        .await?;
        Ok(())
    }

    async fn await_gateway_gone(&self) -> Result<()> {
        eventually("gateway disconnected", Duration::from_secs(20), || async {
            let gws = self.tb.gateways().await?;
            Ok(gws
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|g| g["name"] == GATEWAY && g["connected"] == false)
                })
                .cloned())
        })
        .await?;
        Ok(())
    }

    /// Waits until ThingsBoard holds client attribute `key` of `device` equal to `value`.
    async fn await_client(&self, device: &str, key: &str, value: Value) -> Result<Value> {
        let value = &value;
        eventually(
            &format!("client attribute {device}.{key} = {value}"),
            Duration::from_secs(20),
            || async move {
                let a = self.tb.attributes(device).await?;
                Ok((a["client"][key] == *value).then_some(a))
            },
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "gatewayd log:\n{}\ntb-emulator log:\n{}",
                self.gateway.proc.tail(),
                self.tb.proc.tail()
            ))
        })
    }
}

fn requests(view: &Value, path: &str) -> u64 {
    view["requests"][path].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_through_thingsboard_answers_with_results_and_coded_errors() -> Result<()> {
    let site = TbSite::start(1).await?;
    let (s, b) = site
        .tb
        .rpc_twoway("agv-1", json!({"method": "battery", "params": {}}))
        .await?;
    assert_eq!(s, 200, "{b}");
    assert!(b.is_number(), "the result itself is the reply's data: {b}");

    let (s, b) = site
        .tb
        .rpc_twoway(
            "agv-1",
            json!({"method": "set_max_speed", "params": {"value": -1}}),
        )
        .await?;
    assert_eq!((s, &b["code"]), (200, &json!("invalid_params")), "{b}");
    assert!(
        b["error"].as_str().is_some_and(|e| e.contains("value")),
        "{b}"
    );

    let (_, b) = site
        .tb
        .rpc_twoway("agv-1", json!({"method": "fly", "params": {}}))
        .await?;
    assert_eq!(b["code"], "method_not_found", "{b}");

    // ThingsBoard's timeout, when the request carries one, bounds the device call.
    site.fleet
        .fault("agv-1", json!({"latency_ms": 3000}))
        .await?;
    let started = std::time::Instant::now();
    let (_, b) = site
        .tb
        .rpc_twoway(
            "agv-1",
            json!({"method": "status", "params": {}, "timeout": 800, "forwardTimeout": true}),
        )
        .await?;
    assert_eq!(b["code"], "timeout", "{b}");
    assert!(started.elapsed() < Duration::from_millis(2500));
    site.fleet.fault("agv-1", json!({"latency_ms": 0})).await?;

    // A device this gateway does not have.
    site.tb.set_shared("ghost", json!({"x": 1})).await?;
    let (s, b) = site
        .tb
        .rpc_twoway("ghost", json!({"method": "status", "params": {}}))
        .await?;
    assert_ne!(
        s, 200,
        "an unknown device is never answered as a success: {b}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_attributes_are_the_desired_state_and_offline_changes_apply_once() -> Result<()> {
    let mut site = TbSite::start(1).await?;
    // Live: a shared attribute change is pushed and applied; the reported value and its apply
    // state come back as client attributes. The AGV clamps 30 to 20: `different`.
    assert!(
        site.tb
            .set_shared(
                "agv-1",
                json!({"maxSpeed": 30, "mode": "auto", "colour": "red"})
            )
            .await?
    );
    let a = site.await_client("agv-1", "maxSpeed", json!(20.0)).await?;
    assert_eq!(a["client"]["maxSpeed_apply"]["state"], "different", "{a}");
    let a = site.await_client("agv-1", "mode", json!("auto")).await?;
    assert_eq!(a["client"]["mode_apply"]["state"], "applied", "{a}");
    assert!(
        a["client"].get("colour").is_none() && a["client"].get("colour_apply").is_none(),
        "a shared attribute that is no twin property is left alone: {a}"
    );

    // Offline: five changes while gatewayd is down reach the device as one application of
    // the final state.
    site.gateway.proc.terminate().await?;
    site.await_gateway_gone().await?;
    let before = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    for v in [11, 12, 13, 14, 15] {
        assert!(
            !site.tb.set_shared("agv-1", json!({"maxSpeed": v})).await?,
            "not pushed while the gateway is offline"
        );
    }
    let since = site.tb.events(0).await?.len() as u64;
    site.restart_gatewayd().await?;
    site.await_client("agv-1", "maxSpeed", json!(15.0)).await?;
    let after = requests(&site.fleet.view("agv-1").await?, "/api/config/maxSpeed");
    assert_eq!(after - before, 1, "one application of the final state");
    let asked: Vec<Value> = site
        .tb
        .events(since)
        .await?
        .into_iter()
        .filter(|e| e["kind"] == "attribute_request" && e["device"] == "agv-1")
        .collect();
    assert_eq!(
        asked.len(),
        1,
        "the full state asked once at connect: {asked:?}"
    );

    // A restart with nothing changed applies nothing.
    site.gateway.proc.terminate().await?;
    site.await_gateway_gone().await?;
    site.restart_gatewayd().await?;
    site.tb.await_active("agv-1", true).await?;
    // A live change after the restart is the next thing the device sees.
    site.tb.set_shared("agv-1", json!({"led": true})).await?;
    site.await_client("agv-1", "led", json!(true)).await?;
    let view = site.fleet.view("agv-1").await?;
    assert_eq!(
        requests(&view, "/api/config/maxSpeed"),
        after,
        "nothing re-applied at a reconnect when nothing changed"
    );

    // A deleted shared attribute leaves the desired state.
    site.tb.delete_shared("agv-1", &["led"]).await?;
    let admin = site.gateway.admin().await?;
    eventually("led gone from desired", Duration::from_secs(20), || {
        let url = format!("{admin}/api/twins?device=agv-1");
        async move {
            let (s, b) = e2e::get(&url).await?;
            let desired = &b[0]["desired"];
            Ok((s == 200 && desired.is_object() && desired.get("led").is_none()).then_some(b))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_rpcs_are_messages_queued_while_offline_run_at_most_once_and_expired_never(
) -> Result<()> {
    let mut site = TbSite::start(1).await?;
    // A one-way persistent RPC: DELIVERED means stored at the gateway; it then runs.
    let one = site
        .tb
        .rpc_persistent("agv-1", true, json!({"method": "BEEP", "params": {"n": 1}}))
        .await?;
    site.tb.await_persistent(&one, "SUCCESSFUL").await?;

    // Queued in ThingsBoard while gatewayd is down; one of them expires first.
    site.gateway.proc.terminate().await?;
    site.await_gateway_gone().await?;
    let now = e2e::thingsboard::now_ms();
    let mut queued = Vec::new();
    for n in 0..10 {
        queued.push(
            site.tb
                .rpc_persistent(
                    "agv-1",
                    false,
                    json!({"method": "BEEP", "params": {"n": n}, "timeout": 5000, "retries": 5}),
                )
                .await?,
        );
    }
    let expiring = site
        .tb
        .rpc_persistent(
            "agv-1",
            false,
            json!({"method": "BEEP", "params": {"n": 99}, "expirationTime": now + 300}),
        )
        .await?;
    site.tb.await_persistent(&expiring, "EXPIRED").await?;

    // gatewayd comes back, and is killed while it works through them (each takes 150 ms on
    // the device, one at a time).
    site.fleet
        .fault("agv-1", json!({"latency_ms": 150}))
        .await?;
    site.restart_gatewayd().await?;
    eventually("a first command done", Duration::from_secs(20), || async {
        for id in &queued {
            let r = site.tb.persistent(id).await?;
            if r["status"] == "SUCCESSFUL" {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await?;
    site.gateway.proc.kill9().await;
    let mut open = 0;
    for id in &queued {
        if site.tb.persistent(id).await?["status"] != "SUCCESSFUL" {
            open += 1;
        }
    }
    assert!(open > 0, "the kill came while commands were still open");
    site.await_gateway_gone().await?;
    site.restart_gatewayd().await?;

    let mut outcomes = Vec::new();
    for id in &queued {
        let r = eventually("a final state", Duration::from_secs(40), || async {
            let r = site.tb.persistent(id).await?;
            Ok(["SUCCESSFUL", "FAILED"]
                .contains(&r["status"].as_str().unwrap_or(""))
                .then_some(r))
        })
        .await?;
        outcomes.push(r);
    }
    let view = site.fleet.view("agv-1").await?;
    let runs = view["executions"].as_object().cloned().unwrap_or_default();
    for (id, n) in &runs {
        assert!(n.as_u64() == Some(1), "message {id} ran {n} times");
    }
    assert!(
        runs.len() <= 11,
        "11 commands (1 + 10) at most ran, each once: {runs:?}"
    );
    let completed = outcomes
        .iter()
        .filter(|r| r["status"] == "SUCCESSFUL")
        .count();
    for r in &outcomes {
        if r["status"] == "FAILED" {
            // Only a command interrupted mid-call may end failed, and it says so.
            assert!(
                r["response"]["outcome"] == "failed" || r["response"]["outcome"] == "may_have_run",
                "{r}"
            );
        } else {
            assert_eq!(r["response"]["outcome"], "completed", "{r}");
        }
    }
    println!(
        "open at the kill: {open}; completed: {completed}; failed: {}; device executions: {}",
        outcomes.len() - completed,
        runs.len()
    );
    assert!(completed >= 8, "{completed} of 10 completed: {outcomes:?}");
    // The expired one never reached the device.
    let expired = site.tb.persistent(&expiring).await?;
    assert_eq!(expired["sends"], 0, "{expired}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_the_devices() -> Result<()> {
    let site = TbSite::start(2).await?;
    let since = site.tb.events(0).await?.len() as u64;
    site.fleet.fault("agv-2", json!({"offline": true})).await?;
    site.tb.await_active("agv-2", false).await?;
    assert_eq!(site.tb.device("agv-1").await?.unwrap()["active"], true);
    site.fleet.fault("agv-2", json!({"offline": false})).await?;
    site.tb.await_active("agv-2", true).await?;
    // Back online, its full shared state is asked again (changes made meanwhile were not
    // pushed to a disconnected device).
    site.tb
        .await_event(since, "state of agv-2 asked again", |e| {
            e["kind"] == "attribute_request" && e["device"] == "agv-2"
        })
        .await?;

    // A session that ThingsBoard drops: the gateway reconnects and connects its devices again.
    let connects = site.tb.device("agv-1").await?.unwrap()["connects"]
        .as_u64()
        .unwrap_or(0);
    assert!(site.tb.drop_session(GATEWAY).await?);
    eventually("agv-1 connected again", Duration::from_secs(20), || async {
        let d = site.tb.device("agv-1").await?.unwrap();
        Ok((d["active"] == true && d["connects"].as_u64().unwrap_or(0) > connects).then_some(()))
    })
    .await?;
    Ok(())
}

/// A live reload on the ThingsBoard profile: a removed device is disconnected in ThingsBoard,
/// an added one connected, on the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reload_connects_and_disconnects_devices() -> Result<()> {
    let site = TbSite::start(2).await?;
    let original = std::fs::read_to_string(&site.config_path)?;
    let at = original.find("\n[devices.agv-2]").expect("agv-2's section");
    let end = original[at + 1..]
        .match_indices("\n[devices.")
        .map(|(i, _)| at + 1 + i)
        .find(|&i| !original[i..].starts_with("\n[devices.agv-2"))
        .unwrap_or(original.len());
    let without = format!("{}{}", &original[..at], &original[end..]);
    std::fs::write(&site.config_path, &without)?;
    site.gateway.proc.signal("HUP")?;
    site.tb.await_active("agv-2", false).await?;
    assert_eq!(site.tb.device("agv-1").await?.unwrap()["active"], true);

    std::fs::write(&site.config_path, &original)?;
    site.gateway.proc.signal("HUP")?;
    site.tb.await_active("agv-2", true).await?;
    let (s, b) = site
        .tb
        .rpc_twoway("agv-2", json!({"method": "battery", "params": {}}))
        .await?;
    assert_eq!(s, 200, "{b}");
    let gws = site.tb.gateways().await?;
    assert_eq!(gws[0]["connects"], 1, "one session throughout: {gws}");
    Ok(())
}
