//! Counters and histograms an operator watches, kept in atomics so the hot paths (RPC, message
//! and twin workers, the MQTT link) never take a lock or touch SQLite to record them. Gauges that
//! live elsewhere (queue depths in SQLite, presence, the connection state) are read when
//! `/metrics` is scraped and handed to [`Metrics::render`], which writes the Prometheus text
//! format (version 0.0.4) by hand.

use gatewayd_protocol::message::FeedbackOutcome;
use gatewayd_protocol::{ApplyState, ErrorCode};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the RPC duration buckets, microseconds (0.5 ms .. 10 s).
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Final message outcomes (the `outcome` label of `gatewayd_messages_total`).
const MESSAGE_OUTCOMES: [&str; 5] = ["completed", "rejected", "expired", "failed", "may_have_run"];

/// Twin apply states (the `state` label of `gatewayd_twin_applies_total`).
const APPLY_STATES: [&str; 4] = ["applied", "different", "refused", "pending"];

/// A histogram with fixed buckets; each bucket counts its own observations (made cumulative
/// when rendered), the last one is `+Inf`.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// The daemon's counters; one instance, shared by `Arc`.
#[derive(Default)]
pub struct Metrics {
    rpc_ok: AtomicU64,
    rpc_errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Durations of successful (0) and failed (1) RPCs.
    rpc_duration: [Histogram; 2],
    messages: [AtomicU64; MESSAGE_OUTCOMES.len()],
    twin_applies: [AtomicU64; APPLY_STATES.len()],
    cloud_reconnects: AtomicU64,
}

/// Values read at scrape time from their owners.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Messages `pending` or `running` in the inbox.
    pub inbox_depth: u64,
    /// Rows waiting in the outbox.
    pub outbox_depth: u64,
    /// Whether the MQTT session is connected.
    pub cloud_connected: bool,
    /// The store thread: jobs waiting, jobs in the last batch, batches committed and their
    /// total commit time, batches failed, whether writes currently fail.
    pub store_queued: u64,
    pub store_last_batch: u64,
    pub store_commits: u64,
    pub store_commit_seconds: f64,
    pub store_failures: u64,
    pub store_failing: bool,
    /// Every device and whether it is online, in id order.
    pub devices: Vec<(String, bool)>,
    /// The running configuration's digest, and the last reload (unix ms, outcome kind).
    pub config_fingerprint: String,
    pub last_reload: Option<(u64, &'static str)>,
}

impl Metrics {
    /// One RPC answered: `Ok(())` or its error code, and how long it took since receipt.
    pub fn rpc(&self, outcome: Result<(), ErrorCode>, elapsed: Duration) {
        match outcome {
            Ok(()) => {
                self.rpc_ok.fetch_add(1, Relaxed);
                self.rpc_duration[0].observe(elapsed);
            }
            Err(code) => {
                self.rpc_errors[code as usize].fetch_add(1, Relaxed);
                self.rpc_duration[1].observe(elapsed);
            }
        }
    }

    /// A message reached a final outcome (`received` is not final and is not counted).
    pub fn message(&self, outcome: FeedbackOutcome) {
        let i = match outcome {
            FeedbackOutcome::Received => return,
            FeedbackOutcome::Completed => 0,
            FeedbackOutcome::Rejected => 1,
            FeedbackOutcome::Expired => 2,
            FeedbackOutcome::Failed => 3,
            FeedbackOutcome::MayHaveRun => 4,
        };
        self.messages[i].fetch_add(1, Relaxed);
    }

    /// `n` messages ended with `outcome` at once (start-up recovery).
    pub fn messages(&self, outcome: FeedbackOutcome, n: usize) {
        for _ in 0..n {
            self.message(outcome);
        }
    }

    /// One desired twin property was applied to a device with this result.
    pub fn twin_apply(&self, state: ApplyState) {
        let i = match state {
            ApplyState::Applied => 0,
            ApplyState::Different => 1,
            ApplyState::Refused => 2,
            ApplyState::Pending => 3,
        };
        self.twin_applies[i].fetch_add(1, Relaxed);
    }

    /// The cloud session was established again after it had been up before.
    pub fn cloud_reconnected(&self) {
        self.cloud_reconnects.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let o = &mut out;

        header(
            o,
            "gatewayd_build_info",
            "gauge",
            "Build information; always 1.",
        );
        let _ = writeln!(
            o,
            "gatewayd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        header(
            o,
            "gatewayd_config_info",
            "gauge",
            "The running configuration's fingerprint; always 1.",
        );
        let _ = writeln!(
            o,
            "gatewayd_config_info{{fingerprint=\"{}\"}} 1",
            gauges.config_fingerprint
        );
        if let Some((at_ms, outcome)) = gauges.last_reload {
            header(
                o,
                "gatewayd_config_last_reload_timestamp_seconds",
                "gauge",
                "When the configuration was last re-read (SIGHUP), unix seconds.",
            );
            let _ = writeln!(
                o,
                "gatewayd_config_last_reload_timestamp_seconds {}",
                at_ms as f64 / 1000.0
            );
            header(
                o,
                "gatewayd_config_last_reload_success",
                "gauge",
                "1 if the last re-read configuration was applied (or unchanged), 0 if it was refused; the outcome label says which.",
            );
            let ok = matches!(outcome, "applied" | "applied_partly" | "unchanged");
            let _ = writeln!(
                o,
                "gatewayd_config_last_reload_success{{outcome=\"{outcome}\"}} {}",
                u8::from(ok)
            );
        }

        header(
            o,
            "gatewayd_rpc_total",
            "counter",
            "RPCs answered, by outcome: ok or the error code sent to the cloud.",
        );
        let _ = writeln!(
            o,
            "gatewayd_rpc_total{{outcome=\"ok\"}} {}",
            self.rpc_ok.load(Relaxed)
        );
        for (code, n) in ErrorCode::ALL.iter().zip(&self.rpc_errors) {
            let _ = writeln!(
                o,
                "gatewayd_rpc_total{{outcome=\"{code}\"}} {}",
                n.load(Relaxed)
            );
        }

        header(
            o,
            "gatewayd_rpc_duration_seconds",
            "histogram",
            "Time from receipt of an RPC request to its response, by outcome class.",
        );
        for (class, h) in ["ok", "error"].iter().zip(&self.rpc_duration) {
            let mut cumulative = 0;
            for (i, bucket) in h.buckets.iter().enumerate() {
                cumulative += bucket.load(Relaxed);
                let le = match BUCKETS_US.get(i) {
                    Some(us) => seconds(*us),
                    None => "+Inf".to_string(),
                };
                let _ = writeln!(
                    o,
                    "gatewayd_rpc_duration_seconds_bucket{{outcome=\"{class}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "gatewayd_rpc_duration_seconds_sum{{outcome=\"{class}\"}} {}",
                seconds(h.sum_us.load(Relaxed))
            );
            let _ = writeln!(
                o,
                "gatewayd_rpc_duration_seconds_count{{outcome=\"{class}\"}} {cumulative}"
            );
        }

        header(
            o,
            "gatewayd_messages_total",
            "counter",
            "Cloud-to-device messages that reached a final outcome.",
        );
        for (outcome, n) in MESSAGE_OUTCOMES.iter().zip(&self.messages) {
            let _ = writeln!(
                o,
                "gatewayd_messages_total{{outcome=\"{outcome}\"}} {}",
                n.load(Relaxed)
            );
        }

        header(
            o,
            "gatewayd_inbox_depth",
            "gauge",
            "Messages waiting in the inbox (pending or running).",
        );
        let _ = writeln!(o, "gatewayd_inbox_depth {}", gauges.inbox_depth);
        header(
            o,
            "gatewayd_outbox_depth",
            "gauge",
            "Reported twin patches and message feedback not yet acknowledged by the broker.",
        );
        let _ = writeln!(o, "gatewayd_outbox_depth {}", gauges.outbox_depth);

        for (name, kind, help, value) in [
            ("gatewayd_store_queue_depth", "gauge", "Store jobs submitted and not yet answered.", gauges.store_queued.to_string()),
            ("gatewayd_store_batch_size", "gauge", "Jobs in the store's last transaction.", gauges.store_last_batch.to_string()),
            ("gatewayd_store_commits_total", "counter", "Store transactions committed.", gauges.store_commits.to_string()),
            ("gatewayd_store_commit_seconds_total", "counter", "Time spent in committed store transactions (divide by commits for the mean latency).", format!("{:.6}", gauges.store_commit_seconds)),
            ("gatewayd_store_failures_total", "counter", "Store transactions that failed (nothing of them was stored).", gauges.store_failures.to_string()),
            ("gatewayd_store_failing", "gauge", "1 while store writes fail (full disk, I/O error).", u8::from(gauges.store_failing).to_string()),
        ] {
            header(o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        }

        header(
            o,
            "gatewayd_twin_applies_total",
            "counter",
            "Desired twin properties applied to devices, by result.",
        );
        for (state, n) in APPLY_STATES.iter().zip(&self.twin_applies) {
            let _ = writeln!(
                o,
                "gatewayd_twin_applies_total{{state=\"{state}\"}} {}",
                n.load(Relaxed)
            );
        }

        header(
            o,
            "gatewayd_cloud_reconnects_total",
            "counter",
            "Times the cloud session was established again after it had been up.",
        );
        let _ = writeln!(
            o,
            "gatewayd_cloud_reconnects_total {}",
            self.cloud_reconnects.load(Relaxed)
        );
        header(
            o,
            "gatewayd_cloud_connected",
            "gauge",
            "1 while the cloud session is connected, else 0.",
        );
        let _ = writeln!(
            o,
            "gatewayd_cloud_connected {}",
            u8::from(gauges.cloud_connected)
        );

        header(
            o,
            "gatewayd_device_up",
            "gauge",
            "1 while the device is online (probes and call outcomes), else 0.",
        );
        for (device, up) in &gauges.devices {
            let _ = writeln!(
                o,
                "gatewayd_device_up{{device=\"{}\"}} {}",
                escape(device),
                u8::from(*up)
            );
        }
        out
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// Microseconds as decimal seconds without float rounding noise, e.g. `0.0005`, `2.5`, `10`.
fn seconds(us: u64) -> String {
    let (whole, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"))
    }

    #[test]
    fn seconds_are_exact() {
        assert_eq!(seconds(500), "0.0005");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(10_000_000), "10");
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(1_234_567), "1.234567");
    }

    #[test]
    fn rpc_counters_and_histogram_render() {
        let m = Metrics::default();
        m.rpc(Ok(()), Duration::from_micros(300));
        m.rpc(Ok(()), Duration::from_millis(7));
        m.rpc(Err(ErrorCode::Timeout), Duration::from_secs(30));
        let text = m.render(&Gauges::default());
        assert_eq!(
            line(&text, "gatewayd_rpc_total{outcome=\"ok\"}"),
            "gatewayd_rpc_total{outcome=\"ok\"} 2"
        );
        assert_eq!(
            line(&text, "gatewayd_rpc_total{outcome=\"timeout\"}"),
            "gatewayd_rpc_total{outcome=\"timeout\"} 1"
        );
        let b = |class: &str, le: &str| {
            line(
                &text,
                &format!("gatewayd_rpc_duration_seconds_bucket{{outcome=\"{class}\",le=\"{le}\"}}"),
            )
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
        };
        assert_eq!(b("ok", "0.0005"), "1");
        assert_eq!(b("ok", "0.005"), "1");
        assert_eq!(b("ok", "0.01"), "2", "cumulative");
        assert_eq!(b("ok", "+Inf"), "2");
        assert_eq!(b("error", "10"), "0", "30 s is beyond the last bound");
        assert_eq!(b("error", "+Inf"), "1");
        assert_eq!(
            line(&text, "gatewayd_rpc_duration_seconds_sum{outcome=\"ok\"}"),
            "gatewayd_rpc_duration_seconds_sum{outcome=\"ok\"} 0.0073"
        );
        assert_eq!(
            line(
                &text,
                "gatewayd_rpc_duration_seconds_count{outcome=\"error\"}"
            ),
            "gatewayd_rpc_duration_seconds_count{outcome=\"error\"} 1"
        );
        assert!(text.contains("# TYPE gatewayd_rpc_duration_seconds histogram\n"));
    }

    #[test]
    fn every_family_has_help_and_type_and_gauges_are_rendered() {
        let m = Metrics::default();
        m.message(FeedbackOutcome::Completed);
        m.message(FeedbackOutcome::Received);
        m.messages(FeedbackOutcome::Failed, 2);
        m.twin_apply(ApplyState::Different);
        m.cloud_reconnected();
        let text = m.render(&Gauges {
            inbox_depth: 3,
            outbox_depth: 4,
            cloud_connected: true,
            store_queued: 0,
            store_last_batch: 1,
            store_commits: 2,
            store_commit_seconds: 0.5,
            store_failures: 0,
            store_failing: false,
            devices: vec![("agv-1".into(), true), ("a\"b".into(), false)],
            config_fingerprint: "00ff".into(),
            last_reload: Some((1_500, "applied_partly")),
        });
        assert!(text.contains("gatewayd_config_info{fingerprint=\"00ff\"} 1"));
        assert!(text.contains("gatewayd_config_last_reload_timestamp_seconds 1.5"));
        assert!(text.contains("gatewayd_config_last_reload_success{outcome=\"applied_partly\"} 1"));
        for family in [
            "gatewayd_build_info",
            "gatewayd_rpc_total",
            "gatewayd_rpc_duration_seconds",
            "gatewayd_messages_total",
            "gatewayd_inbox_depth",
            "gatewayd_outbox_depth",
            "gatewayd_store_queue_depth",
            "gatewayd_store_commit_seconds_total",
            "gatewayd_store_failing",
            "gatewayd_twin_applies_total",
            "gatewayd_cloud_reconnects_total",
            "gatewayd_cloud_connected",
            "gatewayd_device_up",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        for want in [
            "gatewayd_messages_total{outcome=\"completed\"} 1",
            "gatewayd_messages_total{outcome=\"failed\"} 2",
            "gatewayd_messages_total{outcome=\"expired\"} 0",
            "gatewayd_twin_applies_total{state=\"different\"} 1",
            "gatewayd_cloud_reconnects_total 1",
            "gatewayd_cloud_connected 1",
            "gatewayd_inbox_depth 3",
            "gatewayd_outbox_depth 4",
            "gatewayd_device_up{device=\"agv-1\"} 1",
            "gatewayd_device_up{device=\"a\\\"b\"} 0",
        ] {
            assert!(
                text.contains(&format!("{want}\n")),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
    }
}
