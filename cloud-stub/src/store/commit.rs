//! Writes an MQTT acknowledgement waits for: the stub acknowledges a gateway's feedback,
//! reported patch or twin sync only once what it changed is committed, so a crash before the
//! commit leaves the publish unacknowledged and the broker sends it again (the stub's session
//! is persistent).
//!
//! The first attempt is submitted at once, in the order the publishes arrived (so writes to
//! one message stay in order). A failed commit (the store's fault: I/O, full disk, a locked
//! database) is retried by whoever awaits [`Commit::done`], with backoff, for as long as it
//! takes: acknowledgements leave in order, so everything behind it waits too, and flows again
//! by itself once the store works. A job that fails on its own (it would fail the same way
//! again) is logged and acknowledged.

use super::{StoreError, StoreHandle};
use rusqlite::Connection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// First delay before a failed commit is tried again; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);

type Attempt = Box<dyn FnMut() -> oneshot::Receiver<Result<(), StoreError>> + Send>;

/// A submitted write and how to submit it again.
pub struct Commit {
    what: &'static str,
    first: oneshot::Receiver<Result<(), StoreError>>,
    again: Attempt,
}

impl Commit {
    /// Resolves once the write is committed (true), or when its job failed on its own (true,
    /// logged: the publish is acknowledged without it), retrying a failed commit meanwhile.
    /// False when the store has stopped: the publish must not be acknowledged.
    pub async fn done(mut self) -> bool {
        let mut result = self.first.await.unwrap_or(Err(StoreError::Gone));
        let mut delay = FIRST_RETRY;
        loop {
            match result {
                Ok(()) => return true,
                Err(StoreError::Gone) => return false,
                Err(e) if e.is_store_fault() => {
                    tracing::warn!(what = self.what, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "store commit failed; the publish stays unacknowledged until it succeeds");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_RETRY);
                    result = (self.again)().await.unwrap_or(Err(StoreError::Gone));
                }
                Err(e) => {
                    tracing::error!(what = self.what, error = %e,
                        "store job failed; the publish is acknowledged without it");
                    return true;
                }
            }
        }
    }
}

impl StoreHandle {
    /// Submits `job` now and, after each successful commit, runs `then` with its value (on the
    /// store thread, in commit order). The returned [`Commit`] resolves when it is safe to
    /// acknowledge the publish that caused it.
    pub fn write_for_ack<T, F, C>(&self, what: &'static str, job: F, then: C) -> Commit
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + Sync + 'static,
        C: Fn(T) + Send + Sync + 'static,
    {
        let job = Arc::new(job);
        let then = Arc::new(then);
        let store = self.clone();
        let attempt = move || {
            let (tx, rx) = oneshot::channel();
            let (job, then) = (Arc::clone(&job), Arc::clone(&then));
            store.submit(
                move |conn| job(conn),
                move |r| {
                    let _ = tx.send(r.map(|v| then(v)));
                },
            );
            rx
        };
        let first = attempt();
        Commit {
            what,
            first,
            again: Box::new(attempt),
        }
    }
}

impl StoreError {
    /// Whether the store itself failed (worth retrying), rather than the job.
    pub fn is_store_fault(&self) -> bool {
        matches!(self, StoreError::Sqlite(_) | StoreError::Commit(_))
    }
}
