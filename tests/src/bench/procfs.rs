//! What `/proc` says about a process: resident memory and CPU time consumed.

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`).
    pub hwm_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` of `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_memory(&text).ok_or_else(|| anyhow!("{path} lacks VmRSS or VmHWM"))
}

fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// CPU time of a process so far: user + system, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_ticks(&text).ok_or_else(|| anyhow!("{path} is not in the expected format"))
}

/// utime (field 14) + stime (field 15); the command name (field 2) may hold spaces, so the
/// fields are counted after its closing parenthesis.
fn parse_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second: `sysconf(_SC_CLK_TCK)` as `getconf CLK_TCK` reports it; 100 (the
/// value on every Linux port) when it cannot be asked.
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU use of a set of processes between two points in time.
pub struct CpuMeter {
    start: Instant,
    ticks: Vec<(String, u32, u64)>,
    hz: u64,
}

impl CpuMeter {
    /// Starts measuring each named `pid`.
    pub fn start(pids: &[(&str, u32)]) -> Result<CpuMeter> {
        let ticks = pids
            .iter()
            .map(|&(name, pid)| Ok((name.to_string(), pid, cpu_ticks(pid)?)))
            .collect::<Result<_>>()?;
        Ok(CpuMeter {
            start: Instant::now(),
            ticks,
            hz: ticks_per_second(),
        })
    }

    /// Per process: percent of one core used since `start`, and the elapsed time.
    pub fn stop(&self) -> Result<(Vec<(String, f64)>, Duration)> {
        let used = self.used()?;
        Ok((used.percent(), used.elapsed))
    }

    /// CPU time each process used since `start` (user + system, whole clock ticks); processes
    /// of one name are summed.
    pub fn used(&self) -> Result<CpuUsed> {
        let elapsed = self.start.elapsed();
        let mut seconds: Vec<(String, f64)> = Vec::new();
        for (name, pid, before) in &self.ticks {
            let spent = cpu_ticks(*pid)?.saturating_sub(*before) as f64 / self.hz as f64;
            match seconds.iter_mut().find(|(n, _)| n == name) {
                Some((_, s)) => *s += spent,
                None => seconds.push((name.clone(), spent)),
            }
        }
        Ok(CpuUsed {
            elapsed,
            seconds,
            clk_tck: self.hz,
        })
    }
}

/// CPU time used by a set of processes over one window.
#[derive(Debug, Clone)]
pub struct CpuUsed {
    pub elapsed: Duration,
    /// Per process: CPU seconds (utime + stime of `/proc/<pid>/stat`, all threads).
    pub seconds: Vec<(String, f64)>,
    /// The clock ticks per second the figures were read in (one tick is their resolution).
    pub clk_tck: u64,
}

impl CpuUsed {
    /// Per process: percent of one core over the window.
    pub fn percent(&self) -> Vec<(String, f64)> {
        let wall = self.elapsed.as_secs_f64();
        self.seconds
            .iter()
            .map(|(name, s)| (name.clone(), 100.0 * s / wall))
            .collect()
    }

    /// Per process: microseconds of CPU per operation, `ops` operations done in the window
    /// (empty when there were none).
    pub fn us_per_op(&self, ops: u64) -> BTreeMap<String, f64> {
        if ops == 0 {
            return BTreeMap::new();
        }
        self.seconds
            .iter()
            .map(|(name, s)| (name.clone(), s * 1e6 / ops as f64))
            .collect()
    }
}

/// Waits until `pid` spends no CPU tick during one `step`, at most `max`; returns how long it
/// took. Run before a CPU window, so start-up work left over is not charged to the operations
/// measured.
pub async fn settle(pid: u32, step: Duration, max: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut before = cpu_ticks(pid)?;
    while started.elapsed() < max {
        tokio::time::sleep(step).await;
        let now = cpu_ticks(pid)?;
        if now == before {
            break;
        }
        before = now;
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_memory() {
        let s = "Name:\tgatewayd\nVmHWM:\t   20480 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(
            parse_memory(s),
            Some(Memory {
                rss_kib: 12345,
                hwm_kib: 20480
            })
        );
        assert_eq!(parse_memory("Name:\tx\n"), None);
    }

    #[test]
    fn parses_stat_ticks_past_a_spaced_name() {
        let s =
            "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 500 0 0 0 17 5 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_ticks(s), Some(22));
    }

    #[test]
    fn cpu_per_operation_and_percent() {
        let used = CpuUsed {
            elapsed: Duration::from_secs(2),
            seconds: vec![("gatewayd".into(), 1.5), ("bench".into(), 0.0)],
            clk_tck: 100,
        };
        let per = used.us_per_op(30_000);
        assert!((per["gatewayd"] - 50.0).abs() < 1e-9);
        assert_eq!(per["bench"], 0.0);
        assert!(used.us_per_op(0).is_empty());
        assert!((used.percent()[0].1 - 75.0).abs() < 1e-9);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(me).unwrap().rss_kib > 0);
        cpu_ticks(me).unwrap();
    }
}
