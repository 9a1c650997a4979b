//! The results: targets, PASS/MISS verdicts, the printed table and the JSON document.

use super::footprint::Footprint;
use super::latency::Latency;
use super::messages::Messages;
use super::stats::Summary;
use super::throughput::Throughput;
use super::twin_fanout::TwinFanout;
use serde::Serialize;
use std::fmt::Write;

/// Targets a user holds a gateway to.
pub const RPC_P50_MS: f64 = 0.5;
pub const RPC_P99_MS: f64 = 2.0;
pub const OVERHEAD_P50_MS: f64 = 0.2;
pub const CALLS_PER_S: f64 = 10_000.0;
/// RPC throughput as percent of the MQTT echo floor's at the same concurrency.
pub const OF_ECHO_FLOOR_PERCENT: f64 = 60.0;
/// gatewayd's CPU time per operation, microseconds (`/proc/<pid>/stat` over each phase).
pub const CPU_US_PER_RPC: f64 = 40.0;
pub const CPU_US_PER_MESSAGE: f64 = 150.0;
pub const CPU_US_PER_TWIN_PROPERTY: f64 = 150.0;
/// One desired change to each device, until every twin shows it reported: 2 s for up to
/// 1,000 devices, 5 s beyond (10,000 on a gateway).
pub fn twin_fanout_target_s(devices: usize) -> f64 {
    if devices > 1000 {
        5.0
    } else {
        2.0
    }
}
/// From gatewayd's start until the cloud shows every device online.
pub const START_ALL_ONLINE_S: f64 = 10.0;
/// Messages completed durably per second.
pub const MESSAGES_PER_S: f64 = 5_000.0;
/// Idle resident memory, decimal megabytes: 30 MB for up to 1,000 devices, 60 MB beyond
/// (10,000 on a gateway).
pub fn rss_target_mb(devices: usize) -> f64 {
    if devices > 1000 {
        60.0
    } else {
        30.0
    }
}
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
    /// Operator requests in flight in the twin and message phases.
    pub api_in_flight: usize,
    /// The stub's `--max-queue` (open messages per device).
    pub stub_max_queue: usize,
    /// The stub's embedded broker, or the external one used instead.
    pub broker: String,
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
    /// `None` with `--skip-twins`.
    pub twin_fanout: Option<TwinFanout>,
    /// `None` with `--skip-messages`.
    pub messages: Option<Messages>,
    /// `None` with `--skip-footprint`.
    pub footprint: Option<Footprint>,
    /// `None` with `--skip-swarm`; set by [`Report::add_swarm`].
    pub swarm: Option<super::swarm::SwarmReport>,
    /// `None` with `--skip-modbus`; set by [`Report::add_modbus`].
    pub modbus: Option<super::modbus::ModbusReport>,
    /// `None` with `--skip-thingsboard`; set by [`Report::add_thingsboard`].
    pub thingsboard: Option<super::thingsboard::TbReport>,
    pub checks: Vec<Check>,
}

impl Report {
    /// Assembles the report and holds each figure against its target.
    pub fn new(
        settings: Settings,
        latency: Latency,
        throughput: Throughput,
        twin_fanout: Option<TwinFanout>,
        messages: Option<Messages>,
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
            Check::at_least(
                "throughput_of_echo_floor",
                throughput.of_echo_floor_percent,
                "%",
                OF_ECHO_FLOOR_PERCENT,
            ),
        ];
        if let Some(&us) = throughput.cpu_us_per_call.get("gatewayd") {
            checks.push(Check::at_most("cpu_per_rpc", us, "µs", CPU_US_PER_RPC));
        }
        if let Some(t) = &twin_fanout {
            checks.push(Check::at_most(
                "twin_fanout",
                t.elapsed_s,
                "s",
                twin_fanout_target_s(t.devices),
            ));
            checks.push(Check::at_most(
                "start_all_online",
                t.ready_after_s,
                "s",
                START_ALL_ONLINE_S,
            ));
            checks.push(Check::at_most(
                "twin_not_converged",
                t.not_converged as f64,
                "devices",
                0.0,
            ));
            if let Some(&us) = t.cpu_us_per_property.get("gatewayd") {
                checks.push(Check::at_most(
                    "cpu_per_twin_property",
                    us,
                    "µs",
                    CPU_US_PER_TWIN_PROPERTY,
                ));
            }
        }
        if let Some(m) = &messages {
            checks.push(Check::at_least(
                "messages_per_s",
                m.completed_per_s,
                "msg/s",
                MESSAGES_PER_S,
            ));
            checks.push(Check::at_most(
                "messages_not_completed",
                m.not_completed as f64,
                "messages",
                0.0,
            ));
            if let Some(&us) = m.cpu_us_per_message.get("gatewayd") {
                checks.push(Check::at_most(
                    "cpu_per_message",
                    us,
                    "µs",
                    CPU_US_PER_MESSAGE,
                ));
            }
        }
        if let Some(f) = &footprint {
            checks.push(Check::at_most(
                "rss_idle",
                mb(f.rss_idle_kib()),
                "MB",
                rss_target_mb(f.devices),
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
            twin_fanout,
            messages,
            footprint,
            swarm: None,
            modbus: None,
            thingsboard: None,
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
        for f in [&t.echo_floor, &t.http_floor] {
            row(
                "2",
                format!("  floor: {}, {} in flight; p50", f.what, t.in_flight),
                format!(
                    "{} calls/s; {}",
                    num(f.calls_per_s.round()),
                    ms(f.latency.p50_ms)
                ),
                None,
            );
        }
        row(
            "2",
            format!(
                "  share of the MQTT echo floor (of direct HTTP: {:.0} %)",
                t.of_http_floor_percent
            ),
            format!("{:.1} %", t.of_echo_floor_percent),
            self.check("throughput_of_echo_floor"),
        );
        row(
            "2",
            "  gatewayd CPU per RPC".into(),
            us(t.cpu_us_per_call.get("gatewayd")),
            self.check("cpu_per_rpc"),
        );
        match &self.twin_fanout {
            Some(w) => {
                row(
                    "3",
                    format!(
                        "twin fan-out: one change to each of {} devices, until reported == desired",
                        num(w.devices as f64)
                    ),
                    format!("{:.3} s", w.elapsed_s),
                    self.check("twin_fanout"),
                );
                row(
                    "3",
                    format!(
                        "  operator PATCH rate, {} in flight; not 200",
                        w.patches.in_flight
                    ),
                    format!(
                        "{} PATCH/s ({:.3} s); {}",
                        num(w.patches.per_s.round()),
                        w.patches.elapsed_s,
                        w.patches.requests - w.patches.ok
                    ),
                    None,
                );
                row(
                    "3",
                    "  devices not converged".into(),
                    format!("{} of {}", w.not_converged, num(w.devices as f64)),
                    self.check("twin_not_converged"),
                );
                row(
                    "3",
                    "  gatewayd CPU per twin property applied".into(),
                    us(w.cpu_us_per_property.get("gatewayd")),
                    self.check("cpu_per_twin_property"),
                );
                row(
                    "3",
                    format!(
                        "  gatewayd start until all {} devices online",
                        num(w.devices as f64)
                    ),
                    format!("{:.1} s", w.ready_after_s),
                    self.check("start_all_online"),
                );
                row(
                    "3",
                    "  last device: desired committed / applied at device / reported at stub"
                        .into(),
                    format!(
                        "{} / {} / {} s",
                        secs(w.stages.desired_committed_s),
                        secs(w.stages.applied_at_device_s),
                        secs(w.stages.reported_at_stub_s)
                    ),
                    None,
                );
                row(
                    "3",
                    "  per device desired -> reported p50 / p99 / max".into(),
                    triple(&w.stages.desired_to_reported),
                    None,
                );
                row(
                    "3",
                    "  gatewayd RSS: peak with a connection to every device / after they closed"
                        .into(),
                    match w.after_close {
                        Some((rss, after)) => format!(
                            "{:.1} / {:.1} MB ({:.1} s after convergence)",
                            mb(w.peak_rss_kib),
                            mb(rss),
                            after
                        ),
                        None => format!(
                            "{:.1} MB / not settled 30 s after convergence",
                            mb(w.peak_rss_kib)
                        ),
                    },
                    None,
                );
            }
            None => row(
                "3",
                "twin fan-out".into(),
                "skipped (--skip-twins)".into(),
                None,
            ),
        }
        match &self.messages {
            Some(m) => {
                row(
                    "4",
                    format!(
                        "messages: {} {} over {} devices, until all completed",
                        num(m.sends.requests as f64),
                        m.command,
                        m.devices
                    ),
                    format!(
                        "{} msg/s ({:.3} s)",
                        num(m.completed_per_s.round()),
                        m.elapsed_s
                    ),
                    self.check("messages_per_s"),
                );
                row(
                    "4",
                    format!(
                        "  send rate at the operator API, {} in flight; not 202",
                        m.sends.in_flight
                    ),
                    format!(
                        "{} msg/s ({:.3} s); {}",
                        num(m.sends.per_s.round()),
                        m.sends.elapsed_s,
                        m.sends.requests - m.sends.ok
                    ),
                    None,
                );
                let failed = m.by_status.get("failed").copied().unwrap_or(0);
                row(
                    "4",
                    "  lost / failed / not completed (any reason)".into(),
                    format!("{} / {} / {}", m.lost, failed, m.not_completed),
                    self.check("messages_not_completed"),
                );
                row(
                    "4",
                    "  gatewayd CPU per message (received to completed)".into(),
                    us(m.cpu_us_per_message.get("gatewayd")),
                    self.check("cpu_per_message"),
                );
                row(
                    "4",
                    "  last message: queued / sent / delivered / finished".into(),
                    format!(
                        "{} / {} / {} / {} s",
                        secs(m.stages.queued_s),
                        secs(m.stages.sent_s),
                        secs(m.stages.delivered_s),
                        secs(m.stages.finished_s)
                    ),
                    None,
                );
                row(
                    "4",
                    "  per message queued -> finished p50 / p99 / max".into(),
                    triple(&m.stages.queued_to_finished),
                    None,
                );
                row(
                    "4",
                    "  per message sent -> delivered (gatewayd stored it) p50 / p99 / max".into(),
                    triple(&m.stages.sent_to_delivered),
                    None,
                );
                row(
                    "4",
                    "  per message delivered -> finished p50 / p99 / max".into(),
                    triple(&m.stages.delivered_to_finished),
                    None,
                );
                row(
                    "4",
                    format!("  durable: {}", m.durability),
                    format!("{}, fsync p50 {:.3} ms", m.store_fs, m.fsync_p50_ms),
                    None,
                );
            }
            None => row(
                "4",
                "messages".into(),
                "skipped (--skip-messages)".into(),
                None,
            ),
        }
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
        match &self.swarm {
            Some(w) => {
                for (what, result, measure) in w.rows() {
                    row("6", what, result, measure.and_then(|m| self.check(m)));
                }
            }
            None => row("6", "swarm".into(), "skipped (--skip-swarm)".into(), None),
        }
        match &self.modbus {
            Some(m) => {
                for (what, result, measure) in m.rows() {
                    row("7", what, result, measure.and_then(|m| self.check(m)));
                }
            }
            None => row("7", "modbus".into(), "skipped (--skip-modbus)".into(), None),
        }
        match &self.thingsboard {
            Some(tb) => {
                for (what, result) in tb.rows() {
                    row("8", what, result, None);
                }
            }
            None => row(
                "8",
                "thingsboard profile".into(),
                "skipped (--skip-thingsboard)".into(),
                None,
            ),
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
        let _ = writeln!(
            out,
            "\nCPU during the throughput run (percent of one core): {}; per call: {}",
            cpu_line(&t.cpu_percent),
            us_line(&t.cpu_us_per_call)
        );
        let _ = writeln!(
            out,
            "CPU time: utime + stime of /proc/<pid>/stat (all threads), CLK_TCK {} (one tick = {:.0} ms)",
            t.clk_tck,
            1000.0 / t.clk_tck.max(1) as f64
        );
        for f in [&t.echo_floor, &t.http_floor] {
            let _ = writeln!(
                out,
                "CPU during the floor {}: {}; per call: {}; errors / lost {} / {}",
                f.what,
                cpu_line(&f.cpu_percent),
                us_line(&f.cpu_us_per_call),
                f.errors,
                f.lost
            );
        }
        if let Some(w) = &self.twin_fanout {
            let _ = writeln!(
                out,
                "CPU during the twin fan-out (first PATCH until converged): {}; per property: {}",
                cpu_line(&w.cpu_percent),
                us_line(&w.cpu_us_per_property)
            );
        }
        if let Some(m) = &self.messages {
            let _ = writeln!(
                out,
                "CPU during the messages (first POST until all final): {}; per message: {}",
                cpu_line(&m.cpu_percent),
                us_line(&m.cpu_us_per_message)
            );
            let statuses: Vec<String> = m
                .by_status
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ =
                writeln!(
                out,
                "Messages: {} (store {} on {}, WAL file {}); stub --max-queue {}; statuses: {}; \
                 device executions {}, run more than once {}",
                m.durability,
                m.store,
                m.store_fs,
                if m.store_wal_seen { "present" } else { "absent" },
                s.stub_max_queue,
                statuses.join(", "),
                m.device_executions,
                m.executed_twice
            );
        }
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
        if let Some(w) = &self.swarm {
            let _ = writeln!(out, "{}", w.usage_lines());
        }
        let _ = writeln!(out, "Broker: {}; logs: {}", s.broker, s.logs);
        out
    }
}

fn cpu_line(cpu: &std::collections::BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = cpu.iter().map(|(p, c)| format!("{p} {c:.0}%")).collect();
    parts.join(", ")
}

/// Microseconds of CPU per operation, by process.
fn us_line(per_op: &std::collections::BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = per_op
        .iter()
        .map(|(p, v)| format!("{p} {v:.0} µs"))
        .collect();
    parts.join(", ")
}

/// Microseconds, or "-" when nothing was done to divide by.
fn us(v: Option<&f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1} µs"))
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn ms(v: f64) -> String {
    format!("{v:.3} ms")
}

/// p50 / p99 / max, in seconds when the largest is a second or more.
fn triple(s: &Summary) -> String {
    if s.max_ms >= 1000.0 {
        return format!(
            "{:.3} / {:.3} / {:.3} s",
            s.p50_ms / 1000.0,
            s.p99_ms / 1000.0,
            s.max_ms / 1000.0
        );
    }
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
