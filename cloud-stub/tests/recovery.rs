//! Messages that reached a gateway never stay open: a final feedback lost while the cloud was
//! down is asked for again, a delivered message without a verdict is sent again after its TTL
//! and ends `may_have_run`, a gateway whose store was replaced gets its delivered messages
//! again, and a gateway whose store fails is sent nothing until it works again.

mod common;

use cloud_stub::StubConfig;
use common::{FakeGateway, Stub, TempDb, DEVICE};
use serde_json::{json, Value};
use std::time::Duration;

/// Queues `payload` for the device with `ttl` seconds and returns its id.
async fn send(stub: &Stub, payload: Value, ttl: u64) -> String {
    let (status, body) = stub
        .send(DEVICE, json!({"payload": payload, "ttl_seconds": ttl}))
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Sends a message and has the gateway acknowledge it: delivered.
async fn deliver(stub: &Stub, gateway: &mut FakeGateway, payload: Value, ttl: u64) -> String {
    let id = send(stub, payload, ttl).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), id);
    gateway.feedback(DEVICE, &id, "received", json!({})).await;
    stub.wait_message(DEVICE, &id, "delivered").await;
    id
}

async fn start(configure: impl FnOnce(&mut StubConfig)) -> (Stub, FakeGateway) {
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    configure(&mut config);
    let stub = Stub::start_with(config).await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    (stub, gateway)
}

#[tokio::test]
async fn a_final_feedback_lost_while_the_cloud_was_down_is_asked_for_again() {
    let db = TempDb::new("ask-again");
    let broker = common::broker().await;
    let stub = Stub::start_with(StubConfig::new(broker.clone(), db.location())).await;
    let mut gateway = FakeGateway::connect(&broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    let id = deliver(&stub, &mut gateway, json!({"command": "RESTART"}), 600).await;
    stub.stop().await;

    // The gateway finishes it while the cloud is down, and the broker loses the feedback (the
    // next run comes back on a new session, as after a broker restart).
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    let mut config = StubConfig::new(broker, db.location());
    config.client_id = "cloud-stub-next".into();
    let stub = Stub::start_with(config).await;
    // Once the gateway is known to be online, the cloud sends the message again; the gateway
    // recognises the id and repeats its latest feedback.
    let again = gateway.messages.next().await;
    assert_eq!(again.id.as_str(), id);
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    stub.wait_message(DEVICE, &id, "completed").await;
    stub.stop().await;
}

#[tokio::test]
async fn a_delivered_message_without_a_verdict_is_sent_again_then_may_have_run() {
    let grace = Duration::from_millis(900);
    let (stub, mut gateway) = start(|c| {
        c.verdict_grace = grace;
        c.max_queue = 1;
    })
    .await;
    let id = deliver(&stub, &mut gateway, json!({"command": "RESTART"}), 1).await;
    let (status, body) = stub.send(DEVICE, json!({"payload": 2})).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("queue_full")));

    // The gateway stays silent: a third of the grace after the TTL the cloud asks again...
    let again = gateway.messages.next().await;
    assert_eq!(again.id.as_str(), id);
    // ...and at the end of it the message is final: it reached the gateway, so it may have run.
    let m = stub.wait_message(DEVICE, &id, "may_have_run").await;
    let reason = m["reason"].as_str().unwrap();
    assert!(reason.contains("no final feedback"), "{reason}");
    let expires = m["expires_at_ms"].as_u64().unwrap();
    assert!(m["finished_at_ms"].as_u64().unwrap() >= expires + grace.as_millis() as u64);
    let (_, listed) = stub
        .get(&format!(
            "/api/v1/devices/{DEVICE}/messages?status=may_have_run"
        ))
        .await;
    assert_eq!(listed[0]["id"], id.as_str());

    // Its queue slot is free again; a late verdict changes nothing.
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    let next = send(&stub, json!(2), 60).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), next);
    let (_, m) = stub.message(DEVICE, &id).await;
    assert_eq!(m["status"], "may_have_run");
    stub.stop().await;
}

#[tokio::test]
async fn a_replaced_store_gets_its_delivered_messages_again() {
    let (stub, mut gateway) = start(|_| {}).await;
    gateway
        .set_store_state(true, "boot-1", "store-a", None)
        .await;
    stub.wait_for("/api/v1/gateways", |g| g[0]["store_id"] == "store-a")
        .await;
    let open = deliver(&stub, &mut gateway, json!({"n": 1}), 600).await;
    let done = deliver(&stub, &mut gateway, json!({"n": 2}), 600).await;
    gateway
        .feedback(DEVICE, &done, "completed", json!({}))
        .await;
    stub.wait_message(DEVICE, &done, "completed").await;

    // An empty store id is unknown, not a change: nothing is sent again (the next message to
    // arrive is a new one).
    gateway.set_store_state(true, "boot-1", "", None).await;
    let fresh = deliver(&stub, &mut gateway, json!({"n": 3}), 600).await;

    // gatewayd comes back with a new store: what it had been delivered and not finished comes
    // again, in order; what finished does not.
    gateway
        .set_store_state(true, "boot-2", "store-b", None)
        .await;
    assert_eq!(gateway.messages.next().await.id.as_str(), open);
    assert_eq!(gateway.messages.next().await.id.as_str(), fresh);
    let later = send(&stub, json!({"n": 4}), 600).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), later);
    let (_, gateways) = stub.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["store_id"], "store-b");
    stub.stop().await;
}

#[tokio::test]
async fn a_failing_store_is_sent_nothing_until_it_works_again() {
    let (stub, mut gateway) = start(|_| {}).await;
    // In flight (published, not acknowledged) when the store starts failing.
    let unacked = send(&stub, json!({"n": 1}), 600).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), unacked);
    gateway
        .set_store_state(true, "boot-1", "", Some("disk full"))
        .await;
    stub.wait_for("/api/v1/gateways", |g| g[0]["store_error"] == "disk full")
        .await;

    let short = send(&stub, json!({"n": 2}), 1).await;
    let held = send(&stub, json!({"n": 3}), 600).await;
    // Held in the cloud, still expiring by its TTL, never published.
    let m = stub.wait_message(DEVICE, &short, "expired").await;
    assert_eq!(m["sent_at_ms"], Value::Null);
    // Desired updates still go out; messages do not.
    let a = stub
        .patch_desired(DEVICE, json!({"maxSpeed": 5}), None)
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(gateway.desired.next().await.version, 1);
    gateway.messages.assert_empty();
    let (_, m) = stub.message(DEVICE, &held).await;
    assert_eq!(
        (m["status"].as_str(), &m["sent_at_ms"]),
        (Some("queued"), &Value::Null)
    );

    // The store works again: like a new birth, the unacknowledged one comes again, then the
    // held one.
    gateway.set_store_state(true, "boot-1", "", None).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), unacked);
    assert_eq!(gateway.messages.next().await.id.as_str(), held);
    let (_, gateways) = stub.get("/api/v1/gateways").await;
    assert_eq!(gateways[0]["store_error"], Value::Null);
    stub.stop().await;
}
