//! Unit tests of the twin rules: conditional patches, versions, limits, reported seq, sync.

use super::*;
use gatewayd_protocol::ApplyState;
use serde_json::json;

fn dev() -> DeviceId {
    DeviceId::new("agv-1").unwrap()
}

fn patch(row: &mut TwinRow, p: Value, if_match: Option<IfMatch>) -> Result<bool, PatchError> {
    apply_desired(&dev(), row, &p, if_match, 100)
}

fn reported(seq: u64, p: Value) -> ReportedUpdate {
    ReportedUpdate {
        v: 1,
        device: dev(),
        seq,
        patch: p,
        apply: BTreeMap::new(),
    }
}

#[test]
fn if_match_forms() {
    assert_eq!(parse_if_match("7"), Ok(IfMatch::Version(7)));
    assert_eq!(parse_if_match("\"7\""), Ok(IfMatch::Version(7)));
    assert_eq!(parse_if_match(" W/\"7\" "), Ok(IfMatch::Version(7)));
    assert_eq!(parse_if_match("*"), Ok(IfMatch::Any));
    let err = parse_if_match("seven").unwrap_err();
    assert_eq!(
        err,
        "If-Match must be a desired version such as \"7\" or *, got 'seven'"
    );
    assert!(parse_if_match("\"-1\"").is_err());
}

#[test]
fn a_patch_merges_bumps_the_version_and_stamps_properties() {
    let mut row = TwinRow::default();
    assert!(patch(&mut row, json!({"maxSpeed": 30, "mode": "auto"}), None).unwrap());
    assert_eq!(row.desired_version, 1);
    assert!(patch(&mut row, json!({"mode": null}), Some(IfMatch::Version(1))).unwrap());
    assert_eq!(row.desired, json!({"maxSpeed": 30}));
    assert_eq!(row.desired_version, 2);
    assert_eq!(
        row.desired_updated_ms,
        BTreeMap::from([("maxSpeed".into(), 100)])
    );
    assert!(patch(&mut row, json!({"x": 1}), Some(IfMatch::Any)).unwrap());
    assert_eq!(row.desired_version, 3);
}

#[test]
fn an_empty_patch_changes_nothing() {
    let mut row = TwinRow::default();
    assert!(!patch(&mut row, json!({}), None).unwrap());
    assert_eq!(row.desired_version, 0);
}

#[test]
fn a_stale_if_match_is_refused_with_both_versions() {
    let mut row = TwinRow {
        desired_version: 8,
        ..TwinRow::default()
    };
    let err = patch(&mut row, json!({"a": 1}), Some(IfMatch::Version(7))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "desired version is 8, If-Match asked for 7"
    );
    assert_eq!(row.desired_version, 8);
}

#[test]
fn limits_are_enforced_without_changing_the_twin() {
    let mut row = TwinRow::default();
    patch(&mut row, json!({"a": "x".repeat(20_000)}), None).unwrap();
    let before = row.clone();
    let err = patch(&mut row, json!({"b": "y".repeat(20_000)}), None).unwrap_err();
    assert!(matches!(err, PatchError::TooLarge { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("desired twin of agv-1 after this patch: twin document is 40"),
        "{err}"
    );
    assert_eq!(row, before);
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let err = patch(&mut row, deep, None).unwrap_err();
    assert!(matches!(
        err,
        PatchError::Invalid(TwinDocError::TooDeep { .. })
    ));
    let err = patch(&mut row, json!([1]), None).unwrap_err();
    assert_eq!(err.to_string(), "twin document must be a JSON object");
    let err = patch(&mut row, json!({"$v": 1}), None).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    assert_eq!(row, before);
}

#[test]
fn reported_patches_apply_in_seq_order_per_gateway() {
    let mut row = TwinRow::default();
    let mut first = reported(5, json!({"maxSpeed": 20}));
    first.apply.insert(
        "maxSpeed".into(),
        ApplyStatus {
            state: ApplyState::Different,
            desired_version: 1,
            reason: Some("clamped".into()),
            at_ms: 9,
            attempts: 0,
        },
    );
    assert_eq!(
        apply_reported(&mut row, "g1", &first, 50),
        Reported::Applied
    );
    assert_eq!(row.reported_version, 1);
    assert_eq!(row.apply["maxSpeed"].state, ApplyState::Different);
    assert_eq!(row.reported_updated_ms["maxSpeed"], 50);
    assert_eq!(
        apply_reported(&mut row, "g1", &reported(5, json!({"maxSpeed": 1})), 51),
        Reported::Stale { last: 5 }
    );
    assert_eq!(
        apply_reported(&mut row, "g1", &reported(4, json!({"maxSpeed": 1})), 51),
        Reported::Stale { last: 5 }
    );
    assert_eq!(row.reported, json!({"maxSpeed": 20}));
    // Another gateway (the device moved) starts its own sequence.
    assert_eq!(
        apply_reported(&mut row, "g2", &reported(1, json!({"led": true})), 52),
        Reported::Applied
    );
    assert_eq!(row.reported, json!({"maxSpeed": 20, "led": true}));
    assert_eq!(row.reported_version, 2);
    assert!(row.apply.contains_key("maxSpeed"), "apply statuses merge");
}

#[test]
fn an_oversized_reported_document_is_refused() {
    let mut row = TwinRow::default();
    let big = reported(1, json!({"blob": "x".repeat(40_000)}));
    assert!(matches!(
        apply_reported(&mut row, "g1", &big, 1),
        Reported::Refused(TwinDocError::TooLarge { .. })
    ));
    assert_eq!(row, TwinRow::default());
}

#[test]
fn sync_rule() {
    assert_eq!(sync_action(0, 0), SyncAction::Nothing);
    assert_eq!(sync_action(5, 5), SyncAction::Nothing);
    assert_eq!(sync_action(5, 0), SyncAction::Snapshot);
    assert_eq!(sync_action(5, 4), SyncAction::Snapshot);
    assert_eq!(sync_action(0, 7), SyncAction::Jump(8));
}

#[test]
fn hostile_versions_are_bounded() {
    let max = MAX_TWIN_VERSION;
    // A held version above the limit is not believed: answered as if none were held.
    assert_eq!(sync_action(5, u64::MAX), SyncAction::Snapshot);
    assert_eq!(sync_action(0, u64::MAX), SyncAction::Nothing);
    assert_eq!(sync_action(0, max + 1), SyncAction::Nothing);
    assert_eq!(sync_action(0, max - 1), SyncAction::Jump(max));
    // Nothing passes the highest version: a snapshot the gateway ignores, no overflow.
    assert_eq!(sync_action(3, max), SyncAction::Snapshot);

    let mut row = TwinRow::default();
    let seq = reported(u64::MAX, json!({"maxSpeed": 1}));
    assert_eq!(
        apply_reported(&mut row, "g1", &seq, 1),
        Reported::SeqTooHigh
    );
    assert_eq!(row, TwinRow::default());

    row.desired_version = max;
    let before = row.clone();
    let err = patch(&mut row, json!({"maxSpeed": 1}), None).unwrap_err();
    assert!(matches!(err, PatchError::VersionLimit { .. }), "{err}");
    assert_eq!(row, before);
}
