//! Unit tests of the registry: retained-message ordering, device ownership, RPC routing checks.

use super::*;
use serde_json::json;

fn gw(s: &str) -> GatewayId {
    GatewayId::new(s).unwrap()
}

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn state(online: bool) -> GatewayState {
    serde_json::from_value(json!({"v":1,"online":online,"boot_id":"b1","software":"0.1"})).unwrap()
}

fn catalog(ids: &[&str]) -> Catalog {
    let devices: Vec<_> = ids
        .iter()
        .map(|id| {
            json!({"id": id, "kind": "http", "methods": [
                {"name": "status"},
                {"name": "move", "params": {"x": {"type": "number"}}}
            ]})
        })
        .collect();
    serde_json::from_value(json!({"v":1,"devices":devices})).unwrap()
}

fn presence(entries: &[(&str, bool)]) -> DevicePresence {
    let devices: serde_json::Map<_, _> = entries
        .iter()
        .map(|(id, on)| {
            let status = if *on {
                json!({"online": true, "since_ms": 5})
            } else {
                json!({"online": false, "since_ms": 6, "reason": "connection refused"})
            };
            (id.to_string(), status)
        })
        .collect();
    serde_json::from_value(json!({"v":1,"devices":devices})).unwrap()
}

fn online_registry() -> Registry {
    let mut reg = Registry::default();
    reg.apply_state(&gw("g1"), &state(true), 1);
    reg.apply_catalog(&gw("g1"), catalog(&["agv-1"]), 1);
    reg.apply_presence(&gw("g1"), presence(&[("agv-1", true)]), 1);
    reg
}

#[test]
fn routes_a_call_when_everything_is_online() {
    let reg = online_registry();
    let route = reg.route(&dev("agv-1"), "move").unwrap();
    assert_eq!(route.gateway, gw("g1"));
    assert!(route.params.contains_key("x"));
}

#[test]
fn route_checks_run_in_order() {
    let mut reg = online_registry();
    let e = reg.route(&dev("nope"), "status").unwrap_err();
    assert_eq!(e.code, ErrorCode::DeviceNotFound);
    let e = reg.route(&dev("agv-1"), "fly").unwrap_err();
    assert_eq!(e.code, ErrorCode::MethodNotFound);
    assert_eq!(
        e.message,
        "device agv-1 has no method 'fly'; it has: status, move"
    );
    reg.apply_presence(&gw("g1"), presence(&[("agv-1", false)]), 2);
    let e = reg.route(&dev("agv-1"), "status").unwrap_err();
    assert_eq!(e.code, ErrorCode::DeviceOffline);
    assert!(e.message.contains("connection refused"), "{}", e.message);
    assert!(reg.apply_state(&gw("g1"), &state(false), 3).went_offline);
    let e = reg.route(&dev("agv-1"), "status").unwrap_err();
    assert_eq!(e.code, ErrorCode::GatewayOffline);
}

#[test]
fn presence_before_catalog_is_kept_for_the_catalog() {
    let mut reg = Registry::default();
    reg.apply_presence(&gw("g1"), presence(&[("agv-1", true)]), 1);
    reg.apply_state(&gw("g1"), &state(true), 1);
    reg.apply_catalog(&gw("g1"), catalog(&["agv-1"]), 2);
    assert!(reg.route(&dev("agv-1"), "status").is_ok());
}

#[test]
fn a_new_catalog_replaces_the_device_set() {
    let mut reg = online_registry();
    reg.apply_catalog(&gw("g1"), catalog(&["scale-1"]), 2);
    assert!(reg.device(&dev("agv-1")).is_none());
    assert!(reg.device(&dev("scale-1")).is_some());
    let (_, devices) = reg.records(&gw("g1")).unwrap();
    assert_eq!(devices.len(), 1);
}

#[test]
fn the_newest_catalog_claiming_an_id_wins() {
    let mut reg = online_registry();
    reg.apply_state(&gw("g2"), &state(true), 2);
    let taken = reg.apply_catalog(&gw("g2"), catalog(&["agv-1"]), 2);
    assert_eq!(taken, vec![(dev("agv-1"), gw("g1"))]);
    assert_eq!(reg.device(&dev("agv-1")).unwrap().gateway, gw("g2"));
    let (_, g1_devices) = reg.records(&gw("g1")).unwrap();
    assert!(g1_devices.is_empty());
    // g2 said nothing about its presence yet, so the device is not reachable through it.
    let e = reg.route(&dev("agv-1"), "status").unwrap_err();
    assert_eq!(e.code, ErrorCode::DeviceOffline);
    // g1 republishing a catalog without the device does not remove it from g2.
    reg.apply_catalog(&gw("g1"), catalog(&[]), 3);
    assert_eq!(reg.device(&dev("agv-1")).unwrap().gateway, gw("g2"));
}

#[test]
fn presence_from_a_foreign_gateway_is_ignored() {
    let mut reg = online_registry();
    reg.apply_presence(&gw("g2"), presence(&[("agv-1", false)]), 2);
    assert!(reg.device(&dev("agv-1")).unwrap().online);
}

#[test]
fn offline_state_keeps_identity_fields() {
    let mut reg = online_registry();
    let lwt: GatewayState = serde_json::from_value(json!({"online": false})).unwrap();
    assert!(reg.apply_state(&gw("g1"), &lwt, 9).went_offline);
    let (record, _) = reg.records(&gw("g1")).unwrap();
    assert_eq!(record.boot_id, "b1");
    assert!(!record.online);
    assert_eq!(record.last_seen_ms, 9);
}

#[test]
fn records_round_trip_with_gateways_offline() {
    let reg = online_registry();
    let (g, d) = reg.records(&gw("g1")).unwrap();
    let back = Registry::from_records(vec![g], d);
    assert!(!back.gateway_online(&gw("g1")));
    let e = back.route(&dev("agv-1"), "status").unwrap_err();
    assert_eq!(e.code, ErrorCode::GatewayOffline);
    assert!(back.device(&dev("agv-1")).unwrap().online);
}

#[test]
fn a_new_boot_id_means_a_restart() {
    let mut reg = online_registry();
    let again = reg.apply_state(&gw("g1"), &state(true), 2);
    assert_eq!(again, StateChange::default());
    let reboot: GatewayState =
        serde_json::from_value(json!({"online": true, "boot_id": "b2"})).unwrap();
    let change = reg.apply_state(&gw("g1"), &reboot, 3);
    assert!(change.restarted && change.came_online);
}

#[test]
fn a_birth_after_an_absence_is_a_new_birth() {
    let mut reg = Registry::default();
    assert!(reg.apply_state(&gw("g1"), &state(true), 1).came_online);
    assert!(!reg.apply_state(&gw("g1"), &state(true), 2).came_online);
    reg.apply_state(&gw("g1"), &state(false), 3);
    assert!(reg.apply_state(&gw("g1"), &state(true), 4).came_online);
    reg.mark_all_offline();
    assert!(reg.apply_state(&gw("g1"), &state(true), 5).came_online);
}

#[test]
fn a_device_dropped_from_its_catalog_stays_known() {
    let mut reg = online_registry();
    assert!(reg.is_known(&dev("agv-1")));
    assert_eq!(reg.online_owner(&dev("agv-1")), Some(&gw("g1")));
    reg.apply_catalog(&gw("g1"), catalog(&[]), 2);
    assert!(reg.device(&dev("agv-1")).is_none());
    assert!(reg.is_known(&dev("agv-1")));
    assert_eq!(reg.owner(&dev("agv-1")), None);
    assert!(!reg.is_known(&dev("agv-9")));
    reg.remember([dev("agv-9")]);
    assert!(reg.is_known(&dev("agv-9")));
}

#[test]
fn a_late_will_of_a_previous_run_is_ignored() {
    let mut reg = online_registry();
    let reboot: GatewayState =
        serde_json::from_value(json!({"online": true, "boot_id": "b2"})).unwrap();
    reg.apply_state(&gw("g1"), &reboot, 2);
    let old_will: GatewayState =
        serde_json::from_value(json!({"online": false, "boot_id": "b1"})).unwrap();
    assert!(reg.apply_state(&gw("g1"), &old_will, 3).stale_will);
    assert!(reg.gateway_online(&gw("g1")));
    let own_will: GatewayState =
        serde_json::from_value(json!({"online": false, "boot_id": "b2"})).unwrap();
    assert!(reg.apply_state(&gw("g1"), &own_will, 4).went_offline);
}

#[test]
fn mark_all_offline_reports_who_was_online() {
    let mut reg = online_registry();
    reg.apply_state(&gw("g2"), &state(false), 1);
    assert_eq!(reg.mark_all_offline(), vec![gw("g1")]);
    assert!(!reg.gateway_online(&gw("g1")));
}

fn store_state(online: bool, boot: &str, store_id: &str, error: Option<&str>) -> GatewayState {
    serde_json::from_value(json!({"v": 1, "online": online, "boot_id": boot,
        "store_id": store_id, "store_error": error}))
    .unwrap()
}

#[test]
fn a_new_store_id_is_a_replaced_store_and_an_empty_one_is_unknown() {
    let mut reg = Registry::default();
    let g1 = gw("g1");
    let change = reg.apply_state(&g1, &store_state(true, "b1", "s1", None), 1);
    assert_eq!(change.store_replaced, None, "first sighting");
    let change = reg.apply_state(&g1, &store_state(true, "b1", "", None), 2);
    assert_eq!(change.store_replaced, None, "empty: unknown");
    let change = reg.apply_state(&g1, &store_state(true, "b2", "s2", None), 3);
    assert_eq!(change.store_replaced, Some(("s1".into(), "s2".into())));
    assert!(change.came_online, "a new boot is a new birth too");
    let change = reg.apply_state(&g1, &store_state(false, "b2", "s2", None), 4);
    assert_eq!(change.store_replaced, None);
    let (record, _) = reg.records(&g1).unwrap();
    assert_eq!(record.store_id, "s2", "remembered for the next run");
    let restored = Registry::from_records(vec![record], Vec::new());
    let mut restored = restored;
    let change = restored.apply_state(&g1, &store_state(true, "b3", "s3", None), 5);
    assert_eq!(change.store_replaced, Some(("s2".into(), "s3".into())));
}

#[test]
fn a_failing_store_holds_messages_until_a_state_clears_it() {
    let mut reg = online_registry();
    let g1 = gw("g1");
    assert_eq!(reg.accepting_owner(&dev("agv-1")), Some(&g1));
    let change = reg.apply_state(&g1, &store_state(true, "b1", "s1", Some("disk full")), 2);
    assert!(change.store_failing && !change.came_online && !change.store_recovered);
    assert_eq!(reg.accepting_owner(&dev("agv-1")), None);
    assert!(
        reg.route(&dev("agv-1"), "status").is_ok(),
        "RPCs still work"
    );
    let change = reg.apply_state(&g1, &store_state(true, "b1", "s1", Some("disk full")), 3);
    assert!(!change.store_failing, "still failing is no news");
    let change = reg.apply_state(&g1, &store_state(true, "b1", "s1", None), 4);
    assert!(change.store_recovered && !change.came_online);
    assert_eq!(reg.accepting_owner(&dev("agv-1")), Some(&g1));
    // Recovered across an offline spell: the birth itself resends.
    reg.apply_state(&g1, &store_state(true, "b1", "s1", Some("disk full")), 5);
    reg.apply_state(&g1, &store_state(false, "b1", "s1", None), 6);
    let change = reg.apply_state(&g1, &store_state(true, "b1", "s1", None), 7);
    assert!(change.came_online && !change.store_recovered);
}
