//! Modbus devices end to end: the real cloud stub, gatewayd and the Modbus simulator
//! (`device-fixtures modbus`: TCP on a port, RTU on a pseudo-terminal), through the operator
//! API. The same checks run over TCP and over RTU.

use anyhow::Result;
use e2e::modbus::{
    reads_and_writes, rtu_device, rtu_over_tcp_device, rtu_port, tcp_device, unit_map, ModbusSim,
};
use e2e::*;
use serde_json::{json, Value};
use std::time::Duration;
use tempfile::TempDir;

// Field order is drop order: the site and simulator first, their directory last.
struct Env {
    site: Site,
    sim: ModbusSim,
    _dir: TempDir,
}

impl Env {
    /// A simulator with units 1-3 and a site whose gatewayd has `devices` (TOML) on it.
    async fn start(devices: impl Fn(&ModbusSim) -> String) -> Result<Env> {
        let dir = tempfile::tempdir()?;
        let map = json!({"units": {"1": unit_map(1), "2": unit_map(2), "3": unit_map(3)}});
        let sim = ModbusSim::start(dir.path(), "modbus", &map).await?;
        let site = Site::start_with(1, &devices(&sim)).await?;
        Ok(Env {
            site,
            sim,
            _dir: dir,
        })
    }

    async fn call(&self, device: &str, method: &str, params: Value) -> Result<(u16, Value)> {
        let (s, b, _) = invoke(&self.site.stub.api, device, method, params, 5).await?;
        Ok((s, b))
    }

    async fn ok(&self, device: &str, method: &str, params: Value) -> Result<Value> {
        let (s, b) = self.call(device, method, params).await?;
        anyhow::ensure!(s == 200, "{device} {method}: {s} {b}");
        Ok(b["result"].clone())
    }

    /// Requests unit `unit` answered so far.
    async fn requests(&self, unit: u8) -> Result<u64> {
        Ok(
            self.sim.state().await?["units"][unit.to_string()]["requests"]
                .as_u64()
                .unwrap_or(0),
        )
    }
}

fn both(sim: &ModbusSim) -> String {
    format!(
        "{}{}{}",
        tcp_device("meter-tcp", sim, 1),
        rtu_port("rtu", sim),
        rtu_device("meter-rtu", "rtu", 1)
    )
}

/// How a device reaches the simulator.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Tcp,
    Rtu,
    RtuOverTcp,
}

/// Reads, writes, typed values and every fault, on one device; the simulator is reset after.
async fn exercise(env: &Env, device: &str, via: Via) -> Result<()> {
    let rtu = via != Via::Tcp;
    // What every peer agrees on (pymodbus too, `modbus_interop.rs`).
    reads_and_writes(&env.site.stub.api, device).await?;
    env.sim.reset().await?;

    // A block of 10 registers into named fields, in one request.
    let before = env.requests(1).await?;
    env.ok(device, "block", json!(null)).await?;
    assert_eq!(
        env.requests(1).await? - before,
        1,
        "one request for the block"
    );

    // The coil write was FC 5, acted on once.
    env.ok(device, "start", json!(null)).await?;
    let state = env.sim.state().await?;
    assert_eq!(state["units"]["1"]["coils"]["0"], true, "{state}");
    assert_eq!(state["units"]["1"]["executed"]["fc5@0"], 1, "{state}");

    // A value out of the type's range is refused before anything is sent.
    let before = env.requests(1).await?;
    let (s, b) = env.call(device, "set_raw", json!({"value": 70000})).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("invalid_params")),
        "{b}"
    );
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("out of range for u16"),
        "{b}"
    );
    assert_eq!(env.requests(1).await?, before, "nothing sent");

    // Every exception code: device_error with its number and name; the next call works.
    for (code, name) in [
        (1, "illegal function"),
        (2, "illegal data address"),
        (3, "illegal data value"),
        (4, "server device failure"),
    ] {
        env.sim.fault(json!({"exception": code})).await?;
        let (s, b) = env.call(device, "temperature", json!(null)).await?;
        assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
        assert_eq!(b["device_status"], code, "{b}");
        assert_eq!(
            b["detail"],
            format!("modbus exception {code} ({name})"),
            "{b}"
        );
        assert_ne!(b["may_have_run"], json!(true), "{b}");
        env.sim.fault(json!({"exception": null})).await?;
        assert_eq!(
            env.ok(device, "temperature", json!(null)).await?,
            json!(21.5)
        );
    }
    // Busy (6) is transient: device_busy, the device did not act.
    env.sim.fault(json!({"exception": 6})).await?;
    let (s, b) = env.call(device, "set_raw", json!({"value": 7})).await?;
    assert_eq!((s, b["code"].as_str()), (503, Some("device_busy")), "{b}");
    env.sim.fault(json!({"exception": null})).await?;
    assert_eq!(
        env.sim.state().await?["units"]["1"]["holding_registers"]["200"],
        0
    );

    // No answer: timeout at the caller's deadline, and the next call works.
    env.sim.fault(json!({"no_reply": true})).await?;
    let (s, b, took) = invoke(&env.site.stub.api, device, "temperature", json!(null), 1).await?;
    assert_eq!((s, b["code"].as_str()), (504, Some("timeout")), "{b}");
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    env.sim.fault(json!({"no_reply": false})).await?;
    assert_eq!(
        env.ok(device, "temperature", json!(null)).await?,
        json!(21.5)
    );

    // A reply from the wrong unit: device_error (it may have acted), and the next call works.
    env.sim.fault(json!({"wrong_unit": true})).await?;
    let (s, b) = env.call(device, "temperature", json!(null)).await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    assert_eq!(b["may_have_run"], json!(true), "{b}");
    env.sim.fault(json!({"wrong_unit": false})).await?;
    assert_eq!(env.ok(device, "unit", json!(null)).await?, json!(1));

    if rtu {
        // A bad CRC: device_error naming it, and the next call works.
        env.sim.fault(json!({"crc_error": true})).await?;
        let (s, b) = env.call(device, "temperature", json!(null)).await?;
        assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
        assert!(
            b["message"]
                .as_str()
                .unwrap_or_default()
                .contains("bad CRC"),
            "{b}"
        );
        env.sim.fault(json!({"crc_error": false})).await?;
        assert_eq!(
            env.ok(device, "temperature", json!(null)).await?,
            json!(21.5)
        );
    }

    // A slow device within the deadline is fine.
    env.sim.fault(json!({"slow_ms": 300})).await?;
    let (s, b, took) = invoke(&env.site.stub.api, device, "energy", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    env.sim.fault(json!({"slow_ms": 0})).await?;

    // The bus goes away: the device goes offline, calls fail at once, and it comes back.
    env.sim.fault(json!({"gone": true})).await?;
    if via == Via::Rtu {
        await_device_online(&env.site.stub.api, device, false).await?;
    } else {
        // TCP: the next call finds the connection gone (it may have been written), and the
        // reconnect that follows fails: offline.
        let _ = env.call(device, "temperature", json!(null)).await?;
        await_device_online(&env.site.stub.api, device, false).await?;
    }
    let (s, b) = env.call(device, "temperature", json!(null)).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (503, Some("device_offline")),
        "{b}"
    );
    env.sim.fault(json!({"gone": false})).await?;
    await_device_online(&env.site.stub.api, device, true).await?;
    assert_eq!(
        env.ok(device, "temperature", json!(null)).await?,
        json!(21.5)
    );

    env.sim.reset().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_tcp_reads_writes_and_faults() -> Result<()> {
    let env = Env::start(both).await?;
    await_device_online(&env.site.stub.api, "meter-tcp", true).await?;
    let (_, view) = get(&format!("{}/api/v1/devices/meter-tcp", env.site.stub.api)).await?;
    assert_eq!(view["kind"], "modbus_tcp", "{view}");
    exercise(&env, "meter-tcp", Via::Tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_rtu_reads_writes_and_faults() -> Result<()> {
    let env = Env::start(both).await?;
    await_device_online(&env.site.stub.api, "meter-rtu", true).await?;
    exercise(&env, "meter-rtu", Via::Rtu).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_rtu_over_tcp_reads_writes_and_faults() -> Result<()> {
    let env =
        Env::start(|sim| rtu_over_tcp_device("meter-rtu-tcp", &sim.host, sim.rtu_tcp_port, 1))
            .await?;
    await_device_online(&env.site.stub.api, "meter-rtu-tcp", true).await?;
    exercise(&env, "meter-rtu-tcp", Via::RtuOverTcp).await
}

/// A desired setpoint written to a holding register and read back: the device clamps it, so
/// reported differs from desired and the operator sees the delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamped_setpoint_shows_a_delta() -> Result<()> {
    let env = Env::start(both).await?;
    let site = &env.site;
    for device in ["meter-tcp", "meter-rtu"] {
        await_device_online(&site.stub.api, device, true).await?;
        let (s, b) = site
            .patch_desired(device, json!({"setpoint": 120.5}), None)
            .await?;
        assert_eq!(s, 200, "{b}");
        let twin = site
            .await_twin(device, "setpoint 120.5 applied", |t| {
                t["reported"]["setpoint"] == json!(120.5)
            })
            .await?;
        assert_eq!(twin["delta"], json!([]), "{twin}");
        // 200.0 is 2000 raw; the device holds at most 1500 and says so on read-back.
        site.patch_desired(device, json!({"setpoint": 200.0}), None)
            .await?;
        let twin = site
            .await_twin(device, "setpoint clamped to 150", |t| {
                t["reported"]["setpoint"] == json!(150.0)
            })
            .await?;
        assert_eq!(twin["desired"]["setpoint"], json!(200.0), "{twin}");
        assert_eq!(twin["delta"], json!(["setpoint"]), "{twin}");
        assert_eq!(twin["apply"]["setpoint"]["state"], "different", "{twin}");
    }
    let state = env.sim.state().await?;
    assert_eq!(
        state["units"]["1"]["holding_registers"]["100"], 1500,
        "{state}"
    );

    // 7000.0 is 70000 raw, beyond a u16: refused before anything is written, with the reason.
    let before = env.requests(1).await?;
    site.patch_desired("meter-tcp", json!({"setpoint": 7000.0}), None)
        .await?;
    let twin = site
        .await_twin("meter-tcp", "setpoint refused", |t| {
            t["apply"]["setpoint"]["state"] == "refused"
        })
        .await?;
    let reason = twin["apply"]["setpoint"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("out of range for u16"), "{twin}");
    assert_eq!(twin["reported"]["setpoint"], json!(150.0), "{twin}");
    assert_eq!(env.requests(1).await?, before, "nothing written");
    Ok(())
}

/// A unit answering exception 6 (busy) did not act: a message waits and is tried again with
/// backoff, and runs exactly once when the unit is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_unit_gets_its_message_once_it_is_free() -> Result<()> {
    let env = Env::start(|sim| tcp_device("meter-tcp", sim, 1)).await?;
    let site = &env.site;
    await_device_online(&site.stub.api, "meter-tcp", true).await?;
    env.sim.fault(json!({"exception": 6})).await?;
    let id = site
        .send_ok(
            "meter-tcp",
            json!({"command": "CONFIGURE", "seq": 4242, "speed": 9}),
            60,
        )
        .await?;
    let admin = site.gateway.admin().await?;
    let waiting = eventually("two busy attempts", Duration::from_secs(20), || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let (_, rows) = get(&format!("{admin}/api/inbox?device=meter-tcp")).await?;
            Ok(rows.as_array().and_then(|r| {
                r.iter()
                    .find(|m| m["id"] == id.as_str() && m["attempts"].as_u64() >= Some(2))
                    .cloned()
            }))
        }
    })
    .await?;
    assert!(
        waiting["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("exception 6"),
        "{waiting}"
    );
    env.sim.fault(json!({"exception": null})).await?;
    let m = site
        .await_final("meter-tcp", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "completed", "{m}");
    let state = env.sim.state().await?;
    let writes = state["units"]["1"]["writes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let written: Vec<_> = writes.iter().filter(|w| w[2][0] == 4242).collect();
    assert_eq!(written.len(), 1, "{state}");
    assert_eq!(written[0][2], json!([4242, 9, 1]), "{state}");
    Ok(())
}

/// Messages writing three registers each (FC 16), over TCP and RTU, while gatewayd is killed
/// with SIGKILL again and again: every message ends final, and none is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_commands_run_at_most_once_across_kill_9() -> Result<()> {
    // Unit 1 over TCP, unit 2 over RTU.
    let devices = [("meter-tcp", "1"), ("meter-rtu", "2")];
    let mut env = Env::start(|sim| {
        tcp_device("meter-tcp", sim, 1) + &rtu_port("rtu", sim) + &rtu_device("meter-rtu", "rtu", 2)
    })
    .await?;
    for (device, _) in devices {
        await_device_online(&env.site.stub.api, device, true).await?;
    }
    // Each write takes 30 ms to answer, so the kills land while messages run.
    env.sim.fault(json!({"slow_ms": 30})).await?;
    let mut ids = Vec::new();
    for n in 0..40u64 {
        let (device, unit) = devices[n as usize % 2];
        let payload = json!({"command": "CONFIGURE", "seq": 1000 + n, "speed": n});
        ids.push((
            device,
            unit,
            1000 + n,
            env.site.send_ok(device, payload, 600).await?,
        ));
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..5 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(20 + seed % 100)).await;
        env.site.kill_gatewayd().await?;
        env.site.restart_gatewayd().await?;
    }
    let mut by_status: std::collections::BTreeMap<String, usize> = Default::default();
    let mut finals = Vec::new();
    for (device, unit, seq, id) in &ids {
        let m = env
            .site
            .await_final(device, id, Duration::from_secs(60))
            .await?;
        let status = m["status"].as_str().unwrap_or("?").to_string();
        *by_status.entry(status.clone()).or_default() += 1;
        finals.push((*unit, *seq, status));
    }
    let state = env.sim.state().await?;
    let written = |unit: &str, seq: u64| {
        state["units"][unit]["writes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w[0] == 16 && w[1] == 200 && w[2][0] == seq)
            .count()
    };
    eprintln!("after 5 kills: {by_status:?}");
    for (unit, seq, status) in &finals {
        let n = written(unit, *seq);
        assert!(n <= 1, "unit {unit} seq {seq} written {n} times");
        if status == "completed" {
            assert_eq!(n, 1, "completed seq {seq} written {n} times on unit {unit}");
        }
    }
    assert!(
        by_status
            .keys()
            .all(|s| s == "completed" || s == "may_have_run"),
        "{by_status:?}"
    );
    env.site.stop_gatewayd().await?;
    Ok(())
}

/// Three slaves on one RTU bus and an ASCII instrument on another port, 200 mixed reads and
/// writes in flight: every answer belongs to its device, every write reached its own unit
/// once, and the bus served one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_slaves_and_an_ascii_instrument_under_200_calls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let serial = SerialSim::start(dir.path(), "ttyASCII", &[]).await?;
    let ascii = e2e::config::SerialConfig {
        port: "ascii",
        path: &serial.path,
        timeout_ms: 5000,
        devices: &[("tc-1", None)],
    }
    .render();
    let env = Env::start(|sim| {
        let mut s = rtu_port("rtu", sim);
        for unit in 1..=3u8 {
            s.push_str(&rtu_device(&format!("slave-{unit}"), "rtu", unit));
        }
        s + &ascii
    })
    .await?;
    for d in ["slave-1", "slave-2", "slave-3", "tc-1"] {
        await_device_online(&env.site.stub.api, d, true).await?;
    }
    let api = env.site.stub.api.clone();
    let mut calls = Vec::new();
    // A quarter to the instrument; the rest to the slaves, each either reading its own id or
    // writing a value no other call writes.
    for n in 0..200usize {
        let api = api.clone();
        calls.push(tokio::spawn(async move {
            let (device, method, params, want) = match (n % 4, n % 8 < 4) {
                (0, _) => ("tc-1", "temperature", json!(null), json!({"temp": 21.5})),
                (k, true) => (SLAVES[k - 1], "unit", json!(null), json!(k)),
                (k, false) => (SLAVES[k - 1], "set_raw", json!({"value": n}), Value::Null),
            };
            let (s, b, _) = invoke(&api, device, method, params, 60).await?;
            anyhow::ensure!(
                s == 200 && b["result"] == want,
                "{device} {method}: {s} {b}, want {want}"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for c in calls {
        c.await??;
    }
    let state = env.sim.state().await?;
    assert_eq!(state["collisions"], 0, "{state}");
    for k in 1..=3usize {
        let unit = &state["units"][k.to_string()];
        assert!(unit["requests"].as_u64().unwrap_or(0) >= 50, "{state}");
        // Every write reached its own unit, once.
        let mut written: Vec<u64> = unit["writes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| w[2][0].as_u64().unwrap_or(u64::MAX))
            .collect();
        written.sort_unstable();
        let want: Vec<u64> = (0..200u64)
            .filter(|n| n % 4 == k as u64 && n % 8 >= 4)
            .collect();
        assert_eq!(written, want, "unit {k}");
    }
    Ok(())
}

const SLAVES: [&str; 3] = ["slave-1", "slave-2", "slave-3"];

/// A unit polled for its reported state and probed on a register: a change made at its own
/// panel shows in the reported half, and a unit that stops answering goes offline (though its
/// bus is fine) and returns on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_reported_state_and_a_probe_register() -> Result<()> {
    let env = Env::start(|sim| {
        let mut s = rtu_port("rtu", sim);
        s.push_str(&rtu_device("drive-1", "rtu", 1));
        s.push_str(
            r#"
[devices.drive-1.reported_poll]
method = "block"
interval_ms = 1000

[devices.drive-1.health]
register = { table = "holding_register", address = 300 }
interval_ms = 100
timeout_ms = 300
failures_before_offline = 2
"#,
        );
        s
    })
    .await?;
    let site = &env.site;
    await_device_online(&site.stub.api, "drive-1", true).await?;
    site.await_twin("drive-1", "polled voltage 230.1", |t| {
        t["reported"]["voltage"] == json!(230.1) && t["reported"]["r19"] == json!(19)
    })
    .await?;
    env.sim
        .panel(1, "holding_registers", 10, json!([2400]))
        .await?;
    site.await_twin("drive-1", "polled voltage 240", |t| {
        t["reported"]["voltage"] == json!(240.0)
    })
    .await?;

    env.sim.fault(json!({"no_reply": true})).await?;
    let view = await_device_online(&site.stub.api, "drive-1", false).await?;
    eprintln!("offline: {view}");
    env.sim.fault(json!({"no_reply": false})).await?;
    await_device_online(&site.stub.api, "drive-1", true).await?;
    Ok(())
}
