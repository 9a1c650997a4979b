//! What `/proc` says about a process: resident memory and CPU time consumed.

use anyhow::{anyhow, Context, Result};
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

/// Clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be asked).
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
        let elapsed = self.start.elapsed();
        let used = self
            .ticks
            .iter()
            .map(|(name, pid, before)| {
                let spent = cpu_ticks(*pid)?.saturating_sub(*before) as f64 / self.hz as f64;
                Ok((name.clone(), 100.0 * spent / elapsed.as_secs_f64()))
            })
            .collect::<Result<_>>()?;
        Ok((used, elapsed))
    }
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
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(me).unwrap().rss_kib > 0);
        cpu_ticks(me).unwrap();
    }
}
