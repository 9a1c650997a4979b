//! RPC throughput: a fixed number of calls kept in flight, spread round-robin over the devices,
//! for a fixed time, next to two floors run right after it at the same concurrency, for the
//! same time, against the same processes:
//!
//! - the MQTT echo: the same RPC requests through the same broker to a responder that answers
//!   each one at once on a gateway's answer topic (the bench's echo session), so no gateway
//!   logic and no device call: what the broker, the stub's session and an MQTT client cost at
//!   this load;
//! - direct HTTP: the devices' status call made straight from the bench, as gatewayd makes it.
//!
//! The gateway's rate is also given as a share of the echo floor's, which holds across
//! machines better than calls per second. The CPU each process used in each run is recorded,
//! as percent of a core and as microseconds per call (`/proc/<pid>/stat`).

use super::cloud::Cloud;
use super::latency::{METHOD, PATH, TOKEN};
use super::procfs::{CpuMeter, CpuUsed};
use super::stats::Summary;
use anyhow::Result;
use gatewayd_protocol::GatewayId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);
/// Unrecorded run before each measurement, so every device has a warm connection.
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
    /// Microseconds of CPU each process used per answered call.
    pub cpu_us_per_call: BTreeMap<String, f64>,
    /// `/proc` clock ticks per second the CPU figures were read in.
    pub clk_tck: u64,
    /// The same load as MQTT round trips through the same broker, no gateway.
    pub echo_floor: Floor,
    /// The same load as direct HTTP calls to the devices, no MQTT, no gateway.
    pub http_floor: Floor,
    /// `calls_per_s` as percent of the echo floor's.
    pub of_echo_floor_percent: f64,
    /// `calls_per_s` as percent of the direct HTTP floor's.
    pub of_http_floor_percent: f64,
}

/// One floor run: the same concurrency and length as the gateway's, without the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// What was called.
    pub what: &'static str,
    pub elapsed_s: f64,
    /// Answers per second.
    pub calls_per_s: f64,
    pub ok: u64,
    /// Answers that were not a success (HTTP status other than 2xx).
    pub errors: u64,
    /// Calls with no answer within 10 s (or a transport error).
    pub lost: u64,
    /// Latency of successful calls.
    pub latency: Summary,
    pub cpu_percent: BTreeMap<String, f64>,
    pub cpu_us_per_call: BTreeMap<String, f64>,
}

/// How one call ended: `Ok((None, took))` success, `Ok((Some(code), _))` an error answer,
/// `Err` no answer.
type Outcome = Result<(Option<String>, Duration)>;

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    lost: u64,
    latencies: Vec<Duration>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }
}

/// Runs `in_flight` callers over `devices` (name, API base URL) for `duration` through the
/// gateway, then the echo and direct HTTP floors, each after a short warm-up; `pids` are the
/// processes whose CPU use is reported.
pub async fn measure(
    cloud: Arc<Cloud>,
    gateway: &GatewayId,
    devices: &[(String, String)],
    in_flight: usize,
    duration: Duration,
    pids: &[(&str, u32)],
) -> Result<Throughput> {
    let names: Arc<[String]> = devices.iter().map(|(n, _)| n.clone()).collect();

    let rpc = {
        let (cloud, gateway, names) = (cloud.clone(), gateway.clone(), names.clone());
        Arc::new(move |i: usize| {
            let (cloud, gateway, names) = (cloud.clone(), gateway.clone(), names.clone());
            async move {
                let (reply, took) = cloud.rpc(&gateway, &names[i], METHOD, TIMEOUT).await?;
                Ok((reply.error.map(|c| c.to_string()), took))
            }
        })
    };
    let (tally, used) = timed(devices.len(), in_flight, duration, pids, rpc).await?;

    eprintln!("bench:    floor: MQTT echo, {in_flight} in flight");
    let echo = {
        let (cloud, names) = (cloud.clone(), names.clone());
        Arc::new(move |i: usize| {
            let (cloud, names) = (cloud.clone(), names.clone());
            async move {
                let (_, took) = cloud.echo(&names[i], TIMEOUT).await?;
                Ok((None, took))
            }
        })
    };
    let (echo, echo_used) = timed(devices.len(), in_flight, duration, pids, echo).await?;
    let echo_floor = Floor::of("MQTT echo through the same broker", echo, &echo_used);

    eprintln!("bench:    floor: direct HTTP, {in_flight} in flight");
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(TIMEOUT)
        .pool_max_idle_per_host(in_flight)
        .build()?;
    let urls: Arc<[String]> = devices
        .iter()
        .map(|(_, base)| format!("{base}{PATH}"))
        .collect();
    let direct = Arc::new(move |i: usize| {
        let (http, urls) = (http.clone(), urls.clone());
        async move {
            let started = Instant::now();
            let resp = http.get(&urls[i]).bearer_auth(TOKEN).send().await?;
            let status = resp.status();
            resp.bytes().await?;
            let took = started.elapsed();
            Ok((
                (!status.is_success()).then(|| status.as_u16().to_string()),
                took,
            ))
        }
    });
    let (direct, direct_used) = timed(devices.len(), in_flight, duration, pids, direct).await?;
    let http_floor = Floor::of("direct HTTP to the devices", direct, &direct_used);

    let answered = tally.answered();
    let elapsed = used.elapsed.as_secs_f64();
    let calls_per_s = answered as f64 / elapsed;
    let errors: u64 = tally.errors.values().sum();
    let mut latencies = tally.latencies;
    Ok(Throughput {
        in_flight,
        devices: devices.len(),
        elapsed_s: elapsed,
        calls_per_s,
        ok: tally.ok,
        errors,
        error_codes: tally.errors,
        lost: tally.lost,
        latency: Summary::of(&mut latencies),
        cpu_percent: used.percent().into_iter().collect(),
        cpu_us_per_call: used.us_per_op(answered),
        clk_tck: used.clk_tck,
        of_echo_floor_percent: percent_of(calls_per_s, echo_floor.calls_per_s),
        of_http_floor_percent: percent_of(calls_per_s, http_floor.calls_per_s),
        echo_floor,
        http_floor,
    })
}

impl Floor {
    fn of(what: &'static str, tally: Tally, used: &CpuUsed) -> Floor {
        let answered = tally.answered();
        let mut latencies = tally.latencies;
        Floor {
            what,
            elapsed_s: used.elapsed.as_secs_f64(),
            calls_per_s: answered as f64 / used.elapsed.as_secs_f64(),
            ok: tally.ok,
            errors: answered - tally.ok,
            lost: tally.lost,
            latency: Summary::of(&mut latencies),
            cpu_percent: used.percent().into_iter().collect(),
            cpu_us_per_call: used.us_per_op(answered),
        }
    }
}

/// `part` as percent of `whole` (0 when `whole` is 0).
fn percent_of(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// A warm-up, then one measured run with the CPU of `pids` metered over it.
async fn timed<F, Fut>(
    devices: usize,
    in_flight: usize,
    duration: Duration,
    pids: &[(&str, u32)],
    call: Arc<F>,
) -> Result<(Tally, CpuUsed)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    drive(devices, in_flight, WARMUP, call.clone()).await;
    let cpu = CpuMeter::start(pids)?;
    let tally = drive(devices, in_flight, duration, call).await;
    Ok((tally, cpu.used()?))
}

/// Keeps `in_flight` calls going, `call(i)` with `i` the device index taken round-robin,
/// until `duration` has passed, then waits for the last answers.
async fn drive<F, Fut>(devices: usize, in_flight: usize, duration: Duration, call: Arc<F>) -> Tally
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let end = Instant::now() + duration;
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < end {
                    let device = next.fetch_add(1, Ordering::Relaxed) % devices;
                    match call(device).await {
                        Ok((None, took)) => {
                            tally.ok += 1;
                            tally.latencies.push(took);
                        }
                        Ok((Some(code), _)) => *tally.errors.entry(code).or_default() += 1,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drive_counts_answers_errors_and_losses() {
        let call = Arc::new(|i: usize| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            match i % 4 {
                0 => Ok((Some("timeout".to_string()), Duration::ZERO)),
                1 => Err(anyhow::anyhow!("no answer")),
                _ => Ok((None, Duration::from_millis(1))),
            }
        });
        let tally = drive(4, 4, Duration::from_millis(50), call).await;
        assert!(
            tally.ok > 0 && tally.lost > 0,
            "{} {}",
            tally.ok,
            tally.lost
        );
        assert_eq!(tally.latencies.len() as u64, tally.ok);
        assert_eq!(tally.answered(), tally.ok + tally.errors["timeout"]);
    }

    #[test]
    fn shares_of_a_floor() {
        assert!((percent_of(15_000.0, 25_000.0) - 60.0).abs() < 1e-9);
        assert_eq!(percent_of(1.0, 0.0), 0.0);
    }
}
