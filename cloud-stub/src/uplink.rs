//! What the cloud does with each message a gateway publishes under `gw/{gateway}/up/`: update
//! the registry, persist it, complete or fail pending RPC calls, and hand twin and message
//! traffic to [`Twins`] and [`Outbox`]. Synchronous and quick (store work is queued, never
//! awaited), so the session can run it inline between polls. What must be committed before
//! the publish is acknowledged (feedback, reported patches, twin syncs) comes back as a
//! [`Commit`] the session's acker waits for.

use crate::calls::PendingCalls;
use crate::events::Events;
use crate::messages::Outbox;
use crate::registry::{self, SharedRegistry};
use crate::store::{Commit, StoreHandle};
use crate::twins::Twins;
use gatewayd_protocol::chunk::CatalogAssembly;
use gatewayd_protocol::{
    decode, Catalog, DeviceId, DevicePresence, ErrorCode, Feedback, GatewayId, GatewayState,
    ReportedUpdate, RpcError, RpcResponse, Topics, TwinSync, Up,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;

/// Applies gateway messages to the cloud's state.
pub struct Uplink {
    registry: SharedRegistry,
    calls: Arc<PendingCalls>,
    store: StoreHandle,
    twins: Twins,
    outbox: Arc<Outbox>,
    /// Where presence changes and configuration reports are announced.
    events: Events,
    /// Catalog parts per gateway until an announcement is complete.
    catalogs: std::sync::Mutex<HashMap<GatewayId, CatalogAssembly>>,
    /// The gateways' configuration twins.
    configs: crate::gwconfig::GatewayConfigs,
}

/// Most parts one announcement may have (10,000 devices take about 50 at 128 KiB).
const MAX_PARTS: u32 = 10_000;

impl Uplink {
    /// An uplink writing into `registry`, answering `calls`, persisting through `store`, and
    /// passing twin and message traffic on, announcing presence changes to `events`.
    pub fn new(
        registry: SharedRegistry,
        calls: Arc<PendingCalls>,
        store: StoreHandle,
        twins: Twins,
        outbox: Arc<Outbox>,
        events: Events,
    ) -> Self {
        Uplink {
            registry,
            calls,
            store,
            twins,
            outbox,
            events,
            configs: Default::default(),
            catalogs: Default::default(),
        }
    }

    /// Keeps the gateways' configuration reports in `configs` (shared with the operator API).
    pub fn with_configs(mut self, configs: crate::gwconfig::GatewayConfigs) -> Self {
        self.configs = configs;
        self
    }

    /// Handles one incoming publish. Malformed topics and payloads are logged and dropped.
    /// Returns the store work its acknowledgement must wait for, if any.
    pub fn handle(&self, topic: &str, payload: &[u8], now_ms: u64) -> Option<Commit> {
        if let Some((gw, kind, part)) = Topics::parse_up_part(topic) {
            self.on_part(&gw, kind, part, payload, now_ms);
            return None;
        }
        let Some((gw, kind)) = Topics::parse_up(topic) else {
            tracing::debug!(topic, "ignoring message on a foreign topic");
            return None;
        };
        match kind {
            Up::State => {
                if let Some(state) = parse::<GatewayState>(&gw, kind, payload) {
                    self.on_state(&gw, &state, now_ms);
                }
            }
            // A whole announcement on the unsplit topic is its own single part.
            Up::Catalog | Up::Devices => self.on_part(&gw, kind, 0, payload, now_ms),
            Up::RpcResponse => {
                if let Some(response) = parse::<RpcResponse>(&gw, kind, payload) {
                    if !self.calls.complete(&gw, &response.id, response.outcome) {
                        tracing::debug!(gateway = %gw, request_id = %response.id,
                            "answer for an unknown or expired request dropped");
                    }
                }
            }
            Up::TwinReported => {
                let update = parse::<ReportedUpdate>(&gw, kind, payload)?;
                return self.on_reported(gw, update, now_ms);
            }
            Up::TwinSync => {
                let sync = parse::<TwinSync>(&gw, kind, payload)?;
                return self.on_sync(gw, sync);
            }
            Up::MessageFeedback => {
                let feedback = parse::<Feedback>(&gw, kind, payload)?;
                return self.outbox.on_feedback(&gw, &feedback, now_ms);
            }
            // The gateway's own configuration: kept for the operator API, then announced.
            Up::Config => {
                if let Some(report) = parse::<gatewayd_protocol::ConfigReport>(&gw, kind, payload) {
                    let (version, state) = (report.remote.version, report.remote.state.clone());
                    self.configs.reported(&gw, report);
                    self.events.gateway_config(&gw, version, &state);
                }
            }
        }
        None
    }

    /// Our own broker link is up (again): feedback may have been lost while it was down, or
    /// while the cloud was not running, so delivered messages are sent again once their
    /// gateway takes messages (it repeats its latest feedback).
    pub fn link_up(&self) {
        self.outbox.probe_all();
    }

    /// Our own broker link dropped: every gateway's state is unknown until the retained
    /// messages arrive again, and no answer can reach the calls in flight.
    pub fn link_lost(&self) {
        let was_online = registry::lock(&self.registry).mark_all_offline();
        for gw in &was_online {
            self.persist(gw);
            self.events.gateway(gw, false, None);
        }
        let err = RpcError::new(
            ErrorCode::GatewayOffline,
            "cloud lost its broker connection; gateway state unknown",
        );
        let failed = self.calls.fail_all(&err);
        tracing::warn!(
            gateways = was_online.len(),
            failed_calls = failed,
            "broker link lost; all gateways marked offline"
        );
    }

    fn on_state(&self, gw: &GatewayId, state: &GatewayState, now_ms: u64) {
        let change = registry::lock(&self.registry).apply_state(gw, state, now_ms);
        if change.stale_will {
            tracing::info!(gateway = %gw, boot_id = %state.boot_id,
                "ignoring the late will of a previous run");
            return;
        }
        self.persist(gw);
        self.events.gateway(gw, state.online, None);
        tracing::info!(gateway = %gw, online = state.online, boot_id = %state.boot_id,
            store_error = ?state.store_error, "gateway state");
        if let Some((old, new)) = &change.store_replaced {
            tracing::error!(gateway = %gw, old_store_id = %old, new_store_id = %new,
                "gateway store replaced or lost; sending again every message it had been \
                 delivered and not finished");
            self.outbox.store_replaced(gw);
        }
        if change.store_failing {
            tracing::warn!(gateway = %gw, error = ?state.store_error,
                "gateway cannot commit to its store; holding its messages");
        }
        if change.store_recovered {
            tracing::info!(gateway = %gw, "gateway store works again");
        }
        if change.came_online || change.store_recovered {
            self.outbox.gateway_online(gw);
        }
        let message = if change.went_offline {
            format!("gateway {gw} went offline")
        } else if change.restarted {
            format!("gateway {gw} restarted")
        } else {
            return;
        };
        let failed = self
            .calls
            .fail_gateway(gw, &RpcError::new(ErrorCode::GatewayOffline, message));
        if failed > 0 {
            tracing::info!(gateway = %gw, failed_calls = failed, "pending calls failed");
        }
    }

    /// One part of a split announcement: catalog parts are collected until their generation is
    /// complete, presence parts are merged as they come. An empty payload is a deleted
    /// retained part of an earlier, larger announcement.
    fn on_part(&self, gw: &GatewayId, kind: Up, part: u32, payload: &[u8], now_ms: u64) {
        if payload.is_empty() {
            return;
        }
        match kind {
            Up::Catalog => {
                let Some(catalog) = parse::<Catalog>(gw, kind, payload) else {
                    return;
                };
                if catalog.part != part {
                    tracing::warn!(gateway = %gw, part, "catalog part published under another part's topic; ignored");
                    return;
                }
                let (generation, parts) = (catalog.generation, catalog.parts);
                let whole = self
                    .catalogs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(gw.clone())
                    .or_default()
                    .add(catalog, MAX_PARTS);
                if let Some(devices) = whole {
                    tracing::debug!(gateway = %gw, generation, parts, "catalog complete");
                    let catalog = Catalog {
                        v: gatewayd_protocol::PROTOCOL_VERSION,
                        generation,
                        part: 0,
                        parts: 1,
                        devices,
                    };
                    self.on_catalog(gw, catalog, now_ms);
                }
            }
            Up::Devices => {
                if let Some(presence) = parse::<DevicePresence>(gw, kind, payload) {
                    let ids: Vec<DeviceId> = presence.devices.keys().cloned().collect();
                    let mut reg = registry::lock(&self.registry);
                    let seen = |reg: &crate::registry::Registry, id: &DeviceId| {
                        reg.device(id)
                            .filter(|d| &d.gateway == gw)
                            .map(|d| (d.online, d.reason.clone()))
                    };
                    let before: Vec<_> = ids.iter().map(|id| seen(&reg, id)).collect();
                    reg.apply_presence(gw, presence, now_ms);
                    for (id, before) in ids.iter().zip(before) {
                        let after = seen(&reg, id);
                        if let Some((online, reason)) = after.filter(|a| Some(a) != before.as_ref())
                        {
                            self.events.device(id, gw, online, reason.as_deref());
                        }
                    }
                    // Only this part's devices: a big gateway sends dozens of parts.
                    let records = reg.presence_records(gw, ids.iter());
                    drop(reg);
                    if let Some((gateway, devices)) = records {
                        self.store.save_presence(gateway, devices);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_catalog(&self, gw: &GatewayId, catalog: Catalog, now_ms: u64) {
        let count = catalog.devices.len();
        let declared = catalog.devices.iter().map(|d| d.id.clone()).collect();
        let taken = registry::lock(&self.registry).apply_catalog(gw, catalog, now_ms);
        self.store.remember_devices(declared);
        self.outbox.wake();
        for (device, loser) in &taken {
            tracing::warn!(device = %device, from = %loser, to = %gw,
                "device id claimed by two gateways; the newest catalog wins");
        }
        self.persist(gw);
        let online = registry::lock(&self.registry).gateway_online(gw);
        self.events.gateway(gw, online, Some(count));
        tracing::info!(gateway = %gw, devices = count, "gateway catalog");
    }

    fn on_reported(&self, gw: GatewayId, update: ReportedUpdate, now_ms: u64) -> Option<Commit> {
        let owner = registry::lock(&self.registry)
            .owner(&update.device)
            .map(|(owner, _)| owner.clone());
        if owner.as_ref() != Some(&gw) {
            tracing::debug!(gateway = %gw, device = %update.device, owner = ?owner,
                "reported patch for a device this gateway does not own ignored");
            return None;
        }
        self.twins.on_reported(gw, update, now_ms)
    }

    fn on_sync(&self, gw: GatewayId, sync: TwinSync) -> Option<Commit> {
        let held: Vec<_> = {
            let reg = registry::lock(&self.registry);
            sync.devices
                .into_iter()
                .filter(|(device, _)| {
                    let owned = reg.owner(device).is_some_and(|(owner, _)| owner == &gw);
                    if !owned {
                        tracing::debug!(gateway = %gw, device = %device,
                            "twin sync for a device this gateway does not own ignored");
                    }
                    owned
                })
                .collect()
        };
        if held.is_empty() {
            return None;
        }
        Some(self.twins.on_sync(gw, held))
    }

    fn persist(&self, gw: &GatewayId) {
        let records = registry::lock(&self.registry).records(gw);
        if let Some((gateway, devices)) = records {
            self.store.save_gateway(gateway, devices);
        }
    }
}

fn parse<T: DeserializeOwned>(gw: &GatewayId, kind: Up, payload: &[u8]) -> Option<T> {
    if payload.is_empty() {
        tracing::debug!(gateway = %gw, kind = kind.suffix(), "empty payload (retained message cleared)");
        return None;
    }
    match decode::<T>(payload) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(gateway = %gw, kind = kind.suffix(), error = %e, "dropping payload");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::store::{DbLocation, Store};
    use gatewayd_protocol::{DeviceId, RequestId, RpcOutcome};
    use std::sync::Mutex;

    fn uplink() -> (Uplink, SharedRegistry, Arc<PendingCalls>) {
        let registry: SharedRegistry = Arc::new(Mutex::new(Registry::default()));
        let calls = Arc::new(PendingCalls::default());
        let (store, _thread) = Store::open(&DbLocation::Memory).unwrap().spawn().unwrap();
        let (twins, _rx) = Twins::new(store.clone(), Events::default());
        let limits = crate::messages::Limits {
            max_queue: 50,
            window: 200,
            verdict_grace_ms: 90_000,
        };
        let outbox = Outbox::new(
            store.clone(),
            Arc::clone(&registry),
            limits,
            Vec::new(),
            Events::default(),
        );
        let up = Uplink::new(
            Arc::clone(&registry),
            Arc::clone(&calls),
            store,
            twins,
            outbox,
            Events::default(),
        );
        (up, registry, calls)
    }

    fn announce(up: &Uplink) {
        up.handle(
            "gw/g1/up/state",
            br#"{"v":1,"online":true,"boot_id":"b1"}"#,
            1,
        );
        let catalog = br#"{"v":1,"devices":[{"id":"d1","kind":"http","methods":[{"name":"m"}]}]}"#;
        up.handle("gw/g1/up/catalog", catalog, 1);
        up.handle(
            "gw/g1/up/devices",
            br#"{"v":1,"devices":{"d1":{"online":true}}}"#,
            1,
        );
    }

    #[test]
    fn retained_messages_make_a_device_callable() {
        let (up, registry, _) = uplink();
        announce(&up);
        let d1 = DeviceId::new("d1").unwrap();
        assert!(registry::lock(&registry).route(&d1, "m").is_ok());
    }

    #[test]
    fn malformed_payloads_and_foreign_topics_are_dropped() {
        let (up, registry, _) = uplink();
        up.handle("gw/g1/up/state", b"\xff not json", 1);
        up.handle("gw/g1/up/catalog", br#"{"v":1,"devices":"nope"}"#, 1);
        up.handle("gw/g1/up/state", br#"{"v":9,"online":true}"#, 1);
        up.handle("gw/g1/up/state", b"", 1);
        up.handle("other/topic", b"{}", 1);
        up.handle("gw/g1/up/twin/reported", b"{}", 1);
        assert_eq!(registry::lock(&registry).gateways().count(), 0);
    }

    #[tokio::test]
    async fn answers_complete_calls_and_going_offline_fails_them() {
        let (up, _, calls) = uplink();
        announce(&up);
        let g1 = GatewayId::new("g1").unwrap();
        let (_a, answered) = calls.register(RequestId::new("r1").unwrap(), g1.clone());
        let (_b, abandoned) = calls.register(RequestId::new("r2").unwrap(), g1);
        up.handle(
            "gw/g1/up/rpc/res",
            br#"{"v":1,"id":"r1","ok":{"status":200,"result":7}}"#,
            2,
        );
        match answered.await.unwrap() {
            RpcOutcome::Ok(s) => assert_eq!(s.result, serde_json::json!(7)),
            other => panic!("expected success, got {other:?}"),
        }
        up.handle("gw/g1/up/state", br#"{"v":1,"online":false}"#, 3);
        match abandoned.await.unwrap() {
            RpcOutcome::Error(e) => {
                assert_eq!(e.code, ErrorCode::GatewayOffline);
                assert_eq!(e.message, "gateway g1 went offline");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
