//! The real `cloud-stub` binary as a process: a crash between receiving a gateway's final
//! feedback and committing it loses nothing, and its log is plain text where ordinary
//! disconnects are not errors.

mod common;

use common::process::StubProcess;
use common::{FakeGateway, TempDb, DEVICE, GW, WAIT};
use gatewayd_protocol::{Topics, Up};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use std::time::Duration;

/// A stub process using the broker `broker` (run by the test, so it outlives the stub) and the
/// database `db`, logging message feedback.
fn stub_on(broker: &cloud_stub::MqttTarget, db: &TempDb) -> StubProcess {
    let url = broker.to_string();
    let path = db.0.display().to_string();
    StubProcess::start(
        &["--broker", &url, "--db", &path],
        "info,cloud_stub::messages=debug",
    )
}

async fn post_message(stub: &StubProcess) -> String {
    let res = stub
        .http
        .post(format!("{}/api/v1/devices/{DEVICE}/messages", stub.api))
        .json(&json!({"payload": {"command": "RESTART"}, "ttl_seconds": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let body: Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn final_feedback_received_but_not_committed_survives_a_crash() {
    let broker = common::broker().await;
    let db = TempDb::new("crash");
    let mut stub = stub_on(&broker, &db);
    let mut gateway = FakeGateway::connect(&broker).await;
    gateway.announce().await;
    let device = format!("/api/v1/devices/{DEVICE}");
    stub.wait_for(&device, |d| d["online"] == true).await;
    let id = post_message(&stub).await;
    assert_eq!(gateway.messages.next().await.id.as_str(), id);
    gateway.feedback(DEVICE, &id, "received", json!({})).await;
    let path = format!("{device}/messages/{id}");
    stub.wait_for(&path, |m| m["status"] == "delivered").await;

    // Another writer holds the database: the stub receives the final feedback but cannot
    // commit it (SQLite waits up to 5 s for the lock), and then it crashes.
    let lock = rusqlite::Connection::open(&db.0).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    stub.wait_log(&["message feedback", &id, "completed"]).await;
    stub.kill();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Never acknowledged, so the broker keeps it for the stub's session and sends it again.
    let stub = stub_on(&broker, &db);
    let m = stub.wait_for(&path, |m| m["status"] == "completed").await;
    assert!(m["finished_at_ms"].as_u64().is_some());
}

/// A client that connects and leaves with a DISCONNECT, as gatewayd does when it stops.
async fn orderly_visit(mqtt: &cloud_stub::MqttTarget) {
    let mut options = MqttOptions::new("orderly-visitor", &mqtt.host, mqtt.port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let visit = async {
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Incoming(Packet::ConnAck(_)))
        ) {}
        client.disconnect().await.unwrap();
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
        ) {}
    };
    tokio::time::timeout(WAIT, visit)
        .await
        .expect("a visit within 5 s");
}

#[tokio::test]
async fn the_log_is_plain_text_and_an_ordinary_disconnect_is_no_error() {
    let mut stub = StubProcess::start(
        &["--mqtt-listen", "127.0.0.1:0", "--db", ":memory:"],
        "info,rumqttd=info",
    );
    // The broker logs the end of the link (closed by the peer, or ended by the router after
    // the client's DISCONNECT) before it tells its router, which may then handle a second
    // disconnect; everything the test does later reaches the router after it.
    orderly_visit(&stub.mqtt).await;
    stub.wait_log(&["Disconnected by"]).await;
    // A gateway with its last will, which leaves without a DISCONNECT (as a crash or a pulled
    // cable would): the broker logs the closed connection, then publishes the will.
    let gw = gatewayd_protocol::GatewayId::new(GW).unwrap();
    let mut options = MqttOptions::new(format!("raw-{GW}"), &stub.mqtt.host, stub.mqtt.port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_last_will(LastWill::new(
        Topics::up(&gw, Up::State),
        json!({"v": 1, "online": false, "boot_id": "boot-1"}).to_string(),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let polling = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let state = json!({"v": 1, "online": true, "boot_id": "boot-1"});
    client
        .publish(
            Topics::up(&gw, Up::State),
            QoS::AtLeastOnce,
            true,
            state.to_string(),
        )
        .await
        .unwrap();
    let gateways = "/api/v1/gateways";
    let online = |g: &Value| {
        g.as_array()
            .is_some_and(|a| a.iter().any(|g| g["online"] == true))
    };
    stub.wait_for(gateways, online).await;
    polling.abort();
    let _ = tokio::time::timeout(WAIT, polling).await;
    stub.wait_for(gateways, |g| !online(g) && g[0]["id"] == GW)
        .await;

    let log = stub.kill();
    assert!(!log.is_empty());
    for line in &log {
        assert!(
            !line.contains('\x1b'),
            "colour codes in a log file: {line:?}"
        );
        assert!(
            !line.contains("ERROR"),
            "an error in an ordinary run: {line}\nthe whole log:\n{}",
            log.join("\n")
        );
    }
    assert!(log
        .iter()
        .any(|l| l.contains("went offline") || l.contains("online=false")));
}
