//! gatewayd's own protocol (`gw/{gw}/up/...`, `gw/{gw}/down/...`), the one `cloud-stub`
//! speaks. Every topic and payload comes from the `gatewayd-protocol` crate; `docs/protocol.md`
//! describes it.

use super::{Ctx, Inbound, Out};
use crate::clock::now_ms;
use crate::store::Store;
use gatewayd_protocol::{
    decode, ApplyStatus, C2dMessage, DecodeError, DesiredUpdate, DeviceId, Down, ErrorCode,
    GatewayId, GatewayState, MessageId, ReportedUpdate, RpcError, RpcRequest, RpcResponse, Topics,
    TwinSync, Up, PROTOCOL_VERSION,
};
use rumqttc::{LastWill, QoS};
use rusqlite::OptionalExtension;
use serde_json::Value;
use std::collections::BTreeMap;
use tracing::{debug, warn};

pub struct Native {
    gateway: GatewayId,
}

impl Native {
    pub fn new(gateway: GatewayId) -> Native {
        Native { gateway }
    }

    pub fn subscriptions(&self) -> Vec<String> {
        vec![Topics::down_filter(&self.gateway)]
    }

    pub fn last_will(&self, boot_id: &str, store_id: &str) -> LastWill {
        LastWill::new(
            Topics::up(&self.gateway, Up::State),
            state_payload(false, boot_id, store_id, None),
            QoS::AtLeastOnce,
            true,
        )
    }

    pub fn config_report_topic(&self) -> String {
        Topics::up(&self.gateway, Up::Config)
    }

    pub fn goodbye(&self, boot_id: &str, store_id: &str) -> Out {
        Out {
            topic: Topics::up(&self.gateway, Up::State),
            payload: state_payload(false, boot_id, store_id, None),
            retain: true,
        }
    }

    /// Catalog parts, presence parts (deleting stale retained parts of a larger earlier
    /// announcement), birth and the twin sync.
    pub async fn announce(&self, ctx: &Ctx<'_>) {
        let gw = &self.gateway;
        let devices = ctx.devices;
        let mut catalog_parts = 0;
        match devices.catalog_plan(ctx.max_publish) {
            Ok(plan) => {
                let n = plan.len() as u32;
                catalog_parts = n;
                for part in devices.catalog_parts(rand::random(), &plan) {
                    let body = serde_json::to_vec(&part).expect("catalog serializes");
                    ctx.publisher
                        .publish(
                            Topics::up_part(gw, Up::Catalog, part.part),
                            body,
                            true,
                            None,
                        )
                        .await;
                }
                self.clear_stale_parts(ctx, Up::Catalog, n).await;
            }
            // Checked at start; cannot happen with the running configuration.
            Err(e) => warn!(error = %e, "catalog not announced"),
        }
        let presence = &devices.presence;
        presence.take_dirty();
        for part in 0..presence.parts() {
            let body = serde_json::to_vec(&presence.part(part)).expect("presence serializes");
            ctx.publisher
                .publish(Topics::up_part(gw, Up::Devices, part), body, true, None)
                .await;
        }
        self.clear_stale_parts(ctx, Up::Devices, presence.parts())
            .await;
        ctx.publisher
            .publish(
                Topics::up(gw, Up::State),
                state_payload(
                    true,
                    ctx.boot_id,
                    ctx.store.id(),
                    super::super::session::store_error(ctx.store),
                ),
                true,
                None,
            )
            .await;
        match ctx.twins.held_versions().await {
            Ok(held) => self.sync(ctx, held).await,
            Err(e) => warn!(error = %e, "cannot read twin versions for the sync"),
        }
        debug!(
            devices = devices.len(),
            catalog_parts,
            presence_parts = devices.presence.parts(),
            "announced"
        );
    }

    /// Deletes retained parts a previous run published beyond today's `parts` (an empty
    /// retained publish deletes), remembering the count in the store for the next start.
    async fn clear_stale_parts(&self, ctx: &Ctx<'_>, kind: Up, parts: u32) {
        let before = remember_parts(ctx.store, kind, parts).await;
        for stale in parts..before.min(100_000) {
            ctx.publisher
                .publish(
                    Topics::up_part(&self.gateway, kind, stale),
                    Vec::new(),
                    true,
                    None,
                )
                .await;
        }
    }

    /// Publishes `up/twin/sync`: the desired version held for each of `devices`, so the cloud
    /// answers with a snapshot for every one that is behind.
    async fn sync(&self, ctx: &Ctx<'_>, devices: BTreeMap<DeviceId, u64>) {
        let body = serde_json::to_vec(&TwinSync {
            v: PROTOCOL_VERSION,
            devices,
        })
        .expect("sync serializes");
        ctx.publisher
            .publish(Topics::up(&self.gateway, Up::TwinSync), body, false, None)
            .await;
    }

    pub async fn resync(&self, ctx: &Ctx<'_>, device: &DeviceId) {
        if let Ok(held) = ctx.twins.load(device).await {
            self.sync(
                ctx,
                BTreeMap::from([(device.clone(), held.desired_version)]),
            )
            .await;
        }
    }

    /// A retained state with `store_error` while the store fails (the cloud holds messages
    /// back); once it works, the state without it and a twin sync.
    pub async fn store_changed(&self, ctx: &Ctx<'_>, error: Option<String>) {
        let recovered = error.is_none();
        ctx.publisher
            .publish(
                Topics::up(&self.gateway, Up::State),
                state_payload(true, ctx.boot_id, ctx.store.id(), error),
                true,
                None,
            )
            .await;
        if recovered {
            match ctx.twins.held_versions().await {
                Ok(devices) => self.sync(ctx, devices).await,
                Err(e) => warn!(error = %e, "cannot read twin versions for the sync"),
            }
        }
    }

    /// Republishes the retained presence parts that changed.
    pub async fn presence_changed(&self, ctx: &Ctx<'_>) {
        let presence = &ctx.devices.presence;
        for part in presence.take_dirty() {
            let body = serde_json::to_vec(&presence.part(part)).expect("presence serializes");
            ctx.publisher
                .publish(
                    Topics::up_part(&self.gateway, Up::Devices, part),
                    body,
                    true,
                    None,
                )
                .await;
        }
    }

    pub fn decode(&self, topic: &str, payload: &[u8]) -> Inbound {
        let kind = Topics::parse_down(topic).filter(|(gw, _)| gw == &self.gateway);
        match kind {
            Some((_, Down::RpcRequest)) => decode_rpc(payload),
            Some((_, Down::TwinDesired)) => match decode::<DesiredUpdate>(payload) {
                Ok(u) => Inbound::Desired(u),
                Err(e) => Inbound::Drop(format!("malformed desired update: {e}")),
            },
            Some((_, Down::Message)) => decode_message(payload),
            Some((_, Down::ConfigDesired)) => {
                match decode::<gatewayd_protocol::ConfigDesired>(payload) {
                    Ok(d) => Inbound::GatewayConfig(d),
                    Err(e) => Inbound::Drop(format!("malformed desired configuration: {e}")),
                }
            }
            None => Inbound::Drop(format!("publish on an unexpected topic {topic}")),
        }
    }

    pub fn rpc_reply(&self, resp: &RpcResponse) -> Out {
        Out::new(
            Topics::up(&self.gateway, Up::RpcResponse),
            serde_json::to_vec(resp).expect("response serializes"),
        )
    }

    pub fn reported(
        &self,
        device: &DeviceId,
        seq: u64,
        patch: Value,
        apply: BTreeMap<String, ApplyStatus>,
    ) -> Vec<Out> {
        let update = ReportedUpdate {
            v: PROTOCOL_VERSION,
            device: device.clone(),
            seq,
            patch,
            apply,
        };
        vec![Out::new(
            Topics::up(&self.gateway, Up::TwinReported),
            serde_json::to_vec(&update).expect("reported update serializes"),
        )]
    }

    pub fn feedback(&self, body: &Value) -> Vec<Out> {
        vec![Out::new(
            Topics::up(&self.gateway, Up::MessageFeedback),
            body.to_string().into_bytes(),
        )]
    }
}

fn decode_code(e: &DecodeError) -> ErrorCode {
    match e {
        DecodeError::Version(_) => ErrorCode::UnsupportedVersion,
        DecodeError::Json(_) => ErrorCode::BadRequest,
    }
}

fn decode_rpc(payload: &[u8]) -> Inbound {
    match decode::<RpcRequest>(payload) {
        Ok(req) => {
            let reply = super::ReplyTo::Native(req.id.clone());
            Inbound::Rpc { req, reply }
        }
        Err(e) => {
            // Answer if at least the id can be read, so the caller is not left waiting.
            match serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .and_then(|id| serde_json::from_value(id).ok())
            {
                Some(id) => Inbound::RpcRefused {
                    reply: super::ReplyTo::Native(id),
                    error: RpcError::new(decode_code(&e), format!("request refused: {e}")),
                },
                None => Inbound::Drop(format!("malformed RPC request: {e}")),
            }
        }
    }
}

fn decode_message(payload: &[u8]) -> Inbound {
    match decode::<C2dMessage>(payload) {
        Ok(msg) => Inbound::Message(msg),
        Err(e) => {
            // Answer with a coded feedback where the id and device can be read, so the
            // message ends at once instead of waiting for its TTL.
            #[derive(serde::Deserialize)]
            struct Head {
                id: MessageId,
                device: DeviceId,
            }
            match serde_json::from_slice::<Head>(payload) {
                Ok(head) => {
                    let code = decode_code(&e);
                    Inbound::MessageRefused {
                        id: head.id,
                        device: head.device,
                        reason: format!("{code}: message refused: {e}"),
                    }
                }
                Err(_) => Inbound::Drop(format!("malformed message (no valid id to answer): {e}")),
            }
        }
    }
}

pub(super) fn state_payload(
    online: bool,
    boot_id: &str,
    store_id: &str,
    store_error: Option<String>,
) -> Vec<u8> {
    serde_json::to_vec(&GatewayState {
        v: PROTOCOL_VERSION,
        online,
        boot_id: boot_id.to_string(),
        software: concat!("gatewayd ", env!("CARGO_PKG_VERSION")).to_string(),
        at_ms: now_ms(),
        store_id: store_id.to_string(),
        store_error,
    })
    .expect("state serializes")
}

/// Stores today's part count of `kind` and returns the previous one (0 when none).
async fn remember_parts(store: &Store, kind: Up, parts: u32) -> u32 {
    let key = format!("parts/{}", kind.suffix());
    store
        .call(move |c| {
            let old: Option<String> = c
                .query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })
                .optional()?;
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = ?2",
                rusqlite::params![key, parts.to_string()],
            )?;
            Ok(old.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0))
        })
        .await
        .unwrap_or(0)
}
