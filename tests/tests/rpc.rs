//! RPC end to end: the real cloud stub, simulated AGVs and gatewayd, through the operator API.
//! Every guarantee of synchronous RPC is checked here, once against the stub's embedded broker
//! and once against Mosquitto.

use anyhow::Result;
use e2e::*;
use serde_json::json;
use std::time::Duration;

const GW: &str = SITE_GATEWAY;

/// A site (stub, simulated AGVs, gatewayd) on the broker under test.
type Env = Site;

async fn start(broker: Broker, devices: usize) -> Result<Env> {
    Site::start_on(broker, devices, "").await
}

/// The RPC suite; run against each broker.
async fn suite(env: &Env) -> Result<()> {
    let api = &env.stub.api;

    // Success with params, a body template and a result taken by JSON pointer.
    let (s, b, _) = invoke(
        api,
        "agv-1",
        "move",
        json!({"x": 3.0, "y": 4.0, "speed": 5}),
        5,
    )
    .await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], 200);
    assert_eq!(b["result"]["accepted"], true);
    assert_eq!(b["result"]["eta_s"], 1.0);
    let (s, b, _) = invoke(api, "agv-1", "battery", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    assert!(b["result"].is_number(), "{b}");
    // Path, query, header, auth and whole-params body templates all reach the device.
    let (s, b, _) = invoke(api, "agv-1", "echo", json!({"tag": "a b/c", "n": 7}), 5).await?;
    assert_eq!(s, 200, "{b}");
    let echo = &b["result"];
    assert_eq!(echo["path"], "/api/echo");
    assert_eq!(echo["query"], "tag=a+b%2Fc");
    assert_eq!(echo["headers"]["x-request-tag"], "a b/c");
    assert_eq!(echo["headers"]["authorization"], "Bearer demo-token");
    assert_eq!(echo["body"], json!({"tag": "a b/c", "n": 7}));

    // The device clamps: asking 30 with a limit of 20 returns what it stored.
    let (s, b, _) = invoke(api, "agv-1", "set_max_speed", json!({"value": 30}), 5).await?;
    assert_eq!((s, b["result"].clone()), (200, json!(20.0)), "{b}");

    // Unknown device and unknown method: refused by the cloud, nothing published.
    let (s, b, _) = invoke(api, "agv-99", "status", json!(null), 5).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (404, Some("device_not_found")),
        "{b}"
    );
    let (s, b, _) = invoke(api, "agv-1", "fly", json!(null), 5).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (404, Some("method_not_found")),
        "{b}"
    );
    assert!(
        b["message"].as_str().unwrap().contains("move"),
        "lists the methods it has: {b}"
    );

    // Invalid params: refused before any device call.
    let before = env.fleet.view("agv-1").await?["requests"]["/api/move"].clone();
    let (s, b, _) = invoke(api, "agv-1", "move", json!({"x": "left"}), 5).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("invalid_params")),
        "{b}"
    );
    let msg = b["message"].as_str().unwrap();
    assert!(
        msg.contains("param 'x' must be number") && msg.contains("missing required param 'y'"),
        "{msg}"
    );
    assert_eq!(
        env.fleet.view("agv-1").await?["requests"]["/api/move"],
        before
    );

    // The device refuses (422): device_error with its status and answer.
    let (s, b, _) = invoke(
        api,
        "agv-1",
        "move",
        json!({"x": 1, "y": 1, "speed": 500}),
        5,
    )
    .await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    assert_eq!(b["device_status"], 422);
    assert!(
        b["detail"]["error"]
            .as_str()
            .unwrap()
            .contains("above maxSpeed"),
        "{b}"
    );

    // The device errors on everything: device_error 500.
    env.fleet
        .fault("agv-2", json!({"error_status": 500}))
        .await?;
    let (s, b, _) = invoke(api, "agv-2", "status", json!(null), 5).await?;
    assert_eq!(
        (s, b["code"].as_str(), b["device_status"].as_i64()),
        (502, Some("device_error"), Some(500)),
        "{b}"
    );
    env.fleet
        .fault("agv-2", json!({"error_status": null}))
        .await?;

    // The device answers garbage: device_error naming the unreadable answer; it stays online.
    env.fleet.fault("agv-2", json!({"garbage": true})).await?;
    let (s, b, _) = invoke(api, "agv-2", "status", json!(null), 5).await?;
    assert_eq!((s, b["code"].as_str()), (502, Some("device_error")), "{b}");
    assert!(
        b["message"].as_str().unwrap_or("").contains("invalid JSON"),
        "{b}"
    );
    env.fleet.fault("agv-2", json!({"garbage": false})).await?;
    let (s, b, _) = invoke(api, "agv-2", "status", json!(null), 5).await?;
    assert_eq!(s, 200, "the device is still reachable after garbage: {b}");

    // The device stops answering: timeout at the caller's deadline, not a fixed wait.
    env.fleet.fault("agv-2", json!({"hang": true})).await?;
    let (s, b, took) = invoke(api, "agv-2", "status", json!(null), 2).await?;
    assert_eq!((s, b["code"].as_str()), (504, Some("timeout")), "{b}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2500),
        "took {took:?}"
    );
    env.fleet.fault("agv-2", json!({"hang": false})).await?;

    // The device goes down: once the probe notices, calls fail at once with device_offline.
    env.fleet.fault("agv-2", json!({"offline": true})).await?;
    await_device_online(api, "agv-2", false).await?;
    let (s, b, took) = invoke(api, "agv-2", "status", json!(null), 10).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (503, Some("device_offline")),
        "{b}"
    );
    assert!(
        took < Duration::from_millis(300),
        "offline must fail immediately, took {took:?}"
    );
    env.fleet.fault("agv-2", json!({"offline": false})).await?;
    await_device_online(api, "agv-2", true).await?;
    let (s, _, _) = invoke(api, "agv-2", "status", json!(null), 5).await?;
    assert_eq!(s, 200);

    // At most 4 calls in flight per device: 8 calls to a device that takes 400 ms each run in
    // two rounds, and all succeed because the wait stays within their deadline.
    env.fleet.fault("agv-3", json!({"latency_ms": 400})).await?;
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { invoke(&api, "agv-3", "status", json!(null), 5).await })
        })
        .collect();
    for c in calls {
        let (s, b, _) = c.await??;
        assert_eq!(s, 200, "{b}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(790) && took < Duration::from_millis(2000),
        "took {took:?}"
    );
    env.fleet.fault("agv-3", json!({"latency_ms": 0})).await?;
    Ok(())
}

/// 200 concurrent RPCs over 10 devices, each answer matched to its own call.
async fn concurrent(env: &Env) -> Result<()> {
    let mut calls = Vec::new();
    for i in 0..200 {
        let api = env.stub.api.clone();
        let device = format!("agv-{}", i % 10 + 1);
        calls.push(tokio::spawn(async move {
            let tag = format!("call-{i}");
            let (s, b, _) = invoke(&api, &device, "echo", json!({"tag": tag, "n": i}), 20).await?;
            anyhow::ensure!(s == 200, "call {i}: {s} {b}");
            anyhow::ensure!(
                b["result"]["body"] == json!({"tag": tag, "n": i}),
                "call {i} got {b}"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for c in calls {
        c.await??;
    }
    Ok(())
}

/// gatewayd killed: gateway_offline at once; restarted: serves again without operator action.
async fn restart(env: &mut Env) -> Result<()> {
    let api = env.stub.api.clone();
    env.gateway.proc.kill9().await;
    await_gateway_online(&api, GW, false).await?;
    let (s, b, took) = invoke(&api, "agv-1", "status", json!(null), 10).await?;
    assert_eq!(
        (s, b["code"].as_str()),
        (503, Some("gateway_offline")),
        "{b}"
    );
    assert!(took < Duration::from_millis(300), "took {took:?}");

    env.gateway = Gateway::start_with(env.dir.path(), &env.gateway.config_path.clone()).await?;
    await_device_online(&api, "agv-1", true).await?;
    let (s, b, _) = invoke(&api, "agv-1", "status", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");

    // An orderly stop announces the gateway offline too, and exits 0.
    let code = env.gateway.proc.terminate().await?;
    assert_eq!(code, Some(0));
    await_gateway_online(&api, GW, false).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_guarantees_with_the_embedded_broker() -> Result<()> {
    let mut env = start(Broker::Embedded("127.0.0.1:0".into()), 10).await?;
    suite(&env).await?;
    concurrent(&env).await?;
    restart(&mut env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_guarantees_with_mosquitto() -> Result<()> {
    let mosquitto = e2e::Mosquitto::start()?;
    let mut env = start(Broker::External(mosquitto.url.clone()), 10).await?;
    suite(&env).await?;
    concurrent(&env).await?;
    restart(&mut env).await
}

/// The cloud side vanishes (stub and its embedded broker killed) and comes back on the same
/// port: gatewayd reconnects with backoff, re-announces itself, and serves RPCs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reconnects_after_the_broker_restarts() -> Result<()> {
    // Site::start keeps the embedded broker on one port across stub restarts.
    let mut env = Site::start(1).await?;
    env.stub.proc.kill9().await;
    let (s, _, _) = invoke(&env.stub.api, "agv-1", "status", json!(null), 5)
        .await
        .unwrap_or((0, json!(null), Duration::ZERO));
    assert_eq!(s, 0, "the operator API is gone with the stub");

    env.restart_stub().await?;
    await_device_online(&env.stub.api, "agv-1", true).await?;
    let (s, b, _) = invoke(&env.stub.api, "agv-1", "status", json!(null), 5).await?;
    assert_eq!(s, 200, "{b}");
    Ok(())
}

/// Garbage on every topic gatewayd listens to: it keeps running, answers what it can (an RPC
/// whose id is readable gets `bad_request`, or `unsupported_version` from a newer protocol),
/// and serves the next real call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_publishes_never_take_the_gateway_down() -> Result<()> {
    let env = start(Broker::Embedded("127.0.0.1:0".into()), 1).await?;
    let raw = e2e::raw::Raw::connect("garbage-cloud", &env.stub.mqtt, Default::default())
        .await?
        .map_err(|why| anyhow::anyhow!("cannot connect: {why}"))?;
    let mut raw = raw;
    let code = raw.subscribe("gw/site-1/up/rpc/res").await?;
    assert!(!e2e::raw::failed(code));
    for (topic, payload) in [
        ("gw/site-1/down/rpc/req", json!("not an object")),
        (
            "gw/site-1/down/rpc/req",
            json!({"id": "bad-1", "device": "agv-1"}),
        ),
        (
            "gw/site-1/down/rpc/req",
            json!({"v": 99, "id": "bad-2", "device": "agv-1", "method": "status", "timeout_ms": 1000, "deadline_ms": 1}),
        ),
        (
            "gw/site-1/down/twin/desired",
            json!({"device": "agv-1", "version": "x"}),
        ),
        ("gw/site-1/down/msg", json!({"id": "m", "payload": null})),
        ("gw/site-1/down/unknown", json!({})),
    ] {
        assert!(
            raw.publish_acked(topic, &payload, false).await?,
            "broker took {topic}"
        );
    }
    // Answers may have arrived while the publishes were being acknowledged.
    let mut answers = std::collections::HashMap::new();
    for (_, p) in raw.received.drain(..) {
        let v: serde_json::Value = serde_json::from_slice(&p)?;
        answers.insert(v["id"].as_str().unwrap_or("").to_string(), v);
    }
    for id in ["bad-1", "bad-2"] {
        if !answers.contains_key(id) {
            let v = raw.response("gw/site-1/up/rpc/res", id).await?;
            answers.insert(id.to_string(), v);
        }
    }
    let answer = &answers["bad-1"];
    assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("malformed payload"),
        "{answer}"
    );
    let answer = &answers["bad-2"];
    assert_eq!(answer["error"]["code"], "unsupported_version", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("version 99"),
        "{answer}"
    );

    let (s, b, _) = invoke(&env.stub.api, "agv-1", "status", json!(null), 5).await?;
    assert_eq!(s, 200, "still serving: {b}");
    Ok(())
}
