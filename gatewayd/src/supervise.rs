//! Supervision of the long-lived tasks. A critical task (MQTT link, dispatcher, acker, outbox
//! sender, store health) ends only when the daemon stops; if one ends earlier or panics, that
//! is fatal: readiness names it, the watchdog stops pinging, and `run` returns an error so the
//! process exits non-zero and systemd restarts it, instead of running on with a dead uplink.

use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Watches critical tasks; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    /// Cancelled when the daemon stops: every end after it is planned.
    stopping: CancellationToken,
    /// Cancelled at the first unplanned end.
    failed: CancellationToken,
    dead: Mutex<Vec<&'static str>>,
}

impl Supervisor {
    /// A supervisor for which every task end after `stopping` is planned.
    pub fn new(stopping: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                stopping,
                failed: CancellationToken::new(),
                dead: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Wraps `task` (spawned on its own, so a panic is seen too) as the critical task `name`.
    pub fn critical<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + Send
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let inner = self.inner.clone();
        async move {
            let outcome = tokio::spawn(task).await;
            if inner.stopping.is_cancelled() {
                return;
            }
            match outcome {
                Ok(()) => tracing::error!(task = name, "critical task ended unexpectedly"),
                Err(e) => tracing::error!(task = name, error = %e, "critical task failed"),
            }
            inner
                .dead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name);
            inner.failed.cancel();
        }
    }

    /// Critical tasks that ended unexpectedly.
    pub fn dead(&self) -> Vec<&'static str> {
        self.inner
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves at the first unplanned end of a critical task.
    pub async fn failed(&self) {
        self.inner.failed.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unplanned_end_is_fatal_and_a_planned_one_is_not() {
        let stopping = CancellationToken::new();
        let s = Supervisor::new(stopping.clone());
        s.critical("quiet", async {}).await;
        assert_eq!(s.dead(), vec!["quiet"]);
        tokio::time::timeout(std::time::Duration::from_secs(1), s.failed())
            .await
            .expect("failure signalled");

        let stopping = CancellationToken::new();
        let s = Supervisor::new(stopping.clone());
        stopping.cancel();
        s.critical("planned", async {}).await;
        assert!(s.dead().is_empty());
    }

    #[tokio::test]
    async fn a_panic_is_fatal() {
        let s = Supervisor::new(CancellationToken::new());
        s.critical("boom", async { panic!("boom") }).await;
        assert_eq!(s.dead(), vec!["boom"]);
    }
}
