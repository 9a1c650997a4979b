//! What a gateway publishes, as ThingsBoard's gateway MQTT API reads it: `v1/gateway/connect`,
//! `disconnect`, `attributes`, `telemetry`, `attributes/request` and `rpc` (replies), plus the
//! `getSessionLimits` call the official client makes on its own device topics. Pure functions
//! of the state; a malformed payload is logged as a `protocol_error` event and dropped.

use super::state::{Ack, SessionId, State, ATTRIBUTES_RESPONSE_TOPIC};
use serde_json::{json, Map, Value};

const DEVICE_RPC_REQUEST: &str = "v1/devices/me/rpc/request/";
const DEVICE_RPC_RESPONSE: &str = "v1/devices/me/rpc/response/";

/// What handling a publish asks of the caller.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// A device came online: persistent RPCs may be due.
    pub wake_delivery: bool,
}

/// Handles one publish of `gateway` on session `session`.
pub fn handle(
    st: &mut State,
    session: SessionId,
    gateway: &str,
    topic: &str,
    payload: &[u8],
    now: u64,
) -> Outcome {
    let body: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            protocol_error(st, topic, &format!("payload is not JSON: {e}"), now);
            return Outcome::default();
        }
    };
    let result = match topic {
        "v1/gateway/connect" => connect(st, gateway, &body, now),
        "v1/gateway/disconnect" => disconnect(st, &body, now),
        "v1/gateway/attributes" => attributes(st, gateway, &body, now),
        "v1/gateway/telemetry" => telemetry(st, gateway, &body, now),
        "v1/gateway/attributes/request" => attribute_request(st, session, gateway, &body, now),
        "v1/gateway/rpc" => rpc_reply(st, gateway, &body, now),
        t if t.starts_with(DEVICE_RPC_REQUEST) => device_rpc(st, session, t, &body),
        _ => {
            tracing::info!(topic, "publish on a topic the emulator ignores");
            Ok(false)
        }
    };
    match result {
        Ok(wake_delivery) => Outcome { wake_delivery },
        Err(e) => {
            protocol_error(st, topic, &e, now);
            Outcome::default()
        }
    }
}

fn protocol_error(st: &mut State, topic: &str, error: &str, now: u64) {
    tracing::warn!(topic, error, "protocol error, publish dropped");
    st.event(
        now,
        "protocol_error",
        None,
        json!({"topic": topic, "error": error}),
    );
}

fn device_name(body: &Value) -> Result<&str, String> {
    body.get("device")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| "no \"device\" name".to_string())
}

/// `{"device": "Name", "type": "Profile"}`.
fn connect(st: &mut State, gateway: &str, body: &Value, now: u64) -> Result<bool, String> {
    let name = device_name(body)?;
    let kind = body.get("type").and_then(Value::as_str);
    st.connect_device(gateway, name, kind, now);
    Ok(true)
}

/// `{"device": "Name"}`.
fn disconnect(st: &mut State, body: &Value, now: u64) -> Result<bool, String> {
    let name = device_name(body)?;
    st.set_inactive(name, json!({"reason": "gateway disconnect"}), now);
    Ok(false)
}

/// The `{"Dev A": ..., "Dev B": ...}` object of attributes and telemetry publishes.
fn per_device(body: &Value) -> Result<&Map<String, Value>, String> {
    body.as_object()
        .ok_or_else(|| "payload is not an object of devices".to_string())
}

/// `{"Dev": {"k": v}}`: client-side attributes merged per key; a null value refuses the whole
/// publish.
fn attributes(st: &mut State, gateway: &str, body: &Value, now: u64) -> Result<bool, String> {
    let devices = per_device(body)?;
    for (name, values) in devices {
        let values = values
            .as_object()
            .ok_or_else(|| format!("attributes of {name} are not an object"))?;
        if let Some((k, _)) = values.iter().find(|(_, v)| v.is_null()) {
            return Err(format!("attribute {k} of {name} is null"));
        }
    }
    let mut woke = false;
    for (name, values) in devices {
        woke |= st.ensure_connected(gateway, name, now);
        if let Some(d) = st.devices.get_mut(name) {
            for (k, v) in values.as_object().into_iter().flatten() {
                d.client.insert(k.clone(), v.clone());
            }
        }
        st.event(
            now,
            "attributes",
            Some(name),
            json!({"scope": "client", "data": values}),
        );
    }
    Ok(woke)
}

/// `{"Dev": [{"ts": 1, "values": {..}}]}`, `{"Dev": [{..values..}]}` or `{"Dev": {..}}`.
fn telemetry(st: &mut State, gateway: &str, body: &Value, now: u64) -> Result<bool, String> {
    let devices = per_device(body)?;
    let mut parsed = Vec::new();
    for (name, entries) in devices {
        let list = match entries {
            Value::Array(a) => a.clone(),
            Value::Object(_) => vec![entries.clone()],
            _ => {
                return Err(format!(
                    "telemetry of {name} is neither a list nor an object"
                ))
            }
        };
        let mut points = Vec::new();
        for e in list {
            let point = match (e.get("ts"), e.get("values")) {
                (Some(ts), Some(values)) if ts.is_i64() || ts.is_u64() => {
                    json!({"ts": ts, "values": values})
                }
                _ if e.is_object() => json!({"ts": now, "values": e}),
                _ => return Err(format!("telemetry entry of {name} is not an object")),
            };
            points.push(point);
        }
        parsed.push((name.clone(), points));
    }
    let mut woke = false;
    for (name, points) in parsed {
        woke |= st.ensure_connected(gateway, &name, now);
        let count = points.len();
        if let Some(d) = st.devices.get_mut(&name) {
            d.telemetry.extend(points);
        }
        st.event(now, "telemetry", Some(&name), json!({"points": count}));
    }
    Ok(woke)
}

/// `{"id": 1, "device": "Dev", "client": false, "key": "k"}` or `... "keys": [..]}`, answered
/// on `v1/gateway/attributes/response`.
fn attribute_request(
    st: &mut State,
    session: SessionId,
    gateway: &str,
    body: &Value,
    now: u64,
) -> Result<bool, String> {
    let name = device_name(body)?;
    let id = body
        .get("id")
        .filter(|v| v.is_number())
        .ok_or("no numeric \"id\"")?;
    let client = body.get("client").and_then(Value::as_bool).unwrap_or(false);
    let (keys, multiple) = if let Some(k) = body.get("key") {
        let k = k.as_str().ok_or("\"key\" is not a string")?;
        (vec![k.to_string()], false)
    } else if let Some(keys) = body.get("keys").and_then(Value::as_array) {
        let keys = keys
            .iter()
            .map(|k| k.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("\"keys\" holds a non-string")?;
        (keys, true)
    } else {
        return Err("neither \"key\" nor \"keys\"".into());
    };
    let woke = st.ensure_connected(gateway, name, now);
    let answer = st.attribute_answer(id, name, client, &keys, multiple);
    let pushed = st
        .push(session, ATTRIBUTES_RESPONSE_TOPIC, &answer, Ack::Nothing)
        .is_some();
    st.event(
        now,
        "attribute_request",
        Some(name),
        json!({"request": body, "answer": answer, "pushed": pushed}),
    );
    Ok(woke)
}

/// `{"device": "Dev", "id": 7, "data": {..}}`.
fn rpc_reply(st: &mut State, gateway: &str, body: &Value, now: u64) -> Result<bool, String> {
    let name = device_name(body)?;
    let id = body
        .get("id")
        .and_then(Value::as_u64)
        .ok_or("no integer \"id\"")?;
    let data = body.get("data").cloned().unwrap_or(Value::Null);
    let woke = st.ensure_connected(gateway, name, now);
    if !st.rpc_reply(name, id, data, now) {
        tracing::info!(device = name, id, "rpc reply nobody waits for, ignored");
    }
    Ok(woke)
}

/// The gateway's own client-side RPC: the official client asks `getSessionLimits` on connect;
/// answered as ThingsBoard does, with no rate limits set.
fn device_rpc(
    st: &mut State,
    session: SessionId,
    topic: &str,
    body: &Value,
) -> Result<bool, String> {
    let request_id = &topic[DEVICE_RPC_REQUEST.len()..];
    let answer = match body.get("method").and_then(Value::as_str) {
        Some("getSessionLimits") => {
            let none = json!({"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""});
            json!({
                "maxPayloadSize": super::wire::MAX_PACKET,
                "maxInflightMessages": 100,
                "rateLimits": none,
                "gatewayRateLimits": none,
            })
        }
        other => json!({"error": format!("unsupported client-side rpc {other:?}")}),
    };
    st.push(
        session,
        &format!("{DEVICE_RPC_RESPONSE}{request_id}"),
        &answer,
        Ack::Nothing,
    );
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thingsboard::state::Command;
    use tokio::sync::mpsc;

    fn gateway() -> (State, SessionId, mpsc::UnboundedReceiver<Command>) {
        let mut st = State::default();
        st.register_gateway("gw", "tok");
        let (tx, rx) = mpsc::unbounded_channel();
        let s = st.open_session("gw", tx, json!({}), 0);
        (st, s, rx)
    }

    #[test]
    fn a_null_attribute_drops_the_whole_publish() {
        let (mut st, s, _rx) = gateway();
        let body = br#"{"A": {"x": 1}, "B": {"y": null}}"#;
        handle(&mut st, s, "gw", "v1/gateway/attributes", body, 1);
        assert!(st.devices.is_empty());
        let ev = st.events_since(0);
        assert_eq!(ev.last().unwrap()["kind"], "protocol_error");
        handle(&mut st, s, "gw", "v1/gateway/attributes", b"not json", 2);
        assert_eq!(st.events_since(0).last().unwrap()["kind"], "protocol_error");
    }

    #[test]
    fn telemetry_keeps_given_timestamps_and_stamps_the_others() {
        let (mut st, s, _rx) = gateway();
        let body = br#"{"A": [{"ts": 5, "values": {"t": 1}}, {"t": 2}], "B": {"u": 3}}"#;
        let out = handle(&mut st, s, "gw", "v1/gateway/telemetry", body, 9);
        assert!(out.wake_delivery, "the devices were connected implicitly");
        assert_eq!(
            st.devices["A"].telemetry,
            vec![
                json!({"ts": 5, "values": {"t": 1}}),
                json!({"ts": 9, "values": {"t": 2}})
            ]
        );
        assert_eq!(
            st.devices["B"].telemetry,
            vec![json!({"ts": 9, "values": {"u": 3}})]
        );
        assert!(st.devices["A"].active);
    }
}
