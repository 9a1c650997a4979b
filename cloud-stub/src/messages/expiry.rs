//! The expiry task: expires messages whose TTL passed while they waited in the cloud. It sleeps
//! until the nearest deadline (at most [`MAX_SLEEP`]), and is woken early when a message with an
//! earlier deadline is queued.

use super::Outbox;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest sleep between two checks.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled.
pub async fn run(outbox: Arc<Outbox>, stop: CancellationToken) {
    loop {
        let now = crate::now_ms();
        let sleep = match outbox.expire_due(now) {
            Some(at) => Duration::from_millis(at.saturating_sub(now)).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = outbox.wake_expiry.notified() => {}
        }
    }
}
