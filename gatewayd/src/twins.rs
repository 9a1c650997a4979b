//! Device twins, I/O part. Desired updates are committed to SQLite before their MQTT
//! acknowledgement; one worker per device applies the difference between the latest desired
//! document and the last one applied in full, once the device is reachable, and commits the
//! reported patch to the outbox in the same transaction as the new applied state.
//!
//! Crash consistency: a desired change that was acknowledged is on disk; one that was not is
//! recovered by the twin sync at the next connect. A `kill -9` between the device call and the
//! commit re-applies the same final state after restart (idempotent settings), never a stale one.

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::device::{answer_text, CallError, Device, Devices};
use crate::metrics::Metrics;
use crate::outbox::{self, Wake};
use crate::store::{pause_after_failure, Store, StoreError};
use crate::twin::{applied_after, plan, report, Step, StepOutcome};
use crate::wakeups::{Ended, Wakeups, Woke};
use gatewayd_protocol::twin::{decide_desired, merge_patch, validate_doc, DesiredDecision};
use gatewayd_protocol::{DesiredBody, DesiredUpdate, DeviceId};
use rusqlite::{params, OptionalExtension};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

/// One device's twin as the gateway holds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinRow {
    pub desired: Value,
    pub desired_version: u64,
    pub applied: Value,
    pub applied_version: u64,
    pub reported: Value,
}

/// Shared twin state: the store and a wake-up per device worker.
pub struct Twins {
    store: Store,
    pub(crate) wakers: crate::wakeups::Wakers,
    metrics: Arc<Metrics>,
    /// Devices whose whole desired state is to be applied again (drift seen by a poll).
    reapply: std::sync::Mutex<std::collections::HashSet<DeviceId>>,
}

impl Twins {
    /// One waker per configured device.
    pub fn new(store: Store, devices: &Devices, metrics: Arc<Metrics>) -> Twins {
        let wakers = crate::wakeups::Wakers::new(devices.all().into_iter().map(|d| d.id.clone()));
        Twins {
            store,
            wakers,
            metrics,
            reapply: Default::default(),
        }
    }

    /// Asks the worker of `device` for a full round (every desired property applied again).
    pub fn request_reapply(&self, device: &DeviceId) {
        self.reapply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.clone());
        self.wake(device);
    }

    fn take_reapply(&self, device: &DeviceId) -> bool {
        self.reapply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device)
    }

    /// Stores a desired update by the version rule. Submitted at once, so updates are stored in
    /// receipt order; the receiver resolves after the commit.
    pub fn receive(
        &self,
        update: DesiredUpdate,
    ) -> oneshot::Receiver<Result<DesiredDecision, StoreError>> {
        self.store.submit(move |c| {
            let (desired, desired_version) = load_desired(c, update.device.as_str())?;
            let (is_snapshot, body) = match &update.body {
                DesiredBody::Patch(p) => (false, p),
                DesiredBody::Snapshot(s) => (true, s),
            };
            let decision = decide_desired(desired_version, update.version, is_snapshot);
            if decision != DesiredDecision::Apply {
                return Ok(decision);
            }
            let mut doc = if is_snapshot {
                json!({})
            } else {
                parse_doc(&desired)
            };
            merge_patch(&mut doc, body);
            if let Err(e) = validate_doc(&doc) {
                warn!(device = %update.device, error = %e, "desired document refused");
                return Ok(DesiredDecision::Ignore);
            }
            c.prepare_cached(
                "INSERT INTO twin (device, desired, desired_version) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device) DO UPDATE SET desired = ?2, desired_version = ?3",
            )?
            .execute(params![
                update.device.as_str(),
                doc.to_string(),
                update.version as i64
            ])?;
            Ok(decision)
        })
    }

    /// Stores a desired change from a cloud that keeps no versions (ThingsBoard's shared
    /// attributes): the gateway orders changes by arrival and numbers them itself, each one the
    /// held version plus one. A `Snapshot` replaces the document; a `Patch` is merged. A change
    /// that leaves the document as it was is `Ignore`d, so a full state asked again at every
    /// connect applies nothing when nothing changed. Resolves after the commit.
    pub fn receive_unversioned(
        &self,
        device: DeviceId,
        body: DesiredBody,
    ) -> oneshot::Receiver<Result<DesiredDecision, StoreError>> {
        self.store.submit(move |c| {
            let (desired, desired_version) = load_desired(c, device.as_str())?;
            let desired = parse_doc(&desired);
            let mut doc = match &body {
                DesiredBody::Patch(p) => {
                    let mut doc = desired.clone();
                    merge_patch(&mut doc, p);
                    doc
                }
                DesiredBody::Snapshot(s) => s.clone(),
            };
            if !doc.is_object() {
                doc = json!({});
            }
            if doc == desired {
                return Ok(DesiredDecision::Ignore);
            }
            if let Err(e) = validate_doc(&doc) {
                warn!(%device, error = %e, "desired document refused");
                return Ok(DesiredDecision::Ignore);
            }
            c.prepare_cached(
                "INSERT INTO twin (device, desired, desired_version) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device) DO UPDATE SET desired = ?2, desired_version = ?3",
            )?
            .execute(params![
                device.as_str(),
                doc.to_string(),
                (desired_version + 1) as i64
            ])?;
            Ok(DesiredDecision::Apply)
        })
    }

    /// The devices whose twin has a desired version not yet applied: the ones whose worker has
    /// a round to run at start-up.
    pub async fn owing(&self) -> Result<HashSet<String>, StoreError> {
        self.store
            .call(|c| {
                c.prepare("SELECT device FROM twin WHERE desired_version > applied_version")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
    }

    /// Wakes the worker of `device`.
    pub fn wake(&self, device: &DeviceId) {
        self.wakers.notify(device);
    }

    /// The desired version held per configured device (0 when none), for the sync at connect.
    pub async fn held_versions(&self) -> Result<BTreeMap<DeviceId, u64>, StoreError> {
        let ids: Vec<DeviceId> = self.wakers.ids();
        self.store
            .call(move |c| {
                let mut st =
                    c.prepare_cached("SELECT desired_version FROM twin WHERE device = ?1")?;
                let mut out = BTreeMap::new();
                for id in ids {
                    let v: Option<i64> = st.query_row([id.as_str()], |r| r.get(0)).optional()?;
                    out.insert(id, v.unwrap_or(0) as u64);
                }
                Ok(out)
            })
            .await
    }

    /// The row of `device` (default when none).
    pub async fn load(&self, device: &DeviceId) -> Result<TwinRow, StoreError> {
        let id = device.to_string();
        self.store.call(move |c| load_row(c, &id)).await
    }
}

/// The desired document of `device` as stored (not parsed: a stale update never needs it) and
/// its version; `{}` and 0 when there is no row.
fn load_desired(c: &rusqlite::Connection, device: &str) -> rusqlite::Result<(String, u64)> {
    let row = c
        .prepare_cached("SELECT desired, desired_version FROM twin WHERE device = ?1")?
        .query_row([device], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
        .optional()?;
    Ok(row.unwrap_or_else(|| ("{}".to_string(), 0)))
}

/// A stored JSON document; `{}` when it does not parse.
fn parse_doc(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!({}))
}

fn load_row(c: &rusqlite::Connection, device: &str) -> rusqlite::Result<TwinRow> {
    let row = c
        .prepare_cached("SELECT desired, desired_version, applied, applied_version, reported FROM twin WHERE device = ?1")?
        .query_row([device], |r| {
            Ok(TwinRow {
                desired: parse_doc(&r.get::<_, String>(0)?),
                desired_version: r.get::<_, i64>(1)? as u64,
                applied: parse_doc(&r.get::<_, String>(2)?),
                applied_version: r.get::<_, i64>(3)? as u64,
                reported: parse_doc(&r.get::<_, String>(4)?),
            })
        })
        .optional()?;
    Ok(row.unwrap_or_else(|| TwinRow {
        desired: json!({}),
        applied: json!({}),
        reported: json!({}),
        ..TwinRow::default()
    }))
}

/// Applies desired changes to one device until `stop`. A round runs when a newer desired
/// version arrived, when properties are still pending (busy or unreachable device; retried
/// with backoff, honouring `Retry-After`), and, with `reapply_on_reconnect`, as a full round of
/// every desired property when the device comes back from offline or a reported poll shows it
/// drifted from what was applied (a device reset to its defaults).
///
/// `idle`: the start-up query ([`Twins::owing`]) found nothing to apply for this device, so the
/// worker waits for a wake-up or a presence change before it reads the twin (what its first
/// round would do anyway): ten thousand devices at start cost one query, not ten thousand.
pub async fn worker(
    device: Arc<Device>,
    devices: Arc<Devices>,
    twins: Arc<Twins>,
    outbox: Wake,
    idle: bool,
    stop: CancellationToken,
) {
    let Some(wake) = twins.wakers.get(&device.id) else {
        return;
    };
    let mut wakeups = Wakeups::new(stop, wake, devices.presence.watch(&device.id));
    let mut was_online = devices.presence.is_online(&device.id);
    let mut idle = idle;
    loop {
        if idle && wakeups.event().await.is_err() {
            return;
        }
        idle = true;
        // Boxed: the state of the rounds lives only while there is work, so the ten thousand
        // idle workers of a big gateway stay small.
        let rounds = apply_until_idle(
            &device,
            &devices,
            &twins,
            &outbox,
            &mut wakeups,
            &mut was_online,
        );
        if Box::pin(rounds).await.is_err() {
            return;
        }
    }
}

/// Runs rounds until nothing is owed (`Ok`), or until the worker is to stop.
async fn apply_until_idle(
    device: &Arc<Device>,
    devices: &Arc<Devices>,
    twins: &Arc<Twins>,
    outbox: &Wake,
    wakeups: &mut Wakeups,
    was_online: &mut bool,
) -> Result<(), Ended> {
    // A debug span (an info one costs its field formatting at every round); the info and
    // warn events of a round name the device themselves.
    let span = || tracing::debug_span!("twin", device = %device.id);
    let mut backoff = Backoff::new(200, 10_000);
    let mut attempts: HashMap<String, u32> = HashMap::new();
    // A round still owed: `Some(full)` after a round left properties pending.
    let mut owed: Option<bool> = None;
    let mut retry_in: Option<Duration> = None;
    loop {
        let online = devices.presence.is_online(&device.id);
        let mut full = false;
        if online && !*was_online && device.config.reapply_on_reconnect {
            info!(device = %device.id, "device back online: applying its desired state again");
            full = true;
        }
        *was_online = online;
        if twins.take_reapply(&device.id) {
            full = true;
        }
        let row = match twins.load(&device.id).await {
            Ok(row) => row,
            Err(e) => {
                warn!(device = %device.id, error = %e, "cannot read the twin");
                tokio::select! {
                    _ = wakeups.stop.cancelled() => return Err(Ended),
                    _ = pause_after_failure(&twins.store, backoff.delay()) => {}
                }
                continue;
            }
        };
        let newer = row.desired_version > row.applied_version;
        let due = retry_in.is_none() && owed.is_some();
        let full = full || (due && owed == Some(true));
        let wanted = online
            && row.desired.as_object().is_some_and(|d| !d.is_empty())
            && (newer || full || due);
        if wanted {
            let round = apply_round(device, devices, twins, outbox, row, full, &mut attempts);
            match round.instrument(span()).await {
                Ok(Round::Done { newer }) => {
                    backoff.reset();
                    owed = None;
                    retry_in = None;
                    if newer {
                        continue;
                    }
                    // Nothing newer was stored when the round committed, so reading the twin
                    // again would find nothing to do. Whatever comes later (a desired update,
                    // a reapply, a presence change) wakes the worker.
                    return Ok(());
                }
                Ok(Round::Pending { after }) => {
                    owed = Some(full || owed == Some(true));
                    retry_in = Some(after.unwrap_or_else(|| backoff.delay()));
                }
                Err(why) => {
                    debug!(device = %device.id, %why, "twin application postponed");
                    owed = Some(full || owed == Some(true));
                    retry_in = Some(backoff.delay());
                }
            }
        }
        if owed.is_none() && retry_in.is_none() {
            return Ok(());
        }
        match retry_in {
            Some(after) => {
                if wakeups.event_or(after).await? == Woke::Timer {
                    retry_in = None;
                }
            }
            None => wakeups.event().await?,
        }
    }
}

/// How a round ended.
enum Round {
    /// Every planned property has a final apply state; `newer` when a newer desired version
    /// was stored meanwhile.
    Done { newer: bool },
    /// Some properties are pending; try again (after `after` when the device said when).
    Pending { after: Option<Duration> },
}

/// One application of the latest desired state: every property changed since the last
/// application (all of them when `full`). Err when the outcome could not be recorded.
async fn apply_round(
    device: &Device,
    devices: &Devices,
    twins: &Twins,
    outbox: &Wake,
    row: TwinRow,
    full: bool,
    attempts: &mut HashMap<String, u32>,
) -> Result<Round, String> {
    let base = if full { json!({}) } else { row.applied.clone() };
    let steps = plan(&row.desired, &base);
    let mut results: Vec<(Step, StepOutcome)> = Vec::new();
    let mut after: Option<Duration> = None;
    let mut unreachable: Option<String> = None;
    for step in steps {
        let pending = |reason: String, attempts: &mut HashMap<String, u32>| {
            let n = attempts.entry(step.property.clone()).or_insert(0);
            *n += 1;
            StepOutcome::Pending {
                reason,
                attempts: *n,
            }
        };
        if let Some(why) = &unreachable {
            // Not tried: the device stopped answering earlier in this round.
            let outcome = StepOutcome::Pending {
                reason: why.clone(),
                attempts: attempts.get(&step.property).copied().unwrap_or(0),
            };
            results.push((step, outcome));
            continue;
        }
        let Some(action) = device.actions.twin.get(&step.property) else {
            let reason = format!(
                "device {} has no mapping for twin property '{}'",
                device.id, step.property
            );
            results.push((step, StepOutcome::Refused { reason }));
            continue;
        };
        let mut vars = Map::new();
        vars.insert("value".into(), step.value.clone());
        vars.insert("property".into(), Value::String(step.property.clone()));
        let timeout = Duration::from_millis(action.timeout_ms.unwrap_or(device.config.timeout_ms));
        let _slot = device
            .slots
            .acquire()
            .await
            .map_err(|_| "shutting down".to_string())?;
        let result = device.call(action, &vars, timeout).await;
        devices.presence.observe_call(&device.id, &result, now_ms());
        let result = match (result, &action.read_back) {
            (Ok(_), Some(method)) => {
                read_back(device, method, action.read_back_pointer.as_deref(), timeout).await
            }
            (other, _) => other,
        };
        let outcome = match result {
            Ok(answer) => StepOutcome::Accepted {
                holds: if answer.result.is_null() || answer.result == json!({}) {
                    step.value.clone()
                } else {
                    answer.result
                },
            },
            Err(CallError::Status { status, detail }) => StepOutcome::Refused {
                reason: format!("device answered {status}: {}", answer_text(&detail)),
            },
            Err(CallError::Coded { code, detail }) => StepOutcome::Refused {
                reason: format!("device answered error {code}: {}", answer_text(&detail)),
            },
            Err(
                e @ (CallError::BadAnswer(_) | CallError::Refused(_) | CallError::TooLarge { .. }),
            ) => StepOutcome::Refused {
                reason: e.to_string(),
            },
            Err(CallError::Busy {
                reason,
                retry_after,
                ..
            }) => {
                after = match (after, retry_after) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                pending(format!("device busy: {reason}"), attempts)
            }
            // Not reached, or no answer in time (a setting is written again, which is safe):
            // pending, and the rest of the round waits for the device too.
            Err(e @ (CallError::Unreachable(_) | CallError::Timeout(_))) => {
                unreachable = Some(format!("device not answering: {e}"));
                pending(e.to_string(), attempts)
            }
        };
        if !matches!(outcome, StepOutcome::Pending { .. }) {
            attempts.remove(&step.property);
        }
        results.push((step, outcome));
    }
    let any_pending = results
        .iter()
        .any(|(_, o)| matches!(o, StepOutcome::Pending { .. }));
    let (patch, apply) = report(&results, row.desired_version, now_ms());
    let applied = applied_after(&row.desired, &row.applied, &results);
    let states: Vec<_> = apply.values().map(|s| s.state).collect();
    for (property, status) in &apply {
        if status.state == gatewayd_protocol::ApplyState::Refused {
            warn!(device = %device.id, property = %property, reason = status.reason.as_deref().unwrap_or(""), "desired property refused");
        }
    }
    let id = device.id.to_string();
    let version = row.desired_version;
    let applied_count = results.len();
    let newer = twins
        .store
        .call(move |c| {
            // Only what the commit needs: the desired and applied documents are not parsed.
            let current: Option<(i64, i64, String)> = c
                .prepare_cached(
                    "SELECT applied_version, desired_version, reported FROM twin WHERE device = ?1",
                )?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let (applied_version, desired_version, reported) =
                current.unwrap_or((0, 0, String::new()));
            let newer = desired_version as u64 > version;
            if applied_version as u64 > version {
                return Ok(true);
            }
            let mut reported = parse_doc(&reported);
            merge_patch(&mut reported, &patch);
            c.prepare_cached(
                "UPDATE twin SET applied = ?2, applied_version = ?3, reported = ?4 WHERE device = ?1")?
                .execute(
                params![id, applied.to_string(), version as i64, reported.to_string()],
            )?;
            if !(patch.as_object().is_some_and(|p| p.is_empty()) && apply.is_empty()) {
                outbox::push(c, outbox::Kind::Reported, &id, &json!({"patch": patch, "apply": apply}))?;
            }
            Ok(newer)
        })
        .await
        .map_err(|e| e.to_string())?;
    for state in states {
        twins.metrics.twin_apply(state);
    }
    outbox.wake();
    if any_pending {
        info!(
            device = %device.id,
            version,
            properties = applied_count,
            "desired state partly applied; the rest is retried"
        );
        return Ok(Round::Pending { after });
    }
    // Debug, not info: at ten thousand devices a fan-out would log ten thousand lines; the
    // outcome is in the twin's apply states and the twin apply counters.
    debug!(
        version,
        properties = applied_count,
        full,
        "desired state applied"
    );
    Ok(Round::Done { newer })
}

/// Calls the `read_back` method and picks the value it reports.
async fn read_back(
    device: &Device,
    method: &str,
    pointer: Option<&str>,
    timeout: Duration,
) -> Result<crate::device::Answer, CallError> {
    let action = device.actions.methods.get(method).ok_or_else(|| {
        CallError::BadAnswer(format!("read_back method '{method}' is not configured"))
    })?;
    let mut answer = device.call(action, &Map::new(), timeout).await?;
    if let Some(ptr) = pointer.filter(|p| !p.is_empty()) {
        answer.result = answer.result.pointer(ptr).cloned().ok_or_else(|| {
            CallError::BadAnswer(format!("read_back answer has no value at {ptr}"))
        })?;
    }
    Ok(answer)
}

/// Polls the reported properties of one device, if its configuration asks for it: calls the
/// poll method on its interval and merges what changed into the reported half (through the
/// outbox, like any reported patch).
pub async fn poll_reported(
    device: Arc<Device>,
    devices: Arc<Devices>,
    twins: Arc<Twins>,
    outbox: Wake,
    stop: CancellationToken,
) {
    let Some(poll) = device.config.reported_poll.clone() else {
        return;
    };
    let Some(action) = device.actions.methods.get(&poll.method).cloned() else {
        return;
    };
    let interval = Duration::from_millis(poll.interval_ms);
    let timeout = Duration::from_millis(action.timeout_ms.unwrap_or(device.config.timeout_ms));
    let span = tracing::info_span!("poll", device = %device.id);
    async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if !devices.presence.is_online(&device.id) {
                continue;
            }
            let result = {
                let Ok(_slot) = device.slots.acquire().await else {
                    return;
                };
                device.call(&action, &Map::new(), timeout).await
            };
            devices.presence.observe_call(&device.id, &result, now_ms());
            let value = match result {
                Ok(answer) => match poll.pointer.as_deref().filter(|p| !p.is_empty()) {
                    Some(ptr) => answer.result.pointer(ptr).cloned(),
                    None => Some(answer.result),
                },
                Err(e) => {
                    debug!(error = %e, "reported poll failed");
                    continue;
                }
            };
            let Some(Value::Object(seen)) = value else {
                debug!("reported poll answer is not an object; ignored");
                continue;
            };
            let id = device.id.to_string();
            let twin_props: Vec<String> = device.actions.twin.keys().cloned().collect();
            let r = twins
                .store
                .call(move |c| {
                    let row = load_row(c, &id)?;
                    // A twin property the gateway applied but the device no longer holds: it
                    // was reset or changed locally, so the desired state is applied again.
                    let drifted = twin_props.iter().any(|k| {
                        let (Some(want), Some(got), Some(done)) =
                            (row.desired.get(k), seen.get(k), row.applied.get(k))
                        else {
                            return false;
                        };
                        gatewayd_protocol::twin::same_value(want, done)
                            && !gatewayd_protocol::twin::same_value(want, got)
                    });
                    let mut patch = Map::new();
                    for (k, v) in seen {
                        let same = row
                            .reported
                            .get(&k)
                            .is_some_and(|old| gatewayd_protocol::twin::same_value(old, &v));
                        if !same {
                            patch.insert(k, v);
                        }
                    }
                    if patch.is_empty() {
                        return Ok((false, drifted));
                    }
                    let patch = Value::Object(patch);
                    let mut reported = row.reported;
                    merge_patch(&mut reported, &patch);
                    c.execute(
                        "INSERT INTO twin (device, reported) VALUES (?1, ?2)
                         ON CONFLICT(device) DO UPDATE SET reported = ?2",
                        params![id, reported.to_string()],
                    )?;
                    outbox::push(c, outbox::Kind::Reported, &id, &json!({"patch": patch}))?;
                    Ok((true, drifted))
                })
                .await;
            if let Ok((_, true)) = r {
                if device.config.reapply_on_reconnect {
                    info!("the device no longer holds its desired state: applying it again");
                    twins.request_reapply(&device.id);
                }
            }
            match r {
                Ok((true, _)) => {
                    debug!("reported properties changed on the device");
                    outbox.wake();
                }
                Ok((false, _)) => {}
                Err(e) => warn!(error = %e, "cannot record polled reported properties"),
            }
        }
    }
    .instrument(span)
    .await
}
