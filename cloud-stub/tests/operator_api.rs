//! The operator API's registry and RPC end to end, in-process: embedded broker on a free port,
//! the real `run()` on `127.0.0.1:0`, and a fake gateway speaking the wire protocol through a
//! raw rumqttc client (see `common/`).

mod common;

use cloud_stub::security::Secret;
use cloud_stub::StubConfig;
use common::{setup, FakeGateway, Stub, DEVICE, GW};
use gatewayd_protocol::{RpcError, RpcOutcome, RpcSuccess};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn ok(result: Value) -> RpcOutcome {
    RpcOutcome::Ok(RpcSuccess {
        status: 200,
        result,
    })
}

#[tokio::test]
async fn rpc_round_trip_returns_the_device_result() {
    let (stub, mut gateway) = setup().await;
    let (_, gateways) = stub.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["id"], GW);
    assert_eq!(gateways[0]["devices"], json!([DEVICE]));
    let (status, device) = stub.get(&format!("/api/v1/devices/{DEVICE}")).await;
    assert_eq!(status, 200);
    assert_eq!(device["methods"][1]["name"], "move");

    let mut latencies = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let call = stub.call(
            DEVICE,
            "move",
            json!({"params": {"x": i}, "timeout_seconds": 5}),
        );
        let answer = async {
            let req = gateway.next_request().await;
            assert_eq!(req.device.as_str(), DEVICE);
            assert_eq!(req.method, "move");
            assert_eq!(req.params, json!({"x": i}));
            assert_eq!(req.timeout_ms, 5000);
            assert!(req.deadline_ms > req.timeout_ms);
            gateway.answer(&req, ok(json!({"moved": i}))).await;
        };
        let ((status, body), ()) = tokio::join!(call, answer);
        latencies.push(started.elapsed());
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"status": 200, "result": {"moved": i}}));
    }
    latencies.sort();
    eprintln!("rpc round trip median: {:?}", latencies[2]);
    stub.stop().await;
}

#[tokio::test]
async fn refused_calls_fail_fast_and_publish_nothing() {
    let (stub, mut gateway) = setup().await;
    let (status, body) = stub.call("agv-9", "status", json!({})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let (status, body) = stub.call(DEVICE, "fly", json!({})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("method_not_found"))
    );
    assert_eq!(
        body["message"],
        "device agv-1 has no method 'fly'; it has: status, move"
    );
    let (status, body) = stub
        .call(DEVICE, "move", json!({"params": {"x": "far"}}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_params"))
    );
    let (status, body) = stub
        .call(DEVICE, "status", json!({"timeout_seconds": 0}))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let blob = "x".repeat(128 * 1024 + 1);
    let (status, body) = stub
        .call(DEVICE, "move", json!({"params": {"x": blob}}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // The first request the gateway ever sees is this one: nothing above was published.
    let call = stub.call(DEVICE, "status", json!(null));
    let answer = async {
        let req = gateway.next_request().await;
        assert_eq!(req.method, "status");
        assert_eq!(
            req.timeout_ms, 30_000,
            "empty body means the default timeout"
        );
        gateway.answer(&req, ok(json!("idle"))).await;
    };
    let ((status, _), ()) = tokio::join!(call, answer);
    assert_eq!(status, 200);
    stub.stop().await;
}

#[tokio::test]
async fn a_silent_device_times_out_on_time() {
    let (stub, mut gateway) = setup().await;
    let started = Instant::now();
    let (status, body) = stub
        .call(DEVICE, "status", json!({"timeout_seconds": 1}))
        .await;
    let elapsed = started.elapsed();
    assert_eq!((status, body["code"].as_str()), (504, Some("timeout")));
    assert_eq!(
        body["message"],
        "device agv-1 did not answer 'status' within 1s"
    );
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    // A late answer is dropped quietly and the next call works.
    let late = gateway.next_request().await;
    gateway.answer(&late, ok(json!(1))).await;
    let call = stub.call(DEVICE, "status", json!({}));
    let answer = async {
        let req = gateway.next_request().await;
        gateway.answer(&req, ok(json!(2))).await;
    };
    let ((status, body), ()) = tokio::join!(call, answer);
    assert_eq!((status, &body["result"]), (200, &json!(2)));
    stub.stop().await;
}

#[tokio::test]
async fn a_device_error_is_a_bad_gateway_with_the_device_status() {
    let (stub, mut gateway) = setup().await;
    let call = stub.call(DEVICE, "status", json!({}));
    let answer = async {
        let req = gateway.next_request().await;
        let err = RpcError::device(500, json!({"error": "jammed"}), "device answered 500");
        gateway.answer(&req, RpcOutcome::Error(err)).await;
    };
    let ((status, body), ()) = tokio::join!(call, answer);
    assert_eq!(status, 502);
    assert_eq!(body["code"], "device_error");
    assert_eq!(body["device_status"], 500);
    assert_eq!(body["detail"], json!({"error": "jammed"}));
    stub.stop().await;
}

#[tokio::test]
async fn an_offline_gateway_fails_calls_immediately() {
    let (stub, mut gateway) = setup().await;

    // A call in flight when the gateway goes offline fails before its deadline.
    let started = Instant::now();
    let call = stub.call(DEVICE, "status", json!({"timeout_seconds": 10}));
    let go_offline = async {
        gateway.next_request().await;
        gateway.set_online(false).await;
    };
    let ((status, body), ()) = tokio::join!(call, go_offline);
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("gateway_offline"))
    );
    assert_eq!(body["message"], "gateway gw-test went offline");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The next call is refused at once, before anything is published.
    stub.wait_device(DEVICE, |d| d["gateway_online"] == false)
        .await;
    let started = Instant::now();
    let (status, body) = stub
        .call(DEVICE, "status", json!({"timeout_seconds": 10}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("gateway_offline"))
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    gateway.requests.assert_empty();
    let (_, gateways) = stub.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["online"], false);
    stub.stop().await;
}

/// `GET /` lists every route, behind the token like the rest; each listed route is served.
#[tokio::test]
async fn the_root_is_an_index_of_the_api() {
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    config.api_token = Some(Secret::new("s3cret"));
    let stub = Stub::start_with(config).await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    let auth = [("authorization", "Bearer s3cret")];

    let a = stub.request(Method::GET, "/", Value::Null, &[]).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let a = stub
        .request(Method::GET, "/healthz", Value::Null, &[])
        .await;
    assert_eq!(a.status, 200, "liveness stays open");
    let index = stub.request(Method::GET, "/", Value::Null, &auth).await;
    assert_eq!(index.status, 200);
    assert!(index.body["message_statuses"]
        .as_array()
        .unwrap()
        .contains(&json!("may_have_run")));
    let routes = index.body["routes"].as_array().unwrap();
    assert_eq!(routes.len(), cloud_stub::api::ROUTES.len());
    let deadline = Instant::now() + common::WAIT;
    while stub
        .request(
            Method::GET,
            &format!("/api/v1/devices/{DEVICE}"),
            Value::Null,
            &auth,
        )
        .await
        .body["online"]
        != true
    {
        assert!(Instant::now() < deadline, "device never online");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for route in routes {
        let method: Method = route["method"].as_str().unwrap().parse().unwrap();
        let path = route["path"]
            .as_str()
            .unwrap()
            .replace("{id}", DEVICE)
            .replace("{method}", "status")
            .replace("{msg_id}", "0123456789abcdef0123456789abcdef")
            .replace("{file}", "app.js");
        assert!(!route["description"].as_str().unwrap().is_empty());
        // The event stream never ends and the console's files are not JSON: their headers
        // say enough.
        if path == "/api/v1/events" || path.starts_with("/console/") {
            let res = stub
                .http
                .get(format!("{}{path}", stub.api))
                .header("authorization", "Bearer s3cret")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{path}");
            continue;
        }
        let body = match method {
            Method::POST if path.ends_with("/messages") => json!({"payload": 1}),
            Method::POST => json!({"timeout_seconds": 1}),
            Method::PATCH => json!({"maxSpeed": 1}),
            _ => Value::Null,
        };
        let a = stub.request(method.clone(), &path, body, &auth).await;
        let routed = a.status != 405
            && !a.body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no route"));
        assert!(
            routed,
            "{method} {path} is listed but not served: {}",
            a.body
        );
    }
    stub.stop().await;
}
