//! One simulated gateway and its devices, without I/O: what it announces at every connect,
//! what it publishes when it leaves, and what it answers to each publish under its `down/`
//! topics. Its devices answer every call at once, hold whatever desired value they are given
//! for a property they declare, and run every command they declare. Everything is kept in
//! memory, so the gateway survives reconnects but not the process (a restart of the swarm is a
//! new boot with a new store).

use gatewayd_protocol::chunk::{presence_part, presence_part_size, presence_parts, split_catalog};
use gatewayd_protocol::message::FeedbackOutcome;
use gatewayd_protocol::twin::{decide_desired, merge_patch, DesiredDecision};
use gatewayd_protocol::{
    decode, validate_params, ApplyState, ApplyStatus, C2dMessage, DesiredBody, DesiredUpdate,
    DeviceId, DeviceInfo, DeviceStatus, Down, ErrorCode, Feedback, GatewayId, GatewayState,
    MessageId, MethodInfo, ReportedUpdate, RequestId, RpcError, RpcOutcome, RpcRequest,
    RpcResponse, RpcSuccess, Topics, TwinSync, Up, PROTOCOL_VERSION,
};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Methods every simulated device declares: `status` (no params) and `move` (`x`, optional
/// `speed` of at least 0).
pub const METHODS: [&str; 2] = ["status", "move"];
/// Desired properties every simulated device maps.
pub const TWIN_PROPERTIES: [&str; 2] = ["maxSpeed", "mode"];
/// Message commands every simulated device runs.
pub const COMMANDS: [&str; 2] = ["RESTART", "BEEP"];
/// Software the simulated gateways announce.
pub const SOFTWARE: &str = "gatewayd-swarm";
/// Message ids a gateway remembers (with their latest feedback) to recognise a redelivery.
const REMEMBERED_MESSAGES: usize = 4096;

/// One publish a simulated gateway sends (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// What one incoming publish was, for the swarm's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// An RPC request, answered (successfully or with a coded error).
    Rpc { ok: bool },
    /// A new message, run to this outcome.
    Message(FeedbackOutcome),
    /// A message id seen before: its latest feedback was repeated.
    MessageRepeated,
    /// A desired update and what the version rule made of it.
    Desired(DesiredDecision),
    /// Not for this gateway, unreadable, or for a device it does not have.
    Ignored,
}

struct SimDevice {
    /// Desired version held.
    held: u64,
    /// Desired document held (what the device was last told).
    desired: Value,
}

/// A simulated gateway.
pub struct SimGateway {
    id: GatewayId,
    boot_id: String,
    store_id: String,
    max_publish: usize,
    devices: BTreeMap<DeviceId, SimDevice>,
    /// Latest feedback by message id, oldest first in `order`.
    messages: HashMap<MessageId, Feedback>,
    order: VecDeque<MessageId>,
    /// Last reported `seq` (grows per device, as the protocol asks, because it grows overall).
    seq: u64,
    /// When the devices came online, unix ms.
    since_ms: u64,
    presence_generation: u64,
    /// Retained parts published at the last connect, deleted when the gateway leaves.
    catalog_parts: u32,
    presence_parts: u32,
}

impl SimGateway {
    /// A gateway `id` with `devices`, publishing at most `max_publish` bytes at once.
    /// `boot_id`, `store_id` and `presence_generation` identify this run; `now_ms` starts the
    /// reported `seq` (so a later run of the same gateway is never taken for a stale one).
    pub fn new(
        id: GatewayId,
        devices: Vec<DeviceId>,
        max_publish: usize,
        boot_id: String,
        store_id: String,
        presence_generation: u64,
        now_ms: u64,
    ) -> SimGateway {
        let devices = devices
            .into_iter()
            .map(|d| {
                (
                    d,
                    SimDevice {
                        held: 0,
                        desired: Value::Object(Map::new()),
                    },
                )
            })
            .collect();
        SimGateway {
            id,
            boot_id,
            store_id,
            max_publish,
            devices,
            messages: HashMap::new(),
            order: VecDeque::new(),
            seq: now_ms,
            since_ms: now_ms,
            presence_generation,
            catalog_parts: 0,
            presence_parts: 0,
        }
    }

    /// The gateway id (also its MQTT client id).
    pub fn id(&self) -> &GatewayId {
        &self.id
    }

    /// The last will: retained `up/state` offline, with this run's boot id.
    pub fn will(&self) -> Publish {
        self.state(false, 0)
    }

    /// What the gateway publishes at every ConnAck, after subscribing to its `down/#`: the
    /// catalog parts of a new `generation`, the presence parts, the birth and the twin sync.
    pub fn announce(&mut self, generation: u64, now_ms: u64) -> Vec<Publish> {
        let infos: Vec<DeviceInfo> = self.devices.keys().map(device_info).collect();
        let catalog = split_catalog(infos, generation, self.max_publish)
            .expect("a simulated device's catalog entry fits any publish above 1 KiB");
        let mut out: Vec<Publish> = catalog
            .iter()
            .map(|part| self.up_part(Up::Catalog, part.part, part))
            .collect();
        self.catalog_parts = catalog.len() as u32;
        let ids: Vec<DeviceId> = self.devices.keys().cloned().collect();
        let groups = presence_parts(&ids, presence_part_size(self.max_publish));
        let parts = groups.len() as u32;
        for (i, group) in groups.into_iter().enumerate() {
            let devices = group
                .into_iter()
                .map(|d| {
                    let status = DeviceStatus {
                        online: true,
                        since_ms: self.since_ms,
                        reason: None,
                    };
                    (d, status)
                })
                .collect();
            let part = presence_part(self.presence_generation, i as u32, parts, devices);
            out.push(self.up_part(Up::Devices, i as u32, &part));
        }
        self.presence_parts = parts;
        out.push(self.state(true, now_ms));
        out.push(self.sync(self.devices.iter().map(|(d, s)| (d.clone(), s.held))));
        out
    }

    /// What the gateway publishes when it leaves in order: its offline state, then empty
    /// retained publishes that delete its state and announcement parts from the broker, so a
    /// cloud that subscribes later never sees this gateway.
    pub fn goodbye(&self, now_ms: u64) -> Vec<Publish> {
        let clear = |topic: String| Publish {
            topic,
            payload: Vec::new(),
            retain: true,
        };
        let mut out = vec![
            self.state(false, now_ms),
            clear(Topics::up(&self.id, Up::State)),
        ];
        out.extend(
            (0..self.catalog_parts).map(|i| clear(Topics::up_part(&self.id, Up::Catalog, i))),
        );
        out.extend(
            (0..self.presence_parts).map(|i| clear(Topics::up_part(&self.id, Up::Devices, i))),
        );
        out
    }

    /// Handles one publish the gateway received; returns what it was and the answers to send.
    pub fn handle(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> (Handled, Vec<Publish>) {
        match Topics::parse_down(topic) {
            Some((gw, kind)) if gw == self.id => match kind {
                Down::RpcRequest => self.on_rpc(payload, now_ms),
                Down::TwinDesired => self.on_desired(payload, now_ms),
                Down::Message => self.on_message(payload, now_ms),
                Down::ConfigDesired => (Handled::Ignored, Vec::new()),
            },
            _ => (Handled::Ignored, Vec::new()),
        }
    }

    fn on_rpc(&mut self, payload: &[u8], now_ms: u64) -> (Handled, Vec<Publish>) {
        let req: RpcRequest = match decode(payload) {
            Ok(r) => r,
            Err(e) => {
                // A request whose id can still be read is answered `bad_request`.
                let id = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| RequestId::new(v.get("id")?.as_str()?).ok());
                let Some(id) = id else {
                    return (Handled::Ignored, Vec::new());
                };
                let err = RpcError::new(ErrorCode::BadRequest, format!("malformed request: {e}"));
                return (Handled::Rpc { ok: false }, vec![self.answer(id, Err(err))]);
            }
        };
        let outcome = self.call(&req, now_ms);
        let ok = outcome.is_ok();
        (Handled::Rpc { ok }, vec![self.answer(req.id, outcome)])
    }

    fn call(&self, req: &RpcRequest, now_ms: u64) -> Result<RpcSuccess, RpcError> {
        if req.effective_deadline_ms(now_ms) <= now_ms {
            return Err(RpcError::new(
                ErrorCode::Timeout,
                format!("request {} arrived after its deadline", req.id),
            ));
        }
        if !self.devices.contains_key(&req.device) {
            return Err(RpcError::new(
                ErrorCode::DeviceNotFound,
                format!("gateway {} has no device {}", self.id, req.device),
            ));
        }
        let Some(method) = methods().into_iter().find(|m| m.name == req.method) else {
            return Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("device {} has no method '{}'", req.device, req.method),
            ));
        };
        validate_params(&method.params, &req.params).map_err(|problems| {
            RpcError::new(
                ErrorCode::InvalidParams,
                format!(
                    "invalid params for {} '{}': {problems}",
                    req.device, req.method
                ),
            )
        })?;
        Ok(RpcSuccess {
            status: 200,
            result: json!({"device": req.device, "method": req.method, "at_ms": now_ms}),
        })
    }

    fn answer(&self, id: RequestId, outcome: Result<RpcSuccess, RpcError>) -> Publish {
        let response = RpcResponse {
            v: PROTOCOL_VERSION,
            id,
            outcome: match outcome {
                Ok(s) => RpcOutcome::Ok(s),
                Err(e) => RpcOutcome::Error(e),
            },
        };
        self.up(Up::RpcResponse, &response)
    }

    fn on_desired(&mut self, payload: &[u8], now_ms: u64) -> (Handled, Vec<Publish>) {
        let Ok(update) = decode::<DesiredUpdate>(payload) else {
            return (Handled::Ignored, Vec::new());
        };
        let Some(device) = self.devices.get_mut(&update.device) else {
            return (Handled::Ignored, Vec::new());
        };
        let (is_snapshot, doc) = match &update.body {
            DesiredBody::Patch(p) => (false, p),
            DesiredBody::Snapshot(s) => (true, s),
        };
        let Some(doc) = doc.as_object() else {
            return (Handled::Ignored, Vec::new());
        };
        let decision = decide_desired(device.held, update.version, is_snapshot);
        match decision {
            DesiredDecision::Ignore => return (Handled::Desired(decision), Vec::new()),
            DesiredDecision::Resync => {
                let held = [(update.device.clone(), device.held)];
                return (Handled::Desired(decision), vec![self.sync(held)]);
            }
            DesiredDecision::Apply => {}
        }
        // What changes at the device: the update's properties, and for a snapshot also the
        // properties it no longer names (deleted).
        let mut changes = doc.clone();
        if is_snapshot {
            if let Some(old) = device.desired.as_object() {
                for k in old.keys().filter(|k| !doc.contains_key(*k)) {
                    changes.insert(k.clone(), Value::Null);
                }
            }
            device.desired = Value::Object(doc.clone());
        } else {
            merge_patch(&mut device.desired, &Value::Object(doc.clone()));
        }
        device.held = update.version;
        let mut patch = Map::new();
        let mut apply = BTreeMap::new();
        for (k, v) in changes {
            if !TWIN_PROPERTIES.contains(&k.as_str()) {
                if v.is_null() {
                    continue;
                }
                let status = ApplyStatus {
                    state: ApplyState::Refused,
                    desired_version: update.version,
                    reason: Some(format!("device {} maps no property '{k}'", update.device)),
                    at_ms: now_ms,
                    attempts: 0,
                };
                apply.insert(k, status);
                continue;
            }
            if !v.is_null() {
                let status = ApplyStatus {
                    state: ApplyState::Applied,
                    desired_version: update.version,
                    reason: None,
                    at_ms: now_ms,
                    attempts: 0,
                };
                apply.insert(k.clone(), status);
            }
            patch.insert(k, v);
        }
        self.seq += 1;
        let reported = ReportedUpdate {
            v: PROTOCOL_VERSION,
            device: update.device,
            seq: self.seq,
            patch: Value::Object(patch),
            apply,
        };
        (
            Handled::Desired(decision),
            vec![self.up(Up::TwinReported, &reported)],
        )
    }

    fn on_message(&mut self, payload: &[u8], now_ms: u64) -> (Handled, Vec<Publish>) {
        let msg: C2dMessage = match decode(payload) {
            Ok(m) => m,
            Err(e) => {
                // One whose id and device can be read ends `rejected` with the reason.
                let head = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
                    let id = MessageId::new(v.get("id")?.as_str()?).ok()?;
                    let device = DeviceId::new(v.get("device")?.as_str()?).ok()?;
                    Some((id, device))
                });
                let Some((id, device)) = head else {
                    return (Handled::Ignored, Vec::new());
                };
                let reason = format!("malformed message: {e}");
                let fb = feedback(
                    &id,
                    &device,
                    FeedbackOutcome::Rejected,
                    Some(reason),
                    now_ms,
                );
                self.remember(fb.clone());
                return (
                    Handled::Message(FeedbackOutcome::Rejected),
                    vec![self.up(Up::MessageFeedback, &fb)],
                );
            }
        };
        if let Some(last) = self.messages.get(&msg.id) {
            return (
                Handled::MessageRepeated,
                vec![self.up(Up::MessageFeedback, last)],
            );
        }
        let (outcome, reason) = if !self.devices.contains_key(&msg.device) {
            let why = format!("gateway {} has no device {}", self.id, msg.device);
            (FeedbackOutcome::Rejected, Some(why))
        } else if msg.expires_at_ms <= now_ms {
            (FeedbackOutcome::Expired, None)
        } else {
            match msg.payload.get("command").and_then(Value::as_str) {
                Some(c) if COMMANDS.contains(&c) => (FeedbackOutcome::Completed, None),
                Some(c) => (
                    FeedbackOutcome::Rejected,
                    Some(format!("no mapping for command '{c}'")),
                ),
                None => (
                    FeedbackOutcome::Rejected,
                    Some("the payload names no command".to_string()),
                ),
            }
        };
        let received = feedback(
            &msg.id,
            &msg.device,
            FeedbackOutcome::Received,
            None,
            now_ms,
        );
        let last = feedback(&msg.id, &msg.device, outcome, reason, now_ms);
        let out = vec![
            self.up(Up::MessageFeedback, &received),
            self.up(Up::MessageFeedback, &last),
        ];
        self.remember(last);
        (Handled::Message(outcome), out)
    }

    fn remember(&mut self, fb: Feedback) {
        if self.order.len() >= REMEMBERED_MESSAGES {
            if let Some(old) = self.order.pop_front() {
                self.messages.remove(&old);
            }
        }
        self.order.push_back(fb.id.clone());
        self.messages.insert(fb.id.clone(), fb);
    }

    fn state(&self, online: bool, now_ms: u64) -> Publish {
        let state = GatewayState {
            v: PROTOCOL_VERSION,
            online,
            boot_id: self.boot_id.clone(),
            software: SOFTWARE.to_string(),
            at_ms: now_ms,
            store_id: self.store_id.clone(),
            store_error: None,
        };
        Publish {
            retain: true,
            ..self.up(Up::State, &state)
        }
    }

    fn sync(&self, held: impl IntoIterator<Item = (DeviceId, u64)>) -> Publish {
        let sync = TwinSync {
            v: PROTOCOL_VERSION,
            devices: held.into_iter().collect(),
        };
        self.up(Up::TwinSync, &sync)
    }

    fn up(&self, kind: Up, payload: &impl Serialize) -> Publish {
        Publish {
            topic: Topics::up(&self.id, kind),
            payload: serde_json::to_vec(payload).expect("payloads serialize"),
            retain: false,
        }
    }

    fn up_part(&self, kind: Up, part: u32, payload: &impl Serialize) -> Publish {
        Publish {
            topic: Topics::up_part(&self.id, kind, part),
            payload: serde_json::to_vec(payload).expect("payloads serialize"),
            retain: true,
        }
    }
}

fn feedback(
    id: &MessageId,
    device: &DeviceId,
    outcome: FeedbackOutcome,
    reason: Option<String>,
    now_ms: u64,
) -> Feedback {
    Feedback {
        v: PROTOCOL_VERSION,
        id: id.clone(),
        device: device.clone(),
        outcome,
        reason,
        device_status: None,
        at_ms: now_ms,
    }
}

/// The methods of [`METHODS`] with their declared params.
fn methods() -> Vec<MethodInfo> {
    serde_json::from_value(json!([
        {"name": METHODS[0]},
        {"name": METHODS[1], "params": {
            "x": {"type": "number"},
            "speed": {"type": "number", "required": false, "min": 0}
        }}
    ]))
    .expect("method declarations parse")
}

/// The catalog entry of a simulated device.
fn device_info(id: &DeviceId) -> DeviceInfo {
    DeviceInfo {
        id: id.clone(),
        kind: "sim".into(),
        methods: methods(),
        twin_properties: TWIN_PROPERTIES.map(String::from).into(),
        commands: COMMANDS.map(String::from).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatewayd_protocol::chunk::CatalogAssembly;
    use gatewayd_protocol::{Catalog, DevicePresence};

    const NOW: u64 = 1_795_000_000_000;

    fn gateway(devices: usize, max_publish: usize) -> SimGateway {
        let id = GatewayId::new("sw-1").unwrap();
        let devices = (0..devices)
            .map(|i| DeviceId::new(format!("sw-1-d{i:02}")).unwrap())
            .collect();
        SimGateway::new(id, devices, max_publish, "b1".into(), "s1".into(), 9, NOW)
    }

    fn json_of(p: &Publish) -> Value {
        serde_json::from_slice(&p.payload).unwrap()
    }

    #[test]
    fn the_announcement_splits_into_parts_that_fit_then_birth_then_sync() {
        let mut gw = gateway(10, 2048);
        let out = gw.announce(77, NOW);
        assert!(out.iter().all(|p| p.payload.len() <= 2048));
        let mut assembly = CatalogAssembly::default();
        let mut whole = None;
        let mut presence = BTreeMap::new();
        for p in &out[..out.len() - 2] {
            match Topics::parse_up_part(&p.topic).unwrap() {
                (_, Up::Catalog, i) => {
                    let c: Catalog = decode(&p.payload).unwrap();
                    assert_eq!((c.part, c.generation), (i, 77));
                    whole = assembly.add(c, 100).or(whole);
                }
                (_, Up::Devices, _) => {
                    let d: DevicePresence = decode(&p.payload).unwrap();
                    presence.extend(d.devices);
                }
                other => panic!("unexpected part {other:?}"),
            }
            assert!(p.retain);
        }
        assert!(gw.catalog_parts > 1 && gw.presence_parts > 1);
        assert_eq!(whole.unwrap().len(), 10);
        assert_eq!(presence.len(), 10);
        assert!(presence.values().all(|s| s.online));
        let birth = &out[out.len() - 2];
        assert_eq!(birth.topic, "gw/sw-1/up/state");
        assert!(birth.retain);
        assert_eq!(json_of(birth)["online"], true);
        assert_eq!(json_of(birth)["store_id"], "s1");
        let sync = &out[out.len() - 1];
        assert_eq!(sync.topic, "gw/sw-1/up/twin/sync");
        assert_eq!(json_of(sync)["devices"]["sw-1-d03"], 0);
        let gone = gw.goodbye(NOW);
        assert_eq!(json_of(&gone[0])["online"], false);
        assert_eq!(gone.len() as u32, 2 + gw.catalog_parts + gw.presence_parts);
        assert!(gone[1..].iter().all(|p| p.retain && p.payload.is_empty()));
        assert_eq!(json_of(&gw.will())["boot_id"], "b1");
    }

    #[test]
    fn calls_are_answered_at_once_and_checked_like_gatewayd_does() {
        let mut gw = gateway(2, 128 * 1024);
        let req = |id: &str, device: &str, method: &str, params: Value| {
            serde_json::to_vec(&json!({"v":1,"id":id,"device":device,"method":method,
                "params":params,"timeout_ms":5000,"deadline_ms":NOW + 5000}))
            .unwrap()
        };
        let topic = "gw/sw-1/down/rpc/req";
        let (h, out) = gw.handle(topic, &req("r1", "sw-1-d01", "status", Value::Null), NOW);
        assert_eq!(h, Handled::Rpc { ok: true });
        assert_eq!(out[0].topic, "gw/sw-1/up/rpc/res");
        let res = json_of(&out[0]);
        assert_eq!(res["ok"]["status"], 200);
        assert_eq!(res["ok"]["result"]["device"], "sw-1-d01");
        let code = |payload: Vec<u8>, now| {
            let mut gw = gateway(2, 128 * 1024);
            json_of(&gw.handle(topic, &payload, now).1[0])["error"]["code"].clone()
        };
        assert_eq!(
            code(req("r2", "x", "status", Value::Null), NOW),
            "device_not_found"
        );
        assert_eq!(
            code(req("r3", "sw-1-d00", "fly", Value::Null), NOW),
            "method_not_found"
        );
        assert_eq!(
            code(req("r4", "sw-1-d00", "move", json!({"x": "a"})), NOW),
            "invalid_params"
        );
        assert_eq!(
            code(req("r5", "sw-1-d00", "status", Value::Null), NOW + 6000),
            "timeout"
        );
        assert_eq!(code(br#"{"id":"r6"}"#.to_vec(), NOW), "bad_request");
        let (h, out) = gw.handle(
            "gw/sw-2/down/rpc/req",
            &req("r7", "sw-1-d00", "status", Value::Null),
            NOW,
        );
        assert_eq!((h, out.len()), (Handled::Ignored, 0));
    }

    #[test]
    fn messages_get_received_then_their_outcome_and_a_redelivery_repeats_it() {
        let mut gw = gateway(2, 128 * 1024);
        let msg = |id: &str, command: &str, expires: u64| {
            serde_json::to_vec(&json!({"v":1,"id":id,"device":"sw-1-d00",
                "payload":{"command":command},"expires_at_ms":expires}))
            .unwrap()
        };
        let topic = "gw/sw-1/down/msg";
        let (h, out) = gw.handle(topic, &msg("m1", "RESTART", NOW + 1000), NOW);
        assert_eq!(h, Handled::Message(FeedbackOutcome::Completed));
        let outcomes: Vec<Value> = out.iter().map(|p| json_of(p)["outcome"].clone()).collect();
        assert_eq!(outcomes, [json!("received"), json!("completed")]);
        assert_eq!(out[0].topic, "gw/sw-1/up/msg/feedback");
        let (h, out) = gw.handle(topic, &msg("m1", "RESTART", NOW + 1000), NOW);
        assert_eq!(h, Handled::MessageRepeated);
        assert_eq!(json_of(&out[0])["outcome"], "completed");
        let (h, out) = gw.handle(topic, &msg("m2", "FLY", NOW + 1000), NOW);
        assert_eq!(h, Handled::Message(FeedbackOutcome::Rejected));
        assert_eq!(json_of(&out[1])["reason"], "no mapping for command 'FLY'");
        let (h, _) = gw.handle(topic, &msg("m3", "BEEP", NOW), NOW);
        assert_eq!(h, Handled::Message(FeedbackOutcome::Expired));
    }

    #[test]
    fn desired_updates_follow_the_version_rule_and_are_reported_applied() {
        let mut gw = gateway(1, 128 * 1024);
        let topic = "gw/sw-1/down/twin/desired";
        let upd = |v: u64, body: Value| {
            let mut u = json!({"v":1,"device":"sw-1-d00","version":v});
            u.as_object_mut()
                .unwrap()
                .extend(body.as_object().unwrap().clone());
            serde_json::to_vec(&u).unwrap()
        };
        let (h, out) = gw.handle(
            topic,
            &upd(1, json!({"patch":{"maxSpeed":12.5,"color":"red"}})),
            NOW,
        );
        assert_eq!(h, Handled::Desired(DesiredDecision::Apply));
        let r = json_of(&out[0]);
        assert_eq!(out[0].topic, "gw/sw-1/up/twin/reported");
        assert_eq!(r["patch"], json!({"maxSpeed": 12.5}));
        assert_eq!(r["apply"]["maxSpeed"]["state"], "applied");
        assert_eq!(r["apply"]["maxSpeed"]["desired_version"], 1);
        assert_eq!(r["apply"]["color"]["state"], "refused");
        let seq1 = r["seq"].as_u64().unwrap();
        // Stale, then a gap (asks for a snapshot), then the snapshot.
        let (h, out) = gw.handle(topic, &upd(1, json!({"patch":{"maxSpeed":1}})), NOW);
        assert_eq!(
            (h, out.len()),
            (Handled::Desired(DesiredDecision::Ignore), 0)
        );
        let (h, out) = gw.handle(topic, &upd(3, json!({"patch":{"mode":"eco"}})), NOW);
        assert_eq!(h, Handled::Desired(DesiredDecision::Resync));
        assert_eq!(json_of(&out[0])["devices"]["sw-1-d00"], 1);
        let (h, out) = gw.handle(topic, &upd(3, json!({"snapshot":{"mode":"eco"}})), NOW);
        assert_eq!(h, Handled::Desired(DesiredDecision::Apply));
        let r = json_of(&out[0]);
        assert_eq!(r["patch"], json!({"mode": "eco", "maxSpeed": null}));
        assert!(r["seq"].as_u64().unwrap() > seq1);
        assert_eq!(gw.devices.values().next().unwrap().held, 3);
    }
}
