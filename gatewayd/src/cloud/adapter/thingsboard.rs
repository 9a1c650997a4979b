//! ThingsBoard's gateway MQTT API (`v1/gateway/...`), server side as ThingsBoard implements
//! it. `docs/thingsboard.md` is the user's view of this mapping.
//!
//! - Presence: `v1/gateway/connect` `{"device","type"}` for every device that is online (at
//!   each connect, and when one comes back), `v1/gateway/disconnect` when one goes offline.
//!   ThingsBoard pushes attribute updates and RPCs only for connected devices.
//! - Twins: shared attributes are the desired state. ThingsBoard keeps no versions, so the
//!   gateway orders changes by arrival (one MQTT session delivers in order) and numbers them
//!   itself. When a device is connected, its full shared state (the keys configured as twin
//!   properties) is asked on `v1/gateway/attributes/request` and replaces the held desired
//!   document; changes that arrive while that request is out are merged again over the answer,
//!   so an answer read before a change cannot undo it. Only twin property keys are taken; other
//!   shared attributes are ThingsBoard's business. Reported values go up as client attributes,
//!   each with `<key>_apply` carrying its apply state.
//! - RPC and messages: every server-side RPC arrives on `v1/gateway/rpc` the same way, so the
//!   name decides: a configured command is a message (stored before the PUBACK, at most once,
//!   its final outcome sent back as the RPC's reply), anything else an RPC.
//! - The gateway's own state (boot id, software, store errors) goes up as its own attributes
//!   on `v1/devices/me/attributes`.

use super::{Ctx, Inbound, Out, ReplyTo};
use crate::clock::now_ms;
use crate::config::Config;
use crate::device::Devices;
use gatewayd_protocol::message::FeedbackOutcome;
use gatewayd_protocol::{
    ApplyStatus, C2dMessage, DesiredBody, DeviceId, ErrorCode, Feedback, GatewayId, MessageId,
    RequestId, RpcError, RpcOutcome, RpcRequest, RpcResponse, PROTOCOL_VERSION,
};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{debug, warn};

pub const CONNECT: &str = "v1/gateway/connect";
pub const DISCONNECT: &str = "v1/gateway/disconnect";
pub const ATTRIBUTES: &str = "v1/gateway/attributes";
pub const ATTRIBUTES_REQUEST: &str = "v1/gateway/attributes/request";
pub const ATTRIBUTES_RESPONSE: &str = "v1/gateway/attributes/response";
pub const RPC: &str = "v1/gateway/rpc";
pub const TELEMETRY: &str = "v1/gateway/telemetry";
pub const OWN_ATTRIBUTES: &str = "v1/devices/me/attributes";

/// Suffix of the client attribute carrying a twin property's apply state.
pub const APPLY_SUFFIX: &str = "_apply";

/// An RPC without ThingsBoard's `timeout` runs under its method's own timeout; this only
/// bounds the request's deadline.
const NO_CALLER_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

pub struct ThingsBoard {
    devices: Arc<Devices>,
    default_type: String,
    command_field: String,
    command_ttl_ms: u64,
    telemetry: bool,
    next_request: AtomicI64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Attribute requests in flight: request id → device and the keys asked.
    requests: HashMap<i64, (DeviceId, Vec<String>)>,
    /// Changes received while a device's full state is being asked, composed into one merge
    /// patch (bounded by the twin properties, however many arrive) and merged again over the
    /// answer.
    since_request: HashMap<DeviceId, Value>,
    /// Devices announced connected on this session.
    connected: HashSet<DeviceId>,
}

impl ThingsBoard {
    pub fn new(config: &Config, _gateway: GatewayId, devices: Arc<Devices>) -> ThingsBoard {
        let tb = &config.cloud.thingsboard;
        ThingsBoard {
            devices,
            default_type: tb.device_type.clone(),
            command_field: config.messages.command_field.clone(),
            command_ttl_ms: tb.command_ttl_s * 1000,
            telemetry: tb.telemetry,
            next_request: AtomicI64::new(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscriptions(&self) -> Vec<String> {
        vec![RPC.into(), ATTRIBUTES.into(), ATTRIBUTES_RESPONSE.into()]
    }

    pub fn goodbye(&self, boot_id: &str) -> Out {
        Out::new(
            OWN_ATTRIBUTES.into(),
            json!({"gatewayd_online": false, "gatewayd_boot_id": boot_id})
                .to_string()
                .into_bytes(),
        )
    }

    /// The gateway's own attributes, every online device connected, and the full shared state
    /// of each asked.
    pub async fn announce(&self, ctx: &Ctx<'_>) {
        *self.state() = State::default();
        let error = super::super::session::store_error(ctx.store);
        ctx.send(own_state(ctx, true, error)).await;
        let online: Vec<DeviceId> = ctx
            .devices
            .all()
            .into_iter()
            .filter(|d| ctx.devices.presence.is_online(&d.id))
            .map(|d| d.id.clone())
            .collect();
        ctx.devices.presence.take_dirty();
        for id in &online {
            self.connect(ctx, id).await;
        }
        debug!(devices = online.len(), "devices connected to ThingsBoard");
        self.request_states(ctx, online).await;
    }

    async fn connect(&self, ctx: &Ctx<'_>, id: &DeviceId) {
        self.state().connected.insert(id.clone());
        let ty = ctx
            .devices
            .get(id)
            .and_then(|d| d.config.profile.clone())
            .unwrap_or_else(|| self.default_type.clone());
        ctx.send(Out::new(
            CONNECT.into(),
            json!({"device": id, "type": ty}).to_string().into_bytes(),
        ))
        .await;
    }

    /// Asks the full shared state (the twin property keys) of each device that has any.
    pub async fn request_states(&self, ctx: &Ctx<'_>, devices: impl IntoIterator<Item = DeviceId>) {
        for id in devices {
            let Some(device) = ctx.devices.get(&id) else {
                continue;
            };
            let keys: Vec<String> = device.actions.twin.keys().cloned().collect();
            if keys.is_empty() {
                continue;
            }
            let request = self.next_request.fetch_add(1, Ordering::Relaxed);
            {
                let mut st = self.state();
                st.requests.insert(request, (id.clone(), keys.clone()));
                st.since_request
                    .insert(id.clone(), Value::Object(Map::new()));
            }
            ctx.send(Out::new(
                ATTRIBUTES_REQUEST.into(),
                json!({"id": request, "device": id, "client": false, "keys": keys})
                    .to_string()
                    .into_bytes(),
            ))
            .await;
        }
    }

    /// Asks again the full state of those of `devices` that are connected (a device that is
    /// not gets it when it connects).
    pub async fn refresh(&self, ctx: &Ctx<'_>, devices: Vec<DeviceId>) {
        let connected: Vec<DeviceId> = {
            let st = self.state();
            devices
                .into_iter()
                .filter(|d| st.connected.contains(d))
                .collect()
        };
        self.request_states(ctx, connected).await;
    }

    /// Connects devices that came online (asking their state: changes made while they were
    /// offline were not pushed) and disconnects those that went offline or left the
    /// configuration.
    pub async fn presence_changed(&self, ctx: &Ctx<'_>) {
        ctx.devices.presence.take_dirty();
        let (up, down): (Vec<DeviceId>, Vec<DeviceId>) = {
            let st = self.state();
            let mut up = Vec::new();
            let mut down: Vec<DeviceId> = st
                .connected
                .iter()
                .filter(|id| !ctx.devices.contains(id))
                .cloned()
                .collect();
            for d in ctx.devices.all() {
                let online = ctx.devices.presence.is_online(&d.id);
                let connected = st.connected.contains(&d.id);
                if online && !connected {
                    up.push(d.id.clone());
                } else if !online && connected {
                    down.push(d.id.clone());
                }
            }
            (up, down)
        };
        for id in &down {
            self.state().connected.remove(id);
            ctx.send(Out::new(
                DISCONNECT.into(),
                json!({"device": id}).to_string().into_bytes(),
            ))
            .await;
        }
        for id in &up {
            self.connect(ctx, id).await;
        }
        self.request_states(ctx, up).await;
    }

    pub async fn store_changed(&self, ctx: &Ctx<'_>, error: Option<String>) {
        let recovered = error.is_none();
        ctx.send(own_state(ctx, true, error)).await;
        if recovered {
            let connected: Vec<DeviceId> = self.state().connected.iter().cloned().collect();
            self.request_states(ctx, connected).await;
        }
    }

    pub fn decode(&self, topic: &str, payload: &[u8], received_ms: u64) -> Inbound {
        let body: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return Inbound::Drop(format!("not JSON: {e}")),
        };
        match topic {
            RPC => self.decode_rpc(body, received_ms),
            ATTRIBUTES => self.decode_change(body),
            ATTRIBUTES_RESPONSE => self.decode_state(body),
            other => Inbound::Drop(format!("publish on an unexpected topic {other}")),
        }
    }

    fn decode_rpc(&self, body: Value, received_ms: u64) -> Inbound {
        let Some(data) = body.get("data").and_then(Value::as_object) else {
            return Inbound::Drop("RPC without a data object".into());
        };
        let Some(name) = body.get("device").and_then(Value::as_str) else {
            return Inbound::Drop("RPC without a device".into());
        };
        let Some(id) = data.get("id").and_then(Value::as_i64) else {
            return Inbound::Drop("RPC without an integer data.id".into());
        };
        let reply = ReplyTo::ThingsBoard {
            device: name.to_string(),
            id,
        };
        let Some(method) = data.get("method").and_then(Value::as_str) else {
            return Inbound::RpcRefused {
                reply,
                error: RpcError::new(ErrorCode::BadRequest, "RPC without a method name"),
            };
        };
        let device = match DeviceId::new(name) {
            Ok(d) if self.devices.get(&d).is_some() => d,
            _ => {
                return Inbound::RpcRefused {
                    reply,
                    error: RpcError::new(
                        ErrorCode::DeviceNotFound,
                        format!("this gateway has no device '{name}'"),
                    ),
                }
            }
        };
        let params = match data.get("params") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(p) => p.clone(),
        };
        // The answer must reach ThingsBoard before it stops waiting: a tenth of its timeout
        // (at most 500 ms) is kept for the way back.
        let timeout_ms = data
            .get("timeout")
            .and_then(Value::as_u64)
            .map(|t| t - (t / 10).min(500))
            .unwrap_or(NO_CALLER_TIMEOUT_MS);
        let expiration = data.get("expirationTime").and_then(Value::as_u64);
        let is_command = self
            .devices
            .get(&device)
            .is_some_and(|d| d.actions.commands.contains_key(method));
        if is_command {
            let msg_id = message_id(id, &device, method, &params);
            let Value::Object(mut payload) = params else {
                return Inbound::MessageRefused {
                    id: msg_id,
                    device,
                    reason: format!(
                        "invalid_params: the params of command '{method}' must be an object"
                    ),
                };
            };
            payload.insert(self.command_field.clone(), Value::String(method.into()));
            return Inbound::Message(C2dMessage {
                v: PROTOCOL_VERSION,
                id: msg_id,
                device,
                payload: Value::Object(payload),
                expires_at_ms: expiration
                    .unwrap_or_else(|| received_ms.saturating_add(self.command_ttl_ms)),
            });
        }
        Inbound::Rpc {
            req: RpcRequest {
                v: PROTOCOL_VERSION,
                id: RequestId::new(format!("tb-{id}")).expect("a number makes a valid id"),
                device,
                method: method.to_string(),
                params,
                timeout_ms,
                deadline_ms: expiration.unwrap_or(u64::MAX),
            },
            reply,
        }
    }

    /// `{"device", "data": {k: v, ..., "deleted": [k]}}`: a merge patch of the twin property
    /// keys.
    fn decode_change(&self, body: Value) -> Inbound {
        let (Some(name), Some(data)) = (
            body.get("device").and_then(Value::as_str),
            body.get("data").and_then(Value::as_object),
        ) else {
            return Inbound::Drop("attribute update without device or data".into());
        };
        let Some((device, keys)) = self.twin_keys(name) else {
            debug!(
                device = name,
                "attribute update for a device without twin properties"
            );
            return Inbound::Nothing;
        };
        let mut patch = Map::new();
        for (k, v) in data {
            if k != "deleted" && keys.contains(k) {
                patch.insert(k.clone(), v.clone());
            }
        }
        if let Some(deleted) = data.get("deleted").and_then(Value::as_array) {
            for k in deleted.iter().filter_map(Value::as_str) {
                if keys.iter().any(|key| key == k) {
                    patch.insert(k.to_string(), Value::Null);
                }
            }
        }
        if patch.is_empty() {
            return Inbound::Nothing;
        }
        let patch = Value::Object(patch);
        if let Some(pending) = self.state().since_request.get_mut(&device) {
            crate::outbox::compose(pending, &patch);
        }
        Inbound::DesiredUnversioned {
            device,
            body: DesiredBody::Patch(patch),
        }
    }

    /// `{"id", "device", "values": {...}}` (or `"value"` for one key): the full state.
    fn decode_state(&self, body: Value) -> Inbound {
        let Some(request) = body.get("id").and_then(Value::as_i64) else {
            return Inbound::Drop("attribute response without an id".into());
        };
        let (device, asked, pending) = {
            let mut st = self.state();
            let Some((device, asked)) = st.requests.remove(&request) else {
                return Inbound::Drop(format!("attribute response to unknown request {request}"));
            };
            let pending = st.since_request.remove(&device);
            (device, asked, pending)
        };
        let mut state = Map::new();
        if let Some(values) = body.get("values").and_then(Value::as_object) {
            for k in &asked {
                if let Some(v) = values.get(k) {
                    state.insert(k.clone(), v.clone());
                }
            }
        } else if let (Some(v), [k]) = (body.get("value"), asked.as_slice()) {
            state.insert(k.clone(), v.clone());
        }
        let mut state = Value::Object(state);
        if let Some(patch) = &pending {
            gatewayd_protocol::twin::merge_patch(&mut state, patch);
        }
        Inbound::DesiredUnversioned {
            device,
            body: DesiredBody::Snapshot(state),
        }
    }

    fn twin_keys(&self, name: &str) -> Option<(DeviceId, Vec<String>)> {
        let id = DeviceId::new(name).ok()?;
        let device = self.devices.get(&id)?;
        let keys: Vec<String> = device.actions.twin.keys().cloned().collect();
        (!keys.is_empty()).then_some((id, keys))
    }

    /// `{"device", "id", "data"}`: the result itself, or `{"error", "code", ...}` (the error's
    /// `message`, `device_status`, `detail`, `may_have_run` included).
    pub fn rpc_reply(&self, reply: &ReplyTo, resp: &RpcResponse) -> Out {
        let (device, id) = match reply {
            ReplyTo::ThingsBoard { device, id } => (device.clone(), *id),
            // Cannot happen: this adapter makes only ThingsBoard replies.
            ReplyTo::Native(id) => (String::new(), id.as_str().len() as i64),
        };
        let data = match &resp.outcome {
            RpcOutcome::Ok(ok) => ok.result.clone(),
            RpcOutcome::Error(e) => {
                // gatewayd's error object with ThingsBoard's usual `error` text beside it.
                let mut data = serde_json::to_value(e).expect("error serializes");
                data["error"] = json!(e.message);
                data
            }
        };
        Out::new(
            RPC.into(),
            json!({"device": device, "id": id, "data": data})
                .to_string()
                .into_bytes(),
        )
    }

    /// Client attributes: each reported value (ThingsBoard cannot delete a client attribute
    /// over MQTT, so a removed value is left out) and `<key>_apply` with its apply state; with
    /// `telemetry`, the values again as telemetry.
    pub fn reported(
        &self,
        device: &DeviceId,
        patch: Value,
        apply: BTreeMap<String, ApplyStatus>,
    ) -> Vec<Out> {
        let mut values = Map::new();
        if let Value::Object(patch) = patch {
            values.extend(patch.into_iter().filter(|(_, v)| !v.is_null()));
        }
        let mut attributes = values.clone();
        for (k, status) in apply {
            let status = serde_json::to_value(status).expect("apply state serializes");
            attributes.insert(format!("{k}{APPLY_SUFFIX}"), status);
        }
        let mut out = Vec::new();
        if self.telemetry && !values.is_empty() {
            out.push(Out::new(
                TELEMETRY.into(),
                json!({device.as_str(): [{"ts": now_ms(), "values": values}]})
                    .to_string()
                    .into_bytes(),
            ));
        }
        if !attributes.is_empty() {
            out.push(Out::new(
                ATTRIBUTES.into(),
                json!({device.as_str(): attributes})
                    .to_string()
                    .into_bytes(),
            ));
        }
        out
    }

    /// A command's final outcome as the reply to its RPC (ThingsBoard records it for a
    /// two-way persistent RPC and ignores it for a one-way one, whose `DELIVERED` already meant
    /// "stored at the gateway"). `received` is the PUBACK itself: nothing to send.
    pub fn feedback(&self, body: &Value) -> Vec<Out> {
        let Ok(fb) = serde_json::from_value::<Feedback>(body.clone()) else {
            warn!("unreadable message feedback skipped");
            return Vec::new();
        };
        if fb.outcome == FeedbackOutcome::Received {
            return Vec::new();
        }
        let Some(id) = request_of(&fb.id) else {
            return Vec::new();
        };
        let outcome = serde_json::to_value(fb.outcome).expect("outcome serializes");
        let mut data = json!({"outcome": outcome});
        if let Some(status) = fb.device_status {
            data["device_status"] = json!(status);
        }
        if fb.outcome != FeedbackOutcome::Completed {
            let outcome = outcome.as_str().unwrap_or_default().to_string();
            data["error"] = match &fb.reason {
                Some(r) => json!(format!("{outcome}: {r}")),
                None => json!(outcome),
            };
        }
        vec![Out::new(
            RPC.into(),
            json!({"device": fb.device, "id": id, "data": data})
                .to_string()
                .into_bytes(),
        )]
    }
}

fn own_state(ctx: &Ctx<'_>, online: bool, store_error: Option<String>) -> Out {
    Out::new(
        OWN_ATTRIBUTES.into(),
        json!({
            "gatewayd_online": online,
            "gatewayd_boot_id": ctx.boot_id,
            "gatewayd_software": concat!("gatewayd ", env!("CARGO_PKG_VERSION")),
            "gatewayd_store_id": ctx.store.id(),
            "gatewayd_store_error": store_error.unwrap_or_default(),
            "gatewayd_devices": ctx.devices.len(),
        })
        .to_string()
        .into_bytes(),
    )
}

/// The message id of a command: ThingsBoard's request number (sent again unchanged when it
/// retries) and a hash of device, method and params. The hash keeps a number that
/// ThingsBoard reuses after its own restart (its counters restart) from passing for a
/// redelivery, unless the command is the very same.
fn message_id(request: i64, device: &DeviceId, method: &str, params: &Value) -> MessageId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [device.as_str(), method, &params.to_string()] {
        for b in part.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    MessageId::new(format!("tb-{request}-{h:016x}")).expect("digits and hex make a valid id")
}

/// ThingsBoard's request number inside a message id made by [`message_id`].
fn request_of(id: &MessageId) -> Option<i64> {
    let rest = id.as_str().strip_prefix("tb-")?;
    let (number, _) = rest.split_once('-')?;
    number.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_carry_the_request_number_and_tell_reused_numbers_apart() {
        let dev = DeviceId::new("pump-1").unwrap();
        let a = message_id(7, &dev, "start", &json!({"speed": 3}));
        assert_eq!(request_of(&a), Some(7));
        assert_eq!(a, message_id(7, &dev, "start", &json!({"speed": 3})));
        assert_ne!(a, message_id(7, &dev, "start", &json!({"speed": 4})));
        assert_ne!(a, message_id(7, &dev, "stop", &json!({"speed": 3})));
        assert_eq!(request_of(&MessageId::new("m-1").unwrap()), None);
    }
}
