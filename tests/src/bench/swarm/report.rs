//! The swarm phase's targets, table rows and per-step usage line.

use super::{
    SwarmReport, Usage, RPC_DURATION, RPC_P99_MS, START_S, STORM_DEADLINE, STORM_S, STUB_RSS_MB,
};
use crate::bench::report::{Check, Report};

impl SwarmReport {
    /// The targets held against this phase's figures.
    pub fn checks(&self) -> Vec<Check> {
        let rpc_errors: usize = self.rpc.errors.values().sum();
        vec![
            at_most("swarm_start", self.start.gateways_s, "s", START_S),
            // Never all online: the whole window, longer than the target.
            at_most(
                "swarm_storm",
                self.storm
                    .after_ready
                    .as_ref()
                    .map_or(STORM_DEADLINE.as_secs_f64(), |o| o.gateways_s),
                "s",
                STORM_S,
            ),
            at_most(
                "swarm_storm_missing",
                (self.gateways - self.storm.gateways_online) as f64,
                "gateways",
                0.0,
            ),
            at_most("swarm_rpc_p99", self.rpc.latency.p99_ms, "ms", RPC_P99_MS),
            at_most("swarm_rpc_errors", rpc_errors as f64, "calls", 0.0),
            at_most(
                "swarm_messages_not_completed",
                self.messages.not_completed as f64,
                "messages",
                0.0,
            ),
            at_most(
                "swarm_twins_not_converged",
                self.twins.not_converged as f64,
                "devices",
                0.0,
            ),
            at_most(
                "swarm_stub_session_errors",
                self.session_errors() as f64,
                "errors",
                0.0,
            ),
            at_most(
                "swarm_stub_rss_peak",
                mb(self.peak_kib()),
                "MB",
                STUB_RSS_MB,
            ),
        ]
    }

    /// Table rows: (what, result, the check's measure name if it has one).
    pub fn rows(&self) -> Vec<(String, String, Option<&'static str>)> {
        let m = &self.messages;
        let t = &self.twins;
        let r = &self.rpc;
        let st = &self.storm;
        let rpc_errors: usize = r.errors.values().sum();
        let storm_what = if st.broker_restarted {
            "  connect storm: stub and its broker SIGKILLed, restarted on the same port; all gateways online again after its ready line"
        } else {
            "  stub SIGKILLed and restarted (external broker up, gateways stay connected); all gateways online after its ready line"
        };
        vec![
            (
                format!(
                    "swarm: {} gateways x {} devices ({}), from connect to all gateways / devices online",
                    self.gateways, self.devices_per_gateway, self.broker
                ),
                format!("{:.1} / {:.1} s", self.start.gateways_s, self.start.devices_s),
                Some("swarm_start"),
            ),
            (
                format!("  stub idle over {:.0} s: CPU, RSS", self.idle.seconds),
                format!(
                    "{:.1} % of a core, {:.1} MB",
                    self.idle.stub_cpu_percent,
                    mb(self.idle.stub_rss_kib)
                ),
                None,
            ),
            (
                storm_what.into(),
                match &st.after_ready {
                    Some(o) => format!(
                        "{:.1} s (ready {:.1} s after the kill; devices {:.1} s)",
                        o.gateways_s, st.kill_to_ready_s, o.devices_s
                    ),
                    None => format!(
                        "not within {} s (ready {:.1} s after the kill)",
                        STORM_DEADLINE.as_secs(),
                        st.kill_to_ready_s
                    ),
                },
                Some("swarm_storm"),
            ),
            (
                "  gateways / devices not shown online at the end of that step (the next steps leave them out)"
                    .into(),
                format!(
                    "{} / {}",
                    self.gateways - st.gateways_online,
                    self.gateways * self.devices_per_gateway - st.devices_online
                ),
                Some("swarm_storm_missing"),
            ),
            (
                format!(
                    "  RPC at {}/s for {} s over random devices, p50 / p99 / max",
                    r.rate_per_s,
                    RPC_DURATION.as_secs()
                ),
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms
                ),
                Some("swarm_rpc_p99"),
            ),
            (
                format!("  RPC errors of {} calls", r.calls),
                format!("{rpc_errors}"),
                Some("swarm_rpc_errors"),
            ),
            (
                format!(
                    "  messages: {} over {} devices of all gateways, until all completed",
                    m.messages, m.devices
                ),
                if m.not_completed == 0 {
                    format!("{:.0} msg/s ({:.2} s)", m.completed_per_s, m.elapsed_s)
                } else {
                    format!("{} of {} completed", m.completed, m.messages)
                },
                None,
            ),
            (
                "  messages not completed".into(),
                format!("{} of {}", m.not_completed, m.messages),
                Some("swarm_messages_not_completed"),
            ),
            (
                format!(
                    "  twins: one change to each of {} devices of {} gateways, until reported == desired",
                    t.devices, t.gateways
                ),
                if t.not_converged == 0 {
                    format!("{:.2} s", t.elapsed_s)
                } else {
                    format!("{} of {} converged", t.converged, t.devices)
                },
                None,
            ),
            (
                "  twins not converged".into(),
                format!("{} of {}", t.not_converged, t.devices),
                Some("swarm_twins_not_converged"),
            ),
            (
                "  failures of the stub's own MQTT session (each marks every gateway offline)"
                    .into(),
                format!("{}", self.session_errors()),
                Some("swarm_stub_session_errors"),
            ),
            (
                "  stub peak RSS".into(),
                format!("{:.1} MB", mb(self.peak_kib())),
                Some("swarm_stub_rss_peak"),
            ),
        ]
    }

    /// The steps' usage, in order.
    fn steps(&self) -> [(&'static str, &Usage); 6] {
        [
            ("start", &self.start_usage),
            ("idle", &self.idle),
            ("storm", &self.storm.usage),
            ("rpc", &self.rpc.usage),
            ("messages", &self.messages.usage),
            ("twins", &self.twins.usage),
        ]
    }

    /// Failures of the stub's own MQTT session over every step.
    pub fn session_errors(&self) -> usize {
        self.steps()
            .iter()
            .map(|(_, u)| u.stub_session_errors)
            .sum()
    }

    /// The stub's peak resident memory over every step (both stub processes), KiB.
    pub fn peak_kib(&self) -> u64 {
        self.steps()
            .iter()
            .map(|(_, u)| u.stub_hwm_kib)
            .max()
            .unwrap_or(0)
    }

    /// One line per step: the stub's CPU and memory, and this process's CPU.
    pub fn usage_lines(&self) -> String {
        let parts: Vec<String> = self
            .steps()
            .iter()
            .map(|(name, u)| {
                format!(
                    "{name} {:.1} s: stub {:.0}% / {:.1} MB, {} session error(s) (bench {:.0}%)",
                    u.seconds,
                    u.stub_cpu_percent,
                    mb(u.stub_rss_kib),
                    u.stub_session_errors,
                    u.bench_cpu_percent
                )
            })
            .collect();
        format!(
            "Swarm, per step (CPU in percent of one core, stub RSS at the step's end): {}; \
             swarm reconnects in the storm {} ({} connection errors); messages by status {:?}",
            parts.join(", "),
            self.storm.reconnects,
            self.storm.connection_errors,
            self.messages.by_status
        )
    }
}

impl Report {
    /// Adds the swarm phase's figures and checks.
    pub fn add_swarm(&mut self, swarm: SwarmReport) {
        self.checks.extend(swarm.checks());
        self.swarm = Some(swarm);
    }
}

fn at_most(measure: &'static str, value: f64, unit: &'static str, target: f64) -> Check {
    Check {
        measure,
        value,
        unit,
        op: "<=",
        target,
        pass: value <= target,
    }
}

/// KiB to decimal megabytes.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1_000_000.0
}
