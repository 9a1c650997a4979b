//! The benchmark behind the `bench` binary: starts the cloud stub, simulated devices and
//! gatewayd through the harness, drives them over MQTT as the cloud does, and measures RPC
//! latency against baselines taken in the same run, RPC throughput next to floors taken at the
//! same concurrency (MQTT echo through the same broker, direct HTTP to the devices), twin
//! fan-out and message throughput through the operator API, gatewayd's CPU time per RPC, per
//! twin property and per message, its idle footprint, and RPC latency through the
//! `thingsboard` cloud profile next to the native one.
//!
//! - `cloud`: the bench's own MQTT sessions (cloud side and echo);
//! - `rig`: the bench's cloud stub, and a gatewayd and its devices on it;
//! - `latency`, `throughput`, `twin_fanout`, `messages`, `footprint`, `modbus`, `thingsboard`:
//!   one phase each;
//! - `swarm`: the cloud side under many simulated gateways (`crate::swarm`), on its own stub;
//! - `load`: operator-API bursts and polling; `procfs`, `stats`: measuring helpers;
//! - `report`: targets, verdicts, table and JSON.

pub mod cloud;
pub mod footprint;
pub mod latency;
pub mod load;
pub mod messages;
pub mod modbus;
pub mod procfs;
pub mod report;
pub mod rig;
pub mod stats;
pub mod swarm;
pub mod thingsboard;
pub mod throughput;
pub mod twin_fanout;

use anyhow::{Context, Result};
use cloud::{Cloud, Echo};
use report::{Report, Settings};
use rig::Rig;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Probe interval of the RPC phases: long, so probes stay out of the figures.
pub const RPC_PROBE_INTERVAL_MS: u64 = 60_000;
/// Open messages the bench's stub allows per device (its default, 50, is below the message
/// phase's 100 per device).
pub const STUB_MAX_QUEUE: usize = 200;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Devices behind the gateway for the RPC phases.
    pub devices: usize,
    /// Recorded sequential rounds (each: direct HTTP, MQTT echo, RPC).
    pub samples: usize,
    /// Unrecorded sequential rounds before them.
    pub warmup: usize,
    /// Calls kept in flight in the throughput phase.
    pub in_flight: usize,
    /// Length of the throughput phase.
    pub duration: Duration,
    /// Devices of the twin fan-out phase; `None` skips it.
    pub twin_devices: Option<usize>,
    /// Devices and messages per device of the message phase; `None` skips it.
    pub messages: Option<(usize, usize)>,
    /// Operator requests (PATCH, POST) in flight in the twin and message phases.
    pub api_in_flight: usize,
    /// Devices of the footprint phase; `None` skips it.
    pub footprint_devices: Option<usize>,
    /// Idle window of the footprint phase.
    pub idle: Duration,
    /// An external MQTT broker (`mqtt://host:port`) instead of the stub's embedded one.
    pub broker: Option<String>,
    /// Gateways and devices per gateway of the swarm phase; `None` skips it.
    pub swarm: Option<(usize, usize)>,
    /// Rounds, calls in flight and duration of the Modbus phase; `None` skips it.
    pub modbus: Option<modbus::ModbusOptions>,
    /// Rounds of the ThingsBoard profile phase; `None` skips it.
    pub thingsboard: Option<thingsboard::TbOptions>,
    /// Where logs and stores go (emptied first).
    pub dir: PathBuf,
}

/// Runs every phase and returns the report.
pub async fn run(opts: &Options) -> Result<Report> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg_at_start = loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let _ = std::fs::remove_dir_all(&opts.dir);
    std::fs::create_dir_all(&opts.dir)?;
    // First, on its own stub, so nothing else runs beside it (see `swarm`).
    let swarm = match opts.swarm {
        Some((gateways, devices)) => {
            eprintln!("bench: 6. swarm, {gateways} gateways of {devices} devices each");
            let settings = swarm::SwarmSettings {
                gateways,
                devices,
                broker: opts.broker.clone(),
                api_in_flight: opts.api_in_flight,
                dir: opts.dir.join("swarm"),
            };
            Some(swarm::measure(&settings).await?)
        }
        None => None,
    };
    let max_queue = STUB_MAX_QUEUE.max(opts.messages.map_or(0, |(_, per)| per));
    let stub = rig::start_stub(&opts.dir, max_queue, opts.broker.as_deref()).await?;
    let stub_pid = stub.proc.child.id().context("cloud-stub has exited")?;
    eprintln!(
        "bench: cloud stub up (api {}, broker {})",
        stub.api, stub.mqtt
    );

    let rig = Rig::start(
        &stub,
        &opts.dir.join("rpc"),
        "bench-gw",
        "agv",
        opts.devices,
        RPC_PROBE_INTERVAL_MS,
    )
    .await?;
    eprintln!(
        "bench: gatewayd up with {} devices, all online after {:.1} s",
        opts.devices,
        rig.ready_after.as_secs_f64()
    );
    let echo = Echo::start(&stub.mqtt).await?;
    let cloud = Arc::new(Cloud::connect(&stub.mqtt).await?);

    eprintln!("bench: 1. sequential latency, {} rounds", opts.samples);
    let latency = latency::measure(
        &cloud,
        &rig.gateway_id,
        &rig.fleet.devices[0],
        opts.warmup,
        opts.samples,
    )
    .await?;

    eprintln!(
        "bench: 2. throughput, {} in flight for {} s",
        opts.in_flight,
        opts.duration.as_secs()
    );
    let mut pids = vec![("gatewayd", rig.gateway_pid()?), ("cloud-stub", stub_pid)];
    pids.extend(rig.fleet_pids()?);
    pids.push(("bench", std::process::id()));
    let throughput = throughput::measure(
        cloud.clone(),
        &rig.gateway_id,
        &rig.fleet.devices,
        opts.in_flight,
        opts.duration,
        &pids,
    )
    .await?;
    if let Ok(cloud) = Arc::try_unwrap(cloud) {
        cloud.close().await;
    }
    echo.close().await;
    rig.stop().await?;

    let bench_pids = [("cloud-stub", stub_pid), ("bench", std::process::id())];
    let twin_fanout = match opts.twin_devices {
        Some(n) => {
            eprintln!(
                "bench: 3. twin fan-out, one change to each of {n} devices, {} PATCHes in flight",
                opts.api_in_flight
            );
            let dir = opts.dir.join("twins");
            Some(twin_fanout::measure(&stub, &dir, n, opts.api_in_flight, &bench_pids).await?)
        }
        None => None,
    };
    let messages = match opts.messages {
        Some((devices, per_device)) => {
            eprintln!(
                "bench: 4. messages, {} over {devices} devices, {} POSTs in flight",
                devices * per_device,
                opts.api_in_flight
            );
            let dir = opts.dir.join("messages");
            Some(
                messages::measure(
                    &stub,
                    &dir,
                    devices,
                    per_device,
                    opts.api_in_flight,
                    &bench_pids,
                )
                .await?,
            )
        }
        None => None,
    };

    let footprint = match opts.footprint_devices {
        Some(n) => {
            eprintln!(
                "bench: 5. footprint, {n} devices, then {} s idle",
                opts.idle.as_secs()
            );
            let dir = opts.dir.join("footprint");
            Some(footprint::measure(&stub, &dir, n, opts.idle).await?)
        }
        None => None,
    };

    let modbus = match &opts.modbus {
        Some(m) => {
            eprintln!("bench: 7. modbus, TCP and RTU, {} rounds each", m.rounds);
            Some(modbus::measure(&stub, &opts.dir.join("modbus"), m).await?)
        }
        None => None,
    };

    let thingsboard = match &opts.thingsboard {
        Some(t) => {
            eprintln!(
                "bench: 8. thingsboard profile next to native, {} rounds through each operator API",
                t.rounds
            );
            Some(thingsboard::measure(&stub, &opts.dir.join("thingsboard"), t).await?)
        }
        None => None,
    };

    let settings = Settings {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        devices: opts.devices,
        samples: opts.samples,
        in_flight: opts.in_flight,
        duration_s: opts.duration.as_secs(),
        probe_interval_ms: RPC_PROBE_INTERVAL_MS,
        api_in_flight: opts.api_in_flight,
        stub_max_queue: max_queue,
        broker: opts
            .broker
            .clone()
            .unwrap_or_else(|| "embedded (rumqttd)".into()),
        footprint_devices: opts.footprint_devices,
        footprint_probe_interval_ms: footprint::PROBE_INTERVAL_MS,
        idle_s: opts.idle.as_secs(),
        loadavg_at_start,
        logs: opts.dir.display().to_string(),
    };
    let mut report = Report::new(
        settings,
        latency,
        throughput,
        twin_fanout,
        messages,
        footprint,
    );
    if let Some(swarm) = swarm {
        report.add_swarm(swarm);
    }
    if let Some(modbus) = modbus {
        report.add_modbus(modbus);
    }
    if let Some(tb) = thingsboard {
        report.add_thingsboard(tb);
    }
    Ok(report)
}
