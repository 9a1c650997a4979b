//! What wakes a device's twin or message worker: its own notification (new work), a change of
//! the device's presence, or a timer; shutdown, or the presence table going away, ends it.

use gatewayd_protocol::DeviceId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// The worker is to stop.
#[derive(Debug)]
pub struct Ended;

/// What a wait with a timer ended on.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke {
    /// A notification or a presence change.
    Event,
    /// The timer.
    Timer,
}

/// One worker's sources of wake-ups.
pub struct Wakeups {
    pub stop: CancellationToken,
    wake: Arc<Notify>,
    presence: watch::Receiver<bool>,
}

impl Wakeups {
    pub fn new(
        stop: CancellationToken,
        wake: Arc<Notify>,
        presence: watch::Receiver<bool>,
    ) -> Self {
        Wakeups {
            stop,
            wake,
            presence,
        }
    }

    /// Waits for a notification or a presence change. No timer: this is the wait of an idle
    /// worker, kept small.
    pub async fn event(&mut self) -> Result<(), Ended> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(Ended),
            _ = self.wake.notified() => Ok(()),
            r = self.presence.changed() => r.map_err(|_| Ended),
        }
    }

    /// Waits for a notification, a presence change, or `after` to pass.
    pub async fn event_or(&mut self, after: Duration) -> Result<Woke, Ended> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(Ended),
            _ = self.wake.notified() => Ok(Woke::Event),
            r = self.presence.changed() => r.map(|_| Woke::Event).map_err(|_| Ended),
            _ = tokio::time::sleep(after) => Ok(Woke::Timer),
        }
    }
}

/// One notification per configured device; devices join and leave with a live reload.
#[derive(Debug, Default)]
pub struct Wakers(std::sync::RwLock<std::collections::HashMap<DeviceId, Arc<Notify>>>);

impl Wakers {
    /// One per device of `ids`.
    pub fn new(ids: impl Iterator<Item = DeviceId>) -> Wakers {
        Wakers(std::sync::RwLock::new(
            ids.map(|id| (id, Arc::new(Notify::new()))).collect(),
        ))
    }

    /// The notification of `id`, if it is configured.
    pub fn get(&self, id: &DeviceId) -> Option<Arc<Notify>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Wakes the worker of `id`.
    pub fn notify(&self, id: &DeviceId) {
        if let Some(w) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            w.notify_one();
        }
    }

    /// Every configured device.
    pub fn ids(&self) -> Vec<DeviceId> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// A device joined (a notification it already has is kept).
    pub fn add(&self, id: DeviceId) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(|| Arc::new(Notify::new()));
    }

    /// A device left.
    pub fn remove(&self, id: &DeviceId) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}
