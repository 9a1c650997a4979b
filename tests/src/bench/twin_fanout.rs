//! Twin fan-out: one desired change to each of many devices behind one gateway, sent as fast as
//! the operator API takes them, and timed from the first PATCH until the operator API shows
//! reported == desired for every device. The stub's own stamps (desired committed, applied at
//! the device, reported back) tell which stage the time went to, and the CPU each process used
//! over that window, divided by the properties applied, what one costs.

use super::load::{self, Burst};
use super::procfs::{self, CpuMeter};
use super::rig::Rig;
use super::stats::Summary;
use crate::{get, patch, Stub};
use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Probe interval of this phase: long, so probes stay out of the figures.
pub const PROBE_INTERVAL_MS: u64 = 60_000;
/// The property changed (`[devices.*.twin.maxSpeed]` in the generated configuration).
pub const PROPERTY: &str = "maxSpeed";
/// Below the simulated AGV's limit (20) and unlike its factory value (10): the device holds
/// exactly what was asked, and a matching `reported` can only come from this change.
pub const VALUE: f64 = 12.5;
/// Longest wait for every twin to match after the last PATCH was answered.
const DEADLINE: Duration = Duration::from_secs(60);
/// Twin reads in flight while polling.
const POLL_IN_FLIGHT: usize = 16;
/// Longest wait, after convergence, for gatewayd to close its idle device connections and
/// hand their memory back.
const CLOSE_MAX: Duration = Duration::from_secs(30);
/// Longest wait for gatewayd to go quiet after its start, before the CPU window opens.
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_STEP: Duration = Duration::from_millis(250);

/// What the twin fan-out phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct TwinFanout {
    pub devices: usize,
    pub property: &'static str,
    pub value: f64,
    /// From gatewayd's start until the stub showed every device online, seconds.
    pub ready_after_s: f64,
    /// From then until gatewayd used no CPU for one 250 ms step (at most 10 s), seconds.
    pub settled_after_s: f64,
    /// The PATCHes at the operator API (expected answer 200).
    pub patches: Burst,
    /// From the first PATCH until the operator API showed reported == desired for every
    /// device, seconds (until the deadline when some never did).
    pub elapsed_s: f64,
    /// Devices whose twin showed reported == desired.
    pub converged: usize,
    /// Devices that did not by the deadline (a failed PATCH counts here too).
    pub not_converged: usize,
    pub stages: TwinStages,
    /// Percent of one core used by each process from the first PATCH until convergence.
    pub cpu_percent: BTreeMap<String, f64>,
    /// Microseconds of CPU each process used over the same window per property applied (one
    /// per converged device).
    pub cpu_us_per_property: BTreeMap<String, f64>,
    /// gatewayd's peak RSS (`VmHWM`), KiB, with a kept connection to every device it called.
    pub peak_rss_kib: u64,
    /// gatewayd's RSS after its idle device connections were closed (its open files back
    /// below [`SOCKETS_LEFT`]) and its RSS held for 6 s, KiB, and how long after convergence
    /// that was, seconds; `None` when that took more than 30 s.
    pub after_close: Option<(u64, f64)>,
}

/// Open files below which gatewayd counts as having closed its device connections.
pub const SOCKETS_LEFT: usize = 100;

/// When the last device passed each stage, as the stub stamped it, in seconds after the first
/// PATCH (wall clock, millisecond stamps).
#[derive(Debug, Clone, Serialize)]
pub struct TwinStages {
    /// The stub committed the desired change (`desired_updated_ms`).
    pub desired_committed_s: Option<f64>,
    /// gatewayd's device call finished (`apply.<property>.at_ms`, gatewayd's clock).
    pub applied_at_device_s: Option<f64>,
    /// The stub applied the reported patch (`reported_updated_ms`).
    pub reported_at_stub_s: Option<f64>,
    /// Per device: desired committed at the stub until reported applied at the stub.
    pub desired_to_reported: Summary,
}

/// Starts `devices` devices and a gatewayd for them on `stub`, PATCHes the desired
/// [`PROPERTY`] of every device with `in_flight` requests at once, and polls the twins until
/// each matches. `pids` are further processes whose CPU use is reported (the stub, the bench).
pub async fn measure(
    stub: &Stub,
    dir: &Path,
    devices: usize,
    in_flight: usize,
    pids: &[(&str, u32)],
) -> Result<TwinFanout> {
    let rig = Rig::start(stub, dir, "bench-tw", "tw", devices, PROBE_INTERVAL_MS).await?;
    eprintln!(
        "bench:    gatewayd up with {devices} devices, all online after {:.1} s",
        rig.ready_after.as_secs_f64()
    );
    let mut all_pids = vec![("gatewayd", rig.gateway_pid()?)];
    all_pids.extend(rig.fleet_pids()?);
    all_pids.extend_from_slice(pids);
    let settled_after = procfs::settle(all_pids[0].1, SETTLE_STEP, SETTLE_MAX).await?;
    let api = stub.api.clone();
    let names: Arc<Vec<String>> =
        Arc::new(rig.fleet.devices.iter().map(|(n, _)| n.clone()).collect());

    let cpu = CpuMeter::start(&all_pids)?;
    let body = json!({ PROPERTY: VALUE });
    let sent = {
        let (api, names) = (api.clone(), names.clone());
        load::burst(names.len(), in_flight, 200, move |i| {
            let url = format!("{api}/api/v1/devices/{}/twin/desired", names[i]);
            let body = body.clone();
            async move {
                let (status, answer) = patch(&url, &body, None).await?;
                Ok((
                    status,
                    answer["desired_version"].as_u64().unwrap_or(u64::MAX),
                ))
            }
        })
        .await
    };
    eprintln!(
        "bench:    {} PATCHes answered in {:.3} s ({:.0}/s), {} not 200",
        sent.burst.requests,
        sent.burst.elapsed_s,
        sent.burst.per_s,
        sent.burst.requests - sent.burst.ok
    );

    // Every device whose change was accepted, with the desired version it must reach.
    let versions: Arc<BTreeMap<usize, u64>> = Arc::new(
        sent.answers
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect(),
    );
    let polled = {
        let (api, names, versions) = (api.clone(), names.clone(), versions.clone());
        load::poll_until_done(
            versions.keys().copied().collect(),
            POLL_IN_FLIGHT,
            Instant::now() + DEADLINE,
            move |i| {
                let url = format!("{api}/api/v1/devices/{}/twin", names[i]);
                let version = versions[&i];
                async move {
                    let (status, twin) = get(&url).await?;
                    Ok((status == 200 && matches(&twin, version)).then_some(twin))
                }
            },
        )
        .await
    };
    let end = polled.all_done_at.unwrap_or_else(Instant::now);
    let used = cpu.used()?;
    let elapsed = end.saturating_duration_since(sent.started);

    let twins: Vec<&Value> = polled.done.values().collect();
    std::fs::write(dir.join("twins.json"), serde_json::to_vec(&twins)?)?;
    let stamp = |t: &Value, pointer: &str| t.pointer(pointer).and_then(Value::as_u64);
    let desired_ptr = format!("/desired_updated_ms/{PROPERTY}");
    let applied_ptr = format!("/apply/{PROPERTY}/at_ms");
    let reported_ptr = format!("/reported_updated_ms/{PROPERTY}");
    let t0 = sent.started_ms;
    let mut desired_to_reported: Vec<Duration> = twins
        .iter()
        .filter_map(|t| {
            let (d, r) = (stamp(t, &desired_ptr)?, stamp(t, &reported_ptr)?);
            Some(Duration::from_millis(r.saturating_sub(d)))
        })
        .collect();
    let stages = TwinStages {
        desired_committed_s: load::last_after(
            t0,
            twins.iter().filter_map(|t| stamp(t, &desired_ptr)),
        ),
        applied_at_device_s: load::last_after(
            t0,
            twins.iter().filter_map(|t| stamp(t, &applied_ptr)),
        ),
        reported_at_stub_s: load::last_after(
            t0,
            twins.iter().filter_map(|t| stamp(t, &reported_ptr)),
        ),
        desired_to_reported: Summary::of(&mut desired_to_reported),
    };
    let converged = polled.done.len();
    let gateway = rig.gateway_pid()?;
    let peak_rss_kib = procfs::memory(gateway)?.hwm_kib;
    let after_close = closed_after(gateway, end).await?;
    let result = TwinFanout {
        devices,
        property: PROPERTY,
        value: VALUE,
        ready_after_s: rig.ready_after.as_secs_f64(),
        settled_after_s: settled_after.as_secs_f64(),
        patches: sent.burst,
        elapsed_s: elapsed.as_secs_f64(),
        converged,
        not_converged: devices - converged,
        stages,
        cpu_percent: used.percent().into_iter().collect(),
        cpu_us_per_property: used.us_per_op(converged as u64),
        peak_rss_kib,
        after_close,
    };
    rig.stop().await?;
    Ok(result)
}

/// Waits until `pid` has fewer than [`SOCKETS_LEFT`] open files and then until its RSS has
/// not fallen for 6 s (gatewayd hands freed memory back every 5 s); that RSS and the seconds
/// since `since`.
async fn closed_after(pid: u32, since: Instant) -> Result<Option<(u64, f64)>> {
    const STEP: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + CLOSE_MAX;
    let dir = format!("/proc/{pid}/fd");
    while std::fs::read_dir(&dir)?.count() >= SOCKETS_LEFT {
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(STEP).await;
    }
    let (mut low, mut held) = (procfs::memory(pid)?.rss_kib, 0);
    while held < 24 {
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(STEP).await;
        let rss = procfs::memory(pid)?.rss_kib;
        if rss < low {
            (low, held) = (rss, 0);
        } else {
            held += 1;
        }
    }
    Ok(Some((low, since.elapsed().as_secs_f64())))
}

/// Whether `twin` shows the property reported as desired, for desired `version` or later.
fn matches(twin: &Value, version: u64) -> bool {
    let reported = twin["reported"][PROPERTY].as_f64();
    let desired = twin["desired"][PROPERTY].as_f64();
    let applied_for = twin["apply"][PROPERTY]["desired_version"].as_u64();
    reported.is_some()
        && reported == desired
        && applied_for.is_some_and(|v| v >= version)
        && !twin["delta"]
            .as_array()
            .is_some_and(|d| d.iter().any(|p| p == PROPERTY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_twin_matches_only_once_the_change_is_reported() {
        let done = json!({
            "desired": {"maxSpeed": 12.5}, "reported": {"maxSpeed": 12.5}, "delta": [],
            "apply": {"maxSpeed": {"state": "applied", "desired_version": 1}}
        });
        assert!(matches(&done, 1));
        assert!(!matches(&done, 2), "an older application does not count");
        let pending = json!({"desired": {"maxSpeed": 12.5}, "reported": {}, "delta": ["maxSpeed"]});
        assert!(!matches(&pending, 1));
    }
}
