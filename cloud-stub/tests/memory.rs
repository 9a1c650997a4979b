//! Memory stays flat under RPC traffic: the real `cloud-stub` binary (embedded broker, in-memory
//! store) in its own process, a fake gateway answering every request, and the stub's RSS read
//! from `/proc` after a warm-up and again after many more calls. `STUB_RSS_CALLS=100000` makes
//! a longer run (the figure it prints is the one to compare); `STUB_RSS_BROKER=mqtt://host:port`
//! runs the stub behind that broker (e.g. Mosquitto) instead of its embedded one.

mod common;

use common::process::StubProcess;
use common::{FakeGateway, DEVICE};
use gatewayd_protocol::{GatewayId, RpcOutcome, RpcResponse, RpcSuccess, Topics, Up};
use serde_json::json;
use std::time::Instant;

/// Calls made before the first reading: enough for the broker's logs, the allocator and every
/// buffer to reach their steady size.
const WARM_UP: usize = 10_000;
/// Calls made between the two readings, unless `STUB_RSS_CALLS` says otherwise.
const MEASURED: usize = 20_000;
/// Calls in flight at once.
const CONCURRENCY: usize = 32;
/// Growth allowed between the readings. Unbounded, the stub grew by about 750 bytes per call
/// here (15 MB over this run); bounded, it stays within noise.
const MARGIN_KIB: u64 = 4 * 1024;

/// Makes `n` calls, `CONCURRENCY` at a time, each expecting a 200.
async fn calls(stub: &StubProcess, n: usize) {
    let url = format!("{}/api/v1/devices/{DEVICE}/methods/status", stub.api);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let (http, url) = (stub.http.clone(), url.clone());
        let share = n / CONCURRENCY + usize::from(worker < n % CONCURRENCY);
        tasks.spawn(async move {
            for _ in 0..share {
                let res = http
                    .post(&url)
                    .json(&json!({"timeout_seconds": 10}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status().as_u16(), 200);
                res.bytes().await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// Answers every request the fake gateway receives with a small result.
fn answer_everything(gateway: &mut FakeGateway) -> tokio::task::JoinHandle<()> {
    let mut requests = std::mem::replace(&mut gateway.requests, common::Inbox::closed());
    let client = gateway.client.clone();
    let topic = Topics::up(&GatewayId::new(common::GW).unwrap(), Up::RpcResponse);
    tokio::spawn(async move {
        while let Some(req) = requests.next_or_closed().await {
            let res = RpcResponse {
                v: 1,
                id: req.id,
                outcome: RpcOutcome::Ok(RpcSuccess {
                    status: 200,
                    result: json!({"speed": 1.5, "battery": 87}),
                }),
            };
            let payload = serde_json::to_vec(&res).unwrap();
            client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_flat_over_many_rpcs() {
    let broker = std::env::var("STUB_RSS_BROKER").ok();
    let mut args = vec!["--db", ":memory:"];
    match &broker {
        Some(url) => args.extend(["--broker", url.as_str()]),
        None => args.extend(["--mqtt-listen", "127.0.0.1:0"]),
    }
    let stub = StubProcess::start(&args, "warn");
    let mut gateway = FakeGateway::connect(&stub.mqtt).await;
    gateway.announce().await;
    stub.wait_for(&format!("/api/v1/devices/{DEVICE}"), |d| {
        d["online"] == true
    })
    .await;
    let answering = answer_everything(&mut gateway);

    let measured_calls = std::env::var("STUB_RSS_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MEASURED);
    let start = stub.rss_kib();
    let started = Instant::now();
    calls(&stub, WARM_UP).await;
    let before = stub.rss_kib();
    let measured = Instant::now();
    calls(&stub, measured_calls).await;
    let after = stub.rss_kib();
    let rate = measured_calls as f64 / measured.elapsed().as_secs_f64();
    eprintln!(
        "stub RSS: {start} KiB idle, {before} KiB after {WARM_UP} calls ({:?}), {after} KiB \
         after {measured_calls} more ({rate:.0}/s): {:+} KiB, {:.0} B per call",
        measured - started,
        after as i64 - before as i64,
        (after as f64 - before as f64) * 1024.0 / measured_calls as f64
    );
    answering.abort();
    assert!(
        after <= before + MARGIN_KIB,
        "stub RSS grew from {before} KiB to {after} KiB over {measured_calls} calls"
    );
}
