//! Sequential RPC latency and its two baselines, measured in the same rounds: each round makes
//! one direct HTTP call to the device, one MQTT round trip through the broker with no gateway,
//! and one RPC through gatewayd, so all three see the same background load.

use super::cloud::Cloud;
use super::stats::Summary;
use anyhow::{bail, Result};
use gatewayd_protocol::GatewayId;
use serde::Serialize;
use std::time::{Duration, Instant};

/// The method measured, and the device path it maps to (`AGV_METHODS`).
pub const METHOD: &str = "status";
pub const PATH: &str = "/api/status";
/// The token the generated configuration sends.
pub const TOKEN: &str = "demo-token";
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the sequential phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Device called.
    pub device: String,
    pub warmup_rounds: usize,
    /// RPC through gatewayd, timed at the cloud side (publish to answer).
    pub gateway: Summary,
    /// Direct HTTP call to the same device endpoint.
    pub direct_http: Summary,
    /// MQTT round trip through the same broker, no gateway.
    pub mqtt_round_trip: Summary,
    /// gateway p50 - (direct p50 + MQTT round trip p50).
    pub overhead_p50_ms: f64,
    /// RPCs answered with an error (not counted as samples).
    pub rpc_errors: usize,
}

/// Runs `warmup` unrecorded rounds, then `rounds` recorded ones against `device` (name, API
/// base URL).
pub async fn measure(
    cloud: &Cloud,
    gateway: &GatewayId,
    device: &(String, String),
    warmup: usize,
    rounds: usize,
) -> Result<Latency> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()?;
    let url = format!("{}{PATH}", device.1);
    let (name, _) = device;
    let mut gw = Vec::with_capacity(rounds);
    let mut direct = Vec::with_capacity(rounds);
    let mut mqtt = Vec::with_capacity(rounds);
    let mut rpc_errors = 0;
    for round in 0..warmup + rounds {
        let record = round >= warmup;

        let started = Instant::now();
        let resp = http.get(&url).bearer_auth(TOKEN).send().await?;
        let status = resp.status();
        resp.bytes().await?;
        let took = started.elapsed();
        if !status.is_success() {
            bail!("direct call to {url} answered {status}");
        }
        if record {
            direct.push(took);
        }

        let (_, took) = cloud.echo(name, TIMEOUT).await?;
        if record {
            mqtt.push(took);
        }

        let (reply, took) = cloud.rpc(gateway, name, METHOD, TIMEOUT).await?;
        match reply.error {
            Some(_) if record => rpc_errors += 1,
            None if record => gw.push(took),
            _ => {}
        }
    }
    let gateway = Summary::of(&mut gw);
    let direct_http = Summary::of(&mut direct);
    let mqtt_round_trip = Summary::of(&mut mqtt);
    Ok(Latency {
        device: name.clone(),
        warmup_rounds: warmup,
        overhead_p50_ms: gateway.p50_ms - (direct_http.p50_ms + mqtt_round_trip.p50_ms),
        gateway,
        direct_http,
        mqtt_round_trip,
        rpc_errors,
    })
}
