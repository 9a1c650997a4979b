//! Unit tests of the store: migrations, save and load, reopening a file.

use super::*;
use serde_json::json;

fn gateway(id: &str, online: bool) -> GatewayRecord {
    GatewayRecord {
        id: GatewayId::new(id).unwrap(),
        online,
        boot_id: "b1".into(),
        software: "0.1".into(),
        last_seen_ms: 42,
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
        let (writer, thread) = store.spawn_writer().unwrap();
        writer.save(gateway("g1", true), vec![device("a", "g1")]);
        drop(writer);
        thread.join().unwrap();
    }
    {
        let store = Store::open(&location).unwrap();
        let (gateways, devices) = store.load().unwrap();
        assert_eq!(gateways, vec![gateway("g1", true)]);
        assert_eq!(devices, vec![device("a", "g1")]);
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
