//! The ThingsBoard profile phase: one simulated AGV and two gatewayds over it, one with the
//! native profile behind the cloud stub and one with `cloud.profile = "thingsboard"` behind
//! the ThingsBoard emulator (`tb-emulator`). The same sequential RPC is made through each
//! cloud's operator HTTP API (the stub's method invoke route, ThingsBoard's
//! `POST /api/rpc/twoway/{device}`), alternating the order every round, so both paths hold one
//! HTTP hop, one MQTT broker, gatewayd and the device, and see the same background load. Each
//! gatewayd's CPU time over the recorded rounds is divided by its own RPCs (the other one is
//! idle meanwhile: probes every 60 s).

use super::latency::METHOD;
use super::procfs::CpuMeter;
use super::report::Report;
use super::rig::await_all_online;
use super::stats::Summary;
use super::RPC_PROBE_INTERVAL_MS;
use crate::config::GatewayConfig;
use crate::thingsboard::TbEmulator;
use crate::{invoke, Fleet, Gateway, Stub};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const NATIVE_GATEWAY: &str = "bench-tb-native";
const TB_GATEWAY: &str = "bench-tb";
/// The ThingsBoard gateway device's access token (its MQTT user name).
const TB_TOKEN: &str = "bench-tb-token";
/// Device prefix: `tb-1`, distinct from the other phases' devices on the shared stub.
const PREFIX: &str = "tb";
const TIMEOUT_S: u64 = 5;

/// What to run.
#[derive(Debug, Clone)]
pub struct TbOptions {
    /// Recorded rounds (each: one RPC through each profile).
    pub rounds: usize,
    /// Unrecorded rounds before them.
    pub warmup: usize,
}

/// One profile's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ProfilePath {
    pub profile: &'static str,
    /// The cloud in front of gatewayd and the operator route the RPC was made through.
    pub cloud: &'static str,
    pub route: &'static str,
    /// RPC timed at the operator API client: request sent to answer read.
    pub rpc: Summary,
    /// RPCs not answered with the method's result (not counted as samples).
    pub errors: usize,
    /// CPU time per RPC over the recorded rounds, µs, by process (this gatewayd and its cloud).
    pub cpu_us_per_rpc: BTreeMap<String, f64>,
}

/// The phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TbReport {
    pub device: String,
    pub method: &'static str,
    pub rounds: usize,
    pub warmup_rounds: usize,
    pub native: ProfilePath,
    pub thingsboard: ProfilePath,
    /// thingsboard p50 / native p50.
    pub ratio_p50: f64,
    /// thingsboard p99 / native p99.
    pub ratio_p99: f64,
    /// The CPU figures' resolution: one clock tick divided by the rounds, µs per RPC.
    pub cpu_resolution_us: f64,
}

/// Runs the phase: the native gatewayd on `stub`, the emulator and the thingsboard gatewayd
/// started here (logs and stores under `dir`).
pub async fn measure(stub: &Stub, dir: &Path, opts: &TbOptions) -> Result<TbReport> {
    std::fs::create_dir_all(dir)?;
    let fleet = Fleet::start(dir, PREFIX, 1).await?;
    let device = fleet.devices[0].0.clone();

    let native_dir = dir.join("native");
    std::fs::create_dir_all(&native_dir)?;
    let store = native_dir.join("gatewayd.db");
    let config = GatewayConfig {
        gateway_id: NATIVE_GATEWAY,
        broker: &stub.mqtt,
        store: &store,
        devices: &fleet.devices,
        probe_interval_ms: RPC_PROBE_INTERVAL_MS,
    }
    .render();
    let mut native = Gateway::start(&native_dir, &config).await?;
    await_all_online(&stub.api, NATIVE_GATEWAY, 1, Duration::from_secs(30))
        .await
        .with_context(|| format!("see {}", native.proc.log.display()))?;

    let tb_dir = dir.join("thingsboard");
    std::fs::create_dir_all(&tb_dir)?;
    let tb = TbEmulator::start(&tb_dir, &[(TB_GATEWAY, TB_TOKEN)]).await?;
    let store = tb_dir.join("gatewayd.db");
    let broker = format!("mqtt://{}", tb.mqtt_addr);
    let config = thingsboard_config(
        &GatewayConfig {
            gateway_id: TB_GATEWAY,
            broker: &broker,
            store: &store,
            devices: &fleet.devices,
            probe_interval_ms: RPC_PROBE_INTERVAL_MS,
        }
        .render(),
    )?;
    let mut thingsboard = Gateway::start(&tb_dir, &config).await?;
    tb.await_active(&device, true)
        .await
        .with_context(|| format!("see {}", thingsboard.proc.log.display()))?;

    let calls = Calls {
        stub_api: &stub.api,
        tb: &tb,
        device: &device,
    };
    for round in 0..opts.warmup {
        calls.round(round).await?;
    }
    let pid = |p: &crate::Proc, name: &str| p.child.id().with_context(|| format!("{name} exited"));
    let meter = CpuMeter::start(&[
        ("gatewayd native", pid(&native.proc, "gatewayd (native)")?),
        (
            "gatewayd thingsboard",
            pid(&thingsboard.proc, "gatewayd (thingsboard)")?,
        ),
        ("cloud-stub", pid(&stub.proc, "cloud-stub")?),
        ("tb-emulator", pid(&tb.proc, "tb-emulator")?),
    ])?;
    let (mut native_rpc, mut tb_rpc) = (
        Vec::with_capacity(opts.rounds),
        Vec::with_capacity(opts.rounds),
    );
    let (mut native_errors, mut tb_errors) = (0, 0);
    for round in 0..opts.rounds {
        let (n, t) = calls.round(round).await?;
        match n {
            Some(d) => native_rpc.push(d),
            None => native_errors += 1,
        }
        match t {
            Some(d) => tb_rpc.push(d),
            None => tb_errors += 1,
        }
    }
    let used = meter.used()?;
    let cpu = used.us_per_op(opts.rounds as u64);
    let pick = |names: [&str; 2]| -> BTreeMap<String, f64> {
        names
            .iter()
            .filter_map(|n| cpu.get(*n).map(|v| (n.to_string(), *v)))
            .collect()
    };

    thingsboard.proc.terminate().await?;
    native.proc.terminate().await?;
    drop(tb);
    drop(fleet);

    let native = ProfilePath {
        profile: "native",
        cloud: "cloud-stub",
        route: "POST /api/v1/devices/{device}/methods/{method}",
        rpc: Summary::of(&mut native_rpc),
        errors: native_errors,
        cpu_us_per_rpc: pick(["gatewayd native", "cloud-stub"]),
    };
    let thingsboard = ProfilePath {
        profile: "thingsboard",
        cloud: "tb-emulator",
        route: "POST /api/rpc/twoway/{device}",
        rpc: Summary::of(&mut tb_rpc),
        errors: tb_errors,
        cpu_us_per_rpc: pick(["gatewayd thingsboard", "tb-emulator"]),
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(TbReport {
        device,
        method: METHOD,
        rounds: opts.rounds,
        warmup_rounds: opts.warmup,
        ratio_p50: ratio(thingsboard.rpc.p50_ms, native.rpc.p50_ms),
        ratio_p99: ratio(thingsboard.rpc.p99_ms, native.rpc.p99_ms),
        native,
        thingsboard,
        cpu_resolution_us: 1e6 / used.clk_tck.max(1) as f64 / opts.rounds.max(1) as f64,
    })
}

/// A rendered native configuration turned into a thingsboard one: the profile, and the
/// gateway device's access token as the MQTT user name.
fn thingsboard_config(native: &str) -> Result<String> {
    let anchor = "reconnect_max_ms = 1000\n";
    ensure!(
        native.contains(anchor),
        "the rendered configuration has no `{anchor}` in [cloud]"
    );
    Ok(native.replacen(
        anchor,
        &format!("{anchor}profile = \"thingsboard\"\nusername = \"{TB_TOKEN}\"\n"),
        1,
    ))
}

/// The two operator APIs and the device they call.
struct Calls<'a> {
    stub_api: &'a str,
    tb: &'a TbEmulator,
    device: &'a str,
}

impl Calls<'_> {
    /// One RPC through each profile, native first in even rounds: (native, thingsboard)
    /// durations, `None` for an RPC not answered with a result.
    async fn round(&self, round: usize) -> Result<(Option<Duration>, Option<Duration>)> {
        if round.is_multiple_of(2) {
            let n = self.native().await?;
            let t = self.thingsboard().await?;
            Ok((n, t))
        } else {
            let t = self.thingsboard().await?;
            let n = self.native().await?;
            Ok((n, t))
        }
    }

    async fn native(&self) -> Result<Option<Duration>> {
        let (status, _, took) =
            invoke(self.stub_api, self.device, METHOD, json!({}), TIMEOUT_S).await?;
        Ok((status == 200).then_some(took))
    }

    async fn thingsboard(&self) -> Result<Option<Duration>> {
        let body = json!({"method": METHOD, "params": {}, "timeout": TIMEOUT_S * 1000});
        let started = Instant::now();
        let (status, answer) = self.tb.rpc_twoway(self.device, body).await?;
        let took = started.elapsed();
        Ok((status == 200 && !is_error(&answer)).then_some(took))
    }
}

/// gatewayd's coded error as ThingsBoard relays it: `{"error": .., "code": ..}`.
fn is_error(answer: &Value) -> bool {
    answer.get("code").is_some_and(Value::is_string) && answer.get("error").is_some()
}

impl TbReport {
    /// Table rows: (what, result).
    pub fn rows(&self) -> Vec<(String, String)> {
        let (n, t) = (&self.native, &self.thingsboard);
        let cpu = |p: &ProfilePath, name: &str| {
            p.cpu_us_per_rpc
                .get(name)
                .map_or_else(|| "-".into(), |v| format!("{v:.1}"))
        };
        vec![
            (
                format!(
                    "ThingsBoard profile: RPC `{}` p50 / p99 through each cloud's operator API, {} rounds; native (cloud-stub)",
                    self.method, self.rounds
                ),
                format!("{:.3} / {:.3} ms", n.rpc.p50_ms, n.rpc.p99_ms),
            ),
            (
                "  thingsboard (tb-emulator, POST /api/rpc/twoway)".into(),
                format!("{:.3} / {:.3} ms", t.rpc.p50_ms, t.rpc.p99_ms),
            ),
            (
                "  ratio thingsboard / native, p50 / p99".into(),
                format!("{:.2} / {:.2}", self.ratio_p50, self.ratio_p99),
            ),
            (
                format!(
                    "  gatewayd CPU per RPC, native / thingsboard (one tick = {:.0} µs per RPC)",
                    self.cpu_resolution_us
                ),
                format!(
                    "{} / {} µs",
                    cpu(n, "gatewayd native"),
                    cpu(t, "gatewayd thingsboard")
                ),
            ),
            (
                "  cloud CPU per RPC, cloud-stub / tb-emulator".into(),
                format!(
                    "{} / {} µs",
                    cpu(n, "cloud-stub"),
                    cpu(t, "tb-emulator")
                ),
            ),
            (
                "  errors, native / thingsboard".into(),
                format!("{} / {}", n.errors, t.errors),
            ),
        ]
    }
}

impl Report {
    /// Adds the ThingsBoard profile phase's figures (no targets: a comparison).
    pub fn add_thingsboard(&mut self, tb: TbReport) {
        self.thingsboard = Some(tb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coded_errors_are_told_from_results() {
        assert!(is_error(
            &json!({"error": "device is offline", "code": "device_offline"})
        ));
        assert!(!is_error(&json!({"battery": 80, "mode": "auto"})));
        assert!(!is_error(&json!(81)));
    }

    #[test]
    fn the_thingsboard_config_sets_profile_and_token() {
        let text = thingsboard_config("[cloud]\nreconnect_max_ms = 1000\n\n[store]\n").unwrap();
        assert!(text.contains("profile = \"thingsboard\"\nusername = \"bench-tb-token\"\n"));
        assert!(thingsboard_config("[cloud]\n").is_err());
    }
}
