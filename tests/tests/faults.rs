//! The guarantees under faults, with the real processes: at most one execution per message
//! even when a device drops the connection after acting or answers garbage, nothing
//! acknowledged that was not stored when the disk is full (and everything flowing again by
//! itself once space returns, with an idle CPU meanwhile), and device answers read with a
//! bound whatever their size. Each scenario prints its figures.

use anyhow::{Context, Result};
use e2e::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A `/proc/<pid>/status` field in kB.
fn proc_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Each way a device can act and then fail to answer ends `may_have_run` after exactly one
/// execution: never retried, never reported as certainly not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_acts_then_fails_to_answer_runs_each_message_once() -> Result<()> {
    let site = Site::start(1).await?;
    let mut figures = Vec::new();
    for fault in ["drop_after_acting", "malformed_status", "huge_header"] {
        site.fleet.fault("agv-1", json!({ fault: true })).await?;
        let id = site
            .send_ok("agv-1", json!({"command": "RESTART"}), 30)
            .await?;
        let m = site
            .await_final("agv-1", &id, Duration::from_secs(20))
            .await?;
        site.fleet.fault("agv-1", json!({ fault: false })).await?;
        let runs = executions(&site.fleet.view("agv-1").await?, &id);
        println!(
            "faults: {fault}: status {}, executions {runs}",
            m["status"].as_str().unwrap_or("?")
        );
        figures.push((fault, runs));
        assert_eq!(m["status"], "may_have_run", "{fault}: {m}");
        assert_eq!(runs, 1, "{fault}: executions of {id}");
    }
    // The device is reachable again and the next message completes normally.
    let id = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 30)
        .await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    assert_eq!(m["status"], "completed", "{m}");
    println!("faults: executions per accepted message: {figures:?} (at most 1 each)");
    Ok(())
}

/// The reproduction: a slow device goes offline while a command is in flight and comes
/// back later. The request was written, so the message ends `may_have_run` and is never sent
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_going_offline_during_a_command_never_runs_it_twice() -> Result<()> {
    let site = Site::start(1).await?;
    site.fleet
        .fault("agv-1", json!({"latency_ms": 2000}))
        .await?;
    let id = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 30)
        .await?;
    // Wait until gatewayd has started the call (the message is `running`: written to the
    // device, which sits on it for 2 s), then take the device offline.
    let admin = site.gateway.admin().await?;
    eventually("message running", Duration::from_secs(10), || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            let (_, rows) = get(&format!("{admin}/api/inbox?device=agv-1")).await?;
            Ok(rows
                .as_array()
                .is_some_and(|r| {
                    r.iter()
                        .any(|m| m["id"] == id.as_str() && m["state"] == "running")
                })
                .then_some(()))
        }
    })
    .await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    let m = site
        .await_final("agv-1", &id, Duration::from_secs(20))
        .await?;
    site.fleet
        .fault("agv-1", json!({"offline": false, "latency_ms": 0}))
        .await?;
    let runs = executions(&site.fleet.view("agv-1").await?, &id);
    println!(
        "faults: offline during a command: status {}, executions {runs}",
        m["status"]
    );
    assert!(runs <= 1, "executions {runs}");
    assert_ne!(m["status"], "completed", "{m}");
    // Back online: the message is final and is not executed again.
    await_device_online(&site.stub.api, "agv-1", true).await?;
    let again = site.message("agv-1", &id).await?;
    assert_eq!(again["status"], m["status"]);
    assert!(executions(&site.fleet.view("agv-1").await?, &id) <= 1);
    Ok(())
}

/// A 200 MB answer costs gatewayd the answer limit, not the answer: the call is a
/// `device_error` naming the limit, and the device stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_device_answer_is_cut_at_the_limit() -> Result<()> {
    let site = Site::start(1).await?;
    let pid = site.gateway.proc.child.id().context("gatewayd pid")?;
    let before = proc_kb(pid, "VmRSS:")?;
    site.fleet
        .fault("agv-1", json!({"huge_body_mb": 200}))
        .await?;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let api = site.stub.api.clone();
        calls.push(async move { invoke(&api, "agv-1", "status", json!({}), 30).await });
    }
    let answers = futures_join(calls).await;
    let peak = proc_kb(pid, "VmHWM:")?;
    site.fleet
        .fault("agv-1", json!({"huge_body_mb": 0}))
        .await?;
    for a in answers {
        let (s, b, took) = a?;
        assert_eq!(s, 502, "{b}");
        assert_eq!(b["code"], "device_error", "{b}");
        let msg = b["message"].as_str().unwrap_or("");
        assert!(msg.contains("131072 bytes"), "{b}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    println!(
        "faults: 4 concurrent 200 MB answers: gatewayd RSS {} kB before, peak {} kB (limit 131072 B per answer)",
        before, peak
    );
    assert!(
        peak < before + 32 * 1024,
        "peak RSS {peak} kB against {before} kB before"
    );
    let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!({}), 10).await?;
    assert_eq!(s, 200, "{b}");
    Ok(())
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// A small tmpfs for gatewayd's store, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(under: &Path) -> Result<SmallDisk> {
        let dir = under.join("small-disk");
        std::fs::create_dir_all(&dir)?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&dir)
            .status()
            .context("mount (the full-disk test needs root to mount a tmpfs)")?
            .success();
        anyhow::ensure!(
            ok,
            "cannot mount a tmpfs at {} (the full-disk test needs root)",
            dir.display()
        );
        Ok(SmallDisk { dir })
    }

    /// Fills the file system to the last byte.
    fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join("filler"))?;
        let block = vec![0u8; 64 * 1024];
        loop {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        while f.write_all(&small[..1]).is_ok() {}
        let _ = f.sync_all();
        Ok(())
    }

    fn free(&self) -> Result<()> {
        Ok(std::fs::remove_file(self.dir.join("filler"))?)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Commit before acknowledge on a full disk: nothing is acknowledged that was not stored, the
/// cloud and `/readyz` learn that the store fails, the CPU stays idle, and once space returns
/// every message and the twin change flow by themselves, each message executed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_acknowledges_nothing_and_recovers_by_itself() -> Result<()> {
    let parent = tempfile::tempdir()?;
    let disk = SmallDisk::mount(parent.path())?;
    let site = Site::start_opts(
        Broker::Embedded(format!("127.0.0.1:{}", free_port()?)),
        1,
        SiteOptions {
            store_dir: Some(disk.dir.clone()),
            ..SiteOptions::default()
        },
    )
    .await?;
    let admin = site.gateway.admin().await?;
    let pid = site.gateway.proc.child.id().context("gatewayd pid")?;
    disk.fill()?;

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            site.send_ok("agv-1", json!({"command": "RESTART"}), 120)
                .await?,
        );
    }
    let (s, b) = site
        .patch_desired("agv-1", json!({"mode": "manual"}), None)
        .await?;
    anyhow::ensure!(s == 200, "patch: {s} {b}");

    // Readiness says why, and the cloud learns it too.
    let (status, ready) = eventually("readyz 503", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move {
            let (s, b) = get(&format!("{admin}/readyz")).await?;
            Ok((s == 503
                && b["reasons"].as_array().is_some_and(|r| {
                    r.iter()
                        .any(|x| x.as_str().unwrap_or("").contains("store failing"))
                }))
            .then_some((s, b)))
        }
    })
    .await?;
    println!("faults: full disk: /readyz {status} {ready}");

    // Idle while it waits: CPU over 3 s.
    let t0 = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks = cpu_ticks(pid)? - t0;
    let hz = 100.0;
    let cpu = ticks as f64 / hz / started.elapsed().as_secs_f64() * 100.0;
    println!("faults: full disk: gatewayd CPU {cpu:.1} % of a core over 3 s");
    assert!(cpu < 20.0, "CPU {cpu:.1} % on a full disk");

    // Nothing was acknowledged unstored: no message executed, none completed.
    let view = site.fleet.view("agv-1").await?;
    let ran: u64 = ids.iter().map(|id| executions(&view, id)).sum();
    let mut done = 0;
    for id in &ids {
        let m = site.message("agv-1", id).await?;
        if m["status"] == "completed" {
            done += 1;
        }
    }
    println!("faults: full disk: {ran} executions, {done} completed while full");

    disk.free()?;
    let started = Instant::now();
    for id in &ids {
        let m = site
            .await_final("agv-1", id, Duration::from_secs(60))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
    }
    let twin = site
        .await_twin("agv-1", "mode manual reported", |t| {
            t["reported"]["mode"] == "manual"
        })
        .await
        .with_context(|| format!("gatewayd log:\n{}", site.gateway.proc.tail()))?;
    let view = site.fleet.view("agv-1").await?;
    for id in &ids {
        assert_eq!(executions(&view, id), 1, "{id}");
    }
    println!(
        "faults: space returned: 20 messages completed and the twin applied within {:?}, each executed once ({})",
        started.elapsed(),
        twin["reported"]
    );
    let (s, _) = get(&format!("{admin}/readyz")).await?;
    assert_eq!(s, 200);
    Ok(())
}

/// Hostile publishes on the gateway's down topics are checked where they enter: bad or
/// oversize ids are never stored or run, an oversize payload with a readable id ends
/// `rejected` at once, a desired version of 2^64-1 is ignored (later operator patches still
/// apply), and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_publishes_are_checked_on_receipt() -> Result<()> {
    let site = Site::start(1).await?;
    let mut raw = e2e::raw::Raw::connect("hostile-cloud", &site.stub.mqtt, Default::default())
        .await?
        .map_err(|why| anyhow::anyhow!("cannot connect: {why}"))?;
    assert!(!e2e::raw::failed(
        raw.subscribe("gw/site-1/up/msg/feedback").await?
    ));
    let far = 4_000_000_000_000u64;
    let long = "x".repeat(1000);
    let big = "y".repeat(100 * 1024);
    for (topic, payload) in [
        (
            "gw/site-1/down/msg",
            json!({"id": "../x", "device": "agv-1", "payload": {"command": "RESTART"}, "expires_at_ms": far}),
        ),
        (
            "gw/site-1/down/msg",
            json!({"id": long, "device": "agv-1", "payload": {"command": "RESTART"}, "expires_at_ms": far}),
        ),
        (
            "gw/site-1/down/msg",
            json!({"id": "big-1", "device": "agv-1", "payload": {"command": "RESTART", "pad": big}, "expires_at_ms": far}),
        ),
        (
            "gw/site-1/down/msg",
            json!({"id": "shape-1", "device": "agv-1", "payload": {"command": "RESTART"}}),
        ),
        (
            "gw/site-1/down/rpc/req",
            json!({"id": long, "device": "agv-1", "method": "restart", "timeout_ms": 5000, "deadline_ms": far}),
        ),
        (
            "gw/site-1/down/twin/desired",
            json!({"device": "agv-1", "version": u64::MAX, "snapshot": {"mode": "manual"}}),
        ),
    ] {
        assert!(raw.publish_acked(topic, &payload, false).await?, "{topic}");
    }
    let big = raw.response("gw/site-1/up/msg/feedback", "big-1").await?;
    let shape = raw.response("gw/site-1/up/msg/feedback", "shape-1").await?;
    println!("faults: hostile publishes: feedback {big} and {shape}");
    assert_eq!(big["outcome"], "rejected", "{big}");
    assert!(
        big["reason"]
            .as_str()
            .unwrap_or("")
            .contains("payload_too_large"),
        "{big}"
    );
    assert_eq!(shape["outcome"], "rejected", "{shape}");
    assert!(
        shape["reason"]
            .as_str()
            .unwrap_or("")
            .contains("bad_request"),
        "{shape}"
    );

    // The operator's own patch still applies after the hostile version.
    let (s, b) = site
        .patch_desired("agv-1", json!({"led": true}), None)
        .await?;
    anyhow::ensure!(s == 200, "patch: {s} {b}");
    site.await_twin("agv-1", "led applied", |t| t["reported"]["led"] == true)
        .await?;
    let view = site.fleet.view("agv-1").await?;
    let runs: u64 = view["executions"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(runs, 0, "nothing hostile ran: {view}");
    assert_eq!(
        view["config"]["mode"], "auto",
        "the hostile snapshot was not applied"
    );
    let (s, b, _) = invoke(&site.stub.api, "agv-1", "status", json!({}), 5).await?;
    assert_eq!(s, 200, "still serving: {b}");
    Ok(())
}

/// A message is started only while enough of its TTL is left, and once started it runs with
/// its full timeout: a slow command queued behind another ends `expired` (never executed)
/// instead of being cut off and reported failed after the device ran it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_too_close_to_its_ttl_is_not_started() -> Result<()> {
    let site = Site::start(1).await?;
    site.fleet
        .fault("agv-1", json!({"latency_ms": 800}))
        .await?;
    let first = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 1)
        .await?;
    let second = site
        .send_ok("agv-1", json!({"command": "RESTART"}), 1)
        .await?;
    let a = site
        .await_final("agv-1", &first, Duration::from_secs(10))
        .await?;
    let b = site
        .await_final("agv-1", &second, Duration::from_secs(10))
        .await?;
    let view = site.fleet.view("agv-1").await?;
    println!(
        "faults: 800 ms commands with a 1 s ttl: first {} ({} run), second {} ({} run): {}",
        a["status"],
        executions(&view, &first),
        b["status"],
        executions(&view, &second),
        b["reason"]
    );
    assert_eq!(a["status"], "completed", "{a}");
    assert_eq!(executions(&view, &first), 1);
    assert_eq!(b["status"], "expired", "{b}");
    assert_eq!(executions(&view, &second), 0);
    Ok(())
}

/// A store that comes back empty after a crash (a zero-length file, its WAL gone) is detected:
/// gatewayd says so at ERROR, and the cloud, seeing a new store id, sends again the messages it
/// had delivered there, which then complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_store_is_detected_and_the_cloud_sends_again() -> Result<()> {
    let mut site = Site::start(1).await?;
    site.fleet.fault("agv-1", json!({"offline": true})).await?;
    await_device_online(&site.stub.api, "agv-1", false).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            site.send_ok("agv-1", json!({"command": "RESTART"}), 120)
                .await?,
        );
    }
    for id in &ids {
        eventually("delivered", Duration::from_secs(10), || async {
            let m = site.message("agv-1", id).await?;
            Ok((m["status"] == "delivered").then_some(()))
        })
        .await?;
    }
    site.kill_gatewayd().await?;
    let db = site.dir.path().join("gatewayd.db");
    std::fs::File::create(&db)?.set_len(0)?;
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
    }
    site.fleet.fault("agv-1", json!({"offline": false})).await?;
    site.restart_gatewayd().await?;
    site.await_log("the store lost its data").await?;
    let started = Instant::now();
    for id in &ids {
        let m = site
            .await_final("agv-1", id, Duration::from_secs(60))
            .await?;
        assert_eq!(m["status"], "completed", "{m}");
    }
    let view = site.fleet.view("agv-1").await?;
    for id in &ids {
        assert_eq!(executions(&view, id), 1, "{id}");
    }
    println!(
        "faults: store emptied after a crash: loss logged, 20 delivered messages sent again and completed in {:?}",
        started.elapsed()
    );
    Ok(())
}
