//! RPC throughput: a fixed number of calls kept in flight, spread round-robin over the devices,
//! for a fixed time. Also records the CPU each process used meanwhile, which shows where the
//! time goes when the target is missed.

use super::cloud::Cloud;
use super::latency::METHOD;
use super::procfs::CpuMeter;
use super::stats::Summary;
use anyhow::Result;
use gatewayd_protocol::GatewayId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Unrecorded run before the measurement, so every device has a warm connection.
const WARMUP: Duration = Duration::from_secs(1);

/// What the throughput phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub in_flight: usize,
    pub devices: usize,
    /// From the first call to the last answer, seconds.
    pub elapsed_s: f64,
    /// Answers (successes and errors) per second.
    pub calls_per_s: f64,
    pub ok: u64,
    /// Answers carrying an `error`.
    pub errors: u64,
    /// Error answers by code.
    pub error_codes: BTreeMap<String, u64>,
    /// Calls with no answer within 10 s.
    pub lost: u64,
    /// Latency of successful calls under this load.
    pub latency: Summary,
    /// Percent of one core used by each process during the run.
    pub cpu_percent: BTreeMap<String, f64>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    lost: u64,
    latencies: Vec<Duration>,
}

/// Runs `in_flight` callers over `devices` for `duration` after a short warm-up; `pids` are
/// the processes whose CPU use is reported.
pub async fn measure(
    cloud: Arc<Cloud>,
    gateway: &GatewayId,
    devices: &[String],
    in_flight: usize,
    duration: Duration,
    pids: &[(&str, u32)],
) -> Result<Throughput> {
    drive(&cloud, gateway, devices, in_flight, WARMUP).await;
    let cpu = CpuMeter::start(pids)?;
    let started = Instant::now();
    let tally = drive(&cloud, gateway, devices, in_flight, duration).await;
    let elapsed = started.elapsed();
    let (used, _) = cpu.stop()?;
    let mut latencies = tally.latencies;
    let errors: u64 = tally.errors.values().sum();
    Ok(Throughput {
        in_flight,
        devices: devices.len(),
        elapsed_s: elapsed.as_secs_f64(),
        calls_per_s: (tally.ok + errors) as f64 / elapsed.as_secs_f64(),
        ok: tally.ok,
        errors,
        error_codes: tally.errors,
        lost: tally.lost,
        latency: Summary::of(&mut latencies),
        cpu_percent: used.into_iter().collect(),
    })
}

/// Keeps `in_flight` calls going until `duration` has passed, then waits for the last answers.
async fn drive(
    cloud: &Arc<Cloud>,
    gateway: &GatewayId,
    devices: &[String],
    in_flight: usize,
    duration: Duration,
) -> Tally {
    let end = Instant::now() + duration;
    let next = Arc::new(AtomicUsize::new(0));
    let devices: Arc<[String]> = devices.into();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (cloud, gateway, devices, next) = (
                cloud.clone(),
                gateway.clone(),
                devices.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < end {
                    let device = &devices[next.fetch_add(1, Ordering::Relaxed) % devices.len()];
                    match cloud.rpc(&gateway, device, METHOD, TIMEOUT).await {
                        Ok((reply, took)) => match reply.error {
                            None => {
                                tally.ok += 1;
                                tally.latencies.push(took);
                            }
                            Some(code) => *tally.errors.entry(code.to_string()).or_default() += 1,
                        },
                        Err(_) => tally.lost += 1,
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        if let Ok(t) = w.await {
            total.ok += t.ok;
            total.lost += t.lost;
            total.latencies.extend(t.latencies);
            for (code, n) in t.errors {
                *total.errors.entry(code).or_default() += n;
            }
        }
    }
    total
}
