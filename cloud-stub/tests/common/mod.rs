//! Test harness: the real `run()` in-process on `127.0.0.1:0` against an embedded broker on a
//! free port, an HTTP client for the operator API, and a fake gateway speaking the wire
//! protocol through a raw rumqttc client. Nothing sleeps for a fixed time where an event can be
//! awaited: waits poll with a deadline.

#![allow(dead_code)]

pub mod process;

use cloud_stub::{DbLocation, MqttTarget, StubConfig};
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::{
    C2dMessage, Catalog, DesiredUpdate, DevicePresence, Down, GatewayId, GatewayState, RpcOutcome,
    RpcRequest, RpcResponse, Topics, Up,
};
use reqwest::header::HeaderMap;
use reqwest::Method;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const GW: &str = "gw-test";
pub const DEVICE: &str = "agv-1";
/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// An embedded broker on a free port, shared by the stub runs of one test.
pub async fn broker() -> MqttTarget {
    let listen = cloud_stub::resolve_listen("127.0.0.1:0".parse().unwrap()).unwrap();
    cloud_stub::start_embedded_broker(listen).unwrap();
    cloud_stub::wait_until_accepting(listen, WAIT)
        .await
        .unwrap();
    MqttTarget {
        host: "127.0.0.1".into(),
        port: listen.port(),
    }
}

/// A database file in the temp dir, removed (with its WAL files) on drop.
pub struct TempDb(pub PathBuf);

impl TempDb {
    pub fn new(name: &str) -> TempDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        TempDb(std::env::temp_dir().join(format!(
            "cloud-stub-{name}-{}-{nanos}.db",
            std::process::id()
        )))
    }

    pub fn location(&self) -> DbLocation {
        DbLocation::Path(self.0.clone())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A running stub and the URL of its API.
pub struct Stub {
    pub api: String,
    pub http: reqwest::Client,
    pub broker: MqttTarget,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cloud_stub::StubError>>,
}

/// An operator API answer.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Stub {
    /// A stub with an in-memory database on a new broker.
    pub async fn start() -> Stub {
        let broker = broker().await;
        Stub::start_with(StubConfig::new(broker, DbLocation::Memory)).await
    }

    /// A stub with this configuration.
    pub async fn start_with(config: StubConfig) -> Stub {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let broker = config.mqtt.clone();
        let task = tokio::spawn(cloud_stub::run(config, api, shutdown.clone()));
        Stub {
            api: url,
            http: reqwest::Client::new(),
            broker,
            shutdown,
            task,
        }
    }

    /// Sends a request; a `null` body sends no body at all.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.api));
        if !body.is_null() {
            req = req.json(&body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.json().await.unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let a = self.request(Method::GET, path, Value::Null, &[]).await;
        (a.status, a.body)
    }

    /// Invokes a method; a `null` body sends no body at all.
    pub async fn call(&self, device: &str, method: &str, body: Value) -> (u16, Value) {
        let path = format!("/api/v1/devices/{device}/methods/{method}");
        let a = self.request(Method::POST, &path, body, &[]).await;
        (a.status, a.body)
    }

    /// `PATCH .../twin/desired`, with an optional `If-Match`.
    pub async fn patch_desired(
        &self,
        device: &str,
        patch: Value,
        if_match: Option<&str>,
    ) -> Answer {
        let path = format!("/api/v1/devices/{device}/twin/desired");
        let headers: Vec<(&str, &str)> = if_match.map(|v| ("if-match", v)).into_iter().collect();
        self.request(Method::PATCH, &path, patch, &headers).await
    }

    pub async fn twin(&self, device: &str) -> Answer {
        let path = format!("/api/v1/devices/{device}/twin");
        self.request(Method::GET, &path, Value::Null, &[]).await
    }

    /// `POST .../messages`.
    pub async fn send(&self, device: &str, body: Value) -> (u16, Value) {
        let path = format!("/api/v1/devices/{device}/messages");
        let a = self.request(Method::POST, &path, body, &[]).await;
        (a.status, a.body)
    }

    pub async fn message(&self, device: &str, id: &str) -> (u16, Value) {
        self.get(&format!("/api/v1/devices/{device}/messages/{id}"))
            .await
    }

    /// Polls `GET path` until `pred` holds on a 200 answer, for at most [`WAIT`].
    pub async fn wait_for(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{path} never matched: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `GET /api/v1/devices/{id}` until `pred` holds.
    pub async fn wait_device(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(&format!("/api/v1/devices/{id}"), pred).await
    }

    /// Polls a message until its status is `status`.
    pub async fn wait_message(&self, device: &str, id: &str, status: &str) -> Value {
        let path = format!("/api/v1/devices/{device}/messages/{id}");
        self.wait_for(&path, |m| m["status"] == status).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stub stops within 5 s")
            .unwrap()
            .unwrap();
    }
}

/// What the fake gateway received, by kind.
pub struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<T>,
}

impl<T> Inbox<T> {
    /// An inbox that never receives (to swap one out of a [`FakeGateway`]).
    pub fn closed() -> Self {
        let (_, rx) = mpsc::unbounded_channel();
        Inbox { rx }
    }
}

impl<T: std::fmt::Debug> Inbox<T> {
    /// The next one, within [`WAIT`].
    pub async fn next(&mut self) -> T {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a publish within 5 s")
            .expect("fake gateway running")
    }

    /// The next one, waiting as long as it takes; `None` once the fake gateway stopped.
    pub async fn next_or_closed(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// Fails if one is already here.
    pub fn assert_empty(&mut self) {
        if let Ok(v) = self.rx.try_recv() {
            panic!("unexpected publish: {v:?}");
        }
    }
}

/// A gateway played by the test: publishes the retained messages, hands every downlink
/// publish to the test by kind, and sends what the test tells it to.
pub struct FakeGateway {
    pub id: GatewayId,
    pub client: AsyncClient,
    pub requests: Inbox<RpcRequest>,
    pub desired: Inbox<DesiredUpdate>,
    pub messages: Inbox<C2dMessage>,
}

impl FakeGateway {
    pub async fn connect(broker: &MqttTarget) -> FakeGateway {
        let id = GatewayId::new(GW).unwrap();
        let mut options = MqttOptions::new(format!("fake-{GW}"), broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (des_tx, desired) = mpsc::unbounded_channel();
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let (suback_tx, mut suback) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let bytes = &p.payload;
                        match Topics::parse_down(&p.topic).map(|(_, k)| k) {
                            Some(Down::RpcRequest) => {
                                let _ = req_tx.send(decode(bytes));
                            }
                            Some(Down::TwinDesired) => {
                                let _ = des_tx.send(decode(bytes));
                            }
                            Some(Down::Message) => {
                                let _ = msg_tx.send(decode(bytes));
                            }
                            // Its own configuration: this fake gateway takes none.
                            Some(Down::ConfigDesired) => {}
                            None => panic!("fake gateway got a foreign topic {}", p.topic),
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
        tokio::time::timeout(WAIT, suback.recv())
            .await
            .expect("suback within 5 s");
        FakeGateway {
            id,
            client,
            requests: Inbox { rx: requests },
            desired: Inbox { rx: desired },
            messages: Inbox { rx: messages },
        }
    }

    pub async fn publish(&self, kind: Up, payload: Value, retain: bool) {
        let topic = Topics::up(&self.id, kind);
        let bytes = serde_json::to_vec(&payload).unwrap();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, bytes)
            .await
            .unwrap();
    }

    pub async fn set_online(&self, online: bool) {
        self.set_state(online, "boot-1").await;
    }

    pub async fn set_state(&self, online: bool, boot_id: &str) {
        self.set_store_state(online, boot_id, "", None).await;
    }

    /// A retained state with a store identity and, while it fails, the store's error.
    pub async fn set_store_state(
        &self,
        online: bool,
        boot_id: &str,
        store_id: &str,
        store_error: Option<&str>,
    ) {
        let state = GatewayState {
            v: 1,
            online,
            boot_id: boot_id.into(),
            software: "test".into(),
            at_ms: 0,
            store_id: store_id.into(),
            store_error: store_error.map(str::to_string),
        };
        self.publish(Up::State, serde_json::to_value(state).unwrap(), true)
            .await;
    }

    /// Birth, a catalog declaring `devices` (the first with two methods), all online.
    pub async fn announce_devices(&self, devices: &[&str]) {
        self.set_online(true).await;
        let entries: Vec<Value> = devices
            .iter()
            .map(|d| {
                json!({"id": d, "kind": "http",
                    "methods": [
                        {"name": "status"},
                        {"name": "move", "params": {"x": {"type": "number", "required": true}}}
                    ],
                    "twin_properties": ["maxSpeed"], "commands": ["RESTART"]})
            })
            .collect();
        let catalog: Catalog = serde_json::from_value(json!({"v": 1, "devices": entries})).unwrap();
        self.publish(Up::Catalog, serde_json::to_value(catalog).unwrap(), true)
            .await;
        let presence: serde_json::Map<String, Value> = devices
            .iter()
            .map(|d| (d.to_string(), json!({"online": true, "since_ms": 1})))
            .collect();
        let presence: DevicePresence =
            serde_json::from_value(json!({"v": 1, "devices": presence})).unwrap();
        self.publish(Up::Devices, serde_json::to_value(presence).unwrap(), true)
            .await;
    }

    pub async fn announce(&self) {
        self.announce_devices(&[DEVICE]).await;
    }

    pub async fn next_request(&mut self) -> RpcRequest {
        self.requests.next().await
    }

    pub async fn answer(&self, request: &RpcRequest, outcome: RpcOutcome) {
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

    /// `up/msg/feedback` for a message.
    pub async fn feedback(&self, device: &str, id: &str, outcome: &str, extra: Value) {
        let mut fb = json!({"v": 1, "id": id, "device": device, "outcome": outcome, "at_ms": 1});
        if let (Some(fb), Value::Object(extra)) = (fb.as_object_mut(), extra) {
            fb.extend(extra);
        }
        self.publish(Up::MessageFeedback, fb, false).await;
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    gatewayd_protocol::decode(bytes).unwrap_or_else(|e| {
        panic!(
            "fake gateway got a malformed payload: {e}: {}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// A stub with one online gateway declaring `agv-1`, seen online by the API.
pub async fn setup() -> (Stub, FakeGateway) {
    let stub = Stub::start().await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    (stub, gateway)
}
