//! The in-memory registry of gateways and devices, built from the gateways' retained `up/`
//! messages (state, catalog, device presence). The RPC path reads only this, never SQLite.
//!
//! Invariants: every device belongs to exactly one gateway, and that gateway's `devices` set
//! lists it; device ids are global, so when two gateways claim the same id the newest catalog
//! wins.

use crate::store::{DeviceRecord, GatewayRecord, PresenceRecord};
use gatewayd_protocol::{
    Catalog, DeviceId, DeviceInfo, DevicePresence, DeviceStatus, ErrorCode, GatewayId,
    GatewayState, ParamSpec, RpcError,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// The registry shared between the MQTT session (writer) and the operator API (reader).
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// Locks the registry; a poisoned lock is still usable because every update leaves the maps
/// consistent before anything can panic.
pub fn lock(registry: &SharedRegistry) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the cloud knows about one gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// Whether its retained state says online (and our broker link is up).
    pub online: bool,
    /// Changes at every gatewayd start.
    pub boot_id: String,
    /// Gateway software version.
    pub software: String,
    /// When the cloud last heard from it, cloud clock, unix ms.
    pub last_seen_ms: u64,
    /// The identity of its store as it last reported it; empty: unknown.
    pub store_id: String,
    /// Set while its newest online state says it cannot commit to its store: it is sent no
    /// messages until a later state clears it.
    pub store_error: Option<String>,
    /// The devices its newest catalog declares (minus ids a newer catalog took away).
    pub devices: BTreeSet<DeviceId>,
    /// Its newest presence snapshot, kept so a catalog arriving after it still finds it.
    presence: BTreeMap<DeviceId, DeviceStatus>,
}

/// What the cloud knows about one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// The gateway whose catalog declares it.
    pub gateway: GatewayId,
    /// Its catalog entry.
    pub info: DeviceInfo,
    /// Whether its gateway reports it reachable.
    pub online: bool,
    /// When that state last changed, gateway clock, unix ms.
    pub since_ms: u64,
    /// Why it is offline, as the gateway said.
    pub reason: Option<String>,
    /// When the cloud last saw it reported online, cloud clock, unix ms.
    pub last_seen_ms: u64,
}

/// What a gateway state message changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateChange {
    /// It was online and now is not.
    pub went_offline: bool,
    /// It is online now and was not, or it restarted: a new birth. Messages published to it
    /// and not yet acknowledged are sent again.
    pub came_online: bool,
    /// Its boot id changed: gatewayd restarted, and calls it had in flight are lost.
    pub restarted: bool,
    /// A late will of a previous run, ignored.
    pub stale_will: bool,
    /// It reported another store than the one the cloud knew (old, new): its store was
    /// replaced or lost, with every message the cloud had delivered there.
    pub store_replaced: Option<(String, String)>,
    /// Its store started failing (it cannot take messages).
    pub store_failing: bool,
    /// Its store works again after failing, while it stayed online: like a new birth, messages
    /// it did not acknowledge are sent again.
    pub store_recovered: bool,
}

/// Where an RPC goes once every check passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The device's gateway.
    pub gateway: GatewayId,
    /// The method's declared parameters.
    pub params: BTreeMap<String, ParamSpec>,
}

/// Gateways and devices by id.
#[derive(Debug, Default)]
pub struct Registry {
    gateways: BTreeMap<GatewayId, Gateway>,
    devices: BTreeMap<DeviceId, Device>,
    /// Every device any catalog ever declared, including those no catalog declares any more:
    /// their twins and messages stay addressable.
    known: BTreeSet<DeviceId>,
}

impl Registry {
    /// Rebuilds the registry from persisted records. Every gateway starts offline until its
    /// retained birth arrives again; devices whose gateway is unknown are dropped.
    pub fn from_records(gateways: Vec<GatewayRecord>, devices: Vec<DeviceRecord>) -> Self {
        let mut reg = Registry::default();
        for g in gateways {
            let mut gw = Gateway::new(g.last_seen_ms);
            gw.boot_id = g.boot_id;
            gw.software = g.software;
            gw.store_id = g.store_id;
            reg.gateways.insert(g.id, gw);
        }
        for d in devices {
            let Some(gw) = reg.gateways.get_mut(&d.gateway) else {
                continue;
            };
            gw.devices.insert(d.info.id.clone());
            reg.known.insert(d.info.id.clone());
            reg.devices.insert(
                d.info.id.clone(),
                Device {
                    gateway: d.gateway,
                    info: d.info,
                    online: d.online,
                    since_ms: d.since_ms,
                    reason: d.reason,
                    last_seen_ms: d.last_seen_ms,
                },
            );
        }
        reg
    }

    /// Applies a gateway's retained state and says what changed. An offline state carrying
    /// another boot id than the online gateway's is a late will of a previous run: ignored.
    /// A non-empty `store_id` is remembered (an empty one is unknown, not a change); an online
    /// state sets or clears `store_error`.
    pub fn apply_state(
        &mut self,
        id: &GatewayId,
        state: &GatewayState,
        now_ms: u64,
    ) -> StateChange {
        let gw = self.gateway_entry(id, now_ms);
        let other_boot =
            !gw.boot_id.is_empty() && !state.boot_id.is_empty() && gw.boot_id != state.boot_id;
        if gw.online && !state.online && other_boot {
            return StateChange {
                stale_will: true,
                ..StateChange::default()
            };
        }
        let store_replaced = (!state.store_id.is_empty()
            && !gw.store_id.is_empty()
            && gw.store_id != state.store_id)
            .then(|| (gw.store_id.clone(), state.store_id.clone()));
        let came_online = state.online && (!gw.online || other_boot);
        let was_failing = gw.online && gw.store_error.is_some();
        let failing = state.online && state.store_error.is_some();
        let change = StateChange {
            went_offline: gw.online && !state.online,
            came_online,
            restarted: other_boot,
            stale_will: false,
            store_replaced,
            store_failing: failing && !was_failing,
            store_recovered: state.online && was_failing && !failing && !came_online,
        };
        if !state.store_id.is_empty() {
            gw.store_id.clone_from(&state.store_id);
        }
        if state.online {
            gw.store_error.clone_from(&state.store_error);
        }
        gw.online = state.online;
        gw.last_seen_ms = now_ms;
        if !state.boot_id.is_empty() {
            gw.boot_id.clone_from(&state.boot_id);
        }
        if !state.software.is_empty() {
            gw.software.clone_from(&state.software);
        }
        change
    }

    /// Replaces a gateway's device set with its catalog. Returns the ids taken over from other
    /// gateways (the newest catalog wins), with the gateway that lost each.
    pub fn apply_catalog(
        &mut self,
        id: &GatewayId,
        catalog: Catalog,
        now_ms: u64,
    ) -> Vec<(DeviceId, GatewayId)> {
        let gw = self.gateway_entry(id, now_ms);
        gw.last_seen_ms = now_ms;
        let old: BTreeSet<DeviceId> = std::mem::take(&mut gw.devices);
        let presence = gw.presence.clone();
        let mut taken = Vec::new();
        let mut declared = BTreeSet::new();
        for info in catalog.devices {
            let dev_id = info.id.clone();
            declared.insert(dev_id.clone());
            self.known.insert(dev_id.clone());
            match self.devices.get_mut(&dev_id) {
                Some(dev) if &dev.gateway == id => dev.info = info,
                existing => {
                    if let Some(dev) = existing {
                        let loser = dev.gateway.clone();
                        if let Some(other) = self.gateways.get_mut(&loser) {
                            other.devices.remove(&dev_id);
                        }
                        taken.push((dev_id.clone(), loser));
                    }
                    let status = presence.get(&dev_id);
                    let device = Device {
                        gateway: id.clone(),
                        info,
                        online: status.is_some_and(|s| s.online),
                        since_ms: status.map_or(0, |s| s.since_ms),
                        reason: status.and_then(|s| s.reason.clone()),
                        last_seen_ms: if status.is_some_and(|s| s.online) {
                            now_ms
                        } else {
                            0
                        },
                    };
                    self.devices.insert(dev_id, device);
                }
            }
        }
        for gone in old.difference(&declared) {
            if self.devices.get(gone).is_some_and(|d| &d.gateway == id) {
                self.devices.remove(gone);
            }
        }
        if let Some(gw) = self.gateways.get_mut(id) {
            gw.devices = declared;
        }
        taken
    }

    /// Applies a gateway's presence to the devices it owns: a whole snapshot (one part)
    /// replaces what was known, one part of several is merged in.
    pub fn apply_presence(&mut self, id: &GatewayId, presence: DevicePresence, now_ms: u64) {
        let gw = self.gateway_entry(id, now_ms);
        gw.last_seen_ms = now_ms;
        if presence.parts <= 1 {
            gw.presence = presence.devices.clone();
        } else {
            gw.presence.extend(presence.devices.clone());
        }
        for (dev_id, status) in &presence.devices {
            let Some(dev) = self.devices.get_mut(dev_id) else {
                continue;
            };
            if &dev.gateway != id {
                continue;
            }
            dev.online = status.online;
            dev.since_ms = status.since_ms;
            dev.reason.clone_from(&status.reason);
            if status.online {
                dev.last_seen_ms = now_ms;
            }
        }
    }

    /// Marks every gateway offline (our own broker link dropped, so their state is unknown).
    /// Returns those that were online.
    pub fn mark_all_offline(&mut self) -> Vec<GatewayId> {
        let mut was_online = Vec::new();
        for (id, gw) in &mut self.gateways {
            if std::mem::replace(&mut gw.online, false) {
                was_online.push(id.clone());
            }
        }
        was_online
    }

    /// Decides where an RPC goes, checking in order: the device exists, it declares the
    /// method, its gateway is online, the device is online.
    pub fn route(&self, device: &DeviceId, method: &str) -> Result<Route, RpcError> {
        let dev = self.devices.get(device).ok_or_else(|| {
            RpcError::new(
                ErrorCode::DeviceNotFound,
                format!("no gateway declares device {device}"),
            )
        })?;
        let Some(m) = dev.info.methods.iter().find(|m| m.name == method) else {
            let names: Vec<&str> = dev.info.methods.iter().map(|m| m.name.as_str()).collect();
            let has = if names.is_empty() {
                "it has none".to_string()
            } else {
                format!("it has: {}", names.join(", "))
            };
            return Err(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("device {device} has no method '{method}'; {has}"),
            ));
        };
        if !self.gateway_online(&dev.gateway) {
            return Err(RpcError::new(
                ErrorCode::GatewayOffline,
                format!("gateway {} of device {device} is offline", dev.gateway),
            ));
        }
        if !dev.online {
            let why = dev.reason.as_deref().unwrap_or("no reason given");
            return Err(RpcError::new(
                ErrorCode::DeviceOffline,
                format!("device {device} is offline: {why}"),
            ));
        }
        Ok(Route {
            gateway: dev.gateway.clone(),
            params: m.params.clone(),
        })
    }

    /// Adds devices to those ever declared (loaded from the store at start).
    pub fn remember(&mut self, devices: impl IntoIterator<Item = DeviceId>) {
        self.known.extend(devices);
    }

    /// Whether any catalog ever declared this device.
    pub fn is_known(&self, device: &DeviceId) -> bool {
        self.known.contains(device)
    }

    /// The gateway whose catalog declares the device now, and whether it is online.
    pub fn owner(&self, device: &DeviceId) -> Option<(&GatewayId, bool)> {
        self.devices
            .get(device)
            .map(|d| (&d.gateway, self.gateway_online(&d.gateway)))
    }

    /// The gateway of the device when that gateway is online.
    pub fn online_owner(&self, device: &DeviceId) -> Option<&GatewayId> {
        self.owner(device)
            .and_then(|(gw, online)| online.then_some(gw))
    }

    /// Whether the gateway is known and online.
    pub fn gateway_online(&self, id: &GatewayId) -> bool {
        self.gateways.get(id).is_some_and(|g| g.online)
    }

    /// Whether the gateway takes messages now: online, and its store works.
    pub fn gateway_accepting(&self, id: &GatewayId) -> bool {
        self.gateways
            .get(id)
            .is_some_and(|g| g.online && g.store_error.is_none())
    }

    /// The gateway of the device when that gateway takes messages now.
    pub fn accepting_owner(&self, device: &DeviceId) -> Option<&GatewayId> {
        let (gw, _) = self.owner(device)?;
        self.gateway_accepting(gw).then_some(gw)
    }

    /// Every gateway, by id.
    pub fn gateways(&self) -> impl Iterator<Item = (&GatewayId, &Gateway)> {
        self.gateways.iter()
    }

    /// Every device, by id.
    pub fn devices(&self) -> impl Iterator<Item = (&DeviceId, &Device)> {
        self.devices.iter()
    }

    /// One device.
    pub fn device(&self, id: &DeviceId) -> Option<&Device> {
        self.devices.get(id)
    }

    /// The persistent form of one gateway and its devices.
    pub fn records(&self, id: &GatewayId) -> Option<(GatewayRecord, Vec<DeviceRecord>)> {
        let gw = self.gateways.get(id)?;
        let record = self.gateway_record(id)?;
        let devices = gw
            .devices
            .iter()
            .filter_map(|d| self.devices.get(d))
            .map(|d| DeviceRecord {
                gateway: d.gateway.clone(),
                info: d.info.clone(),
                online: d.online,
                since_ms: d.since_ms,
                reason: d.reason.clone(),
                last_seen_ms: d.last_seen_ms,
            })
            .collect();
        Some((record, devices))
    }

    /// The gateway's record and the presence of those of `ids` it owns.
    pub fn presence_records<'a>(
        &self,
        id: &GatewayId,
        ids: impl Iterator<Item = &'a DeviceId>,
    ) -> Option<(GatewayRecord, Vec<PresenceRecord>)> {
        let record = self.gateway_record(id)?;
        let devices = ids
            .filter_map(|d| self.devices.get(d))
            .filter(|d| &d.gateway == id)
            .map(|d| PresenceRecord {
                id: d.info.id.clone(),
                online: d.online,
                since_ms: d.since_ms,
                reason: d.reason.clone(),
                last_seen_ms: d.last_seen_ms,
            })
            .collect();
        Some((record, devices))
    }

    fn gateway_record(&self, id: &GatewayId) -> Option<GatewayRecord> {
        let gw = self.gateways.get(id)?;
        Some(GatewayRecord {
            id: id.clone(),
            online: gw.online,
            boot_id: gw.boot_id.clone(),
            software: gw.software.clone(),
            last_seen_ms: gw.last_seen_ms,
            store_id: gw.store_id.clone(),
        })
    }

    fn gateway_entry(&mut self, id: &GatewayId, now_ms: u64) -> &mut Gateway {
        self.gateways
            .entry(id.clone())
            .or_insert_with(|| Gateway::new(now_ms))
    }
}

impl Gateway {
    fn new(last_seen_ms: u64) -> Self {
        Gateway {
            online: false,
            boot_id: String::new(),
            software: String::new(),
            last_seen_ms,
            store_id: String::new(),
            store_error: None,
            devices: BTreeSet::new(),
            presence: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
