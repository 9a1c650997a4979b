//! The cloud-adapter boundary. The core (inbox, twins, outbox, the RPC path, presence) works on
//! domain events; an adapter maps them to one cloud's wire protocol and back:
//!
//! - inbound: a received publish becomes an [`Inbound`] event (an RPC with where its answer
//!   goes, a versioned or unversioned desired change, a whole desired state, a message), or
//!   something to refuse or drop;
//! - outbound: RPC answers, reported twin patches, message feedback, presence, the gateway's
//!   own state and the announcement at every connect become publishes.
//!
//! Topic strings and payload shapes live only in the adapters (`native.rs`: gatewayd's own
//! protocol, built on the `gatewayd-protocol` crate; `thingsboard.rs`: ThingsBoard's gateway
//! MQTT API). The session (`session.rs`) owns MQTT itself: the connection, acknowledgement
//! order, commit-before-ack, and the work tracker, whichever adapter runs.

mod native;
mod thingsboard;

use super::link::Publisher;
use crate::config::{CloudProfile, Config};
use crate::device::Devices;
use crate::store::Store;
use crate::twins::Twins;
use gatewayd_protocol::{
    C2dMessage, DesiredUpdate, DeviceId, GatewayId, MessageId, RequestId, RpcError, RpcRequest,
    RpcResponse,
};
use rumqttc::LastWill;
use serde_json::Value;
use std::sync::Arc;

pub use native::Native;
pub use thingsboard::ThingsBoard;

/// What a received publish means to the core.
#[derive(Debug)]
pub enum Inbound {
    /// Invoke a method now; the answer goes to `reply`.
    Rpc { req: RpcRequest, reply: ReplyTo },
    /// A request that cannot run (unreadable, unknown device); answered at once.
    RpcRefused { reply: ReplyTo, error: RpcError },
    /// A versioned desired change (native).
    Desired(DesiredUpdate),
    /// A desired change from a cloud without versions, ordered by arrival: a merge patch, or
    /// the device's whole desired state.
    DesiredUnversioned {
        device: DeviceId,
        body: gatewayd_protocol::DesiredBody,
    },
    /// A message (command) to queue and run at most once.
    Message(C2dMessage),
    /// A message that can be identified but not taken; stored as `rejected` with its reason.
    MessageRefused {
        id: MessageId,
        device: DeviceId,
        reason: String,
    },
    /// The gateway's own desired configuration (remote configuration).
    GatewayConfig(gatewayd_protocol::ConfigDesired),
    /// Acknowledged and dropped; the reason is logged.
    Drop(String),
    /// Acknowledged, nothing to do (e.g. an answer the adapter consumed itself).
    Nothing,
}

/// Where an RPC's answer goes.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    /// `up/rpc/res` with the request's id.
    Native(RequestId),
    /// `v1/gateway/rpc` with the device name and ThingsBoard's integer request id.
    ThingsBoard { device: String, id: i64 },
}

/// One publish an adapter asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Out {
    pub fn new(topic: String, payload: Vec<u8>) -> Out {
        Out {
            topic,
            payload,
            retain: false,
        }
    }
}

/// What announcing and the background publishers need.
pub struct Ctx<'a> {
    pub publisher: &'a Publisher,
    pub devices: &'a Arc<Devices>,
    pub store: &'a Store,
    pub twins: &'a Arc<Twins>,
    pub boot_id: &'a str,
    pub max_publish: usize,
}

impl<'a> Ctx<'a> {
    pub fn new(
        publisher: &'a Publisher,
        shared: &'a super::Shared,
        boot_id: &'a str,
        max_publish: usize,
    ) -> Ctx<'a> {
        Ctx {
            publisher,
            devices: &shared.devices,
            store: &shared.store,
            twins: &shared.twins,
            boot_id,
            max_publish,
        }
    }

    pub async fn send(&self, out: Out) {
        self.publisher
            .publish(out.topic, out.payload, out.retain, None)
            .await;
    }
}

/// The adapter in use, chosen by `cloud.profile`.
pub enum Adapter {
    Native(Native),
    ThingsBoard(Box<ThingsBoard>),
}

impl Adapter {
    pub fn new(config: &Config, gateway: GatewayId, devices: Arc<Devices>) -> Adapter {
        match config.cloud.profile {
            CloudProfile::Native => Adapter::Native(Native::new(gateway)),
            CloudProfile::Thingsboard => {
                Adapter::ThingsBoard(Box::new(ThingsBoard::new(config, gateway, devices)))
            }
        }
    }

    /// Topic filters to subscribe at every connect.
    pub fn subscriptions(&self) -> Vec<String> {
        match self {
            Adapter::Native(a) => a.subscriptions(),
            Adapter::ThingsBoard(a) => a.subscriptions(),
        }
    }

    /// The broker-held message published if the connection dies.
    pub fn last_will(&self, boot_id: &str, store_id: &str) -> Option<LastWill> {
        match self {
            Adapter::Native(a) => Some(a.last_will(boot_id, store_id)),
            Adapter::ThingsBoard(_) => None,
        }
    }

    /// Where the gateway's own configuration report goes (retained), where the cloud has a
    /// gateway twin.
    pub fn config_report_topic(&self) -> Option<String> {
        match self {
            Adapter::Native(a) => Some(a.config_report_topic()),
            Adapter::ThingsBoard(_) => None,
        }
    }

    /// The last publish before an orderly disconnect.
    pub fn goodbye(&self, boot_id: &str, store_id: &str) -> Out {
        match self {
            Adapter::Native(a) => a.goodbye(boot_id, store_id),
            Adapter::ThingsBoard(a) => a.goodbye(boot_id),
        }
    }

    /// Everything the cloud must hear at every connect, after the subscriptions.
    pub async fn announce(&self, ctx: &Ctx<'_>) {
        match self {
            Adapter::Native(a) => a.announce(ctx).await,
            Adapter::ThingsBoard(a) => a.announce(ctx).await,
        }
    }

    /// The device set changed (a live reload): announce what differs. `replaced` devices
    /// may have other twin properties now: where the cloud keeps no versions, their desired
    /// state is asked again (the native cloud's twin sync at announce covers them).
    pub async fn reconfigured(&self, ctx: &Ctx<'_>, replaced: Vec<DeviceId>) {
        match self {
            Adapter::Native(a) => a.announce(ctx).await,
            Adapter::ThingsBoard(a) => {
                a.presence_changed(ctx).await;
                a.refresh(ctx, replaced).await;
            }
        }
    }

    /// What a received publish means.
    pub fn decode(&self, topic: &str, payload: &[u8], received_ms: u64) -> Inbound {
        match self {
            Adapter::Native(a) => a.decode(topic, payload),
            Adapter::ThingsBoard(a) => a.decode(topic, payload, received_ms),
        }
    }

    /// The publish answering an RPC.
    pub fn rpc_reply(&self, reply: &ReplyTo, resp: &RpcResponse) -> Out {
        match self {
            Adapter::Native(a) => a.rpc_reply(resp),
            Adapter::ThingsBoard(a) => a.rpc_reply(reply, resp),
        }
    }

    /// After a versioned update skipped versions: ask the cloud for the device's state.
    pub async fn resync(&self, ctx: &Ctx<'_>, device: &DeviceId) {
        match self {
            Adapter::Native(a) => a.resync(ctx, device).await,
            Adapter::ThingsBoard(a) => a.request_states(ctx, [device.clone()]).await,
        }
    }

    /// The store started (`Some`) or stopped (`None`) failing; on recovery, the cloud is asked
    /// for what could not be stored meanwhile.
    pub async fn store_changed(&self, ctx: &Ctx<'_>, error: Option<String>) {
        match self {
            Adapter::Native(a) => a.store_changed(ctx, error).await,
            Adapter::ThingsBoard(a) => a.store_changed(ctx, error).await,
        }
    }

    /// Device presence changed: publish what differs.
    pub async fn presence_changed(&self, ctx: &Ctx<'_>) {
        match self {
            Adapter::Native(a) => a.presence_changed(ctx).await,
            Adapter::ThingsBoard(a) => a.presence_changed(ctx).await,
        }
    }

    /// Publishes carrying one device's reported patch (rows of the outbox merged): the patch,
    /// the apply state per property, and the highest outbox sequence number in it.
    pub fn reported(
        &self,
        device: &DeviceId,
        seq: u64,
        patch: Value,
        apply: std::collections::BTreeMap<String, gatewayd_protocol::ApplyStatus>,
    ) -> Vec<Out> {
        match self {
            Adapter::Native(a) => a.reported(device, seq, patch, apply),
            Adapter::ThingsBoard(a) => a.reported(device, patch, apply),
        }
    }

    /// Publishes carrying one message feedback (the outbox row's `Feedback` body); none when
    /// this cloud does not hear that step (the row is then done at once).
    pub fn feedback(&self, body: &Value) -> Vec<Out> {
        match self {
            Adapter::Native(a) => a.feedback(body),
            Adapter::ThingsBoard(a) => a.feedback(body),
        }
    }
}
