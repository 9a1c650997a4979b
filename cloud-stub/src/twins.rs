//! Device twins on the cloud side: operator patches of the desired half (versioned, optionally
//! conditional), reported patches from gateways, and the snapshot answer to a gateway's
//! `twin/sync`.
//!
//! Every twin operation is one job on the store thread, which runs jobs one at a time: the
//! read-check-write of a conditional patch is atomic per device without any lock, and a patch
//! is answered only once committed. Desired updates to publish leave from the job's completion,
//! so they reach the [`run_publisher`] task in commit (hence version) order.
//!
//! Versions and `seq` numbers are bounded by [`MAX_TWIN_VERSION`] (2^53 - 1): a wire value
//! above it is refused where it enters, and no arithmetic on one can overflow.

use crate::events::Events;
use crate::registry::{self, SharedRegistry};
use crate::session::Publisher;
use crate::store::{Commit, StoreError, StoreHandle, TwinRow};
use gatewayd_protocol::limits::MAX_TWIN_VERSION;
use gatewayd_protocol::twin::{self, TwinDocError};
use gatewayd_protocol::{
    ApplyStatus, DesiredBody, DesiredUpdate, DeviceId, Down, GatewayId, ReportedUpdate, Topics,
    PROTOCOL_VERSION,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// An `If-Match` condition on the desired version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: any version.
    Any,
    /// Exactly this version.
    Version(u64),
}

/// Parses an `If-Match` value: `7`, `"7"`, `W/"7"` or `*`.
pub fn parse_if_match(raw: &str) -> Result<IfMatch, String> {
    let s = raw.trim();
    if s == "*" {
        return Ok(IfMatch::Any);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    s.parse::<u64>()
        .map(IfMatch::Version)
        .map_err(|_| format!("If-Match must be a desired version such as \"7\" or *, got '{raw}'"))
}

/// Why an operator patch was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// `If-Match` named another version.
    #[error("desired version is {current}, If-Match asked for {asked}")]
    Precondition { current: u64, asked: u64 },
    /// The patch is not a valid twin document (shape, depth, keys).
    #[error("{0}")]
    Invalid(TwinDocError),
    /// The merged document would exceed the size limit.
    #[error("desired twin of {device} after this patch: {error}")]
    TooLarge {
        device: DeviceId,
        error: TwinDocError,
    },
    /// The desired version reached [`MAX_TWIN_VERSION`]; no higher one exists.
    #[error("desired version of {device} is at the highest there is ({MAX_TWIN_VERSION})")]
    VersionLimit { device: DeviceId },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted operator patch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Patched {
    pub desired_version: u64,
    pub desired: Value,
}

/// A twin as `GET /api/v1/devices/{id}/twin` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TwinView {
    pub device: DeviceId,
    pub desired: Value,
    pub desired_version: u64,
    pub reported: Value,
    pub reported_version: u64,
    /// Desired properties whose reported value differs or is missing.
    pub delta: Vec<String>,
    pub desired_updated_ms: BTreeMap<String, u64>,
    pub reported_updated_ms: BTreeMap<String, u64>,
    pub apply: BTreeMap<String, ApplyStatus>,
}

impl TwinView {
    fn new(device: DeviceId, row: TwinRow) -> Self {
        TwinView {
            delta: twin::delta(&row.desired, &row.reported),
            device,
            desired: row.desired,
            desired_version: row.desired_version,
            reported: row.reported,
            reported_version: row.reported_version,
            desired_updated_ms: row.desired_updated_ms,
            reported_updated_ms: row.reported_updated_ms,
            apply: row.apply,
        }
    }
}

/// A desired update on its way to a gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// `None`: the device's gateway now, if online. `Some`: this gateway (a sync answer).
    pub gateway: Option<GatewayId>,
    pub update: DesiredUpdate,
}

/// The twins side of the cloud; cheap to clone.
#[derive(Clone)]
pub struct Twins {
    store: StoreHandle,
    out: mpsc::UnboundedSender<Outgoing>,
    events: Events,
}

impl Twins {
    /// Twins stored through `store`, announcing changes to `events`; the receiver feeds
    /// [`run_publisher`].
    pub fn new(store: StoreHandle, events: Events) -> (Twins, mpsc::UnboundedReceiver<Outgoing>) {
        let (out, rx) = mpsc::unbounded_channel();
        (Twins { store, out, events }, rx)
    }

    /// The device's twin (empty at version 0 when nothing was ever written).
    pub async fn get(&self, device: DeviceId) -> Result<TwinView, StoreError> {
        self.store
            .call(move |conn| {
                let row = TwinRow::load(conn, &device)?.unwrap_or_default();
                Ok(TwinView::new(device, row))
            })
            .await
    }

    /// Applies an operator patch to the desired half and, once committed, queues it for the
    /// device's gateway. An empty patch changes nothing and publishes nothing.
    pub async fn patch_desired(
        &self,
        device: DeviceId,
        patch: Value,
        if_match: Option<IfMatch>,
        now_ms: u64,
    ) -> Result<Patched, PatchError> {
        let (tx, rx) = oneshot::channel();
        let out = self.out.clone();
        let events = self.events.clone();
        let job_device = device.clone();
        self.store.submit(
            move |conn| {
                let mut row = TwinRow::load(conn, &job_device)?.unwrap_or_default();
                let changed = match apply_desired(&job_device, &mut row, &patch, if_match, now_ms) {
                    Ok(changed) => changed,
                    Err(e) => return Ok(Err(e)),
                };
                if changed {
                    row.save(conn, &job_device)?;
                }
                let update = changed.then_some(DesiredUpdate {
                    v: PROTOCOL_VERSION,
                    device: job_device,
                    version: row.desired_version,
                    body: DesiredBody::Patch(patch),
                });
                let reported_version = row.reported_version;
                Ok(Ok((
                    Patched {
                        desired_version: row.desired_version,
                        desired: row.desired,
                    },
                    update,
                    reported_version,
                )))
            },
            move |result| {
                let answer = match result {
                    Ok(Ok((patched, update, reported_version))) => {
                        if let Some(update) = update {
                            events.twin(
                                &update.device,
                                "desired",
                                patched.desired_version,
                                reported_version,
                            );
                            let _ = out.send(Outgoing {
                                gateway: None,
                                update,
                            });
                        }
                        Ok(patched)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(PatchError::Store(e)),
                };
                let _ = tx.send(answer);
            },
        );
        let patched = rx
            .await
            .unwrap_or(Err(PatchError::Store(StoreError::Gone)))?;
        tracing::info!(device = %device, version = patched.desired_version, "desired twin patched");
        Ok(patched)
    }

    /// Answers a gateway's `twin/sync` for the devices it owns: a snapshot for each whose cloud
    /// version differs from the one the gateway holds. The returned commit resolves once the
    /// answer is committed and queued for publishing.
    pub fn on_sync(&self, gateway: GatewayId, held: Vec<(DeviceId, u64)>) -> Commit {
        let out = self.out.clone();
        let job_gateway = gateway.clone();
        self.store.write_for_ack(
            "twin sync",
            move |conn| {
                let mut updates = Vec::new();
                for (device, held) in held.iter().cloned() {
                    if held > MAX_TWIN_VERSION {
                        tracing::warn!(gateway = %job_gateway, device = %device, held,
                            max = MAX_TWIN_VERSION,
                            "twin sync states a version above the limit; answered as if it \
                             held none");
                    }
                    let mut row = TwinRow::load(conn, &device)?.unwrap_or_default();
                    match sync_action(row.desired_version, held) {
                        SyncAction::Nothing => continue,
                        SyncAction::Snapshot => {}
                        SyncAction::Jump(to) => {
                            tracing::warn!(gateway = %job_gateway, device = %device, held,
                                cloud = row.desired_version, to,
                                "gateway holds a newer desired version than the cloud (cloud \
                                 store reset?); the cloud's document wins at a higher version");
                            row.desired_version = to;
                            row.save(conn, &device)?;
                        }
                    }
                    updates.push(DesiredUpdate {
                        v: PROTOCOL_VERSION,
                        device,
                        version: row.desired_version,
                        body: DesiredBody::Snapshot(row.desired),
                    });
                }
                Ok(updates)
            },
            move |updates| {
                for update in updates {
                    let _ = out.send(Outgoing {
                        gateway: Some(gateway.clone()),
                        update,
                    });
                }
            },
        )
    }

    /// Applies a reported patch from `gateway` (already checked to own the device). The
    /// returned commit resolves once it is committed (or refused).
    pub fn on_reported(
        &self,
        gateway: GatewayId,
        update: ReportedUpdate,
        now_ms: u64,
    ) -> Option<Commit> {
        if update.seq > MAX_TWIN_VERSION {
            tracing::warn!(gateway = %gateway, device = %update.device, seq = update.seq,
                max = MAX_TWIN_VERSION, "reported patch with a seq above the limit refused");
            return None;
        }
        let job = move |conn: &rusqlite::Connection| {
            let device = &update.device;
            let mut row = TwinRow::load(conn, device)?.unwrap_or_default();
            match apply_reported(&mut row, gateway.as_str(), &update, now_ms) {
                Reported::Applied => {
                    row.save(conn, device)?;
                    tracing::debug!(gateway = %gateway, device = %device, seq = update.seq,
                        version = row.reported_version, "reported twin updated");
                    return Ok(Some((
                        device.clone(),
                        row.desired_version,
                        row.reported_version,
                    )));
                }
                Reported::Stale { last } => {
                    tracing::debug!(gateway = %gateway, device = %device, seq = update.seq, last,
                        "stale reported patch ignored");
                }
                Reported::Refused(e) => {
                    tracing::warn!(gateway = %gateway, device = %device, seq = update.seq,
                        error = %e, "reported patch refused");
                }
                Reported::SeqTooHigh => {
                    tracing::warn!(gateway = %gateway, device = %device, seq = update.seq,
                        "reported patch with a seq above the limit refused");
                }
            }
            Ok(None)
        };
        let events = self.events.clone();
        let announce = move |applied: Option<(DeviceId, u64, u64)>| {
            if let Some((device, desired, reported)) = applied {
                events.twin(&device, "reported", desired, reported);
            }
        };
        Some(self.store.write_for_ack("reported twin", job, announce))
    }
}

/// Applies an operator patch to `row`. Returns whether anything changed (an empty patch does
/// not). Nothing is changed on error.
pub fn apply_desired(
    device: &DeviceId,
    row: &mut TwinRow,
    patch: &Value,
    if_match: Option<IfMatch>,
    now_ms: u64,
) -> Result<bool, PatchError> {
    if let Some(IfMatch::Version(asked)) = if_match {
        if asked != row.desired_version {
            return Err(PatchError::Precondition {
                current: row.desired_version,
                asked,
            });
        }
    }
    twin::validate_patch(patch).map_err(PatchError::Invalid)?;
    let Some(props) = patch.as_object().filter(|p| !p.is_empty()) else {
        return Ok(false);
    };
    let mut merged = row.desired.clone();
    twin::merge_patch(&mut merged, patch);
    twin::validate_doc(&merged).map_err(|error| match error {
        TwinDocError::TooLarge { .. } => PatchError::TooLarge {
            device: device.clone(),
            error,
        },
        other => PatchError::Invalid(other),
    })?;
    let version = row
        .desired_version
        .checked_add(1)
        .filter(|v| *v <= MAX_TWIN_VERSION)
        .ok_or_else(|| PatchError::VersionLimit {
            device: device.clone(),
        })?;
    stamp(&mut row.desired_updated_ms, props, now_ms);
    row.desired = merged;
    row.desired_version = version;
    Ok(true)
}

/// What became of a reported patch.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    Applied,
    /// Its `seq` is not above the last one applied from that gateway.
    Stale {
        last: u64,
    },
    /// Not a valid document, or the merged document would be too large.
    Refused(TwinDocError),
    /// Its `seq` is above [`MAX_TWIN_VERSION`].
    SeqTooHigh,
}

/// Applies a reported patch from `gateway` to `row`. Nothing is changed unless `Applied`.
pub fn apply_reported(
    row: &mut TwinRow,
    gateway: &str,
    update: &ReportedUpdate,
    now_ms: u64,
) -> Reported {
    if row.reported_seq_gateway.as_deref() == Some(gateway) && update.seq <= row.reported_seq {
        return Reported::Stale {
            last: row.reported_seq,
        };
    }
    if update.seq > MAX_TWIN_VERSION {
        return Reported::SeqTooHigh;
    }
    if let Err(e) = twin::validate_patch(&update.patch) {
        return Reported::Refused(e);
    }
    let mut merged = row.reported.clone();
    twin::merge_patch(&mut merged, &update.patch);
    if let Err(e) = twin::validate_doc(&merged) {
        return Reported::Refused(e);
    }
    if let Some(props) = update.patch.as_object() {
        stamp(&mut row.reported_updated_ms, props, now_ms);
    }
    row.reported = merged;
    row.reported_version = row.reported_version.saturating_add(1);
    for (prop, status) in &update.apply {
        row.apply.insert(prop.clone(), status.clone());
    }
    row.reported_seq = update.seq;
    row.reported_seq_gateway = Some(gateway.to_string());
    Reported::Applied
}

/// Records `now` for each top-level property a patch sets, and forgets those it deletes.
fn stamp(times: &mut BTreeMap<String, u64>, props: &serde_json::Map<String, Value>, now_ms: u64) {
    for (k, v) in props {
        if v.is_null() {
            times.remove(k);
        } else {
            times.insert(k.clone(), now_ms);
        }
    }
}

/// What the cloud answers to a gateway holding desired version `held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAction {
    /// Same version: nothing to send.
    Nothing,
    /// The cloud is newer: a snapshot at the cloud's version.
    Snapshot,
    /// The gateway holds a version the cloud never reached (the cloud's store was reset): the
    /// cloud moves its version past it and sends a snapshot, since the gateway ignores
    /// anything not newer than what it holds.
    Jump(u64),
}

/// The sync rule. A held version above [`MAX_TWIN_VERSION`] is not believed: the answer is as
/// if the gateway held none (a snapshot of whatever the cloud has). A gateway holding the
/// highest version there is cannot be passed; it gets a snapshot it will ignore.
pub fn sync_action(cloud: u64, held: u64) -> SyncAction {
    use std::cmp::Ordering::*;
    let held = if held > MAX_TWIN_VERSION { 0 } else { held };
    match cloud.cmp(&held) {
        Equal => SyncAction::Nothing,
        Greater => SyncAction::Snapshot,
        Less => match held.checked_add(1).filter(|v| *v <= MAX_TWIN_VERSION) {
            Some(to) => SyncAction::Jump(to),
            None => SyncAction::Snapshot,
        },
    }
}

/// Publishes desired updates in the order they were committed, QoS 1, until `stop`. A patch
/// goes to the device's gateway only while it is online: an offline gateway resyncs at connect.
pub async fn run_publisher(
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    registry: SharedRegistry,
    publisher: Publisher,
    stop: CancellationToken,
) {
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            out = rx.recv() => match out {
                Some(out) => out,
                None => return,
            },
        };
        let device = &out.update.device;
        let gateway = match out.gateway {
            Some(gw) => Some(gw),
            None => registry::lock(&registry).online_owner(device).cloned(),
        };
        let Some(gateway) = gateway else {
            tracing::debug!(device = %device, version = out.update.version,
                "gateway offline; desired update left for its resync");
            continue;
        };
        let payload = match serde_json::to_vec(&out.update) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(device = %device, error = %e, "cannot encode desired update");
                continue;
            }
        };
        let topic = Topics::down(&gateway, Down::TwinDesired);
        let published = tokio::select! {
            _ = stop.cancelled() => return,
            r = publisher.publish(topic, payload) => r,
        };
        match published {
            Ok(()) => tracing::debug!(gateway = %gateway, device = %device,
                version = out.update.version, "desired update published"),
            Err(e) => tracing::warn!(gateway = %gateway, device = %device, error = %e,
                "cannot publish desired update; the gateway resyncs at its next connect"),
        }
    }
}

#[cfg(test)]
#[path = "twins_tests.rs"]
mod tests;
