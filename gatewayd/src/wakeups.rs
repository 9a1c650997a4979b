//! What wakes a device's twin or message worker: its own notification (new work), a change of
//! the device's presence, or a timer; shutdown, or the presence table going away, ends it.

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
