//! The results: targets, PASS/MISS verdicts, the printed table and the JSON document.

use super::footprint::Footprint;
use super::latency::Latency;
use super::stats::Summary;
use super::throughput::Throughput;
use serde::Serialize;
use std::fmt::Write;

/// Targets a user holds a gateway to.
pub const RPC_P50_MS: f64 = 0.5;
pub const RPC_P99_MS: f64 = 2.0;
pub const OVERHEAD_P50_MS: f64 = 0.2;
pub const CALLS_PER_S: f64 = 10_000.0;
/// Decimal megabytes.
pub const RSS_MB: f64 = 30.0;
pub const IDLE_CPU_PERCENT: f64 = 0.5;

/// How the run was set up.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub profile: &'static str,
    pub cpus: usize,
    pub devices: usize,
    pub samples: usize,
    pub in_flight: usize,
    pub duration_s: u64,
    pub probe_interval_ms: u64,
    pub footprint_devices: Option<usize>,
    pub footprint_probe_interval_ms: u64,
    pub idle_s: u64,
    /// `/proc/loadavg` when the run started: other work on the box skews latency.
    pub loadavg_at_start: String,
    pub logs: String,
}

/// One target held against one figure.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub measure: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// `<=` or `>=`.
    pub op: &'static str,
    pub target: f64,
    pub pass: bool,
}

impl Check {
    fn at_most(measure: &'static str, value: f64, unit: &'static str, target: f64) -> Check {
        let pass = value <= target;
        Check {
            measure,
            value,
            unit,
            op: "<=",
            target,
            pass,
        }
    }
    fn at_least(measure: &'static str, value: f64, unit: &'static str, target: f64) -> Check {
        let pass = value >= target;
        Check {
            measure,
            value,
            unit,
            op: ">=",
            target,
            pass,
        }
    }
    fn target(&self) -> String {
        format!("{} {} {}", self.op, num(self.target), self.unit)
    }
    fn verdict(&self) -> &'static str {
        if self.pass {
            "PASS"
        } else {
            "MISS"
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub settings: Settings,
    pub latency: Latency,
    pub throughput: Throughput,
    /// Not implemented in the product yet.
    pub twin_fanout: Option<()>,
    /// Not implemented in the product yet.
    pub messages: Option<()>,
    /// `None` with `--skip-footprint`.
    pub footprint: Option<Footprint>,
    pub checks: Vec<Check>,
}

impl Report {
    /// Assembles the report and holds each figure against its target.
    pub fn new(
        settings: Settings,
        latency: Latency,
        throughput: Throughput,
        footprint: Option<Footprint>,
    ) -> Report {
        let mut checks = vec![
            Check::at_most("rpc_p50", latency.gateway.p50_ms, "ms", RPC_P50_MS),
            Check::at_most("rpc_p99", latency.gateway.p99_ms, "ms", RPC_P99_MS),
            Check::at_most(
                "overhead_p50",
                latency.overhead_p50_ms,
                "ms",
                OVERHEAD_P50_MS,
            ),
            Check::at_least("throughput", throughput.calls_per_s, "calls/s", CALLS_PER_S),
            Check::at_most(
                "throughput_errors",
                (throughput.errors + throughput.lost) as f64,
                "calls",
                0.0,
            ),
        ];
        if let Some(f) = &footprint {
            checks.push(Check::at_most(
                "rss_idle",
                mb(f.rss_idle_kib()),
                "MB",
                RSS_MB,
            ));
            checks.push(Check::at_most(
                "idle_cpu",
                f.idle_cpu_percent,
                "% of a core",
                IDLE_CPU_PERCENT,
            ));
        }
        Report {
            settings,
            latency,
            throughput,
            twin_fanout: None,
            messages: None,
            footprint,
            checks,
        }
    }

    fn check(&self, measure: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.measure == measure)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let l = &self.latency;
        let t = &self.throughput;
        let mut rows: Vec<[String; 5]> = Vec::new();
        let mut row = |n: &str, what: String, result: String, check: Option<&Check>| {
            let (target, verdict) =
                check.map_or((String::new(), ""), |c| (c.target(), c.verdict()));
            rows.push([n.into(), what, result, target, verdict.into()]);
        };
        row(
            "1",
            format!(
                "RPC latency p50, sequential ({} samples)",
                l.gateway.samples
            ),
            ms(l.gateway.p50_ms),
            self.check("rpc_p50"),
        );
        row(
            "1",
            "RPC latency p99".into(),
            ms(l.gateway.p99_ms),
            self.check("rpc_p99"),
        );
        row("1", "RPC latency max".into(), ms(l.gateway.max_ms), None);
        row(
            "1",
            "  baseline: direct HTTP to the device".into(),
            triple(&l.direct_http),
            None,
        );
        row(
            "1",
            "  baseline: MQTT round trip, no gateway".into(),
            triple(&l.mqtt_round_trip),
            None,
        );
        row(
            "1",
            "  gateway overhead p50 (gw - direct - mqtt)".into(),
            ms(l.overhead_p50_ms),
            self.check("overhead_p50"),
        );
        row(
            "2",
            format!(
                "RPC throughput, {} in flight over {} devices",
                t.in_flight, t.devices
            ),
            format!("{} calls/s", num(t.calls_per_s.round())),
            self.check("throughput"),
        );
        row(
            "2",
            format!(
                "  errors / lost of {} calls",
                num((t.ok + t.errors + t.lost) as f64)
            ),
            format!("{} / {}", t.errors, t.lost),
            self.check("throughput_errors"),
        );
        row(
            "2",
            "  latency under load p50 / p99 / max".into(),
            triple(&t.latency),
            None,
        );
        row(
            "3",
            "twin fan-out".into(),
            "n/a (not implemented yet)".into(),
            None,
        );
        row(
            "4",
            "messages".into(),
            "n/a (not implemented yet)".into(),
            None,
        );
        match &self.footprint {
            Some(f) => {
                row(
                    "5",
                    format!("gatewayd RSS idle, {} devices", num(f.devices as f64)),
                    format!("{:.1} MB", mb(f.rss_idle_kib())),
                    self.check("rss_idle"),
                );
                row(
                    "5",
                    format!("gatewayd CPU idle over {:.0} s", f.idle_s),
                    format!("{:.2} % of a core", f.idle_cpu_percent),
                    self.check("idle_cpu"),
                );
            }
            None => {
                row(
                    "5",
                    "footprint".into(),
                    "skipped (--skip-footprint)".into(),
                    None,
                );
            }
        }

        let mut out = String::new();
        let _ = writeln!(
            out,
            "gatewayd bench: {} build, {} CPUs (load average at start {}), {} devices (probe interval {} s), {} s at {} in flight",
            s.profile, s.cpus, s.loadavg_at_start, s.devices, s.probe_interval_ms / 1000, s.duration_s, s.in_flight
        );
        let header = ["#", "measure", "result", "target", "verdict"].map(String::from);
        let widths: Vec<usize> = (0..5)
            .map(|i| {
                rows.iter()
                    .chain([&header])
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in [&header].into_iter().chain(rows.iter()) {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        let cpu: Vec<String> = t
            .cpu_percent
            .iter()
            .map(|(p, c)| format!("{p} {c:.0}%"))
            .collect();
        let _ = writeln!(
            out,
            "\nCPU during the throughput run (percent of one core): {}",
            cpu.join(", ")
        );
        if let Some(f) = &self.footprint {
            let _ = writeln!(
                out,
                "Footprint: {} devices, probe interval {} s ({} probe round(s) in the idle window); \
                 all online {:.1} s after start, quiet {:.1} s later; RSS settled {:.1} MB, \
                 after idle {:.1} MB, peak {:.1} MB (MB = 10^6 bytes)",
                f.devices,
                f.probe_interval_ms / 1000,
                f.probe_rounds_in_idle_window,
                f.ready_after_s,
                f.settled_after_s,
                mb(f.rss_settled_kib),
                mb(f.rss_end_kib),
                mb(f.rss_peak_kib)
            );
        }
        if !t.error_codes.is_empty() {
            let _ = writeln!(out, "Error answers by code: {:?}", t.error_codes);
        }
        let _ = writeln!(out, "Logs: {}", s.logs);
        out
    }
}

fn ms(v: f64) -> String {
    format!("{v:.3} ms")
}

fn triple(s: &Summary) -> String {
    format!("{:.3} / {:.3} / {:.3} ms", s.p50_ms, s.p99_ms, s.max_ms)
}

/// KiB to decimal megabytes.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1_000_000.0
}

/// A number with thousands separators when it is whole, else as is.
fn num(v: f64) -> String {
    if v.fract() != 0.0 || v.abs() < 1000.0 {
        return format!("{v}");
    }
    let digits = format!("{}", v.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(10_000.0), "10,000");
        assert_eq!(num(1_234_567.0), "1,234,567");
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(30.0), "30");
    }

    #[test]
    fn checks_compare_the_right_way() {
        assert!(Check::at_most("x", 0.5, "ms", 0.5).pass);
        assert!(!Check::at_most("x", 0.51, "ms", 0.5).pass);
        assert!(Check::at_least("x", 10_000.0, "calls/s", 10_000.0).pass);
        assert_eq!(
            Check::at_least("x", 1.0, "calls/s", 10_000.0).target(),
            ">= 10,000 calls/s"
        );
    }
}
