//! The in-memory index of open (not final) messages: per-device FIFO order, what is waiting to
//! be sent, what is published and unacknowledged (the per-gateway window), and expiry
//! deadlines. No I/O and no clock: callers pass `now` and persist the [`MessageWrite`]s it
//! returns, in order.
//!
//! A message's life here: `enqueue` (pending: not sendable until its row is committed) ->
//! `committed` (waiting) -> `take_sends` (in flight to a gateway: counts in that gateway's
//! window) -> `received` feedback (delivered: the gateway owns it) -> a final feedback, expiry or
//! purge removes it. A new birth of the gateway puts its in-flight messages back to waiting, in
//! their original order.
//!
//! Nothing stays open past its TTL plus a grace:
//! - waiting, never published: `expired` at the TTL;
//! - published, never acknowledged: `expired` at TTL + [`UNACKED_GRACE_MS`];
//! - delivered without a final feedback: sent again at TTL + a third of the verdict grace (the
//!   gateway recognises the id and repeats its latest feedback, final one included), and
//!   `may_have_run` at TTL + the verdict grace ([`VERDICT_GRACE_MS`] unless configured): it
//!   reached the gateway, so it may have run.
//!
//! Delivered messages are also sent again ("probes", outside the window) when the cloud may
//! have lost their final feedback: after the cloud's own (re)connect, and when a gateway's
//! store was replaced.

use crate::store::{MessageRecord, MessageWrite};
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{DeviceId, Feedback, GatewayId, MessageId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// How long after its TTL a message that was published but never acknowledged waits for the
/// gateway's own verdict (it may have executed it just in time, by its clock) before the cloud
/// calls it expired.
pub const UNACKED_GRACE_MS: u64 = 30_000;
/// How long after its TTL a delivered message waits for its final feedback before it ends
/// `may_have_run`, unless configured. The gateway runs a command started before the TTL to its
/// end (the device call's own timeout) and then publishes the outcome; at a third of this the
/// cloud sends the message again so a gateway that has the outcome repeats it.
pub const VERDICT_GRACE_MS: u64 = 90_000;
/// Most messages taken from one device per pass, so one busy device cannot starve the others
/// of the same gateway's window.
const QUANTUM: usize = 32;

/// Reason recorded when a message's TTL passes before it was ever published.
pub const EXPIRED_IN_CLOUD: &str = "ttl passed in the cloud queue";
/// Reason recorded when a published message's TTL (plus grace) passes without an answer.
pub const EXPIRED_UNACKED: &str = "ttl passed before the gateway acknowledged it";
/// Reason recorded when a delivered message's TTL (plus the verdict grace) passes without a
/// final feedback.
pub const NO_VERDICT: &str =
    "no final feedback from the gateway within ttl + grace; it reached the gateway, so it may have run";
/// Reason recorded on purge.
pub const PURGED: &str = "purged by operator";

/// One open message.
#[derive(Debug, Clone)]
struct Entry {
    device: DeviceId,
    /// The encoded `C2dMessage`, published as is (and again on resend).
    body: Arc<Vec<u8>>,
    expires_at_ms: u64,
    /// Position in the global enqueue order.
    order: u64,
    /// Its row is committed; until then it is never published.
    committed: bool,
    /// `Queued` or `Delivered`.
    status: MessageStatus,
    /// The gateway it was last published to.
    sent_to: Option<GatewayId>,
    /// Published and not yet acknowledged: counts in `sent_to`'s window.
    inflight: bool,
    /// Delivered and to be sent again to `sent_to` (in `Queue::probes`).
    probe: bool,
    /// Delivered and already sent again after its TTL: the next deadline ends it.
    rechecked: bool,
}

impl Entry {
    /// When the cloud acts on it next (expires, sends again or ends it), if ever.
    fn deadline(&self, verdict_grace_ms: u64) -> Option<u64> {
        let after = |ms: u64| Some(self.expires_at_ms.saturating_add(ms));
        match (self.status, &self.sent_to) {
            (MessageStatus::Queued, None) => Some(self.expires_at_ms),
            (MessageStatus::Queued, Some(_)) => after(UNACKED_GRACE_MS),
            (MessageStatus::Delivered, _) if self.rechecked => after(verdict_grace_ms),
            (MessageStatus::Delivered, _) => after(verdict_grace_ms / 3),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct DeviceQueue {
    /// Every open message, by order.
    open: BTreeMap<u64, MessageId>,
    /// Committed, queued, not in flight: what the sender takes next, by order.
    waiting: BTreeMap<u64, MessageId>,
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub gateway: GatewayId,
    pub id: MessageId,
    pub body: Arc<Vec<u8>>,
}

/// The device already has as many open messages as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// How many are open (queued or delivered).
    pub waiting: usize,
}

/// Why a feedback changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// No open message has this id (unknown, or already final).
    NotOpen,
    /// The message belongs to another device.
    WrongDevice(DeviceId),
    /// The message was not sent to this gateway.
    WrongGateway(Option<GatewayId>),
    /// The status would not move forward.
    NoChange(MessageStatus),
}

/// What a feedback did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub status: MessageStatus,
    pub write: MessageWrite,
    /// A window slot was freed: the sender may have more to send.
    pub freed_window: bool,
}

/// What expiry did.
#[derive(Debug, Default, PartialEq)]
pub struct Expired {
    /// The final statuses to persist.
    pub writes: Vec<MessageWrite>,
    /// Delivered messages now waiting to be sent again.
    pub probes: usize,
}

/// The index. See the module docs.
#[derive(Debug)]
pub struct Queue {
    max_queue: usize,
    window: usize,
    verdict_grace_ms: u64,
    next_order: u64,
    entries: HashMap<MessageId, Entry>,
    devices: HashMap<DeviceId, DeviceQueue>,
    deadlines: BTreeSet<(u64, MessageId)>,
    inflight: HashMap<GatewayId, usize>,
    /// Devices with at least one waiting message.
    ready: BTreeSet<DeviceId>,
    /// Delivered messages to send again, per gateway, by order.
    probes: BTreeMap<GatewayId, BTreeMap<u64, MessageId>>,
    /// The device served last, so passes go round.
    cursor: Option<DeviceId>,
}

impl Queue {
    /// An empty index allowing `max_queue` open messages per device and `window` in flight per
    /// gateway.
    pub fn new(max_queue: usize, window: usize) -> Self {
        Queue {
            max_queue,
            window: window.max(1),
            verdict_grace_ms: VERDICT_GRACE_MS,
            next_order: 0,
            entries: HashMap::new(),
            devices: HashMap::new(),
            deadlines: BTreeSet::new(),
            inflight: HashMap::new(),
            ready: BTreeSet::new(),
            probes: BTreeMap::new(),
            cursor: None,
        }
    }

    /// Sets how long after its TTL a delivered message waits for its final feedback.
    pub fn with_verdict_grace(mut self, ms: u64) -> Self {
        self.verdict_grace_ms = ms;
        self
    }

    /// Restores an open message from the store (at start, in enqueue order). One that was
    /// published and not acknowledged is in flight again, and is resent at its gateway's next
    /// birth.
    pub fn restore(&mut self, record: &MessageRecord, body: Arc<Vec<u8>>) {
        if record.status.is_final() {
            return;
        }
        let inflight = record.status == MessageStatus::Queued && record.gateway.is_some();
        let entry = Entry {
            device: record.device.clone(),
            body,
            expires_at_ms: record.expires_at_ms,
            order: self.bump_order(),
            committed: true,
            status: record.status,
            sent_to: record.gateway.clone(),
            inflight,
            probe: false,
            rechecked: false,
        };
        if let (true, Some(gw)) = (inflight, &record.gateway) {
            *self.inflight.entry(gw.clone()).or_default() += 1;
        }
        self.insert(record.id.clone(), entry);
    }

    /// How many open messages the device has.
    pub fn open_count(&self, device: &DeviceId) -> usize {
        self.devices.get(device).map_or(0, |q| q.open.len())
    }

    /// How many messages are published to `gateway` and not acknowledged.
    pub fn inflight(&self, gateway: &GatewayId) -> usize {
        self.inflight.get(gateway).copied().unwrap_or(0)
    }

    /// Adds a new message, pending until [`Queue::committed`]. Refused when the device already
    /// has `max_queue` open messages.
    pub fn enqueue(
        &mut self,
        id: MessageId,
        device: DeviceId,
        body: Arc<Vec<u8>>,
        expires_at_ms: u64,
    ) -> Result<(), QueueFull> {
        let waiting = self.open_count(&device);
        if waiting >= self.max_queue {
            return Err(QueueFull { waiting });
        }
        let entry = Entry {
            device,
            body,
            expires_at_ms,
            order: self.bump_order(),
            committed: false,
            status: MessageStatus::Queued,
            sent_to: None,
            inflight: false,
            probe: false,
            rechecked: false,
        };
        self.insert(id, entry);
        Ok(())
    }

    /// The message's row is committed: it may be sent. Returns whether it became sendable.
    pub fn committed(&mut self, id: &MessageId) -> bool {
        let Some(e) = self.entries.get_mut(id) else {
            return false;
        };
        if e.committed {
            return false;
        }
        e.committed = true;
        if e.status != MessageStatus::Queued || e.sent_to.is_some() {
            return false;
        }
        let (device, order) = (e.device.clone(), e.order);
        self.wait(&device, order, id.clone());
        true
    }

    /// The message's row could not be committed: forget it.
    pub fn abandon(&mut self, id: &MessageId) {
        self.remove(id);
    }

    /// Devices with waiting messages.
    pub fn ready_devices(&self) -> Vec<DeviceId> {
        self.ready.iter().cloned().collect()
    }

    /// Takes up to `max` messages to publish now, in order per device, for the devices that
    /// `routes` maps to an online gateway, within each gateway's window. A waiting message whose
    /// TTL has passed is never published: expired at once if it was never sent, left to the
    /// expiry deadline otherwise. Returns the publishes and the writes to persist.
    pub fn take_sends(
        &mut self,
        routes: &HashMap<DeviceId, GatewayId>,
        now_ms: u64,
        max: usize,
    ) -> (Vec<Publish>, Vec<MessageWrite>) {
        let mut sends = Vec::new();
        let mut writes = Vec::new();
        let order: Vec<DeviceId> = match &self.cursor {
            Some(c) => {
                let after = self.ready.range::<DeviceId, _>((
                    std::ops::Bound::Excluded(c),
                    std::ops::Bound::Unbounded,
                ));
                let before = self.ready.range::<DeviceId, _>(..=c);
                after.chain(before).cloned().collect()
            }
            None => self.ready.iter().cloned().collect(),
        };
        for device in order {
            if sends.len() >= max {
                break;
            }
            let Some(gw) = routes.get(&device) else {
                continue;
            };
            let mut taken = 0;
            while taken < QUANTUM && sends.len() < max && self.inflight(gw) < self.window {
                let Some(id) = self.pop_waiting(&device) else {
                    break;
                };
                let Some(e) = self.entries.get(&id) else {
                    continue;
                };
                if now_ms >= e.expires_at_ms {
                    if e.sent_to.is_none() {
                        writes.push(self.finish(
                            &id,
                            MessageStatus::Expired,
                            EXPIRED_IN_CLOUD,
                            now_ms,
                        ));
                    }
                    continue;
                }
                let device = e.device.clone();
                self.reschedule(&id, |e| {
                    e.sent_to = Some(gw.clone());
                    e.inflight = true;
                });
                *self.inflight.entry(gw.clone()).or_default() += 1;
                let body = Arc::clone(&self.entries[&id].body);
                writes.push(MessageWrite::Sent {
                    id: id.clone(),
                    device,
                    gateway: gw.clone(),
                    at_ms: now_ms,
                });
                sends.push(Publish {
                    gateway: gw.clone(),
                    id,
                    body,
                });
                taken += 1;
            }
            self.cursor = Some(device);
        }
        (sends, writes)
    }

    /// A new birth of `gateway`: its unacknowledged messages wait to be sent again, in order.
    /// Returns how many.
    pub fn gateway_online(&mut self, gateway: &GatewayId) -> usize {
        let again: Vec<(DeviceId, u64, MessageId)> = self
            .entries
            .iter_mut()
            .filter(|(_, e)| e.inflight && e.sent_to.as_ref() == Some(gateway))
            .map(|(id, e)| {
                e.inflight = false;
                (e.device.clone(), e.order, id.clone())
            })
            .collect();
        self.inflight.remove(gateway);
        for (device, order, id) in &again {
            self.wait(device, *order, id.clone());
        }
        again.len()
    }

    /// Marks delivered messages to be sent again to the gateway that has them (all gateways, or
    /// only `gateway`), in their order: the gateway repeats its latest feedback for an id it
    /// knows, and takes one it lost as new. Returns how many.
    pub fn probe_delivered(&mut self, gateway: Option<&GatewayId>) -> usize {
        let chosen: Vec<(GatewayId, u64, MessageId)> = self
            .entries
            .iter_mut()
            .filter(|(_, e)| e.status == MessageStatus::Delivered && !e.probe)
            .filter_map(|(id, e)| {
                let to = e.sent_to.clone()?;
                if gateway.is_some_and(|g| g != &to) {
                    return None;
                }
                e.probe = true;
                Some((to, e.order, id.clone()))
            })
            .collect();
        for (to, order, id) in &chosen {
            self.probes
                .entry(to.clone())
                .or_default()
                .insert(*order, id.clone());
        }
        chosen.len()
    }

    /// Gateways with delivered messages waiting to be sent again.
    pub fn probe_gateways(&self) -> Vec<GatewayId> {
        self.probes.keys().cloned().collect()
    }

    /// Takes up to `max` delivered messages to send again, in order, to the gateways in
    /// `accepting`. They do not count in the window: the gateway answers with feedback it
    /// already has. Returns the publishes and the writes to persist.
    pub fn take_probes(
        &mut self,
        accepting: &[GatewayId],
        now_ms: u64,
        max: usize,
    ) -> (Vec<Publish>, Vec<MessageWrite>) {
        let mut sends = Vec::new();
        let mut writes = Vec::new();
        for gw in accepting {
            while sends.len() < max {
                let Some(line) = self.probes.get_mut(gw) else {
                    break;
                };
                let Some((_, id)) = line.pop_first() else {
                    break;
                };
                if line.is_empty() {
                    self.probes.remove(gw);
                }
                let Some(e) = self.entries.get_mut(&id) else {
                    continue;
                };
                e.probe = false;
                writes.push(MessageWrite::Sent {
                    id: id.clone(),
                    device: e.device.clone(),
                    gateway: gw.clone(),
                    at_ms: now_ms,
                });
                sends.push(Publish {
                    gateway: gw.clone(),
                    id,
                    body: Arc::clone(&e.body),
                });
            }
        }
        (sends, writes)
    }

    /// Applies gateway feedback from `from`. `owner` is the device's gateway now, which may
    /// answer for a message never published in this run. Forward only; a final status removes
    /// the message.
    pub fn feedback(
        &mut self,
        from: &GatewayId,
        owner: Option<&GatewayId>,
        fb: &Feedback,
        now_ms: u64,
    ) -> Result<Applied, Ignored> {
        let e = self.entries.get(&fb.id).ok_or(Ignored::NotOpen)?;
        if e.device != fb.device {
            return Err(Ignored::WrongDevice(e.device.clone()));
        }
        if e.sent_to.as_ref().or(owner) != Some(from) {
            return Err(Ignored::WrongGateway(e.sent_to.clone()));
        }
        let next = e
            .status
            .apply(fb.outcome)
            .ok_or(Ignored::NoChange(e.status))?;
        let freed_window = e.inflight;
        let id = fb.id.clone();
        if next.is_final() {
            let mut write = self.finish(&id, next, "", now_ms);
            if let MessageWrite::Status {
                reason,
                device_status,
                ..
            } = &mut write
            {
                reason.clone_from(&fb.reason);
                *device_status = fb.device_status;
            }
            return Ok(Applied {
                status: next,
                write,
                freed_window,
            });
        }
        self.release(&id);
        self.reschedule(&id, |e| {
            e.status = next;
            e.sent_to = Some(from.clone());
        });
        Ok(Applied {
            status: next,
            write: MessageWrite::Status {
                id,
                device: Some(fb.device.clone()),
                status: next,
                reason: fb.reason.clone(),
                device_status: fb.device_status,
                delivered_at_ms: (next == MessageStatus::Delivered).then_some(now_ms),
                finished_at_ms: None,
            },
            freed_window,
        })
    }

    /// Acts on every deadline at or before `now_ms`: expires what never reached a gateway,
    /// sends a delivered message again once, and ends it `may_have_run` at its last deadline.
    pub fn expire_due(&mut self, now_ms: u64) -> Expired {
        let mut done = Expired::default();
        while let Some((at, id)) = self.deadlines.first().cloned() {
            if at > now_ms {
                break;
            }
            let Some(e) = self.entries.get(&id) else {
                self.deadlines.pop_first();
                continue;
            };
            match (e.status, e.sent_to.clone(), e.rechecked) {
                (MessageStatus::Delivered, Some(to), false) => {
                    self.reschedule(&id, |e| e.rechecked = true);
                    if self.probe(&id, to) {
                        done.probes += 1;
                    }
                }
                (MessageStatus::Delivered, _, _) => {
                    let write = self.finish(&id, MessageStatus::MayHaveRun, NO_VERDICT, now_ms);
                    done.writes.push(write);
                }
                (_, None, _) => {
                    let write = self.finish(&id, MessageStatus::Expired, EXPIRED_IN_CLOUD, now_ms);
                    done.writes.push(write);
                }
                (_, Some(_), _) => {
                    let write = self.finish(&id, MessageStatus::Expired, EXPIRED_UNACKED, now_ms);
                    done.writes.push(write);
                }
            }
        }
        done
    }

    /// The earliest expiry deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Purges every open message of the device. Returns the writes (one per message).
    pub fn purge(&mut self, device: &DeviceId, now_ms: u64) -> Vec<MessageWrite> {
        let ids: Vec<MessageId> = self
            .devices
            .get(device)
            .map(|q| q.open.values().cloned().collect())
            .unwrap_or_default();
        ids.iter()
            .map(|id| self.finish(id, MessageStatus::Purged, PURGED, now_ms))
            .collect()
    }

    /// Puts one delivered message in its gateway's probe line; false if it already was.
    fn probe(&mut self, id: &MessageId, to: GatewayId) -> bool {
        let Some(e) = self.entries.get_mut(id) else {
            return false;
        };
        if std::mem::replace(&mut e.probe, true) {
            return false;
        }
        self.probes
            .entry(to)
            .or_default()
            .insert(e.order, id.clone());
        true
    }

    fn bump_order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }

    fn insert(&mut self, id: MessageId, entry: Entry) {
        let q = self.devices.entry(entry.device.clone()).or_default();
        q.open.insert(entry.order, id.clone());
        let waits = entry.committed && entry.status == MessageStatus::Queued && !entry.inflight;
        if waits {
            q.waiting.insert(entry.order, id.clone());
            self.ready.insert(entry.device.clone());
        }
        if let Some(at) = entry.deadline(self.verdict_grace_ms) {
            self.deadlines.insert((at, id.clone()));
        }
        self.entries.insert(id, entry);
    }

    fn wait(&mut self, device: &DeviceId, order: u64, id: MessageId) {
        self.devices
            .entry(device.clone())
            .or_default()
            .waiting
            .insert(order, id);
        self.ready.insert(device.clone());
    }

    fn pop_waiting(&mut self, device: &DeviceId) -> Option<MessageId> {
        let q = self.devices.get_mut(device)?;
        let id = q.waiting.pop_first().map(|(_, id)| id);
        if q.waiting.is_empty() {
            self.ready.remove(device);
        }
        id
    }

    /// Changes an entry with its expiry deadline kept in step.
    fn reschedule(&mut self, id: &MessageId, change: impl FnOnce(&mut Entry)) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let grace = self.verdict_grace_ms;
        if let Some(at) = e.deadline(grace) {
            self.deadlines.remove(&(at, id.clone()));
        }
        change(e);
        if let Some(at) = e.deadline(grace) {
            self.deadlines.insert((at, id.clone()));
        }
    }

    /// Takes the entry out of its gateway's window and out of the waiting line.
    fn release(&mut self, id: &MessageId) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        if std::mem::replace(&mut e.inflight, false) {
            if let Some(n) = e.sent_to.as_ref().and_then(|gw| self.inflight.get_mut(gw)) {
                *n = n.saturating_sub(1);
            }
        }
        let (device, order) = (e.device.clone(), e.order);
        if let Some(q) = self.devices.get_mut(&device) {
            q.waiting.remove(&order);
            if q.waiting.is_empty() {
                self.ready.remove(&device);
            }
        }
    }

    fn remove(&mut self, id: &MessageId) -> Option<Entry> {
        self.release(id);
        let e = self.entries.remove(id)?;
        if let Some(at) = e.deadline(self.verdict_grace_ms) {
            self.deadlines.remove(&(at, id.clone()));
        }
        if let (true, Some(to)) = (e.probe, &e.sent_to) {
            if let Some(line) = self.probes.get_mut(to) {
                line.remove(&e.order);
                if line.is_empty() {
                    self.probes.remove(to);
                }
            }
        }
        if let Some(q) = self.devices.get_mut(&e.device) {
            q.open.remove(&e.order);
            if q.open.is_empty() {
                self.devices.remove(&e.device);
            }
        }
        Some(e)
    }

    /// Removes the entry with a final status and returns the write recording it.
    fn finish(
        &mut self,
        id: &MessageId,
        status: MessageStatus,
        reason: &str,
        now_ms: u64,
    ) -> MessageWrite {
        let device = self.remove(id).map(|e| e.device);
        MessageWrite::Status {
            id: id.clone(),
            device,
            status,
            reason: (!reason.is_empty()).then(|| reason.to_string()),
            device_status: None,
            delivered_at_ms: None,
            finished_at_ms: Some(now_ms),
        }
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
