//! Properties of `decode()`: it never panics, whatever arrives, and ids read off the wire obey
//! the same rules as ids built with `new`.

use gatewayd_protocol::ids::validate_id;
use gatewayd_protocol::{
    decode, C2dMessage, Catalog, DecodeError, DesiredUpdate, DevicePresence, Feedback,
    GatewayState, ReportedUpdate, RpcRequest, RpcResponse, TwinSync, PROTOCOL_VERSION,
};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Decodes `bytes` as every payload type; only a panic fails.
fn decode_all(bytes: &[u8]) {
    let _ = decode::<GatewayState>(bytes);
    let _ = decode::<Catalog>(bytes);
    let _ = decode::<DevicePresence>(bytes);
    let _ = decode::<RpcRequest>(bytes);
    let _ = decode::<RpcResponse>(bytes);
    let _ = decode::<DesiredUpdate>(bytes);
    let _ = decode::<TwinSync>(bytes);
    let _ = decode::<ReportedUpdate>(bytes);
    let _ = decode::<C2dMessage>(bytes);
    let _ = decode::<Feedback>(bytes);
}

/// Valid payloads of several kinds, to be damaged.
fn valid_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(json!({"v":1,"id":"m-1","device":"d","payload":{"command":"RESET"},"expires_at_ms":5})),
        Just(json!({"v":1,"id":"r","device":"d","method":"m","params":{"a":[1,2]},"timeout_ms":1,"deadline_ms":2})),
        Just(json!({"v":1,"device":"d","version":4,"patch":{"a":{"b":null}}})),
        Just(json!({"v":1,"device":"d","version":4,"snapshot":{}})),
        Just(json!({"v":1,"id":"r2","error":{"code":"timeout","message":"no answer"}})),
        Just(json!({"v":1,"devices":{"d":3}})),
    ]
    .prop_map(|v| serde_json::to_vec(&v).unwrap())
}

/// A valid payload cut short, with bytes overwritten and inserted.
fn damaged_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        valid_payload(),
        prop::collection::vec(
            (any::<prop::sample::Index>(), any::<u8>(), any::<bool>()),
            0..4,
        ),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut bytes, edits, cut)| {
            for (at, byte, insert) in edits {
                let i = at.index(bytes.len());
                if insert {
                    bytes.insert(i, byte);
                } else {
                    bytes[i] = byte;
                }
            }
            let keep = cut.index(bytes.len() + 1);
            if keep > bytes.len() / 2 {
                bytes.truncate(keep);
            }
            bytes
        })
}

/// Ids of every kind: valid ones, around the length limit, with unsafe characters, any text.
fn any_id() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{1,64}",
        1 => "[A-Za-z0-9._-]{60,70}",
        1 => "[a-z]{0,4}[/+# \\x00-\\x1f\\u{0}-\\u{ffff}][a-z]{0,4}",
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes);
    }

    #[test]
    fn damaged_payloads_never_panic(bytes in damaged_payload()) {
        decode_all(&bytes);
    }

    #[test]
    fn newer_protocol_versions_are_refused(v in prop_oneof![0..4u32, any::<u32>()]) {
        let bytes = serde_json::to_vec(&json!({"v": v, "devices": {}})).unwrap();
        match decode::<TwinSync>(&bytes) {
            Ok(sync) => prop_assert!(v <= PROTOCOL_VERSION && sync.v == v),
            Err(DecodeError::Version(got)) => prop_assert!(got == v && v > PROTOCOL_VERSION),
            Err(e) => return Err(TestCaseError::fail(format!("v {v}: {e}"))),
        }
    }

    #[test]
    fn messages_decode_only_with_valid_ids(id in any_id(), device in any_id()) {
        let body = json!({"v":1,"id":id,"device":device,"payload":{},"expires_at_ms":1});
        let decoded = decode::<C2dMessage>(&serde_json::to_vec(&body).unwrap());
        let valid = validate_id(&id).is_ok() && validate_id(&device).is_ok();
        prop_assert_eq!(decoded.is_ok(), valid, "{:?}", decoded);
        if let Ok(m) = decoded {
            prop_assert_eq!((m.id.as_str(), m.device.as_str()), (id.as_str(), device.as_str()));
        }
    }

    #[test]
    fn rpc_requests_decode_only_with_valid_ids(id in any_id(), device in any_id()) {
        let body = json!({
            "v":1,"id":id,"device":device,"method":"m","timeout_ms":1,"deadline_ms":1
        });
        let decoded = decode::<RpcRequest>(&serde_json::to_vec(&body).unwrap());
        let valid = validate_id(&id).is_ok() && validate_id(&device).is_ok();
        prop_assert_eq!(decoded.is_ok(), valid, "{:?}", decoded);
        if let Ok(r) = decoded {
            prop_assert_eq!((r.id.as_str(), r.device.as_str()), (id.as_str(), device.as_str()));
        }
    }

    #[test]
    fn desired_updates_decode_only_with_a_valid_device(device in any_id(), snapshot in any::<bool>()) {
        let body = if snapshot {
            json!({"v":1,"device":device,"version":2,"snapshot":{"a":1}})
        } else {
            json!({"v":1,"device":device,"version":2,"patch":{"a":null}})
        };
        let decoded = decode::<DesiredUpdate>(&serde_json::to_vec(&body).unwrap());
        prop_assert_eq!(decoded.is_ok(), validate_id(&device).is_ok(), "{:?}", decoded);
        if let Ok(u) = decoded {
            prop_assert_eq!(u.device.as_str(), device.as_str());
        }
    }

    #[test]
    fn ids_inside_maps_are_checked_too(device in any_id()) {
        // Device ids are map keys in presence snapshots and twin syncs.
        let mut devices = serde_json::Map::new();
        devices.insert(device.clone(), Value::from(1));
        let body = serde_json::to_vec(&json!({"v":1,"devices":devices})).unwrap();
        let decoded = decode::<TwinSync>(&body);
        prop_assert_eq!(decoded.is_ok(), validate_id(&device).is_ok(), "{:?}", decoded);
    }
}
