//! The Modbus phase: a gatewayd with one Modbus TCP and one Modbus RTU device on the Modbus
//! simulator (`device-fixtures modbus`), driven over MQTT as the cloud does. Per transport:
//! sequential RPC latency next to the same read made directly against the simulator and an
//! MQTT round trip through the same broker (gateway overhead = RPC - direct - MQTT, p50),
//! and transactions per second with calls kept in flight. On RTU the direct rounds run before
//! gatewayd opens the pty (two readers on one pty would steal each other's bytes), and the
//! theoretical wire time of the frames at 115,200 baud is reported beside the figures: a pty
//! has no baud rate, a real RS-485 line does.

use super::cloud::Cloud;
use super::report::{Check, Report};
use super::rig::await_all_online;
use super::stats::Summary;
use crate::config::GatewayConfig;
use crate::modbus::{rtu_device, rtu_port, tcp_device, unit_map, ModbusSim};
use crate::{Gateway, Stub};
use anyhow::{bail, ensure, Context, Result};
use gatewayd_protocol::GatewayId;
use serde::Serialize;
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Target: gatewayd's own share of a Modbus TCP RPC, p50.
pub const TCP_OVERHEAD_P50_MS: f64 = 0.2;
const GATEWAY: &str = "bench-modbus";
/// The method measured (`METER_ACTIONS`): FC 3, two registers from address 0.
const METHOD: &str = "energy";
/// Its request and reply on the wire (RTU): 8 bytes out, 9 back.
const RTU_REQUEST: [u8; 8] = [0x02, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x38];
const RTU_REPLY_LEN: usize = 9;
const BAUD: f64 = 115_200.0;
const TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct ModbusOptions {
    pub rounds: usize,
    pub in_flight: usize,
    pub duration: Duration,
}

/// One transport's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Transport {
    pub name: &'static str,
    /// RPC through gatewayd, timed at the cloud side.
    pub rpc: Summary,
    /// The same read made directly against the simulator.
    pub direct: Summary,
    /// MQTT round trip through the same broker, no gateway.
    pub mqtt_round_trip: Summary,
    /// rpc p50 - (direct p50 + MQTT round trip p50).
    pub overhead_p50_ms: f64,
    /// RPCs completed per second with `in_flight` calls in flight.
    pub tx_per_s: f64,
    pub in_flight: usize,
    /// RPCs that failed in either part.
    pub errors: usize,
    /// RTU: request and reply frames at 115,200 baud, 10 bits a character, ms.
    pub wire_ms: Option<f64>,
    /// RTU: the 3.5-character silence before each request, ms.
    pub gap_ms: Option<f64>,
}

/// The Modbus phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ModbusReport {
    pub rounds: usize,
    pub tcp: Transport,
    pub rtu: Transport,
}

/// Runs the phase against `stub` (logs under `dir`).
pub async fn measure(stub: &Stub, dir: &Path, opts: &ModbusOptions) -> Result<ModbusReport> {
    std::fs::create_dir_all(dir)?;
    let map = json!({"units": {"1": unit_map(1), "2": unit_map(2)}});
    let sim = ModbusSim::start(dir, "modbus", &map).await?;

    // Direct RTU rounds first, while nobody else has the pty open.
    let path = sim.path.clone();
    let rounds = opts.rounds;
    let mut direct_rtu =
        tokio::task::spawn_blocking(move || direct_rtu(&path, rounds + rounds / 10)).await??;
    direct_rtu.drain(..rounds / 10);

    let store = dir.join("gatewayd.db");
    let mut config = GatewayConfig {
        gateway_id: GATEWAY,
        broker: &stub.mqtt,
        store: &store,
        devices: &[],
        probe_interval_ms: 60_000,
    }
    .render();
    config.push_str("\n[log]\nlevel = \"warn\"\n");
    config.push_str(&tcp_device("meter-tcp", &sim, 1));
    config.push_str(&rtu_port("rtu", &sim));
    config.push_str(&rtu_device("meter-rtu", "rtu", 2));
    let mut gateway = Gateway::start(dir, &config).await?;
    await_all_online(&stub.api, GATEWAY, 2, Duration::from_secs(30))
        .await
        .with_context(|| format!("see {}", gateway.proc.log.display()))?;
    let cloud = Arc::new(Cloud::connect(&stub.mqtt).await?);
    let echo = super::cloud::Echo::start(&stub.mqtt).await?;
    let gw = GatewayId::new(GATEWAY)?;

    let tcp = {
        let mut conn = TcpStream::connect((sim.host.as_str(), sim.port)).await?;
        conn.set_nodelay(true)?;
        let (mut rpc, mut direct, mut mqtt, mut errors) = (vec![], vec![], vec![], 0);
        for round in 0..rounds + rounds / 10 {
            let record = round >= rounds / 10;
            let d = direct_tcp(&mut conn, round as u16).await?;
            let (_, m) = cloud.echo("meter-tcp", TIMEOUT).await?;
            let (reply, r) = cloud.rpc(&gw, "meter-tcp", METHOD, TIMEOUT).await?;
            if record {
                direct.push(d);
                mqtt.push(m);
                match reply.error {
                    None => rpc.push(r),
                    Some(_) => errors += 1,
                }
            }
        }
        let (tx_per_s, failed) = throughput(&cloud, &gw, "meter-tcp", opts).await;
        transport(
            "tcp",
            rpc,
            direct,
            mqtt,
            errors + failed,
            tx_per_s,
            opts,
            None,
        )
    };
    let rtu = {
        let (mut rpc, mut mqtt, mut errors) = (vec![], vec![], 0);
        for round in 0..rounds + rounds / 10 {
            let record = round >= rounds / 10;
            let (_, m) = cloud.echo("meter-rtu", TIMEOUT).await?;
            let (reply, r) = cloud.rpc(&gw, "meter-rtu", METHOD, TIMEOUT).await?;
            if record {
                mqtt.push(m);
                match reply.error {
                    None => rpc.push(r),
                    Some(_) => errors += 1,
                }
            }
        }
        let (tx_per_s, failed) = throughput(&cloud, &gw, "meter-rtu", opts).await;
        let wire = (RTU_REQUEST.len() + RTU_REPLY_LEN) as f64 * 10.0 / BAUD * 1000.0;
        transport(
            "rtu",
            rpc,
            std::mem::take(&mut direct_rtu),
            mqtt,
            errors + failed,
            tx_per_s,
            opts,
            Some((wire, 1.75)),
        )
    };
    if let Ok(cloud) = Arc::try_unwrap(cloud) {
        cloud.close().await;
    }
    echo.close().await;
    gateway.proc.terminate().await?;
    Ok(ModbusReport { rounds, tcp, rtu })
}

#[allow(clippy::too_many_arguments)]
fn transport(
    name: &'static str,
    mut rpc: Vec<Duration>,
    mut direct: Vec<Duration>,
    mut mqtt: Vec<Duration>,
    errors: usize,
    tx_per_s: f64,
    opts: &ModbusOptions,
    rtu: Option<(f64, f64)>,
) -> Transport {
    let rpc = Summary::of(&mut rpc);
    let direct = Summary::of(&mut direct);
    let mqtt_round_trip = Summary::of(&mut mqtt);
    Transport {
        name,
        overhead_p50_ms: rpc.p50_ms - (direct.p50_ms + mqtt_round_trip.p50_ms),
        rpc,
        direct,
        mqtt_round_trip,
        tx_per_s,
        in_flight: opts.in_flight,
        errors,
        wire_ms: rtu.map(|(w, _)| w),
        gap_ms: rtu.map(|(_, g)| g),
    }
}

/// `in_flight` loops calling `device` for `duration`: (completed per second, failures).
async fn throughput(
    cloud: &Arc<Cloud>,
    gw: &GatewayId,
    device: &str,
    opts: &ModbusOptions,
) -> (f64, usize) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + opts.duration;
    let mut loops = Vec::new();
    for _ in 0..opts.in_flight {
        let (cloud, gw, device) = (cloud.clone(), gw.clone(), device.to_string());
        let (ok, failed) = (ok.clone(), failed.clone());
        loops.push(tokio::spawn(async move {
            while Instant::now() < until {
                match cloud.rpc(&gw, &device, METHOD, TIMEOUT).await {
                    Ok((reply, _)) if reply.error.is_none() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    let secs = started.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    )
}

/// One FC 3 read of two registers at 0 from unit 1 over TCP, framed by hand.
async fn direct_tcp(conn: &mut TcpStream, tid: u16) -> Result<Duration> {
    let t = tid.to_be_bytes();
    let request = [t[0], t[1], 0, 0, 0, 6, 1, 3, 0, 0, 0, 2];
    let started = Instant::now();
    conn.write_all(&request).await?;
    let mut reply = [0u8; 13];
    conn.read_exact(&mut reply).await?;
    let took = started.elapsed();
    ensure!(
        reply[..2] == t && reply[7] == 3,
        "direct tcp reply {reply:?}"
    );
    Ok(took)
}

/// `n` FC 3 reads from unit 2 on the pty, blocking, each timed from write to last byte.
fn direct_rtu(path: &str, n: usize) -> Result<Vec<Duration>> {
    // Raw, no echo, as a serial library would set it.
    let stty = std::process::Command::new("stty")
        .args(["-F", path, "raw", "-echo"])
        .status()
        .context("running stty")?;
    ensure!(stty.success(), "stty -F {path} raw -echo: {stty}");
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        port.write_all(&RTU_REQUEST)?;
        let mut reply = [0u8; RTU_REPLY_LEN];
        port.read_exact(&mut reply)?;
        out.push(started.elapsed());
        if reply[..2] != [0x02, 0x03] {
            bail!("direct rtu reply {reply:?}");
        }
        // The 3.5-character gap the gateway keeps too.
        std::thread::sleep(Duration::from_micros(1750));
    }
    Ok(out)
}

impl ModbusReport {
    /// The targets held against this phase's figures.
    pub fn checks(&self) -> Vec<Check> {
        vec![Check {
            measure: "modbus_tcp_overhead_p50",
            value: self.tcp.overhead_p50_ms,
            unit: "ms",
            op: "<=",
            target: TCP_OVERHEAD_P50_MS,
            pass: self.tcp.overhead_p50_ms <= TCP_OVERHEAD_P50_MS,
        }]
    }

    /// Table rows: (what, result, the check's measure name if it has one).
    pub fn rows(&self) -> Vec<(String, String, Option<&'static str>)> {
        let mut rows = Vec::new();
        for t in [&self.tcp, &self.rtu] {
            rows.push((
                format!(
                    "modbus {}: RPC p50 / p99 over {} rounds (direct p50, MQTT p50)",
                    t.name, self.rounds
                ),
                format!(
                    "{:.3} / {:.3} ms ({:.3}, {:.3})",
                    t.rpc.p50_ms, t.rpc.p99_ms, t.direct.p50_ms, t.mqtt_round_trip.p50_ms
                ),
                None,
            ));
            let wire = match (t.wire_ms, t.gap_ms) {
                (Some(w), Some(g)) => format!(
                    "; includes what is left of the {g:.2} ms frame gap the port keeps; a real 115,200 baud line adds {w:.2} ms of frames"
                ),
                _ => String::new(),
            };
            rows.push((
                format!("  gateway overhead p50 (RPC - direct - MQTT){wire}"),
                format!("{:.3} ms", t.overhead_p50_ms),
                (t.name == "tcp").then_some("modbus_tcp_overhead_p50"),
            ));
            let line_max = match (t.wire_ms, t.gap_ms) {
                (Some(w), Some(g)) => format!(
                    " (a 115,200 baud line carries at most {:.0} /s: frames + gap)",
                    1000.0 / (w + g)
                ),
                _ => String::new(),
            };
            rows.push((
                format!(
                    "  transactions per second, {} in flight{line_max}",
                    t.in_flight
                ),
                format!("{:.0} /s, {} errors", t.tx_per_s, t.errors),
                None,
            ));
        }
        rows
    }
}

impl Report {
    /// Adds the Modbus phase's figures and checks.
    pub fn add_modbus(&mut self, modbus: ModbusReport) {
        self.checks.extend(modbus.checks());
        self.modbus = Some(modbus);
    }
}
