//! The cloud side under many gateways: a cloud stub of its own (SQLite file, embedded broker
//! on a port that survives its restart, or the external broker) and a swarm of simulated
//! gateways (`crate::swarm`) on it. Timed through the operator API:
//!
//! 1. start: the swarm connects to a fresh stub, until every gateway and device shows online;
//! 2. idle: nothing but keep-alives;
//! 3. connect storm: the stub is killed (SIGKILL, its embedded broker with it) and started
//!    again on the same port and file, until every gateway shows online again;
//! 4. RPC at a steady rate over random devices of all gateways;
//! 5. messages spread over devices of all gateways, until each is `completed`;
//! 6. one desired change to each device of some gateways, until reported == desired.
//!
//! For each step, the stub's CPU (utime + stime from `/proc`) and resident memory. With an
//! external broker the stub's restart leaves the gateways connected: step 3 then measures the
//! stub's recovery from retained announcements and its persistent session, not a storm.
//!
//! The swarm starts once the stub's own session is up, so every announcement reaches it live.
//! After a restart the gateways reconnect on their own schedule, and the embedded broker hands
//! a new subscriber at most 100 retained publishes (rumqttd's in-flight window; the rest are
//! dropped): gateways that announced themselves before the stub subscribed may never show
//! online. Step 3 counts them, and steps 4 to 6 use only the gateways the stub shows online.
//!
//! `report` holds the phase's targets and its rows of the bench table.

use super::load::{self, Burst};
use super::procfs;
use super::stats::Summary;
use crate::swarm::{observe, Rng, Swarm, SwarmOptions, SwarmStats};
use crate::{free_port, get, invoke, patch, post, Broker, Stub};
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

mod report;

/// Every gateway online within this many seconds of the swarm's start.
pub const START_S: f64 = 15.0;
/// Every gateway online again within this many seconds of the restarted stub's ready line
/// (less than [`STORM_DEADLINE`]).
pub const STORM_S: f64 = 15.0;
/// RPC p99 through the operator API at the steady rate, milliseconds.
pub const RPC_P99_MS: f64 = 100.0;
/// The stub's resident memory at its peak, decimal megabytes.
pub const STUB_RSS_MB: f64 = 250.0;
/// RPCs per second of step 4, and for how long.
pub const RPC_RATE: f64 = 200.0;
pub const RPC_DURATION: Duration = Duration::from_secs(10);
/// Messages of step 5.
pub const MESSAGES: usize = 5000;
/// Gateways whose devices each get one desired change in step 6.
pub const TWIN_GATEWAYS: usize = 200;
/// Idle window of step 2.
pub const IDLE: Duration = Duration::from_secs(5);
/// The stub's own MQTT client id (another stub may share an external broker).
const CLOUD_USER: &str = "bench-swarm-cloud";
/// The client id of the stub the other phases start (its default).
const MAIN_CLOUD_USER: &str = "cloud-stub";
/// Longest wait for the swarm to show online at the start (a thousand gateways take a few
/// seconds through the embedded broker).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for any other step to finish.
const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// Longest wait for the swarm to show online again after the stub's restart.
const STORM_DEADLINE: Duration = Duration::from_secs(20);
/// Reads in flight while polling messages and twins.
const POLL_IN_FLIGHT: usize = 16;

/// What to run.
#[derive(Debug, Clone)]
pub struct SwarmSettings {
    pub gateways: usize,
    pub devices: usize,
    /// An external broker (`mqtt://host:port`) instead of the stub's embedded one.
    pub broker: Option<String>,
    /// Operator requests (POSTs, PATCHes) in flight.
    pub api_in_flight: usize,
    /// Logs and the stub's database.
    pub dir: PathBuf,
}

/// The stub's and the bench's use of the machine during one step.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub seconds: f64,
    /// Percent of one core.
    pub stub_cpu_percent: f64,
    pub stub_rss_kib: u64,
    /// The stub's peak resident memory so far (its process, since its start).
    pub stub_hwm_kib: u64,
    /// This process: the swarm and the operator-API load.
    pub bench_cpu_percent: f64,
    /// Times the stub's own MQTT session failed during the step (its log's "mqtt connection
    /// error"); each one marks every gateway offline until their retained state arrives again.
    pub stub_session_errors: usize,
}

/// Step 3.
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    /// External broker: gateways stayed connected, only the stub restarted.
    pub broker_restarted: bool,
    /// From SIGKILL until the new stub printed its ready line.
    pub kill_to_ready_s: f64,
    /// From the ready line until the operator API showed everything online; `None` when it
    /// did not within [`STORM_DEADLINE`].
    pub after_ready: Option<observe::Online>,
    /// What the operator API showed online at the end of the step.
    pub gateways_online: usize,
    pub devices_online: usize,
    /// ConnAcks and lost connections counted by the swarm during the step.
    pub reconnects: u64,
    pub connection_errors: u64,
    pub usage: Usage,
}

/// Step 4.
#[derive(Debug, Clone, Serialize)]
pub struct RpcLoad {
    pub rate_per_s: f64,
    pub calls: usize,
    pub ok: usize,
    /// Other answers by error code (or HTTP status, or "io").
    pub errors: BTreeMap<String, usize>,
    pub latency: Summary,
    pub usage: Usage,
}

/// Step 5.
#[derive(Debug, Clone, Serialize)]
pub struct MessageLoad {
    pub messages: usize,
    pub devices: usize,
    pub sends: Burst,
    pub completed: usize,
    /// Accepted messages that did not end `completed`, plus POSTs not accepted.
    pub not_completed: usize,
    pub by_status: BTreeMap<String, usize>,
    /// From the first POST until the last message was finished, by the stub's stamps.
    pub elapsed_s: f64,
    pub completed_per_s: f64,
    pub usage: Usage,
}

/// Step 6.
#[derive(Debug, Clone, Serialize)]
pub struct TwinLoad {
    pub gateways: usize,
    pub devices: usize,
    pub patches: Burst,
    pub converged: usize,
    pub not_converged: usize,
    /// From the first PATCH until the last reported patch was applied, by the stub's stamps.
    pub elapsed_s: f64,
    pub usage: Usage,
}

/// Everything the swarm phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    pub gateways: usize,
    pub devices_per_gateway: usize,
    pub broker: String,
    pub start: observe::Online,
    pub start_usage: Usage,
    pub idle: Usage,
    pub storm: Storm,
    pub rpc: RpcLoad,
    pub messages: MessageLoad,
    pub twins: TwinLoad,
    /// The swarm's counters at the end.
    pub swarm: SwarmStats,
}

/// Runs the six steps.
pub async fn measure(s: &SwarmSettings) -> Result<SwarmReport> {
    std::fs::create_dir_all(&s.dir)?;
    let broker = match &s.broker {
        Some(url) => Broker::External(url.clone()),
        None => Broker::Embedded(format!("127.0.0.1:{}", free_port()?)),
    };
    let db = s.dir.join("cloud-stub.db").display().to_string();
    if let Some(url) = &s.broker {
        // Nothing an earlier run left on the broker (queued for its sessions, or retained by
        // gateways that never left in order) may reach this run's stub, and none of this
        // phase's traffic may queue for the stub of the other phases.
        for client_id in [CLOUD_USER, MAIN_CLOUD_USER] {
            observe::forget_session(url, client_id).await?;
        }
        clear_retained(url, crate::swarm::DEFAULT_PREFIX).await?;
    }
    let mut stub = start_stub(&s.dir, &broker, &db).await?;
    observe::await_stub_session(&stub, 0, STEP_DEADLINE).await?;
    let meter = Meter::start(&stub)?;
    let swarm = Swarm::start(&SwarmOptions::new(&stub.mqtt, s.gateways, s.devices))?;
    let steps = steps(s, &broker, &db, &mut stub, &swarm, meter).await;
    // Whatever happened, the gateways leave in order (their retained announcements deleted)
    // and the broker keeps nothing of this phase.
    swarm.stop().await;
    stub.proc.kill9().await;
    if let Some(url) = &s.broker {
        observe::forget_session(url, CLOUD_USER).await?;
    }
    steps
}

/// The steps, from the swarm's start (`start` measures it) to the end.
async fn steps(
    s: &SwarmSettings,
    broker: &Broker,
    db: &str,
    stub: &mut Stub,
    swarm: &Swarm,
    start: Meter,
) -> Result<SwarmReport> {
    let online_at_start = observe::await_online(&stub.api, swarm, START_DEADLINE).await?;
    let start_usage = start.stop(stub)?;
    eprintln!(
        "bench:    {} gateways, {} devices online after {:.1} s",
        s.gateways,
        s.gateways * s.devices,
        online_at_start.devices_s
    );

    let meter = Meter::start(stub)?;
    tokio::time::sleep(IDLE).await;
    let idle = meter.stop(stub)?;

    let (storm, online) = storm(stub, broker, db, &s.dir, swarm).await?;
    match &storm.after_ready {
        Some(o) => eprintln!(
            "bench:    stub restarted: ready {:.1} s after SIGKILL, every gateway online {:.1} s later",
            storm.kill_to_ready_s, o.gateways_s
        ),
        None => eprintln!(
            "bench:    stub restarted: ready {:.1} s after SIGKILL; only {} of {} gateways online after {} s; \
             the next steps use those",
            storm.kill_to_ready_s,
            storm.gateways_online,
            s.gateways,
            STORM_DEADLINE.as_secs()
        ),
    }
    // Devices of the gateways the stub shows online, interleaved across gateways (device 0 of
    // each, then device 1, ...).
    let shown: Vec<usize> = (0..swarm.gateways().len())
        .filter(|&g| online.contains(swarm.gateways()[g].as_str()))
        .collect();
    let devices: Vec<String> = (0..swarm.devices_per_gateway())
        .flat_map(|d| shown.iter().map(move |&g| (g, d)))
        .map(|(g, d)| swarm.device(g, d).to_string())
        .collect();
    anyhow::ensure!(
        !devices.is_empty(),
        "no gateway came back after the stub's restart"
    );
    let devices = Arc::new(devices);

    let rpc = rpc_load(stub, &devices).await?;
    let messages = message_load(stub, swarm, &devices, s.api_in_flight).await?;
    let twins = twin_load(stub, swarm, &online, s.api_in_flight).await?;
    Ok(SwarmReport {
        gateways: s.gateways,
        devices_per_gateway: s.devices,
        broker: s
            .broker
            .clone()
            .unwrap_or_else(|| "embedded (rumqttd)".into()),
        start: online_at_start,
        start_usage,
        idle,
        storm,
        rpc,
        messages,
        twins,
        swarm: swarm.stats(),
    })
}

/// Deletes the retained publishes of gateways named `{prefix}-...` from the broker at `url`
/// (what a swarm that never left in order leaves behind).
async fn clear_retained(url: &str, prefix: &str) -> Result<()> {
    let stale = observe::retained_topics(url, prefix, true).await?;
    if !stale.is_empty() {
        eprintln!(
            "bench:    deleted {} retained publishes an earlier run left on {url}",
            stale.len()
        );
    }
    Ok(())
}

/// The phase's stub, under its own MQTT client id.
async fn start_stub(dir: &Path, broker: &Broker, db: &str) -> Result<Stub> {
    let extra = ["--cloud-user", CLOUD_USER].map(String::from);
    Ok(Stub::start_with_args(dir, broker, db, &extra).await?.0)
}

fn stub_pid(stub: &Stub) -> Result<u32> {
    stub.proc.child.id().context("cloud-stub has exited")
}

/// CPU of the stub and of this process over one step.
struct Meter {
    cpu: procfs::CpuMeter,
    session_errors: usize,
}

impl Meter {
    fn start(stub: &Stub) -> Result<Meter> {
        let pids = [
            ("cloud-stub", stub_pid(stub)?),
            ("bench", std::process::id()),
        ];
        Ok(Meter {
            cpu: procfs::CpuMeter::start(&pids)?,
            session_errors: observe::log_count(stub, observe::SESSION_ERROR),
        })
    }

    fn stop(&self, stub: &Stub) -> Result<Usage> {
        let (used, elapsed) = self.cpu.stop()?;
        let of = |name: &str| used.iter().find(|(n, _)| n == name).map_or(0.0, |u| u.1);
        let memory = procfs::memory(stub_pid(stub)?)?;
        Ok(Usage {
            seconds: elapsed.as_secs_f64(),
            stub_cpu_percent: of("cloud-stub"),
            stub_rss_kib: memory.rss_kib,
            stub_hwm_kib: memory.hwm_kib,
            bench_cpu_percent: of("bench"),
            stub_session_errors: observe::log_count(stub, observe::SESSION_ERROR)
                - self.session_errors,
        })
    }
}

/// How long to read the API for the outcome: long once the swarm did everything (the stub
/// may still be committing), short when it did not (only a few stragglers could still come).
fn poll_window(swarm_done: bool) -> Duration {
    if swarm_done {
        STEP_DEADLINE
    } else {
        Duration::from_secs(5)
    }
}

/// Step 3: SIGKILL, restart on the same port and file, until everything is online again (or
/// [`STORM_DEADLINE`]). Returns the figures and the gateways the stub shows online.
async fn storm(
    stub: &mut Stub,
    broker: &Broker,
    db: &str,
    dir: &Path,
    swarm: &Swarm,
) -> Result<(Storm, HashSet<String>)> {
    let before = swarm.stats();
    let bench_ticks = procfs::cpu_ticks(std::process::id())?;
    let session_errors = observe::log_count(stub, observe::SESSION_ERROR);
    let killed = Instant::now();
    stub.proc.kill9().await;
    let broker_restarted = matches!(broker, Broker::Embedded(_));
    if broker_restarted {
        // Every connection drops with the broker: wait until the swarm saw it.
        swarm
            .until("every connection lost", STEP_DEADLINE, |s| s.connected == 0)
            .await?;
    }
    *stub = start_stub(dir, broker, db).await?;
    let kill_to_ready = killed.elapsed();
    let (after_ready, shown) = observe::watch_online(&stub.api, swarm, STORM_DEADLINE).await;
    let elapsed = killed.elapsed();
    // The new stub's CPU since it started, over the whole step.
    let pid = stub_pid(stub)?;
    let hz = procfs::ticks_per_second() as f64;
    let percent = |ticks: u64| 100.0 * ticks as f64 / hz / elapsed.as_secs_f64();
    let memory = procfs::memory(pid)?;
    let after = swarm.stats();
    let storm = Storm {
        broker_restarted,
        kill_to_ready_s: kill_to_ready.as_secs_f64(),
        after_ready,
        gateways_online: shown.gateways.len(),
        devices_online: shown.devices,
        reconnects: after.connects - before.connects,
        connection_errors: after.connection_errors - before.connection_errors,
        usage: Usage {
            seconds: elapsed.as_secs_f64(),
            stub_cpu_percent: percent(procfs::cpu_ticks(pid)?),
            stub_rss_kib: memory.rss_kib,
            stub_hwm_kib: memory.hwm_kib,
            bench_cpu_percent: percent(
                procfs::cpu_ticks(std::process::id())?.saturating_sub(bench_ticks),
            ),
            stub_session_errors: observe::log_count(stub, observe::SESSION_ERROR) - session_errors,
        },
    };
    Ok((storm, shown.gateways))
}

/// Step 4: [`RPC_RATE`] calls per second for [`RPC_DURATION`], each to a random one of
/// `devices`, sent on schedule whatever the answers (open loop), so a slow answer cannot hide
/// the ones behind it.
async fn rpc_load(stub: &Stub, devices: &Arc<Vec<String>>) -> Result<RpcLoad> {
    let calls = (RPC_RATE * RPC_DURATION.as_secs_f64()) as usize;
    eprintln!(
        "bench:    RPC: {calls} calls at {RPC_RATE}/s over random devices of {} devices",
        devices.len()
    );
    let devices = devices.clone();
    let api = Arc::new(stub.api.clone());
    let mut rng = Rng::seeded();
    let meter = Meter::start(stub)?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / RPC_RATE));
    let mut running = JoinSet::new();
    for _ in 0..calls {
        ticker.tick().await;
        let device = devices[rng.below(devices.len())].to_string();
        let api = api.clone();
        running.spawn(async move {
            let answer = invoke(&api, &device, "status", Value::Null, 5).await;
            match answer {
                Ok((200, _, took)) => (None, took),
                Ok((status, body, took)) => {
                    let code = body["code"]
                        .as_str()
                        .map_or(status.to_string(), str::to_string);
                    (Some(code), took)
                }
                Err(_) => (Some("io".to_string()), Duration::ZERO),
            }
        });
    }
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(calls);
    while let Some(done) = running.join_next().await {
        let (error, took) = done?;
        match error {
            None => latencies.push(took),
            Some(code) => *errors.entry(code).or_default() += 1,
        }
    }
    let usage = meter.stop(stub)?;
    Ok(RpcLoad {
        rate_per_s: RPC_RATE,
        calls,
        ok: latencies.len(),
        errors,
        latency: Summary::of(&mut latencies),
        usage,
    })
}

/// Step 5: [`MESSAGES`] messages over `devices` (interleaved across gateways, so they spread
/// over every gateway), until each is final.
async fn message_load(
    stub: &Stub,
    swarm: &Swarm,
    devices: &Arc<Vec<String>>,
    in_flight: usize,
) -> Result<MessageLoad> {
    let n = MESSAGES;
    let devices = devices.clone();
    eprintln!(
        "bench:    messages: {n} over {} devices, {in_flight} POSTs in flight",
        n.min(devices.len())
    );
    let before = swarm.stats();
    let meter = Meter::start(stub)?;
    let api = stub.api.clone();
    let sent = {
        let (api, devices) = (api.clone(), devices.clone());
        load::burst(n, in_flight, 202, move |i| {
            let url = format!(
                "{api}/api/v1/devices/{}/messages",
                devices[i % devices.len()]
            );
            let body = json!({"payload": {"command": "BEEP", "n": i}, "ttl_seconds": 600});
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
    let accepted = sent.burst.ok as u64;
    // The swarm's own count says when polling can start without sweeping the API in vain.
    let ran = swarm
        .until("every message completed", STEP_DEADLINE, |s| {
            s.messages_completed + s.messages_not_completed
                >= before.messages_completed + before.messages_not_completed + accepted
        })
        .await;
    let ids: Arc<Vec<Option<String>>> = Arc::new(sent.answers);
    let polled = {
        let (api, devices, ids) = (api.clone(), devices.clone(), ids.clone());
        let items = (0..n).filter(|i| ids[*i].is_some()).collect();
        load::poll_until_done(
            items,
            POLL_IN_FLIGHT,
            Instant::now() + poll_window(ran.is_ok()),
            move |i| {
                let url = format!(
                    "{api}/api/v1/devices/{}/messages/{}",
                    devices[i % devices.len()],
                    ids[i].as_deref().unwrap_or_default()
                );
                async move {
                    let (status, m) = get(&url).await?;
                    let open = matches!(m["status"].as_str(), Some("queued" | "delivered") | None);
                    Ok((status == 200 && !open).then_some(m))
                }
            },
        )
        .await
    };
    let usage = meter.stop(stub)?;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut finished = Vec::new();
    for m in polled.done.values() {
        let status = m["status"].as_str().unwrap_or("?").to_string();
        *by_status.entry(status).or_default() += 1;
        finished.extend(m["finished_at_ms"].as_u64());
    }
    let open = sent.burst.ok - polled.done.len();
    if open > 0 {
        by_status.insert("not final".into(), open);
    }
    let completed = by_status.get("completed").copied().unwrap_or(0);
    let elapsed_s = load::last_after(sent.started_ms, finished).unwrap_or(f64::NAN);
    Ok(MessageLoad {
        messages: n,
        devices: n.min(devices.len()),
        completed,
        not_completed: n - completed,
        by_status,
        completed_per_s: completed as f64 / elapsed_s,
        elapsed_s,
        sends: sent.burst,
        usage,
    })
}

/// Step 6: one desired `maxSpeed` to each device of the first [`TWIN_GATEWAYS`] gateways of
/// those `online`, until the operator API shows each reported == desired with the change
/// applied.
async fn twin_load(
    stub: &Stub,
    swarm: &Swarm,
    online: &HashSet<String>,
    in_flight: usize,
) -> Result<TwinLoad> {
    let chosen: Vec<usize> = (0..swarm.gateways().len())
        .filter(|g| online.contains(swarm.gateways()[*g].as_str()))
        .take(TWIN_GATEWAYS)
        .collect();
    let gateways = chosen.len();
    let devices: Arc<Vec<String>> = Arc::new(
        chosen
            .iter()
            .flat_map(|&g| (0..swarm.devices_per_gateway()).map(move |d| (g, d)))
            .map(|(g, d)| swarm.device(g, d).to_string())
            .collect(),
    );
    let n = devices.len();
    eprintln!("bench:    twins: one change to each of {n} devices of {gateways} gateways");
    let value = 12.5;
    let before = swarm.stats();
    let meter = Meter::start(stub)?;
    let api = stub.api.clone();
    let sent = {
        let (api, devices) = (api.clone(), devices.clone());
        load::burst(n, in_flight, 200, move |i| {
            let url = format!("{api}/api/v1/devices/{}/twin/desired", devices[i]);
            async move {
                let (status, answer) = patch(&url, &json!({"maxSpeed": value}), None).await?;
                Ok((
                    status,
                    answer["desired_version"].as_u64().unwrap_or(u64::MAX),
                ))
            }
        })
        .await
    };
    let accepted = sent.burst.ok as u64;
    let ran = swarm
        .until("every desired change applied", STEP_DEADLINE, |s| {
            s.desired_applied >= before.desired_applied + accepted
        })
        .await;
    let versions: Arc<Vec<Option<u64>>> = Arc::new(sent.answers);
    let polled = {
        let (api, devices, versions) = (api.clone(), devices.clone(), versions.clone());
        let items = (0..n).filter(|i| versions[*i].is_some()).collect();
        load::poll_until_done(
            items,
            POLL_IN_FLIGHT,
            Instant::now() + poll_window(ran.is_ok()),
            move |i| {
                let url = format!("{api}/api/v1/devices/{}/twin", devices[i]);
                let version = versions[i].unwrap_or(u64::MAX);
                async move {
                    let (status, t) = get(&url).await?;
                    let done = status == 200
                        && t["reported"]["maxSpeed"] == json!(value)
                        && t["apply"]["maxSpeed"]["state"] == "applied"
                        && t["apply"]["maxSpeed"]["desired_version"]
                            .as_u64()
                            .is_some_and(|v| v >= version);
                    Ok(done.then(|| t["reported_updated_ms"]["maxSpeed"].as_u64()))
                }
            },
        )
        .await
    };
    let usage = meter.stop(stub)?;
    let converged = polled.done.len();
    let elapsed_s = load::last_after(sent.started_ms, polled.done.values().flatten().copied())
        .unwrap_or(f64::NAN);
    Ok(TwinLoad {
        gateways,
        devices: n,
        patches: sent.burst,
        converged,
        not_converged: n - converged,
        elapsed_s,
        usage,
    })
}
