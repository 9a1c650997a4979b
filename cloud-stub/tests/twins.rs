//! Device twins end to end, in-process: operator patches (versions, `If-Match`, limits), what
//! the gateway receives (patches while online, one snapshot after an absence), reported
//! patches, and persistence across a stub restart.

mod common;

use cloud_stub::StubConfig;
use common::{setup, FakeGateway, Stub, TempDb, DEVICE};
use gatewayd_protocol::{DesiredBody, Up};
use rumqttc::QoS;
use serde_json::{json, Value};

fn etag(a: &common::Answer) -> &str {
    a.headers
        .get("etag")
        .expect("an ETag header")
        .to_str()
        .unwrap()
}

fn twin_path() -> String {
    format!("/api/v1/devices/{DEVICE}/twin")
}

#[tokio::test]
async fn a_patch_is_versioned_published_and_shows_in_the_twin() {
    let (stub, mut gateway) = setup().await;
    let empty = stub.twin(DEVICE).await;
    assert_eq!(empty.status, 200);
    assert_eq!(etag(&empty), "\"0\"");
    assert_eq!(empty.body["desired"], json!({}));
    assert_eq!(empty.body["delta"], json!([]));

    let a = stub
        .patch_desired(DEVICE, json!({"maxSpeed": 30, "mode": "auto"}), None)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body,
        json!({"desired_version": 1, "desired": {"maxSpeed": 30, "mode": "auto"}})
    );
    assert_eq!(etag(&a), "\"1\"");
    let update = gateway.desired.next().await;
    assert_eq!(update.device.as_str(), DEVICE);
    assert_eq!(update.version, 1);
    assert_eq!(
        update.body,
        DesiredBody::Patch(json!({"maxSpeed": 30, "mode": "auto"}))
    );

    let twin = stub.twin(DEVICE).await;
    assert_eq!(etag(&twin), "\"1\"");
    let t = &twin.body;
    assert_eq!(t["device"], DEVICE);
    assert_eq!(t["desired_version"], 1);
    assert_eq!(t["reported_version"], 0);
    assert_eq!(t["reported"], json!({}));
    assert_eq!(t["delta"], json!(["maxSpeed", "mode"]));
    assert!(t["desired_updated_ms"]["maxSpeed"].as_u64().unwrap() > 0);
    assert_eq!(t["apply"], json!({}));

    // null deletes; the patch goes out as sent.
    let a = stub
        .patch_desired(DEVICE, json!({"mode": null}), None)
        .await;
    assert_eq!(a.body["desired"], json!({"maxSpeed": 30}));
    let update = gateway.desired.next().await;
    assert_eq!(
        (update.version, update.body),
        (2, DesiredBody::Patch(json!({"mode": null})))
    );
    let twin = stub.twin(DEVICE).await;
    assert_eq!(twin.body["delta"], json!(["maxSpeed"]));
    assert!(twin.body["desired_updated_ms"].get("mode").is_none());

    // An empty patch changes nothing and publishes nothing: the next update is version 3.
    let a = stub.patch_desired(DEVICE, json!({}), None).await;
    assert_eq!((a.status, &a.body["desired_version"]), (200, &json!(2)));
    stub.patch_desired(DEVICE, json!({"led": true}), None).await;
    assert_eq!(gateway.desired.next().await.version, 3);
    stub.stop().await;
}

#[tokio::test]
async fn if_match_guards_the_desired_version() {
    let (stub, _gateway) = setup().await;
    let a = stub.patch_desired(DEVICE, json!({"a": 1}), Some("0")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = stub
        .patch_desired(DEVICE, json!({"a": 2}), Some("W/\"1\""))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = stub
        .patch_desired(DEVICE, json!({"a": 3}), Some("\"1\""))
        .await;
    assert_eq!(a.status, 412);
    assert_eq!(a.body["code"], "precondition_failed");
    assert_eq!(
        a.body["message"],
        "desired version is 2, If-Match asked for 1"
    );
    let a = stub.patch_desired(DEVICE, json!({"a": 3}), Some("*")).await;
    assert_eq!(a.body["desired_version"], 3);
    let a = stub
        .patch_desired(DEVICE, json!({"a": 4}), Some("three"))
        .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (400, Some("bad_request"))
    );

    // Two writers with the same version: exactly one wins.
    for round in 0..5 {
        let version = (3 + round).to_string();
        let (x, y) = tokio::join!(
            stub.patch_desired(DEVICE, json!({"x": round}), Some(&version)),
            stub.patch_desired(DEVICE, json!({"y": round}), Some(&version)),
        );
        let mut statuses = [x.status, y.status];
        statuses.sort();
        assert_eq!(
            statuses,
            [200, 412],
            "round {round}: {} / {}",
            x.body,
            y.body
        );
    }
    let twin = stub.twin(DEVICE).await;
    assert_eq!(twin.body["desired_version"], 8);
    stub.stop().await;
}

#[tokio::test]
async fn limits_are_refused_with_clear_messages() {
    let (stub, mut gateway) = setup().await;
    let a = stub
        .patch_desired(DEVICE, json!({"a": "x".repeat(20_000)}), None)
        .await;
    assert_eq!(a.status, 200);
    gateway.desired.next().await;
    let a = stub
        .patch_desired(DEVICE, json!({"b": "y".repeat(20_000)}), None)
        .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let message = a.body["message"].as_str().unwrap();
    assert!(
        message.starts_with("desired twin of agv-1 after this patch: twin document is 400")
            && message.ends_with("bytes, the limit is 32768"),
        "{message}"
    );

    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let a = stub.patch_desired(DEVICE, deep, None).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (400, Some("bad_request"))
    );
    assert_eq!(
        a.body["message"],
        "twin document nests 11 levels deep at '/k/k/k/k/k/k/k/k/k/k', the limit is 10"
    );
    let a = stub.patch_desired(DEVICE, json!([1, 2]), None).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body["message"],
        "a desired patch must be a JSON object, got array"
    );
    let a = stub
        .patch_desired(DEVICE, json!({"$version": 1}), None)
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body["message"],
        "twin key '$version' is invalid: keys starting with '$' are reserved"
    );
    let a = stub.patch_desired("agv-9", json!({"a": 1}), None).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let twin = stub.twin(DEVICE).await;
    assert_eq!(
        twin.body["desired_version"], 1,
        "nothing refused was applied"
    );
    assert_eq!(stub.twin("agv-9").await.status, 404);
    stub.stop().await;
}

#[tokio::test]
async fn changes_made_while_offline_arrive_as_one_snapshot() {
    let (stub, mut gateway) = setup().await;
    gateway.set_online(false).await;
    stub.wait_device(DEVICE, |d| d["gateway_online"] == false)
        .await;
    for (i, patch) in [
        json!({"maxSpeed": 10}),
        json!({"mode": "auto"}),
        json!({"maxSpeed": 20}),
        json!({"mode": null, "led": true}),
        json!({"maxSpeed": 30}),
    ]
    .into_iter()
    .enumerate()
    {
        let a = stub.patch_desired(DEVICE, patch, None).await;
        assert_eq!(a.body["desired_version"], i + 1);
    }

    gateway.set_online(true).await;
    stub.wait_device(DEVICE, |d| d["gateway_online"] == true)
        .await;
    gateway
        .publish(
            Up::TwinSync,
            json!({"v": 1, "devices": {DEVICE: 0, "agv-9": 0}}),
            false,
        )
        .await;
    // The first update the gateway ever sees is one snapshot of the final state: nothing was
    // published while it was away.
    let update = gateway.desired.next().await;
    assert_eq!(update.version, 5);
    assert_eq!(
        update.body,
        DesiredBody::Snapshot(json!({"maxSpeed": 30, "led": true}))
    );

    // A sync at the current version gets nothing; the next update is the next patch. (The
    // gateway's messages are handled in order: once its reported patch shows, the sync before
    // it has been answered.)
    gateway
        .publish(Up::TwinSync, json!({"v": 1, "devices": {DEVICE: 5}}), false)
        .await;
    gateway
        .publish(
            Up::TwinReported,
            json!({"v": 1, "device": DEVICE, "seq": 1, "patch": {"maxSpeed": 30}}),
            false,
        )
        .await;
    stub.wait_for(&format!("/api/v1/devices/{DEVICE}/twin"), |t| {
        t["reported_version"] == 1
    })
    .await;
    stub.patch_desired(DEVICE, json!({"maxSpeed": 31}), None)
        .await;
    let update = gateway.desired.next().await;
    assert_eq!(
        (update.version, update.body),
        (6, DesiredBody::Patch(json!({"maxSpeed": 31})))
    );
    gateway.desired.assert_empty();
    stub.stop().await;
}

#[tokio::test]
async fn reported_patches_update_the_twin_in_seq_order() {
    let (stub, gateway) = setup().await;
    stub.patch_desired(DEVICE, json!({"maxSpeed": 30, "led": true}), None)
        .await;
    let reported = |seq: u64, patch: Value| {
        json!({"v": 1, "device": DEVICE, "seq": seq, "patch": patch,
               "apply": {"maxSpeed": {"state": "different", "desired_version": 1,
                                      "reason": "clamped to 20", "at_ms": 5}}})
    };
    gateway
        .publish(
            Up::TwinReported,
            reported(1, json!({"maxSpeed": 20, "led": true})),
            false,
        )
        .await;
    let t = stub
        .wait_for(&twin_path(), |t| t["reported_version"] == 1)
        .await;
    assert_eq!(t["reported"], json!({"maxSpeed": 20, "led": true}));
    assert_eq!(t["delta"], json!(["maxSpeed"]));
    assert_eq!(t["apply"]["maxSpeed"]["state"], "different");
    assert_eq!(t["apply"]["maxSpeed"]["reason"], "clamped to 20");
    assert!(t["reported_updated_ms"]["led"].as_u64().unwrap() > 0);

    // A replayed seq, a patch for the device from a gateway that does not own it, and an
    // oversized document are ignored; the next good patch is version 2.
    gateway
        .publish(
            Up::TwinReported,
            reported(1, json!({"maxSpeed": 99})),
            false,
        )
        .await;
    let foreign = serde_json::to_vec(&reported(50, json!({"maxSpeed": 98}))).unwrap();
    gateway
        .client
        .publish(
            "gw/other-gw/up/twin/reported",
            QoS::AtLeastOnce,
            false,
            foreign,
        )
        .await
        .unwrap();
    gateway
        .publish(
            Up::TwinReported,
            reported(2, json!({"blob": "x".repeat(40_000)})),
            false,
        )
        .await;
    gateway
        .publish(
            Up::TwinReported,
            json!({"v": 1, "device": DEVICE, "seq": 3, "patch": {"maxSpeed": 30},
                   "apply": {"maxSpeed": {"state": "applied", "desired_version": 1}}}),
            false,
        )
        .await;
    let t = stub
        .wait_for(&twin_path(), |t| t["reported"]["maxSpeed"] == 30)
        .await;
    assert_eq!(t["reported_version"], 2);
    assert_eq!(t["delta"], json!([]));
    assert_eq!(t["apply"]["maxSpeed"]["state"], "applied");
    assert!(t["reported"].get("blob").is_none());
    stub.stop().await;
}

#[tokio::test]
async fn twins_survive_a_restart() {
    let db = TempDb::new("twins");
    let broker = common::broker().await;
    let stub = Stub::start_with(StubConfig::new(broker.clone(), db.location())).await;
    let gateway = FakeGateway::connect(&broker).await;
    gateway.announce().await;
    stub.wait_device(DEVICE, |d| d["online"] == true).await;
    stub.patch_desired(DEVICE, json!({"maxSpeed": 30}), None)
        .await;
    stub.patch_desired(DEVICE, json!({"mode": "auto"}), None)
        .await;
    gateway
        .publish(
            Up::TwinReported,
            json!({"v": 1, "device": DEVICE, "seq": 7, "patch": {"maxSpeed": 20}}),
            false,
        )
        .await;
    let before = stub
        .wait_for(&twin_path(), |t| t["reported_version"] == 1)
        .await;
    stub.stop().await;

    // The gateway goes away for good (its retained state cleared): the device stays known.
    for kind in [Up::State, Up::Catalog, Up::Devices] {
        gateway
            .client
            .publish(
                gatewayd_protocol::Topics::up(&gateway.id, kind),
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await
            .unwrap();
    }
    let stub = Stub::start_with(StubConfig::new(broker, db.location())).await;
    let after = stub
        .wait_for(&twin_path(), |t| t["desired_version"] == 2)
        .await;
    assert_eq!(after, before);
    let a = stub
        .patch_desired(DEVICE, json!({"led": true}), Some("2"))
        .await;
    assert_eq!(a.body["desired_version"], 3);
    stub.stop().await;
}

/// Someone published a desired snapshot at version 2^64 - 1 on the gateway's down topic, and
/// the gateway reports holding it. The cloud refuses to believe it (above 2^53 - 1), answers as
/// if the gateway held nothing, and every twin and message call keeps working.
#[tokio::test]
async fn a_hostile_held_version_wedges_nothing() {
    let (stub, mut gateway) = setup().await;
    let a = stub
        .patch_desired(DEVICE, json!({"maxSpeed": 30}), None)
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(gateway.desired.next().await.version, 1);
    gateway
        .publish(
            Up::TwinSync,
            json!({"v": 1, "devices": {DEVICE: u64::MAX}}),
            false,
        )
        .await;
    let update = gateway.desired.next().await;
    assert_eq!(
        (update.version, update.body),
        (1, DesiredBody::Snapshot(json!({"maxSpeed": 30})))
    );
    let twin = stub.twin(DEVICE).await;
    assert_eq!(
        (twin.status, &twin.body["desired_version"]),
        (200, &json!(1))
    );
    let a = stub
        .patch_desired(DEVICE, json!({"maxSpeed": 31}), None)
        .await;
    assert_eq!((a.status, &a.body["desired_version"]), (200, &json!(2)));
    let (status, _) = stub
        .send(DEVICE, json!({"payload": {"command": "RESTART"}}))
        .await;
    assert_eq!(status, 202);
    let (status, _) = stub
        .get(&format!("/api/v1/devices/{DEVICE}/messages"))
        .await;
    assert_eq!(status, 200);
    stub.stop().await;
}
