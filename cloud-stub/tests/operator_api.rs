//! The operator API end to end, in-process: embedded broker on a free port, the real `run()`
//! on `127.0.0.1:0`, and a fake gateway speaking the wire protocol through a raw rumqttc client.

use cloud_stub::{DbLocation, MqttTarget, StubConfig};
use gatewayd_protocol::{
    Catalog, DevicePresence, GatewayId, GatewayState, RpcError, RpcOutcome, RpcRequest,
    RpcResponse, RpcSuccess, Topics, Up,
};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const GW: &str = "gw-test";
const DEVICE: &str = "agv-1";

/// A running stub and the URL of its API.
struct Stub {
    api: String,
    http: reqwest::Client,
    broker: MqttTarget,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cloud_stub::StubError>>,
}

impl Stub {
    async fn start() -> Stub {
        let listen = cloud_stub::resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
        cloud_stub::start_embedded_broker(listen).unwrap();
        cloud_stub::wait_until_accepting(listen, Duration::from_secs(5))
            .await
            .unwrap();
        let broker = MqttTarget {
            host: "127.0.0.1".into(),
            port: listen.port(),
        };
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let config = StubConfig::new(broker.clone(), DbLocation::Memory);
        let task = tokio::spawn(cloud_stub::run(config, api, shutdown.clone()));
        Stub {
            api: url,
            http: reqwest::Client::new(),
            broker,
            shutdown,
            task,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap())
    }

    /// Invokes a method; a `null` body sends no body at all.
    async fn call(&self, device: &str, method: &str, body: Value) -> (u16, Value) {
        let url = format!("{}/api/v1/devices/{device}/methods/{method}", self.api);
        let req = self.http.post(url);
        let req = if body.is_null() { req } else { req.json(&body) };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap())
    }

    /// Polls `GET /api/v1/devices/{id}` until `pred` holds, for at most 5 s.
    async fn wait_device(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) = self.get(&format!("/api/v1/devices/{id}")).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "device {id} never matched: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("stub stops within 5 s")
            .unwrap()
            .unwrap();
    }
}

/// A gateway played by the test: it publishes the retained messages and hands every RPC
/// request it receives to the test, which answers (or not).
struct FakeGateway {
    id: GatewayId,
    client: AsyncClient,
    requests: mpsc::UnboundedReceiver<RpcRequest>,
}

impl FakeGateway {
    async fn connect(broker: &MqttTarget) -> FakeGateway {
        let id = GatewayId::new(GW).unwrap();
        let mut options = MqttOptions::new(format!("fake-{GW}"), broker.host.clone(), broker.port);
        options.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        eventloop.set_network_options(NetworkOptions::new());
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (suback_tx, mut suback) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        match gatewayd_protocol::decode::<RpcRequest>(&p.payload) {
                            Ok(r) => {
                                let _ = req_tx.send(r);
                            }
                            Err(e) => panic!("fake gateway got a malformed request: {e}"),
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client
            .subscribe(Topics::down_filter(&id), QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), suback.recv())
            .await
            .expect("suback within 5 s");
        FakeGateway {
            id,
            client,
            requests,
        }
    }

    async fn publish(&self, kind: Up, payload: Value, retain: bool) {
        let topic = Topics::up(&self.id, kind);
        let bytes = serde_json::to_vec(&payload).unwrap();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, bytes)
            .await
            .unwrap();
    }

    async fn set_online(&self, online: bool) {
        let state = GatewayState {
            v: 1,
            online,
            boot_id: "boot-1".into(),
            software: "test".into(),
            at_ms: 0,
        };
        self.publish(Up::State, serde_json::to_value(state).unwrap(), true)
            .await;
    }

    async fn announce(&self) {
        self.set_online(true).await;
        let catalog: Catalog = serde_json::from_value(json!({"v": 1, "devices": [{
            "id": DEVICE, "kind": "http",
            "methods": [
                {"name": "status"},
                {"name": "move", "params": {"x": {"type": "number", "required": true}}}
            ]
        }]}))
        .unwrap();
        self.publish(Up::Catalog, serde_json::to_value(catalog).unwrap(), true)
            .await;
        let presence: DevicePresence = serde_json::from_value(json!({"v": 1, "devices": {
            DEVICE: {"online": true, "since_ms": 1}
        }}))
        .unwrap();
        self.publish(Up::Devices, serde_json::to_value(presence).unwrap(), true)
            .await;
    }

    async fn next_request(&mut self) -> RpcRequest {
        tokio::time::timeout(Duration::from_secs(5), self.requests.recv())
            .await
            .expect("a request within 5 s")
            .expect("fake gateway running")
    }

    async fn answer(&self, request: &RpcRequest, outcome: RpcOutcome) {
        let response = RpcResponse {
            v: 1,
            id: request.id.clone(),
            outcome,
        };
        self.publish(
            Up::RpcResponse,
            serde_json::to_value(response).unwrap(),
            false,
        )
        .await;
    }
}

/// A stub with one online gateway declaring `agv-1`, seen online by the API.
async fn setup() -> (Stub, FakeGateway) {
    let stub = Stub::start().await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    (stub, gateway)
}

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
    assert!(gateway.requests.try_recv().is_err(), "nothing published");
    let (_, gateways) = stub.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["online"], false);
    stub.stop().await;
}
