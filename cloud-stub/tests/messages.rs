//! Cloud-to-device messages end to end, in-process: queueing, delivery in order, feedback,
//! TTL expiry in the cloud, the queue limit, purge, resend at a new birth, the window, a
//! restart, and a throughput run.

mod common;

use cloud_stub::StubConfig;
use common::{setup, FakeGateway, Stub, TempDb, DEVICE};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn id_of(body: &Value) -> String {
    body["id"].as_str().expect("an id").to_string()
}

/// Queues `payload` for `device` and returns its id.
async fn send(stub: &Stub, device: &str, payload: Value, ttl: u64) -> String {
    let (status, body) = stub
        .send(device, json!({"payload": payload, "ttl_seconds": ttl}))
        .await;
    assert_eq!(status, 202, "{body}");
    id_of(&body)
}

async fn stub_with(configure: impl FnOnce(&mut StubConfig)) -> (Stub, FakeGateway) {
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    configure(&mut config);
    let stub = Stub::start_with(config).await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    (stub, gateway)
}

async fn go_offline(stub: &Stub, gateway: &FakeGateway) {
    gateway.set_online(false).await;
    stub.wait_device(DEVICE, |d| d["gateway_online"] == false)
        .await;
}

#[tokio::test]
async fn a_message_is_queued_delivered_and_completed() {
    let (stub, mut gateway) = setup().await;
    let (status, body) = stub
        .send(
            DEVICE,
            json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = id_of(&body);
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(body["status"], "queued");
    let enqueued = body["enqueued_at_ms"].as_u64().unwrap();
    let expires = body["expires_at_ms"].as_u64().unwrap();
    assert_eq!(expires - enqueued, 60_000);
    let rfc3339 = body["expires_at"].as_str().unwrap();
    assert!(rfc3339.len() == 24 && rfc3339.ends_with('Z'), "{rfc3339}");

    let m = gateway.messages.next().await;
    assert_eq!(m.id.as_str(), id);
    assert_eq!(m.device.as_str(), DEVICE);
    assert_eq!(m.payload, json!({"command": "RESTART"}));
    assert_eq!(m.expires_at_ms, expires);
    let sent = stub
        .wait_for(&format!("/api/v1/devices/{DEVICE}/messages/{id}"), |m| {
            !m["sent_at_ms"].is_null()
        })
        .await;
    assert_eq!(sent["status"], "queued");
    assert_eq!(sent["delivered_at_ms"], Value::Null);

    gateway.feedback(DEVICE, &id, "received", json!({})).await;
    let m = stub.wait_message(DEVICE, &id, "delivered").await;
    assert!(m["delivered_at_ms"].as_u64().is_some());
    assert_eq!(m["finished_at_ms"], Value::Null);
    gateway
        .feedback(DEVICE, &id, "completed", json!({"device_status": 200}))
        .await;
    let m = stub.wait_message(DEVICE, &id, "completed").await;
    assert_eq!(m["device_status"], 200);
    assert!(m["finished_at_ms"].as_u64().is_some());
    assert_eq!(m["payload"], json!({"command": "RESTART"}));
    assert_eq!(m["device"], DEVICE);

    // Feedback for a final message changes nothing. Feedback is handled in order, so once a
    // later one shows, the earlier one has been applied (or ignored).
    gateway
        .feedback(DEVICE, &id, "failed", json!({"reason": "late"}))
        .await;
    let other = send(&stub, DEVICE, json!({"command": "PING"}), 60).await;
    gateway.messages.next().await;
    gateway
        .feedback(DEVICE, &other, "received", json!({}))
        .await;
    stub.wait_message(DEVICE, &other, "delivered").await;
    let (_, m) = stub.message(DEVICE, &id).await;
    assert_eq!(m["status"], "completed");
    assert_eq!(m["reason"], Value::Null);
    stub.stop().await;
}

#[tokio::test]
async fn order_is_kept_per_device() {
    let devices = ["agv-1", "agv-2"];
    let broker = common::broker().await;
    let stub = Stub::start_with(StubConfig::new(broker, cloud_stub::DbLocation::Memory)).await;
    let mut gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce_devices(&devices).await;
    stub.wait_device("agv-2", |d| d["online"] == true).await;
    let mut sent: Vec<(String, String)> = Vec::new();
    for i in 0..20 {
        let device = devices[i % 2];
        sent.push((
            device.to_string(),
            send(&stub, device, json!({"n": i}), 60).await,
        ));
    }
    let mut received: Vec<(String, String)> = Vec::new();
    for _ in 0..20 {
        let m = gateway.messages.next().await;
        received.push((m.device.to_string(), m.id.to_string()));
    }
    for device in devices {
        let want: Vec<&String> = sent
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, id)| id)
            .collect();
        let got: Vec<&String> = received
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(got, want, "order for {device}");
    }
    let (_, list) = stub.get("/api/v1/devices/agv-1/messages").await;
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = sent
        .iter()
        .filter(|(d, _)| d == "agv-1")
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(listed, want, "listed in enqueue order");
    stub.stop().await;
}

#[tokio::test]
async fn a_ttl_that_passes_in_the_cloud_expires_the_message_unsent() {
    let (stub, mut gateway) = setup().await;
    go_offline(&stub, &gateway).await;
    let started = Instant::now();
    let id = send(&stub, DEVICE, json!({"command": "RESTART"}), 1).await;
    let m = stub.wait_message(DEVICE, &id, "expired").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    assert_eq!(m["reason"], "ttl passed in the cloud queue");
    assert_eq!(m["sent_at_ms"], Value::Null);
    assert!(m["finished_at_ms"].as_u64().unwrap() >= m["expires_at_ms"].as_u64().unwrap());

    // Back online, the gateway's first message is a new one: the expired one never went out.
    gateway.set_online(true).await;
    let fresh = send(&stub, DEVICE, json!({"command": "PING"}), 60).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), fresh);
    gateway.messages.assert_empty();
    stub.stop().await;
}

#[tokio::test]
async fn messages_queued_while_offline_go_out_in_order_when_the_gateway_returns() {
    let (stub, mut gateway) = setup().await;
    go_offline(&stub, &gateway).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send(&stub, DEVICE, json!({"n": i}), 600).await);
    }
    let (_, queued) = stub
        .get(&format!("/api/v1/devices/{DEVICE}/messages?status=queued"))
        .await;
    assert_eq!(queued.as_array().unwrap().len(), 3);
    assert!(queued
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["sent_at_ms"].is_null()));
    gateway.set_online(true).await;
    for id in &ids {
        assert_eq!(&gateway.messages.next().await.id.to_string(), id);
    }
    stub.stop().await;
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_at_a_new_birth_only() {
    let (stub, mut gateway) = setup().await;
    let first = send(&stub, DEVICE, json!({"n": 1}), 600).await;
    let second = send(&stub, DEVICE, json!({"n": 2}), 600).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), first);
    assert_eq!(gateway.messages.next().await.id.as_str(), second);
    gateway
        .feedback(DEVICE, &first, "received", json!({}))
        .await;
    stub.wait_message(DEVICE, &first, "delivered").await;

    // gatewayd restarted (new boot id): the unacknowledged one comes again, the other does not.
    gateway.set_state(true, "boot-2").await;
    let again = gateway.messages.next().await;
    assert_eq!(again.id.as_str(), second);
    gateway
        .feedback(DEVICE, &second, "completed", json!({}))
        .await;
    stub.wait_message(DEVICE, &second, "completed").await;
    gateway.set_online(false).await;
    gateway.set_state(true, "boot-3").await;
    let third = send(&stub, DEVICE, json!({"n": 3}), 600).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), third);
    stub.stop().await;
}

#[tokio::test]
async fn the_window_bounds_unacknowledged_messages_per_gateway() {
    let (stub, mut gateway) = stub_with(|c| c.send_window = 2).await;
    let ids = [
        send(&stub, DEVICE, json!(1), 600).await,
        send(&stub, DEVICE, json!(2), 600).await,
        send(&stub, DEVICE, json!(3), 600).await,
    ];
    assert_eq!(gateway.messages.next().await.id.as_str(), ids[0]);
    assert_eq!(gateway.messages.next().await.id.as_str(), ids[1]);
    let (_, third) = stub.message(DEVICE, &ids[2]).await;
    assert_eq!(third["sent_at_ms"], Value::Null, "window full");
    gateway
        .feedback(DEVICE, &ids[0], "received", json!({}))
        .await;
    assert_eq!(gateway.messages.next().await.id.as_str(), ids[2]);
    stub.stop().await;
}

#[tokio::test]
async fn a_full_queue_refuses_and_purge_empties_it() {
    let (stub, mut gateway) = stub_with(|c| c.max_queue = 3).await;
    let delivered = send(&stub, DEVICE, json!(0), 600).await;
    gateway.messages.next().await;
    gateway
        .feedback(DEVICE, &delivered, "received", json!({}))
        .await;
    stub.wait_message(DEVICE, &delivered, "delivered").await;
    go_offline(&stub, &gateway).await;
    let queued = [
        send(&stub, DEVICE, json!(1), 600).await,
        send(&stub, DEVICE, json!(2), 600).await,
    ];
    let (status, body) = stub
        .send(DEVICE, json!({"payload": 3, "ttl_seconds": 600}))
        .await;
    assert_eq!((status, body["code"].as_str()), (429, Some("queue_full")));
    assert_eq!(
        body["message"],
        "device agv-1 has 3 messages waiting (the limit)"
    );

    let path = format!("/api/v1/devices/{DEVICE}/messages");
    let a = stub.request(Method::DELETE, &path, Value::Null, &[]).await;
    assert_eq!((a.status, &a.body), (200, &json!({"purged": 3})));
    for id in queued.iter().chain([&delivered]) {
        let (_, m) = stub.message(DEVICE, id).await;
        assert_eq!(m["status"], "purged");
        assert_eq!(m["reason"], "purged by operator");
        assert!(m["finished_at_ms"].as_u64().is_some());
    }
    // Feedback for a purged message changes nothing; the queue has room again.
    gateway
        .feedback(DEVICE, &delivered, "completed", json!({}))
        .await;
    let after = send(&stub, DEVICE, json!(4), 600).await;
    gateway.set_online(true).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), after);
    gateway
        .feedback(DEVICE, &after, "received", json!({}))
        .await;
    stub.wait_message(DEVICE, &after, "delivered").await;
    let (_, m) = stub.message(DEVICE, &delivered).await;
    assert_eq!(m["status"], "purged");
    let a = stub.request(Method::DELETE, &path, Value::Null, &[]).await;
    assert_eq!(a.body, json!({"purged": 1}));
    stub.stop().await;
}

#[tokio::test]
async fn bad_requests_and_unknown_ids_are_refused() {
    let (stub, mut gateway) = setup().await;
    let (status, body) = stub
        .message(DEVICE, "0123456789abcdef0123456789abcdef")
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("message_not_found"))
    );
    assert_eq!(
        body["message"],
        "no message 0123456789abcdef0123456789abcdef for device agv-1"
    );
    let (status, _) = stub.message(DEVICE, "not%20an%20id").await;
    assert_eq!(status, 404);
    let (status, body) = stub.send("agv-9", json!({"payload": 1})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let (status, body) = stub.get("/api/v1/devices/agv-9/messages").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let (status, body) = stub
        .send(DEVICE, json!({"payload": 1, "ttl_seconds": 172_801}))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    assert_eq!(
        body["message"],
        "ttl_seconds must be between 1 and 172800, got 172801"
    );
    let (status, _) = stub.send(DEVICE, json!({"ttl_seconds": 5})).await;
    assert_eq!(status, 400, "payload is required");
    let (status, body) = stub
        .send(DEVICE, json!({"payload": "x".repeat(65 * 1024)}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (status, body) = stub
        .get(&format!("/api/v1/devices/{DEVICE}/messages?status=lost"))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    // Feedback for an id the cloud never issued is ignored; nothing above was queued.
    gateway
        .feedback(
            DEVICE,
            "ffffffffffffffffffffffffffffffff",
            "completed",
            json!({}),
        )
        .await;
    let (_, list) = stub
        .get(&format!("/api/v1/devices/{DEVICE}/messages"))
        .await;
    assert_eq!(list, json!([]));
    gateway.messages.assert_empty();
    stub.stop().await;
}

#[tokio::test]
async fn messages_survive_a_restart() {
    let db = TempDb::new("messages");
    let broker = common::broker().await;
    let stub = Stub::start_with(StubConfig::new(broker.clone(), db.location())).await;
    let mut gateway = FakeGateway::connect(&broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    let done = send(&stub, DEVICE, json!({"n": 1}), 600).await;
    gateway.messages.next().await;
    gateway
        .feedback(DEVICE, &done, "completed", json!({}))
        .await;
    stub.wait_message(DEVICE, &done, "completed").await;
    go_offline(&stub, &gateway).await;
    let waiting = send(&stub, DEVICE, json!({"n": 2}), 600).await;
    stub.stop().await;

    let stub = Stub::start_with(StubConfig::new(broker, db.location())).await;
    let (status, m) = stub.message(DEVICE, &done).await;
    assert_eq!((status, m["status"].as_str()), (200, Some("completed")));
    gateway.set_online(true).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), waiting);
    gateway
        .feedback(DEVICE, &waiting, "received", json!({}))
        .await;
    stub.wait_message(DEVICE, &waiting, "delivered").await;
    stub.stop().await;
}

/// 2,000 messages over 20 devices through the real API and broker, the fake gateway answering
/// `received` then `completed` to each; prints the rate. Debug builds on a shared 2-core box are
/// far from the release benchmark, so this checks completion, not a rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_messages_complete() {
    const DEVICES: usize = 20;
    const PER_DEVICE: usize = 100;
    let names: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    config.max_queue = PER_DEVICE;
    let stub = Stub::start_with(config).await;
    let mut gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce_devices(&refs).await;
    stub.wait_device(&names[DEVICES - 1], |d| d["online"] == true)
        .await;

    let started = Instant::now();
    let client = gateway.client.clone();
    let gw = gateway.id.clone();
    let mut inbox = std::mem::replace(&mut gateway.messages, common::Inbox::closed());
    let answering = tokio::spawn(async move {
        let topic = gatewayd_protocol::Topics::up(&gw, gatewayd_protocol::Up::MessageFeedback);
        for _ in 0..DEVICES * PER_DEVICE {
            let m = inbox.next().await;
            for outcome in ["received", "completed"] {
                let fb = json!({"v": 1, "id": m.id, "device": m.device, "outcome": outcome});
                client
                    .publish(
                        &topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&fb).unwrap(),
                    )
                    .await
                    .unwrap();
            }
        }
    });
    let mut posting = tokio::task::JoinSet::new();
    for name in names.clone() {
        let http = stub.http.clone();
        let url = format!("{}/api/v1/devices/{name}/messages", stub.api);
        posting.spawn(async move {
            for i in 0..PER_DEVICE {
                let res = http
                    .post(&url)
                    .json(&json!({"payload": {"n": i}, "ttl_seconds": 600}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status().as_u16(), 202);
            }
        });
    }
    while let Some(r) = posting.join_next().await {
        r.unwrap();
    }
    let posted = started.elapsed();
    tokio::time::timeout(Duration::from_secs(60), answering)
        .await
        .expect("every message reaches the gateway within 60 s")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in &names {
        loop {
            let (_, list) = stub
                .get(&format!("/api/v1/devices/{name}/messages?status=completed"))
                .await;
            if list.as_array().unwrap().len() == PER_DEVICE {
                break;
            }
            assert!(Instant::now() < deadline, "{name} never completed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let total = started.elapsed();
    let n = DEVICES * PER_DEVICE;
    eprintln!(
        "{n} messages: posted in {posted:?}, all completed in {total:?} ({:.0}/s)",
        n as f64 / total.as_secs_f64()
    );
    stub.stop().await;
}

/// `may_have_run` from the gateway (the command was written, the answer lost) is final like
/// the others, and an operator can read and filter it.
#[tokio::test]
async fn may_have_run_is_a_final_status_an_operator_can_read() {
    let (stub, mut gateway) = setup().await;
    let id = send(&stub, DEVICE, json!({"command": "RESTART"}), 60).await;
    gateway.messages.next().await;
    gateway.feedback(DEVICE, &id, "received", json!({})).await;
    let reason = "answer lost after the command was written";
    gateway
        .feedback(DEVICE, &id, "may_have_run", json!({"reason": reason}))
        .await;
    let m = stub.wait_message(DEVICE, &id, "may_have_run").await;
    assert_eq!(m["reason"], reason);
    assert!(m["finished_at_ms"].as_u64().is_some());
    let path = format!("/api/v1/devices/{DEVICE}/messages?status=may_have_run");
    let (status, listed) = stub.get(&path).await;
    assert_eq!((status, listed.as_array().map(Vec::len)), (200, Some(1)));
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    let (status, body) = stub
        .get(&format!("/api/v1/devices/{DEVICE}/messages?status=lost"))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("may_have_run"),
        "{body}"
    );
    let (_, m) = stub.message(DEVICE, &id).await;
    assert_eq!(m["status"], "may_have_run", "final never changes");
    stub.stop().await;
}
