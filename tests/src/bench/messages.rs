//! Cloud-to-device messages: many messages over a set of devices, posted as fast as the
//! operator API takes them, and timed from the first POST until the operator API shows every
//! one `completed`. gatewayd stores each message durably before it acknowledges it and commits
//! `running` and the outcome around each device call (WAL, `synchronous=FULL`, group commit:
//! `gatewayd/src/store.rs`); the bench does not change those settings. The stub's stamps
//! (queued, sent, delivered, finished) tell which stage the time went to, the devices'
//! counters show that each completed message ran exactly once, and the CPU each process used
//! over the run, divided by the messages completed, what one costs.

use super::load::{self, Burst};
use super::procfs::{self, CpuMeter};
use super::rig::Rig;
use super::stats::Summary;
use crate::{get, post, Stub};
use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Probe interval of this phase: long, so probes stay out of the figures.
pub const PROBE_INTERVAL_MS: u64 = 60_000;
/// The command sent (`[devices.*.commands.BEEP]`: one POST to the device).
pub const COMMAND: &str = "BEEP";
/// Long enough that no message can expire during the run.
pub const TTL_S: u64 = 600;
/// Longest wait for every message to be final after the last POST was answered.
const DEADLINE: Duration = Duration::from_secs(120);
/// Message list reads in flight while polling.
const POLL_IN_FLIGHT: usize = 8;
/// `fdatasync` rounds of the disk probe.
const FSYNC_ROUNDS: usize = 50;
/// Longest wait for gatewayd to go quiet after its start, before the CPU window opens.
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// What the bench can say about gatewayd's store settings (set in `gatewayd/src/store.rs`).
pub const DURABILITY: &str = "gatewayd SQLite store: WAL, synchronous=FULL, group commit";

/// What the message phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Messages {
    pub devices: usize,
    pub per_device: usize,
    pub command: &'static str,
    pub ttl_s: u64,
    /// From gatewayd's start until the stub showed every device online, seconds.
    pub ready_after_s: f64,
    /// The POSTs at the operator API (expected answer 202).
    pub sends: Burst,
    /// From the first POST until the operator API showed every accepted message final (or the
    /// deadline), seconds.
    pub elapsed_s: f64,
    /// Messages `completed` per second of `elapsed_s`.
    pub completed_per_s: f64,
    pub completed: usize,
    /// Accepted messages by the status the API showed at the end.
    pub by_status: BTreeMap<String, usize>,
    /// Accepted messages not final at the end, or missing from the API.
    pub lost: usize,
    /// Accepted messages that did not end `completed`, plus POSTs not accepted.
    pub not_completed: usize,
    /// Device executions counted by the simulated devices (by `X-Message-Id`) and how many
    /// messages ran more than once.
    pub device_executions: u64,
    pub executed_twice: usize,
    pub durability: &'static str,
    /// gatewayd's store file, the file system holding it, and whether its WAL file existed.
    pub store: String,
    pub store_fs: String,
    pub store_wal_seen: bool,
    /// Median of 4 KiB append + `fdatasync` next to the store, before the run: the floor of one
    /// commit.
    pub fsync_p50_ms: f64,
    pub stages: MessageStages,
    /// Percent of one core used by each process from the first POST until the end.
    pub cpu_percent: BTreeMap<String, f64>,
    /// Microseconds of CPU each process used over the same window per message completed
    /// (gatewayd: received, stored, run at the device, outcome stored and reported).
    pub cpu_us_per_message: BTreeMap<String, f64>,
}

/// When the last message passed each stage, as the stub stamped it, in seconds after the first
/// POST (wall clock, millisecond stamps), and per-message time from queued to finished.
#[derive(Debug, Clone, Serialize)]
pub struct MessageStages {
    pub queued_s: Option<f64>,
    pub sent_s: Option<f64>,
    pub delivered_s: Option<f64>,
    pub finished_s: Option<f64>,
    /// Per message: queued until finished (the whole way, waiting included).
    pub queued_to_finished: Summary,
    /// Per message: published by the stub until the gateway's `received` was applied (gatewayd
    /// stored it; this frees its slot in the stub's send window).
    pub sent_to_delivered: Summary,
    /// Per message: `received` until the final feedback was applied (waiting in gatewayd's
    /// per-device FIFO, the device call and its commits).
    pub delivered_to_finished: Summary,
}

/// Starts `devices` devices and a gatewayd for them on `stub`, posts `per_device` messages to
/// each (round-robin over the devices) with `in_flight` requests at once, and polls the message
/// lists until each is final. `pids` are further processes whose CPU use is reported.
pub async fn measure(
    stub: &Stub,
    dir: &Path,
    devices: usize,
    per_device: usize,
    in_flight: usize,
    pids: &[(&str, u32)],
) -> Result<Messages> {
    let rig = Rig::start(stub, dir, "bench-msg", "msg", devices, PROBE_INTERVAL_MS).await?;
    eprintln!(
        "bench:    gatewayd up with {devices} devices, all online after {:.1} s",
        rig.ready_after.as_secs_f64()
    );
    let store = dir.join("gatewayd.db");
    let fsync_p50_ms = load::fsync_p50_ms(dir, FSYNC_ROUNDS)?;
    let mut all_pids = vec![("gatewayd", rig.gateway_pid()?)];
    all_pids.extend(rig.fleet_pids()?);
    all_pids.extend_from_slice(pids);
    procfs::settle(all_pids[0].1, SETTLE_STEP, SETTLE_MAX).await?;
    let api = stub.api.clone();
    let names: Arc<Vec<String>> =
        Arc::new(rig.fleet.devices.iter().map(|(n, _)| n.clone()).collect());
    let total = devices * per_device;

    let cpu = CpuMeter::start(&all_pids)?;
    let sent = {
        let (api, names) = (api.clone(), names.clone());
        load::burst(total, in_flight, 202, move |i| {
            let url = format!("{api}/api/v1/devices/{}/messages", names[i % names.len()]);
            let body = json!({"payload": {"command": COMMAND, "n": i}, "ttl_seconds": TTL_S});
            async move {
                let (status, answer) = post(&url, &body).await?;
                Ok((
                    status,
                    answer["id"].as_str().unwrap_or_default().to_string(),
                ))
            }
        })
        .await
    };
    eprintln!(
        "bench:    {} POSTs answered in {:.3} s ({:.0}/s), {} not 202",
        sent.burst.requests,
        sent.burst.elapsed_s,
        sent.burst.per_s,
        sent.burst.requests - sent.burst.ok
    );

    // Accepted message ids per device.
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); devices];
    for (i, id) in sent.answers.iter().enumerate() {
        if let Some(id) = id {
            ids[i % devices].push(id.clone());
        }
    }
    let ids = Arc::new(ids);
    let polled = {
        let (api, names, ids) = (api.clone(), names.clone(), ids.clone());
        load::poll_until_done(
            (0..devices).collect(),
            POLL_IN_FLIGHT,
            Instant::now() + DEADLINE,
            move |d| {
                let url = format!("{api}/api/v1/devices/{}/messages", names[d]);
                let ids = ids.clone();
                async move {
                    let (status, list) = get(&url).await?;
                    let records = by_id(&list);
                    let done = status == 200
                        && ids[d]
                            .iter()
                            .all(|id| records.get(id.as_str()).is_some_and(|m| is_final(m)));
                    Ok(done.then_some(list))
                }
            },
        )
        .await
    };
    let end = polled.all_done_at.unwrap_or_else(Instant::now);
    let used = cpu.used()?;
    let elapsed = end.saturating_duration_since(sent.started);
    let store_wal_seen = dir.join("gatewayd.db-wal").exists();

    // Devices not done by the deadline: read their lists once more for the final counts.
    let mut lists: BTreeMap<usize, Value> = polled.done;
    for (d, name) in names.iter().enumerate() {
        if let std::collections::btree_map::Entry::Vacant(e) = lists.entry(d) {
            let (_, list) = get(&format!("{api}/api/v1/devices/{name}/messages")).await?;
            e.insert(list);
        }
    }
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut stamps: [Vec<u64>; 4] = Default::default();
    let mut between: [Vec<Duration>; 3] = Default::default();
    let mut lost = 0;
    for (d, list) in &lists {
        let records = by_id(list);
        for id in &ids[*d] {
            let Some(m) = records.get(id.as_str()) else {
                lost += 1;
                *by_status.entry("missing".into()).or_default() += 1;
                continue;
            };
            if !is_final(m) {
                lost += 1;
            }
            let status = m["status"].as_str().unwrap_or("?").to_string();
            *by_status.entry(status).or_default() += 1;
            let fields = [
                "enqueued_at_ms",
                "sent_at_ms",
                "delivered_at_ms",
                "finished_at_ms",
            ];
            for (k, f) in fields.iter().enumerate() {
                if let Some(v) = m[*f].as_u64() {
                    stamps[k].push(v);
                }
            }
            let pairs = [
                ("enqueued_at_ms", "finished_at_ms"),
                ("sent_at_ms", "delivered_at_ms"),
                ("delivered_at_ms", "finished_at_ms"),
            ];
            for (k, (from, to)) in pairs.iter().enumerate() {
                if let (Some(a), Some(b)) = (m[*from].as_u64(), m[*to].as_u64()) {
                    between[k].push(Duration::from_millis(b.saturating_sub(a)));
                }
            }
        }
    }
    let completed = by_status.get("completed").copied().unwrap_or(0);
    let all: Vec<&Value> = lists.values().collect();
    std::fs::write(dir.join("messages.json"), serde_json::to_vec(&all)?)?;

    // What the devices executed, by message id.
    let mut device_executions = 0;
    let mut executed_twice = 0;
    for name in names.iter() {
        let view = rig.fleet.view(name).await?;
        if let Some(map) = view["executions"].as_object() {
            for n in map.values().filter_map(Value::as_u64) {
                device_executions += n;
                if n > 1 {
                    executed_twice += 1;
                }
            }
        }
    }

    let t0 = sent.started_ms;
    let [queued, sent_at, delivered, finished] = stamps;
    let stages = MessageStages {
        queued_s: load::last_after(t0, queued),
        sent_s: load::last_after(t0, sent_at),
        delivered_s: load::last_after(t0, delivered),
        finished_s: load::last_after(t0, finished),
        queued_to_finished: Summary::of(&mut between[0]),
        sent_to_delivered: Summary::of(&mut between[1]),
        delivered_to_finished: Summary::of(&mut between[2]),
    };
    let result = Messages {
        devices,
        per_device,
        command: COMMAND,
        ttl_s: TTL_S,
        ready_after_s: rig.ready_after.as_secs_f64(),
        not_completed: total - completed,
        sends: sent.burst,
        elapsed_s: elapsed.as_secs_f64(),
        completed_per_s: completed as f64 / elapsed.as_secs_f64(),
        completed,
        by_status,
        lost,
        device_executions,
        executed_twice,
        durability: DURABILITY,
        store: store.display().to_string(),
        store_fs: load::fs_type(dir),
        store_wal_seen,
        fsync_p50_ms,
        stages,
        cpu_percent: used.percent().into_iter().collect(),
        cpu_us_per_message: used.us_per_op(completed as u64),
    };
    rig.stop().await?;
    Ok(result)
}

/// A device's message list by message id.
fn by_id(list: &Value) -> HashMap<&str, &Value> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["id"].as_str()?, m)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a message record has a final status.
fn is_final(m: &Value) -> bool {
    !matches!(
        m["status"].as_str(),
        Some("queued") | Some("delivered") | None
    )
}
