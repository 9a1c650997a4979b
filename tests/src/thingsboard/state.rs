//! Everything the emulator knows: gateways and their live sessions, devices with their
//! attributes and telemetry, the event log, and (in `rpc.rs`) RPCs. Plain data behind one
//! `std::sync::Mutex`, never held across an await; every method takes `now` (epoch ms) instead
//! of reading the clock. A push to a session is a send on that session's channel, which never
//! blocks.

use super::wire::Outbound;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use tokio::sync::{mpsc, oneshot};

pub use super::rpc::{PersistentRpc, RpcStatus};

/// Id of one accepted MQTT connection.
pub type SessionId = u64;

/// Topic of attribute updates and of attribute requests' answers, server to gateway.
pub const ATTRIBUTES_TOPIC: &str = "v1/gateway/attributes";
pub const ATTRIBUTES_RESPONSE_TOPIC: &str = "v1/gateway/attributes/response";
pub const RPC_TOPIC: &str = "v1/gateway/rpc";

/// What a session task is told to do.
#[derive(Debug)]
pub enum Command {
    Send(Outbound),
    /// Close the socket at once, without a DISCONNECT.
    Close,
}

/// What the PUBACK of a server publish completes.
#[derive(Debug)]
pub enum Ack {
    Nothing,
    /// A non-persistent one-way RPC waiting in the operator API.
    Waiter(oneshot::Sender<()>),
    /// A persistent RPC, by id.
    Persistent(String),
}

#[derive(Debug)]
pub struct Gateway {
    pub token: String,
    pub session: Option<SessionId>,
    pub connects: u64,
}

#[derive(Debug)]
pub struct Session {
    pub gateway: String,
    pub filters: Vec<String>,
    pub tx: mpsc::UnboundedSender<Command>,
    next_pkid: u16,
    pub inflight: HashMap<u16, Ack>,
}

#[derive(Debug, Default)]
pub struct Device {
    pub kind: String,
    pub gateway: Option<String>,
    pub active: bool,
    pub connects: u64,
    pub disconnects: u64,
    pub client: Map<String, Value>,
    pub shared: Map<String, Value>,
    pub telemetry: Vec<Value>,
    /// Last RPC request id given out for this device.
    pub last_request_id: u64,
}

/// The whole emulator state.
#[derive(Debug, Default)]
pub struct State {
    pub gateways: BTreeMap<String, Gateway>,
    pub devices: BTreeMap<String, Device>,
    pub sessions: HashMap<SessionId, Session>,
    events: Vec<Value>,
    next_session: SessionId,
    /// Non-persistent two-way RPCs waiting for their reply, by (device, request id).
    pub waiters: HashMap<(String, u64), oneshot::Sender<Value>>,
    /// Persistent RPCs in creation order.
    pub rpcs: Vec<PersistentRpc>,
}

/// MQTT topic filter match with `+` and `#`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl State {
    /// Appends to the event log.
    pub fn event(&mut self, now: u64, kind: &str, device: Option<&str>, detail: Value) {
        let seq = self.events.len() as u64 + 1;
        self.events.push(json!({
            "seq": seq, "at_ms": now, "kind": kind, "device": device, "detail": detail,
        }));
    }

    /// Events with `seq > since`.
    pub fn events_since(&self, since: u64) -> Vec<Value> {
        self.events
            .iter()
            .skip(since.min(self.events.len() as u64) as usize)
            .cloned()
            .collect()
    }

    /// Registers (or re-keys) a gateway; false when another gateway holds the token.
    pub fn register_gateway(&mut self, name: &str, token: &str) -> bool {
        if self
            .gateways
            .iter()
            .any(|(n, g)| g.token == token && n != name)
        {
            return false;
        }
        self.gateways
            .entry(name.to_string())
            .and_modify(|g| g.token = token.to_string())
            .or_insert(Gateway {
                token: token.to_string(),
                session: None,
                connects: 0,
            });
        true
    }

    pub fn gateway_of_token(&self, token: &str) -> Option<String> {
        self.gateways
            .iter()
            .find(|(_, g)| g.token == token)
            .map(|(n, _)| n.clone())
    }

    /// Accepts a CONNECT of `gateway`: an older session of the same gateway is closed first.
    pub fn open_session(
        &mut self,
        gateway: &str,
        tx: mpsc::UnboundedSender<Command>,
        detail: Value,
        now: u64,
    ) -> SessionId {
        if let Some(old) = self.gateways.get(gateway).and_then(|g| g.session) {
            self.end_session(old, "replaced by a new connection", now);
        }
        self.next_session += 1;
        let id = self.next_session;
        self.sessions.insert(
            id,
            Session {
                gateway: gateway.to_string(),
                filters: Vec::new(),
                tx,
                next_pkid: 0,
                inflight: HashMap::new(),
            },
        );
        if let Some(g) = self.gateways.get_mut(gateway) {
            g.session = Some(id);
            g.connects += 1;
        }
        let mut detail = detail;
        detail["gateway"] = json!(gateway);
        detail["session"] = json!(id);
        self.event(now, "session_open", None, detail);
        id
    }

    /// Ends a session (no-op when already ended): its socket is told to close, its gateway's
    /// devices go offline, and persistent RPCs sent on it without a PUBACK are queued again.
    pub fn end_session(&mut self, id: SessionId, reason: &str, now: u64) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        let _ = session.tx.send(Command::Close);
        if let Some(g) = self.gateways.get_mut(&session.gateway) {
            if g.session == Some(id) {
                g.session = None;
            }
        }
        let names: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| d.active && d.gateway.as_deref() == Some(session.gateway.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.set_inactive(&name, json!({"reason": "session closed"}), now);
        }
        self.requeue_unacked(id, now);
        self.event(
            now,
            "session_close",
            None,
            json!({"gateway": session.gateway, "session": id, "reason": reason}),
        );
    }

    pub fn subscribe(&mut self, id: SessionId, filters: &[String]) {
        if let Some(s) = self.sessions.get_mut(&id) {
            for f in filters {
                if !s.filters.contains(f) {
                    s.filters.push(f.clone());
                }
            }
        }
    }

    pub fn unsubscribe(&mut self, id: SessionId, filters: &[String]) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.filters.retain(|f| !filters.contains(f));
        }
    }

    /// Publishes `payload` on `topic` to session `id` at QoS 1 if it subscribed a matching
    /// filter; `ack` runs on its PUBACK. Returns the packet id, or None when not sent.
    pub fn push(&mut self, id: SessionId, topic: &str, payload: &Value, ack: Ack) -> Option<u16> {
        let s = self.sessions.get_mut(&id)?;
        if !s.filters.iter().any(|f| topic_matches(f, topic)) {
            return None;
        }
        let pkid = loop {
            s.next_pkid = s.next_pkid.wrapping_add(1).max(1);
            if !s.inflight.contains_key(&s.next_pkid) {
                break s.next_pkid;
            }
        };
        let frame = Outbound::Publish {
            topic: topic.to_string(),
            pkid,
            payload: Bytes::from(payload.to_string()),
        };
        s.tx.send(Command::Send(frame)).ok()?;
        s.inflight.insert(pkid, ack);
        Some(pkid)
    }

    /// The PUBACK of a server publish.
    pub fn puback(&mut self, id: SessionId, pkid: u16, now: u64) {
        let ack = self
            .sessions
            .get_mut(&id)
            .and_then(|s| s.inflight.remove(&pkid));
        match ack {
            Some(Ack::Waiter(tx)) => {
                let _ = tx.send(());
            }
            Some(Ack::Persistent(rpc)) => self.rpc_delivered(&rpc, id, pkid, now),
            Some(Ack::Nothing) | None => {}
        }
    }

    /// The device's record, created (not connected, no gateway, type "default") if unknown.
    pub fn device_entry(&mut self, name: &str) -> &mut Device {
        self.devices
            .entry(name.to_string())
            .or_insert_with(|| Device {
                kind: "default".into(),
                ..Device::default()
            })
    }

    /// The live session through which `device` is connected, if any.
    pub fn device_session(&self, device: &str) -> Option<SessionId> {
        let d = self.devices.get(device)?;
        if !d.active {
            return None;
        }
        self.gateways.get(d.gateway.as_deref()?)?.session
    }

    /// `v1/gateway/connect`: creates the device under this gateway if new and marks it
    /// connected.
    pub fn connect_device(&mut self, gateway: &str, name: &str, kind: Option<&str>, now: u64) {
        let d = self.device_entry(name);
        if let Some(kind) = kind {
            d.kind = kind.to_string();
        }
        d.gateway = Some(gateway.to_string());
        d.active = true;
        d.connects += 1;
        let kind = d.kind.clone();
        self.event(
            now,
            "connect",
            Some(name),
            json!({"gateway": gateway, "type": kind}),
        );
    }

    /// ThingsBoard connects a device implicitly when its gateway sends anything for it
    /// (`GatewaySessionHandler.checkDeviceConnected`): same as `v1/gateway/connect` with the
    /// default type, once.
    pub fn ensure_connected(&mut self, gateway: &str, name: &str, now: u64) -> bool {
        let connected = self
            .devices
            .get(name)
            .is_some_and(|d| d.active && d.gateway.as_deref() == Some(gateway));
        if !connected {
            self.connect_device(gateway, name, None, now);
        }
        !connected
    }

    /// `v1/gateway/disconnect`, or the end of the gateway's session.
    pub fn set_inactive(&mut self, name: &str, detail: Value, now: u64) {
        if let Some(d) = self.devices.get_mut(name) {
            if d.active {
                d.active = false;
                d.disconnects += 1;
                self.event(now, "disconnect", Some(name), detail);
            }
        }
    }

    /// Operator: sets shared attributes; pushed when the device is online.
    pub fn set_shared(&mut self, name: &str, values: Map<String, Value>, now: u64) -> bool {
        let d = self.device_entry(name);
        for (k, v) in &values {
            d.shared.insert(k.clone(), v.clone());
        }
        let data = Value::Object(values);
        self.push_shared(name, data, now)
    }

    /// Operator: deletes shared attributes; the deletion is pushed when the device is online.
    pub fn delete_shared(&mut self, name: &str, keys: &[String], now: u64) -> Option<bool> {
        let d = self.devices.get_mut(name)?;
        for k in keys {
            d.shared.remove(k);
        }
        Some(self.push_shared(name, json!({"deleted": keys}), now))
    }

    fn push_shared(&mut self, name: &str, data: Value, now: u64) -> bool {
        let pushed = match self.device_session(name) {
            Some(s) => self
                .push(
                    s,
                    ATTRIBUTES_TOPIC,
                    &json!({"device": name, "data": data}),
                    Ack::Nothing,
                )
                .is_some(),
            None => false,
        };
        self.event(
            now,
            "attributes",
            Some(name),
            json!({"scope": "shared", "data": data, "pushed": pushed}),
        );
        pushed
    }

    /// The answer to an attribute request, shaped like ThingsBoard's
    /// `JsonConverter.getJsonObjectForGateway`: `value` for a single `key` found, `values` with
    /// the keys found for a `keys` request, neither when nothing was found.
    pub fn attribute_answer(
        &self,
        id: &Value,
        name: &str,
        client: bool,
        keys: &[String],
        multiple: bool,
    ) -> Value {
        let mut answer = json!({"id": id, "device": name});
        let Some(d) = self.devices.get(name) else {
            return answer;
        };
        let scope = if client { &d.client } else { &d.shared };
        let found: Map<String, Value> = keys
            .iter()
            .filter_map(|k| scope.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        if found.len() == 1 && !multiple {
            answer["value"] = found.into_iter().next().map(|(_, v)| v).unwrap_or_default();
        } else if !found.is_empty() {
            answer["values"] = Value::Object(found);
        }
        answer
    }

    pub fn device_view(&self, name: &str) -> Option<Value> {
        let d = self.devices.get(name)?;
        Some(json!({
            "name": name, "type": d.kind, "gateway": d.gateway, "active": d.active,
            "connects": d.connects, "disconnects": d.disconnects,
        }))
    }

    pub fn gateways_view(&self) -> Value {
        Value::Array(
            self.gateways
                .iter()
                .map(|(n, g)| {
                    let filters = g
                        .session
                        .and_then(|s| self.sessions.get(&s))
                        .map(|s| s.filters.clone())
                        .unwrap_or_default();
                    json!({
                        "name": n, "connected": g.session.is_some(), "connects": g.connects,
                        "subscriptions": filters,
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_with_wildcards() {
        assert!(topic_matches("v1/gateway/rpc", "v1/gateway/rpc"));
        assert!(!topic_matches("v1/gateway/rpc", "v1/gateway/rpc/x"));
        assert!(topic_matches(
            "v1/gateway/#",
            "v1/gateway/attributes/response"
        ));
        assert!(topic_matches("#", "v1/gateway/rpc"));
        assert!(topic_matches(
            "v1/devices/me/rpc/response/+",
            "v1/devices/me/rpc/response/1"
        ));
        assert!(!topic_matches(
            "v1/devices/me/attributes",
            "v1/gateway/attributes"
        ));
        assert!(!topic_matches(
            "v1/+/attributes",
            "v1/gateway/attributes/response"
        ));
    }

    #[test]
    fn attribute_answers_follow_thingsboard_shapes() {
        let mut st = State::default();
        let mut shared = Map::new();
        shared.insert("a".into(), json!(1));
        shared.insert("b".into(), json!(2));
        st.set_shared("Dev", shared, 0);
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let id = json!(1);
        assert_eq!(
            st.attribute_answer(&id, "Dev", false, &keys(&["a"]), false),
            json!({"id": 1, "device": "Dev", "value": 1})
        );
        assert_eq!(
            st.attribute_answer(&id, "Dev", false, &keys(&["a"]), true),
            json!({"id": 1, "device": "Dev", "values": {"a": 1}})
        );
        assert_eq!(
            st.attribute_answer(&id, "Dev", false, &keys(&["a", "b", "c"]), true),
            json!({"id": 1, "device": "Dev", "values": {"a": 1, "b": 2}})
        );
        assert_eq!(
            st.attribute_answer(&id, "Dev", false, &keys(&["c"]), true),
            json!({"id": 1, "device": "Dev"})
        );
        assert_eq!(
            st.attribute_answer(&id, "Dev", true, &keys(&["a"]), false),
            json!({"id": 1, "device": "Dev"})
        );
        assert_eq!(
            st.attribute_answer(&id, "Nope", false, &keys(&["a"]), false),
            json!({"id": 1, "device": "Nope"})
        );
    }
}
