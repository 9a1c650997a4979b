//! Device presence: a table of online/offline per device, fed by health probes and by call
//! outcomes, with a change signal the cloud session uses to republish the retained snapshot.

use super::{CallError, Device, Driver};
use gatewayd_protocol::chunk::{presence_part, presence_part_size, presence_parts, MAX_REASON};
use gatewayd_protocol::limits::DEFAULT_MAX_PUBLISH;
use gatewayd_protocol::{DeviceId, DevicePresence, DeviceStatus};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Presence of every device. Devices start online: the first probe runs at once, and a call
/// that cannot connect marks the device offline immediately.
#[derive(Debug)]
pub struct Presence {
    table: Mutex<BTreeMap<DeviceId, DeviceStatus>>,
    /// Bumped at every change; each interested task holds its own receiver.
    changes: watch::Sender<u64>,
    /// Which devices there are and how they are announced; replaced when the configuration
    /// adds or removes devices (a live reload).
    layout: Mutex<Layout>,
    /// Parts changed since they were last taken for publishing.
    dirty: Mutex<BTreeSet<u32>>,
    max_publish: usize,
    /// Devices whose first probe is still to come in the start-up round.
    first_round: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
struct Layout {
    /// Online state per device, for the tasks that care about one device only (its twin and
    /// message workers), so a flapping device wakes its own workers and nobody else's.
    per_device: HashMap<DeviceId, watch::Sender<bool>>,
    /// The partition of devices into presence parts (in id order), each fitting one publish;
    /// a change republishes only its part.
    parts: Vec<Vec<DeviceId>>,
    part_of: HashMap<DeviceId, u32>,
    /// Identifies this partition (new at every start and every change of the device set).
    generation: u64,
}

impl Layout {
    fn new(
        ids: &[DeviceId],
        mut per_device: HashMap<DeviceId, watch::Sender<bool>>,
        max_publish: usize,
    ) -> Layout {
        per_device.retain(|id, _| ids.binary_search(id).is_ok());
        for id in ids {
            per_device
                .entry(id.clone())
                .or_insert_with(|| watch::Sender::new(true));
        }
        let parts = presence_parts(ids, presence_part_size(max_publish));
        let part_of = parts
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.iter().map(move |id| (id.clone(), i as u32)))
            .collect();
        Layout {
            per_device,
            parts,
            part_of,
            generation: rand::random(),
        }
    }
}

impl Presence {
    /// All `ids` online since `now_ms`, in parts that fit the default publish size.
    pub fn new(ids: impl Iterator<Item = DeviceId>, now_ms: u64) -> Self {
        Self::with_limit(ids, now_ms, DEFAULT_MAX_PUBLISH)
    }

    /// All `ids` online since `now_ms`, in parts that fit publishes of `max_publish` bytes.
    pub fn with_limit(
        ids: impl Iterator<Item = DeviceId>,
        now_ms: u64,
        max_publish: usize,
    ) -> Self {
        let table: BTreeMap<DeviceId, DeviceStatus> =
            ids.map(|id| (id, online_since(now_ms))).collect();
        let ids: Vec<DeviceId> = table.keys().cloned().collect();
        let layout = Layout::new(&ids, HashMap::new(), max_publish);
        Self {
            table: Mutex::new(table),
            changes: watch::Sender::new(0),
            layout: Mutex::new(layout),
            dirty: Mutex::new(BTreeSet::new()),
            max_publish,
            first_round: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// At start: `n` probe loops are starting; once each has had its first probe (or found it
    /// has none), the start-up round is over and the memory it used is handed back.
    pub fn expect_first_probes(&self, n: usize) {
        self.first_round
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// One probe loop's first probe is done (or it has none).
    fn first_probe_done(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let before = self
            .first_round
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
        if before == Ok(1) {
            // The first probe of every device, the announcement and the twin sync peak far
            // above what stays in use.
            crate::release_freed_memory();
        }
    }

    /// The device set changed (a live reload): `ids` is the new one. Devices that stay keep
    /// their state and their watchers, except those in `renew` (replaced by a new
    /// configuration): their watchers see the channel close, as for a removed device, which
    /// ends the tasks of the old device. New ones start online; removed ones are forgotten.
    /// The parts are laid out again under a new generation, so the next announcement replaces
    /// every part.
    pub fn set_devices(
        &self,
        ids: impl Iterator<Item = DeviceId>,
        renew: &[DeviceId],
        now_ms: u64,
    ) {
        let ids: BTreeSet<DeviceId> = ids.collect();
        {
            let mut t = self.lock();
            t.retain(|id, _| ids.contains(id));
            for id in &ids {
                t.entry(id.clone()).or_insert_with(|| online_since(now_ms));
            }
        }
        let ids: Vec<DeviceId> = ids.into_iter().collect();
        let mut layout = self.layout();
        let mut per_device = std::mem::take(&mut layout.per_device);
        for id in renew {
            per_device.remove(id);
        }
        *layout = Layout::new(&ids, per_device, self.max_publish);
        drop(layout);
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.changes.send_modify(|g| *g += 1);
    }

    fn layout(&self) -> std::sync::MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `id` is online (unknown ids are not).
    pub fn is_online(&self, id: &DeviceId) -> bool {
        self.lock().get(id).is_some_and(|s| s.online)
    }

    /// Why `id` is offline, if it is.
    pub fn reason(&self, id: &DeviceId) -> Option<String> {
        self.lock().get(id).and_then(|s| s.reason.clone())
    }

    /// Records a state; returns whether it changed (and then signals the change).
    pub fn set(&self, id: &DeviceId, online: bool, reason: Option<String>, now_ms: u64) -> bool {
        let reason = reason.map(|r| cut(r, MAX_REASON));
        let mut t = self.lock();
        let Some(s) = t.get_mut(id) else { return false };
        if s.online == online {
            if !online {
                s.reason = reason;
            }
            return false;
        }
        s.online = online;
        s.since_ms = now_ms;
        s.reason = if online { None } else { reason };
        drop(t);
        let part = {
            let layout = self.layout();
            if let Some(tx) = layout.per_device.get(id) {
                tx.send_replace(online);
            }
            layout.part_of.get(id).copied()
        };
        if online {
            tracing::info!(device = %id, "device online");
        } else {
            tracing::warn!(
                device = %id,
                reason = self.reason(id).as_deref().unwrap_or(""),
                "device offline"
            );
        }
        if let Some(part) = part {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(part);
        }
        self.changes.send_modify(|g| *g += 1);
        true
    }

    /// How many presence parts there are.
    pub fn parts(&self) -> u32 {
        self.layout().parts.len() as u32
    }

    /// One presence part, as published (empty if the layout changed under the caller).
    pub fn part(&self, part: u32) -> DevicePresence {
        let layout = self.layout();
        let t = self.lock();
        let devices = layout
            .parts
            .get(part as usize)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| t.get(id).map(|s| (id.clone(), s.clone())))
                    .collect()
            })
            .unwrap_or_default();
        presence_part(layout.generation, part, layout.parts.len() as u32, devices)
    }

    /// The parts changed since the last call (all of them are published at connect anyway).
    pub fn take_dirty(&self) -> Vec<u32> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }

    /// Feeds a call outcome in: success proves the device is up, a connection failure that it
    /// is down; a timeout or an error answer says nothing about presence.
    pub fn observe_call<T>(&self, id: &DeviceId, result: &Result<T, CallError>, now_ms: u64) {
        match result {
            // The device answered, even if to say no or busy: it is there.
            Ok(_)
            | Err(CallError::Status { .. })
            | Err(CallError::Coded { .. })
            | Err(CallError::Busy {
                status: Some(_), ..
            }) => {
                self.set(id, true, None, now_ms);
            }
            Err(CallError::Unreachable(why)) => {
                self.set(id, false, Some(why.clone()), now_ms);
            }
            Err(_) => {}
        }
    }

    /// Every device's presence (one part holding them all; for local views).
    pub fn snapshot(&self) -> DevicePresence {
        let generation = self.layout().generation;
        presence_part(generation, 0, 1, self.lock().clone())
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A receiver of one device's online state (a closed channel for unknown ids).
    pub fn watch(&self, id: &DeviceId) -> watch::Receiver<bool> {
        match self.layout().per_device.get(id) {
            Some(tx) => tx.subscribe(),
            None => watch::channel(false).1,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<DeviceId, DeviceStatus>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn online_since(now_ms: u64) -> DeviceStatus {
    DeviceStatus {
        online: true,
        since_ms: now_ms,
        reason: None,
    }
}

/// `text` cut to at most `max` characters.
fn cut(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    text.chars().take(max).collect()
}

/// Probes `device` on its interval until `shutdown`.
/// Probes in flight at most, gateway-wide: a thousand devices probed at once would hold a
/// thousand connections' buffers at the same moment on a small box.
static PROBES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);

/// It also ends when the device leaves the configuration (its presence channel closes).
pub async fn probe_loop(device: Arc<Device>, presence: Arc<Presence>, shutdown: CancellationToken) {
    let mut here = presence.watch(&device.id);
    let health = &device.config.health;
    let modbus_probe = matches!(&device.driver, Driver::Modbus(d) if d.has_probe());
    let Some(path) = health.path.clone().or(modbus_probe.then(String::new)) else {
        presence.first_probe_done();
        if let Driver::Http(d) = &device.driver {
            Box::pin(connect_probe_loop(&device, d, &presence, shutdown)).await;
        }
        return;
    };
    let interval = Duration::from_millis(health.interval_ms);
    let timeout = Duration::from_millis(health.timeout_ms);
    let mut failures = 0u32;
    let mut probed = false;
    loop {
        let outcome = match &device.driver {
            Driver::Http(d) => {
                let Ok(_permit) = PROBES.acquire().await else {
                    return;
                };
                // Boxed: the probe's state lives only while it runs.
                Box::pin(d.probe(&path, timeout)).await
            }
            Driver::Modbus(d) if d.has_probe() => Box::pin(d.probe(timeout)).await,
            // No probe: call outcomes and the port task decide (validation refuses a path).
            Driver::Serial(_) | Driver::Modbus(_) => {
                presence.first_probe_done();
                return;
            }
        };
        let now = crate::clock::now_ms();
        let first = !probed;
        probed = true;
        match outcome {
            Ok(()) => {
                failures = 0;
                presence.set(&device.id, true, None, now);
            }
            Err(why) => {
                failures += 1;
                tracing::debug!(device = %device.id, failures, %why, "health probe failed");
                if failures >= health.failures_before_offline {
                    presence.set(&device.id, false, Some(why), now);
                }
            }
        }
        if first {
            presence.first_probe_done();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = retired(&mut here) => return,
        }
    }
}

/// Resolves once `presence`'s channel closes: the device left the configuration.
pub async fn retired(presence: &mut watch::Receiver<bool>) {
    while presence.changed().await.is_ok() {}
}

/// Without a health path, call outcomes take an HTTP device offline, and this brings it back:
/// while it is offline, a TCP connect to its base URL's host and port, with backoff from 1 s
/// up to the probe interval; the first connect that succeeds marks it online.
async fn connect_probe_loop(
    device: &Device,
    driver: &super::http::HttpDriver,
    presence: &Presence,
    shutdown: CancellationToken,
) {
    let mut online = presence.watch(&device.id);
    let interval = device.config.health.interval_ms.max(1000);
    let timeout = Duration::from_millis(device.config.health.timeout_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = online.wait_for(|up| !*up) => { if r.is_err() { return } }
        }
        let mut backoff = crate::backoff::Backoff::new(1000, interval);
        while !*online.borrow() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.delay()) => {}
                _ = online.changed() => continue,
            }
            let ok = {
                let Ok(_permit) = PROBES.acquire().await else {
                    return;
                };
                driver.connect_probe(timeout).await
            };
            match ok {
                Ok(()) => {
                    presence.set(&device.id, true, None, crate::clock::now_ms());
                }
                Err(why) => {
                    tracing::debug!(device = %device.id, %why, "connect probe failed");
                    presence.set(&device.id, false, Some(why), crate::clock::now_ms());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn set_reports_changes_only() {
        let p = Presence::new([id("a")].into_iter(), 1);
        assert!(p.is_online(&id("a")));
        assert!(!p.set(&id("a"), true, None, 2));
        assert!(p.set(&id("a"), false, Some("refused".into()), 3));
        assert_eq!(p.reason(&id("a")).as_deref(), Some("refused"));
        assert_eq!(p.snapshot().devices[&id("a")].since_ms, 3);
        assert!(!p.is_online(&id("zzz")));
    }

    #[test]
    fn a_change_marks_only_its_own_part() {
        let ids: Vec<DeviceId> = (0..2000).map(|i| id(&format!("d{i:04}"))).collect();
        let p = Presence::with_limit(ids.clone().into_iter(), 1, 64 * 1024);
        assert!(p.parts() > 1, "{}", p.parts());
        assert!(p.take_dirty().is_empty());
        p.set(&ids[1999], false, Some("x".repeat(5000)), 2);
        let dirty = p.take_dirty();
        assert_eq!(dirty, vec![p.parts() - 1]);
        let part = p.part(dirty[0]);
        assert_eq!(
            part.devices[&ids[1999]].reason.as_ref().unwrap().len(),
            MAX_REASON
        );
        assert!(serde_json::to_vec(&part).unwrap().len() <= 64 * 1024);
        assert!(p.take_dirty().is_empty());
    }

    #[test]
    fn a_device_watch_sees_only_its_own_device() {
        let p = Presence::new([id("a"), id("b")].into_iter(), 1);
        let a = p.watch(&id("a"));
        let b = p.watch(&id("b"));
        p.set(&id("a"), false, Some("refused".into()), 2);
        assert!(a.has_changed().unwrap());
        assert!(!*a.borrow());
        assert!(!b.has_changed().unwrap(), "b's workers are not woken by a");
    }

    #[test]
    fn call_outcomes_feed_presence() {
        let p = Presence::new([id("a")].into_iter(), 1);
        p.observe_call::<()>(&id("a"), &Err(CallError::Timeout(5)), 2);
        assert!(
            p.is_online(&id("a")),
            "a timeout says nothing about presence"
        );
        p.observe_call::<()>(&id("a"), &Err(CallError::Unreachable("refused".into())), 3);
        assert!(!p.is_online(&id("a")));
        p.observe_call(&id("a"), &Ok(()), 4);
        assert!(p.is_online(&id("a")));
    }
}
