//! Unit tests of the store: migrations, save and load, batches, reopening a file.

use super::*;
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{GatewayId, MessageId};
use serde_json::json;

fn gateway(id: &str, online: bool) -> GatewayRecord {
    GatewayRecord {
        id: GatewayId::new(id).unwrap(),
        online,
        boot_id: "b1".into(),
        software: "0.1".into(),
        last_seen_ms: 42,
        store_id: "st-1".into(),
    }
}

fn device(id: &str, gw: &str) -> DeviceRecord {
    DeviceRecord {
        gateway: GatewayId::new(gw).unwrap(),
        info: serde_json::from_value(json!({"id": id, "kind": "serial", "methods": [
            {"name": "status"}
        ]}))
        .unwrap(),
        online: false,
        since_ms: 7,
        reason: Some("no answer".into()),
        last_seen_ms: 3,
    }
}

#[test]
fn a_fresh_database_is_migrated_to_the_newest_schema() {
    let store = Store::open(&DbLocation::Memory).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    let (g, d) = store.load().unwrap();
    assert!(g.is_empty() && d.is_empty());
}

#[test]
fn saving_a_gateway_replaces_its_devices() {
    let mut store = Store::open(&DbLocation::Memory).unwrap();
    let g = gateway("g1", true);
    store
        .save_gateway(&g, &[device("a", "g1"), device("b", "g1")])
        .unwrap();
    store.save_gateway(&g, &[device("b", "g1")]).unwrap();
    let (gateways, devices) = store.load().unwrap();
    assert_eq!(gateways, vec![g]);
    assert_eq!(devices, vec![device("b", "g1")]);
}

#[test]
fn a_device_claimed_by_another_gateway_moves() {
    let mut store = Store::open(&DbLocation::Memory).unwrap();
    store
        .save_gateway(&gateway("g1", true), &[device("a", "g1")])
        .unwrap();
    store
        .save_gateway(&gateway("g2", true), &[device("a", "g2")])
        .unwrap();
    let (_, devices) = store.load().unwrap();
    assert_eq!(devices, vec![device("a", "g2")]);
}

#[test]
fn a_file_database_survives_reopening_and_refuses_newer_schemas() {
    let path = std::env::temp_dir().join(format!(
        "cloud-stub-store-test-{}-{}.db",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let location = DbLocation::Path(path.clone());
    {
        let store = Store::open(&location).unwrap();
        let (handle, thread) = store.spawn().unwrap();
        handle.save_gateway(gateway("g1", true), vec![device("a", "g1")]);
        handle.remember_devices(vec![DeviceId::new("a").unwrap()]);
        handle.submit(
            |conn| {
                let row = TwinRow {
                    desired: json!({"maxSpeed": 30}),
                    desired_version: 4,
                    ..TwinRow::default()
                };
                row.save(conn, &DeviceId::new("a").unwrap())?;
                message("m1", "a").insert(conn)
            },
            |r| r.unwrap(),
        );
        handle.stop();
        thread.join().unwrap();
    }
    {
        let store = Store::open(&location).unwrap();
        let (gateways, devices) = store.load().unwrap();
        assert_eq!(gateways, vec![gateway("g1", true)]);
        assert_eq!(devices, vec![device("a", "g1")]);
        assert_eq!(
            store.load_known_devices().unwrap(),
            vec![DeviceId::new("a").unwrap()]
        );
        let twin = TwinRow::load(&store.conn, &DeviceId::new("a").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (twin.desired_version, twin.desired),
            (4, json!({"maxSpeed": 30}))
        );
        assert_eq!(
            store.load_open_messages().unwrap(),
            vec![message("m1", "a")]
        );
        store
            .conn
            .pragma_update(None, "user_version", 99_i64)
            .unwrap();
    }
    let err = Store::open(&location).err().expect("newer schema refused");
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

fn message(id: &str, device: &str) -> MessageRecord {
    MessageRecord {
        id: MessageId::new(id).unwrap(),
        device: DeviceId::new(device).unwrap(),
        payload: json!({"command": "RESTART"}),
        status: MessageStatus::Queued,
        reason: None,
        device_status: None,
        gateway: None,
        enqueued_at_ms: 10,
        expires_at_ms: 1000,
        sent_at_ms: None,
        delivered_at_ms: None,
        finished_at_ms: None,
    }
}

#[test]
fn the_registry_migration_gives_known_devices_a_twin() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.pragma_update(None, "user_version", 1_i64).unwrap();
    conn.execute_batch(
        "INSERT INTO gateways VALUES ('g1', 1, 'b1', '0.1', 42);
         INSERT INTO devices VALUES ('a', 'g1', 'serial', '{\"id\":\"a\",\"kind\":\"serial\"}',
                                     1, 1, NULL, 2);",
    )
    .unwrap();
    let mut store = Store { conn };
    migrate(&mut store.conn).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    assert_eq!(
        store.load_known_devices().unwrap(),
        vec![DeviceId::new("a").unwrap()]
    );
    let (gateways, _) = store.load().unwrap();
    assert_eq!(
        gateways[0].store_id, "",
        "unknown until the gateway reports one"
    );
}

#[test]
fn a_status_write_never_changes_a_final_message() {
    let store = Store::open(&DbLocation::Memory).unwrap();
    let m = message("m1", "a");
    m.insert(&store.conn).unwrap();
    let write = |status, delivered| MessageWrite::Status {
        id: m.id.clone(),
        device: None,
        status,
        reason: None,
        device_status: None,
        delivered_at_ms: delivered,
        finished_at_ms: status.is_final().then_some(50),
    };
    // A retried `delivered` lands after the final one.
    apply_message_writes(
        &store.conn,
        &[
            write(MessageStatus::Completed, None),
            write(MessageStatus::Delivered, Some(30)),
        ],
    )
    .unwrap();
    let got = MessageRecord::get(&store.conn, &m.device, &m.id)
        .unwrap()
        .unwrap();
    assert_eq!(got.status, MessageStatus::Completed);
    assert_eq!(got.finished_at_ms, Some(50));
}

#[test]
fn message_writes_apply_in_order_and_times_are_set_once() {
    let store = Store::open(&DbLocation::Memory).unwrap();
    let m = message("m1", "a");
    m.insert(&store.conn).unwrap();
    message("m2", "a").insert(&store.conn).unwrap();
    message("x1", "b").insert(&store.conn).unwrap();
    let id = m.id.clone();
    let status = |status, delivered, finished, reason: Option<&str>| MessageWrite::Status {
        id: id.clone(),
        device: None,
        status,
        reason: reason.map(str::to_string),
        device_status: None,
        delivered_at_ms: delivered,
        finished_at_ms: finished,
    };
    apply_message_writes(
        &store.conn,
        &[
            MessageWrite::Sent {
                id: id.clone(),
                device: m.device.clone(),
                gateway: GatewayId::new("g1").unwrap(),
                at_ms: 20,
            },
            status(MessageStatus::Delivered, Some(30), None, None),
            status(MessageStatus::Completed, Some(99), Some(40), Some("done")),
        ],
    )
    .unwrap();
    let got = MessageRecord::get(&store.conn, &m.device, &id)
        .unwrap()
        .unwrap();
    assert_eq!(got.status, MessageStatus::Completed);
    assert_eq!(got.gateway, Some(GatewayId::new("g1").unwrap()));
    assert_eq!(
        (got.sent_at_ms, got.delivered_at_ms, got.finished_at_ms),
        (Some(20), Some(30), Some(40))
    );
    assert_eq!(got.reason.as_deref(), Some("done"));
    assert!(
        MessageRecord::get(&store.conn, &DeviceId::new("b").unwrap(), &id)
            .unwrap()
            .is_none()
    );
    let all = MessageRecord::list(&store.conn, &m.device, None).unwrap();
    assert_eq!(
        all.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["m1", "m2"]
    );
    let queued = MessageRecord::list(&store.conn, &m.device, Some(MessageStatus::Queued)).unwrap();
    assert_eq!(queued.len(), 1);
    let open = store.load_open_messages().unwrap();
    assert_eq!(open.len(), 2, "m2 and x1");
}

#[tokio::test]
async fn a_panicking_job_answers_with_an_error_and_the_store_goes_on() {
    let store = Store::open(&DbLocation::Memory).unwrap();
    let (handle, thread) = store.spawn().unwrap();
    let before = handle.call(|conn| message("m1", "a").insert(conn));
    let panics = handle.call(|conn| -> Result<(), StoreError> {
        message("m2", "a").insert(conn)?;
        let wire: u64 = u64::MAX;
        let next = wire.checked_add(1).expect("an overflow in a job");
        Err(StoreError::Commit(next.to_string()))
    });
    // A completion that panics is contained as well.
    handle.submit(
        |_| Ok(()),
        |_: Result<(), StoreError>| panic!("completion bug"),
    );
    let after = handle.call(|conn| message("m3", "a").insert(conn));
    let (before, panics, after) = tokio::join!(before, panics, after);
    before.unwrap();
    after.unwrap();
    match panics {
        Err(StoreError::Panicked(why)) => assert_eq!(why, "an overflow in a job"),
        other => panic!("expected a panic answer, got {other:?}"),
    }
    let listed = handle
        .call(|conn| MessageRecord::list(conn, &DeviceId::new("a").unwrap(), None))
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["m1", "m3"],
        "the panicking job's write is rolled back"
    );
    handle.stop();
    thread.join().unwrap();
}

#[tokio::test]
async fn a_failing_job_rolls_back_alone_and_completions_follow_the_commit() {
    let store = Store::open(&DbLocation::Memory).unwrap();
    let (handle, thread) = store.spawn().unwrap();
    let bad = handle.call(|conn| {
        message("m1", "a").insert(conn)?;
        message("m1", "a").insert(conn) // duplicate id: the job fails, m1 is rolled back
    });
    let good = handle.call(|conn| message("m2", "a").insert(conn));
    let (bad, good) = tokio::join!(bad, good);
    assert!(matches!(bad, Err(StoreError::Sqlite(_))), "{bad:?}");
    good.unwrap();
    let listed = handle
        .call(|conn| MessageRecord::list(conn, &DeviceId::new("a").unwrap(), None))
        .await
        .unwrap();
    assert_eq!(listed, vec![message("m2", "a")]);
    handle.stop();
    thread.join().unwrap();
    assert!(matches!(
        handle.call(|_| Ok(())).await,
        Err(StoreError::Gone)
    ));
}
