//! Cloud-to-device messages: the [`Outbox`] ties the in-memory [`queue::Queue`] to the store,
//! and two tasks drive it: [`sender`] publishes waiting messages (never from the MQTT poll
//! task, never from an API handler) and [`expiry`] expires those whose TTL passed in the cloud.
//!
//! Invariants:
//! - the queue lock is never held across an await; store writes are queued (not awaited) while
//!   it is held, so they reach SQLite in the order the queue decided them;
//! - a message is published only after its row is committed, only within its TTL, and only to
//!   a gateway that takes messages (online, its store working);
//! - the operator gets `202` only after the row is committed;
//! - a feedback is acknowledged to the broker only once its write is committed (the returned
//!   [`Commit`]);
//! - no message stays open past its TTL plus a grace (see [`queue`]).

pub mod expiry;
pub mod queue;
pub mod sender;

use crate::events::Events;
use crate::registry::{self, SharedRegistry};
use crate::store::{self, Commit, MessageRecord, MessageWrite, StoreError, StoreHandle};
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{C2dMessage, DeviceId, Feedback, GatewayId, MessageId, PROTOCOL_VERSION};
use queue::{Publish, Queue, QueueFull};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

/// What the operator gets back for an accepted message.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub id: MessageId,
    pub enqueued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The device has as many open messages as allowed.
    #[error("device {device} has {waiting} messages waiting (the limit)")]
    QueueFull { device: DeviceId, waiting: usize },
    /// The message could not be encoded or stored.
    #[error("cannot store the message: {0}")]
    Store(#[from] StoreError),
}

/// The bounds an [`Outbox`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open (queued or delivered) messages per device.
    pub max_queue: usize,
    /// Messages published to one gateway and not yet acknowledged.
    pub window: usize,
    /// How long after its TTL a delivered message waits for its final feedback.
    pub verdict_grace_ms: u64,
}

/// The messages side of the cloud. Shared by the API, the uplink and the two tasks.
pub struct Outbox {
    queue: Mutex<Queue>,
    store: StoreHandle,
    registry: SharedRegistry,
    wake_sender: Notify,
    wake_expiry: Notify,
    /// The deadline the expiry task sleeps until (`u64::MAX`: none), so an enqueue only wakes
    /// it for an earlier one.
    armed_expiry: AtomicU64,
    /// Where status changes are announced.
    events: Events,
}

impl Outbox {
    /// An outbox allowing `max_queue` open messages per device and `window` unacknowledged
    /// ones per gateway, holding the `open` messages loaded from the store. A delivered message
    /// waits `verdict_grace_ms` after its TTL for its final feedback. Status changes go to
    /// `events`.
    pub fn new(
        store: StoreHandle,
        registry: SharedRegistry,
        limits: Limits,
        open: Vec<MessageRecord>,
        events: Events,
    ) -> Arc<Outbox> {
        let mut queue =
            Queue::new(limits.max_queue, limits.window).with_verdict_grace(limits.verdict_grace_ms);
        for record in &open {
            match encode(
                &record.id,
                &record.device,
                &record.payload,
                record.expires_at_ms,
            ) {
                Ok(body) => queue.restore(record, body),
                Err(e) => {
                    tracing::error!(message = %record.id, error = %e, "cannot restore message")
                }
            }
        }
        Arc::new(Outbox {
            queue: Mutex::new(queue),
            store,
            registry,
            wake_sender: Notify::new(),
            wake_expiry: Notify::new(),
            armed_expiry: AtomicU64::new(0),
            events,
        })
    }

    /// Queues a message for `device` (already checked to be known), and returns once it is
    /// committed.
    pub async fn enqueue(
        self: &Arc<Self>,
        device: DeviceId,
        payload: Value,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Accepted, EnqueueError> {
        let id = new_message_id();
        let expires_at_ms = now_ms + ttl_ms;
        let body = encode(&id, &device, &payload, expires_at_ms)?;
        let record = MessageRecord {
            id: id.clone(),
            device: device.clone(),
            payload,
            status: MessageStatus::Queued,
            reason: None,
            device_status: None,
            gateway: None,
            enqueued_at_ms: now_ms,
            expires_at_ms,
            sent_at_ms: None,
            delivered_at_ms: None,
            finished_at_ms: None,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.lock();
            q.enqueue(id.clone(), device.clone(), body, expires_at_ms)
                .map_err(|QueueFull { waiting }| EnqueueError::QueueFull {
                    device: device.clone(),
                    waiting,
                })?;
            // Submitted under the lock: the row is written before anything the queue decides
            // about it later.
            let outbox = Arc::clone(self);
            let committed_id = id.clone();
            let device = device.clone();
            self.store.submit(
                move |conn| record.insert(conn),
                move |result| {
                    let sendable = {
                        let mut q = outbox.lock();
                        match &result {
                            Ok(()) => q.committed(&committed_id),
                            Err(_) => {
                                q.abandon(&committed_id);
                                false
                            }
                        }
                    };
                    if result.is_ok() {
                        outbox
                            .events
                            .message(&device, &committed_id, MessageStatus::Queued);
                    }
                    if sendable {
                        outbox.wake_sender.notify_one();
                    }
                    let _ = tx.send(result);
                },
            );
        }
        if expires_at_ms < self.armed_expiry.load(Ordering::Relaxed) {
            self.wake_expiry.notify_one();
        }
        rx.await.unwrap_or(Err(StoreError::Gone))?;
        Ok(Accepted {
            id,
            enqueued_at_ms: now_ms,
            expires_at_ms,
        })
    }

    /// Applies feedback from gateway `from`; what does not apply is logged at debug level.
    /// Returns the write its acknowledgement must wait for, if it changed anything.
    pub fn on_feedback(&self, from: &GatewayId, fb: &Feedback, now_ms: u64) -> Option<Commit> {
        let owner = registry::lock(&self.registry)
            .owner(&fb.device)
            .map(|(gw, _)| gw.clone());
        let mut q = self.lock();
        match q.feedback(from, owner.as_ref(), fb, now_ms) {
            Ok(applied) => {
                // Submitted under the lock, like every message write: in decision order.
                let writes = [applied.write];
                let events = self.events.clone();
                let announce = writes.clone();
                let commit = self.store.write_for_ack(
                    "message feedback",
                    move |conn| store::apply_message_writes(conn, &writes),
                    move |()| events.message_writes(&announce),
                );
                drop(q);
                tracing::debug!(gateway = %from, message = %fb.id, status = applied.status.as_str(),
                    "message feedback");
                if applied.freed_window {
                    self.wake_sender.notify_one();
                }
                Some(commit)
            }
            Err(why) => {
                drop(q);
                tracing::debug!(gateway = %from, message = %fb.id, device = %fb.device,
                    outcome = ?fb.outcome, why = ?why, "message feedback ignored");
                None
            }
        }
    }

    /// A new birth of `gateway` (or its store works again): resend what it has not
    /// acknowledged.
    pub fn gateway_online(&self, gateway: &GatewayId) {
        let again = self.lock().gateway_online(gateway);
        if again > 0 {
            tracing::info!(gateway = %gateway, messages = again, "resending unacknowledged messages");
        }
        self.wake_sender.notify_one();
    }

    /// `gateway` lost its store: every message delivered there and not finished is sent again
    /// (it takes them as new).
    pub fn store_replaced(&self, gateway: &GatewayId) {
        let again = self.lock().probe_delivered(Some(gateway));
        tracing::info!(gateway = %gateway, messages = again,
            "resending delivered messages to a replaced store");
        self.wake_sender.notify_one();
    }

    /// Sends every delivered message again to its gateway once that gateway takes messages:
    /// its final feedback may have been lost while the cloud was down or disconnected.
    pub fn probe_all(&self) {
        let again = self.lock().probe_delivered(None);
        if again > 0 {
            tracing::info!(
                messages = again,
                "asking gateways again for the outcome of delivered messages"
            );
        }
        self.wake_sender.notify_one();
    }

    /// Something changed that may let the sender send (a catalog moved devices).
    pub fn wake(&self) {
        self.wake_sender.notify_one();
    }

    /// Purges every open message of `device`; returns how many, once committed.
    pub async fn purge(&self, device: &DeviceId, now_ms: u64) -> Result<usize, StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.lock();
            let writes = q.purge(device, now_ms);
            let n = writes.len();
            self.events.message_writes(&writes);
            self.store.submit(
                move |conn| store::apply_message_writes(conn, &writes),
                move |r| {
                    let _ = tx.send(r.map(|()| n));
                },
            );
        }
        rx.await.unwrap_or(Err(StoreError::Gone))
    }

    /// One message of `device`, from the store.
    pub async fn get(
        &self,
        device: DeviceId,
        id: MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        self.store
            .call(move |conn| MessageRecord::get(conn, &device, &id))
            .await
    }

    /// The device's messages in enqueue order, from the store.
    pub async fn list(
        &self,
        device: DeviceId,
        status: Option<MessageStatus>,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        self.store
            .call(move |conn| MessageRecord::list(conn, &device, status))
            .await
    }

    /// Takes the next messages to publish, delivered ones sent again first (see
    /// [`Queue::take_probes`], [`Queue::take_sends`]), and queues their writes. Only gateways
    /// that take messages (online, store working) get any.
    fn take_sends(&self, now_ms: u64, max: usize) -> Vec<Publish> {
        let (ready, probing) = {
            let q = self.lock();
            (q.ready_devices(), q.probe_gateways())
        };
        if ready.is_empty() && probing.is_empty() {
            return Vec::new();
        }
        let (routes, accepting): (HashMap<DeviceId, GatewayId>, Vec<GatewayId>) = {
            let reg = registry::lock(&self.registry);
            let routes = ready
                .into_iter()
                .filter_map(|d| reg.accepting_owner(&d).cloned().map(|gw| (d, gw)))
                .collect();
            let accepting = probing
                .into_iter()
                .filter(|gw| reg.gateway_accepting(gw))
                .collect();
            (routes, accepting)
        };
        if routes.is_empty() && accepting.is_empty() {
            return Vec::new();
        }
        let mut q = self.lock();
        let (mut sends, mut writes) = q.take_probes(&accepting, now_ms, max);
        if sends.len() < max && !routes.is_empty() {
            let (more, more_writes) = q.take_sends(&routes, now_ms, max - sends.len());
            sends.extend(more);
            writes.extend(more_writes);
        }
        self.events.message_writes(&writes);
        self.store.write_messages(writes);
        sends
    }

    /// Acts on what is due (expiry, a second send, `may_have_run`) and returns the next
    /// deadline.
    fn expire_due(&self, now_ms: u64) -> Option<u64> {
        let mut q = self.lock();
        let done = q.expire_due(now_ms);
        let next = q.next_deadline();
        let ended = count_statuses(&done.writes);
        self.events.message_writes(&done.writes);
        self.store.write_messages(done.writes);
        drop(q);
        if !ended.is_empty() {
            tracing::info!(ended = ?ended, "messages ended by the cloud");
        }
        if done.probes > 0 {
            tracing::info!(
                messages = done.probes,
                "delivered messages past their ttl sent again for their outcome"
            );
            self.wake_sender.notify_one();
        }
        self.armed_expiry
            .store(next.unwrap_or(u64::MAX), Ordering::Relaxed);
        next
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many writes end in each status, for the log.
fn count_statuses(writes: &[MessageWrite]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for w in writes {
        if let MessageWrite::Status { status, .. } = w {
            *counts.entry(status.as_str()).or_default() += 1;
        }
    }
    counts
}

/// The wire form of a message, encoded once and published as is (again on resend).
fn encode(
    id: &MessageId,
    device: &DeviceId,
    payload: &Value,
    expires_at_ms: u64,
) -> Result<Arc<Vec<u8>>, StoreError> {
    let message = C2dMessage {
        v: PROTOCOL_VERSION,
        id: id.clone(),
        device: device.clone(),
        payload: payload.clone(),
        expires_at_ms,
    };
    serde_json::to_vec(&message)
        .map(Arc::new)
        .map_err(|source| StoreError::Encode {
            what: format!("message {id}"),
            source,
        })
}

/// 32 random hex digits.
pub fn new_message_id() -> MessageId {
    MessageId::new(format!("{:032x}", rand::random::<u128>())).expect("hex digits are a valid id")
}
