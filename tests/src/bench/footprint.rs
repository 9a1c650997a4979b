//! gatewayd's footprint on a small box: resident memory and CPU use while idle, with many
//! configured devices that are all online.

use super::procfs::{self, CpuMeter};
use super::rig::Rig;
use crate::Stub;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Probe interval of the footprint configuration.
pub const PROBE_INTERVAL_MS: u64 = 60_000;
/// Longest wait for gatewayd to go quiet after the stub shows every device.
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_STEP: Duration = Duration::from_millis(250);

/// What the footprint phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Footprint {
    pub devices: usize,
    pub probe_interval_ms: u64,
    /// From start until the stub showed every device online, seconds.
    pub ready_after_s: f64,
    /// From then until gatewayd used no CPU for one 250 ms step, seconds.
    pub settled_after_s: f64,
    /// VmRSS once settled, at the start of the idle window.
    pub rss_settled_kib: u64,
    /// VmRSS at the end of the idle window.
    pub rss_end_kib: u64,
    /// VmHWM (peak RSS) at the end, startup included.
    pub rss_peak_kib: u64,
    pub idle_s: f64,
    /// CPU over the idle window, percent of one core.
    pub idle_cpu_percent: f64,
    /// Health probe rounds (one probe of every device) that fell inside the idle window.
    pub probe_rounds_in_idle_window: u64,
}

impl Footprint {
    /// The RSS figure held against the target: the larger of the two idle readings.
    pub fn rss_idle_kib(&self) -> u64 {
        self.rss_settled_kib.max(self.rss_end_kib)
    }
}

/// Starts a gatewayd with `devices` devices (probe interval 60 s) on `stub`, waits until it is
/// connected and settled, then watches it idle for `idle`.
pub async fn measure(stub: &Stub, dir: &Path, devices: usize, idle: Duration) -> Result<Footprint> {
    let rig = Rig::start(stub, dir, "bench-fp", "fp", devices, PROBE_INTERVAL_MS).await?;
    let pid = rig.gateway_pid()?;
    let settled_after = settle(pid).await?;
    let settled = procfs::memory(pid)?;
    let cpu = CpuMeter::start(&[("gatewayd", pid)])?;
    tokio::time::sleep(idle).await;
    let (used, elapsed) = cpu.stop()?;
    let end = procfs::memory(pid)?;
    // Probe rounds start when gatewayd starts, then every interval; gatewayd starts about
    // when its devices do, so the rig's start is a close enough origin.
    let window_start = rig.ready_after + settled_after;
    let rounds = |t: Duration| t.as_millis() as u64 / PROBE_INTERVAL_MS;
    let result = Footprint {
        devices,
        probe_interval_ms: PROBE_INTERVAL_MS,
        ready_after_s: rig.ready_after.as_secs_f64(),
        settled_after_s: settled_after.as_secs_f64(),
        rss_settled_kib: settled.rss_kib,
        rss_end_kib: end.rss_kib,
        rss_peak_kib: end.hwm_kib,
        idle_s: elapsed.as_secs_f64(),
        idle_cpu_percent: used[0].1,
        probe_rounds_in_idle_window: rounds(window_start + elapsed) - rounds(window_start),
    };
    rig.stop().await?;
    Ok(result)
}

/// Waits until `pid` spends no CPU tick during one step (at most [`SETTLE_MAX`]).
async fn settle(pid: u32) -> Result<Duration> {
    let started = Instant::now();
    let mut before = procfs::cpu_ticks(pid)?;
    while started.elapsed() < SETTLE_MAX {
        tokio::time::sleep(SETTLE_STEP).await;
        let now = procfs::cpu_ticks(pid)?;
        if now == before {
            break;
        }
        before = now;
    }
    Ok(started.elapsed())
}
