//! The sender task: publishes waiting messages, in order per device, to online gateways within
//! each gateway's window. It sleeps until woken (a message committed, a gateway's new birth, a
//! feedback freeing window space, a catalog change) and then sends until nothing more can go.

use super::Outbox;
use crate::session::Publisher;
use gatewayd_protocol::{Down, Topics};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Most messages taken from the queue per lock.
const BATCH: usize = 256;

/// Runs until `stop` is cancelled.
pub async fn run(outbox: Arc<Outbox>, publisher: Publisher, stop: CancellationToken) {
    loop {
        let sends = outbox.take_sends(crate::now_ms(), BATCH);
        if sends.is_empty() {
            // `Notify` keeps a permit, so a wake between the check above and this await is not
            // lost.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.wake_sender.notified() => continue,
            }
        }
        for send in sends {
            let topic = Topics::down(&send.gateway, Down::Message);
            // Waits only while the MQTT client's request channel is full.
            let published = tokio::select! {
                _ = stop.cancelled() => return,
                r = publisher.publish(topic, send.body.as_ref().clone()) => r,
            };
            match published {
                Ok(()) => {
                    tracing::trace!(gateway = %send.gateway, message = %send.id, "message published")
                }
                // It stays in flight and is sent again at the gateway's next birth.
                Err(e) => tracing::warn!(gateway = %send.gateway, message = %send.id, error = %e,
                    "cannot publish message"),
            }
        }
    }
}
