//! Cloud-to-device messages, gateway side. A message is written to the SQLite inbox and
//! committed before its MQTT acknowledgement, together with its `received` feedback in the
//! outbox; a redelivered id is recognised and acknowledged without running again. One worker
//! per device executes its messages in FIFO order.
//!
//! At most once: a message is marked `running` (committed) before its device call and final
//! after it. A `running` message found at start-up may have reached the device before a crash,
//! so it ends `may_have_run` and is never called again. Only a call that certainly did not make
//! the device act is retried, with backoff, until the TTL: nothing was written (connection
//! refused, DNS failure, connect timeout, port closed), or the device answered "busy"
//! (honouring its `Retry-After`). Once the request was written, the outcome is final:
//! `completed`, `rejected` (4xx, a device error code), `failed` (the device answered a failure),
//! or `may_have_run` (the answer was lost, garbled, too large or late). A message is started
//! only while `min_remaining_ms` of its TTL is left; one whose TTL passed is `expired` and never
//! executed late.
//!
//! A store write that fails (full disk) never makes a worker spin: it pauses with backoff and
//! resumes when the store works again.

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::MessagesConfig;
use crate::device::{answer_text, CallError, Device, Devices};
use crate::metrics::Metrics;
use crate::outbox::{self, Wake};
use crate::store::{pause_after_failure, Store, StoreError};
use crate::wakeups::{Ended, Wakeups};
use gatewayd_protocol::limits::MAX_MESSAGE_PAYLOAD;
use gatewayd_protocol::message::FeedbackOutcome;
use gatewayd_protocol::{validate_params, C2dMessage, DeviceId, Feedback, PROTOCOL_VERSION};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

/// Finished messages are kept this long to recognise redeliveries (longer than the longest TTL).
const KEEP_FINISHED_MS: u64 = 3 * 24 * 3600 * 1000;

/// What became of a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// New, queued for its device.
    Queued,
    /// New, but ended at once (rejected, expired, or the inbox was full).
    Finished(FeedbackOutcome),
    /// Seen before: not stored or executed again.
    Duplicate,
}

/// Shared inbox state.
pub struct Inbox {
    store: Store,
    config: MessagesConfig,
    devices: Arc<Devices>,
    pub(crate) wakers: crate::wakeups::Wakers,
    outbox: Wake,
    metrics: Arc<Metrics>,
    /// Messages `pending` or `running`, for the inbox bound (counted once at start, then kept
    /// up to date, so receiving a message never counts rows).
    open: Arc<AtomicUsize>,
}

impl Inbox {
    /// One worker wake-up per configured device.
    pub fn new(
        store: Store,
        config: MessagesConfig,
        devices: Arc<Devices>,
        outbox: Wake,
        metrics: Arc<Metrics>,
    ) -> Inbox {
        let wakers = crate::wakeups::Wakers::new(devices.all().into_iter().map(|d| d.id.clone()));
        Inbox {
            store,
            config,
            devices,
            wakers,
            outbox,
            metrics,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Stores a received message (in receipt order); resolves after the commit, when the MQTT
    /// acknowledgement may be sent.
    pub fn receive(
        &self,
        msg: C2dMessage,
        now: u64,
    ) -> oneshot::Receiver<Result<Receipt, StoreError>> {
        let verdict = self.check(&msg, now);
        let max_inbox = self.config.max_inbox;
        let open = self.open.clone();
        self.store.submit(move |c| {
            let seen: Option<(String, String, Option<String>, Option<i64>)> = c
                .prepare_cached("SELECT state, device, reason, device_status FROM inbox WHERE id = ?1")?
                .query_row([msg.id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some((state, device, reason, status)) = seen {
                // The cloud has not seen our feedback (or it would not send again): repeat the
                // latest one, final outcome included.
                let outcome = state_outcome(&state);
                push_feedback(c, msg.id.as_str(), &device, outcome, reason, status, now)?;
                return Ok(Receipt::Duplicate);
            }
            let verdict = match verdict {
                None if open.load(Ordering::SeqCst) >= max_inbox => Some((
                    FeedbackOutcome::Failed,
                    format!("gateway inbox full ({max_inbox} messages waiting)"),
                )),
                other => other,
            };
            let state = match &verdict {
                None => "pending",
                Some((outcome, _)) => outcome_state(*outcome),
            };
            c.prepare_cached(
                "INSERT INTO inbox (id, device, payload, expires_at_ms, received_at_ms, state, seq, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT IFNULL(MAX(seq), 0) + 1 FROM inbox), ?7)")?
                 .execute(
                params![
                    msg.id.as_str(),
                    msg.device.as_str(),
                    msg.payload.to_string(),
                    msg.expires_at_ms as i64,
                    now as i64,
                    state,
                    verdict.as_ref().map(|(_, r)| r.clone())
                ],
            )?;
            match verdict {
                None => {
                    open.fetch_add(1, Ordering::SeqCst);
                    push_feedback(
                        c,
                        msg.id.as_str(),
                        msg.device.as_str(),
                        FeedbackOutcome::Received,
                        None,
                        None,
                        now,
                    )?;
                    Ok(Receipt::Queued)
                }
                Some((outcome, reason)) => {
                    push_feedback(
                        c,
                        msg.id.as_str(),
                        msg.device.as_str(),
                        outcome,
                        Some(reason),
                        None,
                        now,
                    )?;
                    Ok(Receipt::Finished(outcome))
                }
            }
        })
    }

    /// A message that could not be decoded but whose id and device could be read: stored as
    /// `rejected` with its feedback, so the cloud hears why at once (and a redelivery is
    /// recognised). Resolves after the commit.
    pub fn refuse(
        &self,
        id: gatewayd_protocol::MessageId,
        device: DeviceId,
        reason: String,
        now: u64,
    ) -> oneshot::Receiver<Result<Receipt, StoreError>> {
        self.store.submit(move |c| {
            let seen: Option<String> = c
                .prepare_cached("SELECT state FROM inbox WHERE id = ?1")?
                .query_row([id.as_str()], |r| r.get(0))
                .optional()?;
            if seen.is_some() {
                return Ok(Receipt::Duplicate);
            }
            c.execute(
                "INSERT INTO inbox (id, device, payload, expires_at_ms, received_at_ms, state, seq, reason)
                 VALUES (?1, ?2, 'null', 0, ?3, 'rejected', (SELECT IFNULL(MAX(seq), 0) + 1 FROM inbox), ?4)",
                params![id.as_str(), device.as_str(), now as i64, reason],
            )?;
            push_feedback(c, id.as_str(), device.as_str(), FeedbackOutcome::Rejected, Some(reason), None, now)?;
            Ok(Receipt::Finished(FeedbackOutcome::Rejected))
        })
    }

    /// Checks that need no database: unknown device, expired, unmapped command.
    fn check(&self, msg: &C2dMessage, now: u64) -> Option<(FeedbackOutcome, String)> {
        let Some(device) = self.devices.get(&msg.device) else {
            return Some((
                FeedbackOutcome::Rejected,
                format!("this gateway has no device '{}'", msg.device),
            ));
        };
        if now >= msg.expires_at_ms {
            return Some((
                FeedbackOutcome::Expired,
                "ttl passed before the gateway received it".into(),
            ));
        }
        let size = serde_json::to_vec(&msg.payload).map_or(usize::MAX, |v| v.len());
        if size > MAX_MESSAGE_PAYLOAD {
            return Some((
                FeedbackOutcome::Rejected,
                format!(
                    "payload_too_large: the payload is {size} bytes, the limit is {MAX_MESSAGE_PAYLOAD}"
                ),
            ));
        }
        match command_of(&msg.payload, &self.config.command_field) {
            Err(why) => Some((FeedbackOutcome::Rejected, why)),
            Ok(cmd) => match device.actions.commands.get(cmd) {
                None => Some((
                    FeedbackOutcome::Rejected,
                    format!(
                        "device {} has no mapping for command '{cmd}'; it has: {}",
                        msg.device,
                        device
                            .actions
                            .commands
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                Some(action) => {
                    let args = args_of(&msg.payload, &self.config.command_field);
                    validate_params(&action.params, &Value::Object(args))
                        .err()
                        .map(|e| (FeedbackOutcome::Rejected, format!("command '{cmd}': {e}")))
                }
            },
        }
    }

    /// The devices with a pending message: the ones whose worker has work at start-up.
    pub async fn pending_devices(&self) -> Result<HashSet<String>, StoreError> {
        self.store
            .call(|c| {
                c.prepare("SELECT DISTINCT device FROM inbox WHERE state = 'pending'")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
    }

    /// Wakes the worker of `device`.
    pub fn wake(&self, device: &DeviceId) {
        self.wakers.notify(device);
        self.outbox.wake();
    }

    /// A device left the configuration: its pending messages end `failed` with `reason`
    /// (never run). Returns how many.
    pub async fn fail_device(&self, device: &DeviceId, reason: &str) -> Result<usize, StoreError> {
        let now = now_ms();
        let device = device.to_string();
        let reason = reason.to_string();
        let n = self
            .store
            .call(move |c| {
                let pending: Vec<String> = c
                    .prepare("SELECT id FROM inbox WHERE device = ?1 AND state = 'pending'")?
                    .query_map([&device], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for id in &pending {
                    finish(
                        c,
                        id,
                        &device,
                        FeedbackOutcome::Failed,
                        Some(reason.clone()),
                        None,
                        now,
                    )?;
                }
                Ok(pending.len())
            })
            .await?;
        self.open
            .fetch_sub(n.min(self.open.load(Ordering::SeqCst)), Ordering::SeqCst);
        self.metrics.messages(FeedbackOutcome::Failed, n);
        Ok(n)
    }

    /// At start-up: messages caught `running` by a crash end `failed` (they may have reached
    /// the device); finished messages past the redelivery window are forgotten.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let failed = self
            .store
            .call(move |c| {
                let running: Vec<(String, String)> = c
                    .prepare("SELECT id, device FROM inbox WHERE state = 'running'")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                for (id, device) in &running {
                    let reason = "gateway restarted while the device call was in progress: the device may have run it; not retried (at most once)";
                    finish(c, id, device, FeedbackOutcome::MayHaveRun, Some(reason.into()), None, now)?;
                }
                c.execute(
                    "DELETE FROM inbox WHERE state NOT IN ('pending', 'running') AND received_at_ms < ?1",
                    [now.saturating_sub(KEEP_FINISHED_MS) as i64],
                )?;
                let open: i64 = c.query_row(
                    "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'running')",
                    [],
                    |r| r.get(0),
                )?;
                Ok((running.len(), open as usize))
            })
            .await?;
        let (failed, open) = failed;
        self.open.store(open, Ordering::SeqCst);
        self.metrics.messages(FeedbackOutcome::MayHaveRun, failed);
        Ok(failed)
    }
}

fn state_outcome(state: &str) -> FeedbackOutcome {
    match state {
        "completed" => FeedbackOutcome::Completed,
        "rejected" => FeedbackOutcome::Rejected,
        "expired" => FeedbackOutcome::Expired,
        "failed" => FeedbackOutcome::Failed,
        "may_have_run" => FeedbackOutcome::MayHaveRun,
        _ => FeedbackOutcome::Received,
    }
}

fn outcome_state(o: FeedbackOutcome) -> &'static str {
    match o {
        FeedbackOutcome::Received => "pending",
        FeedbackOutcome::Completed => "completed",
        FeedbackOutcome::Rejected => "rejected",
        FeedbackOutcome::Expired => "expired",
        FeedbackOutcome::Failed => "failed",
        FeedbackOutcome::MayHaveRun => "may_have_run",
    }
}

fn command_of<'a>(payload: &'a Value, field: &str) -> Result<&'a str, String> {
    payload
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("payload has no string '{field}' naming the command"))
}

fn args_of(payload: &Value, field: &str) -> Map<String, Value> {
    let mut args = payload.as_object().cloned().unwrap_or_default();
    args.remove(field);
    args
}

fn push_feedback(
    c: &Connection,
    id: &str,
    device: &str,
    outcome: FeedbackOutcome,
    reason: Option<String>,
    device_status: Option<i64>,
    now: u64,
) -> rusqlite::Result<()> {
    let (Ok(id), Ok(device)) = (gatewayd_protocol::MessageId::new(id), DeviceId::new(device))
    else {
        return Ok(());
    };
    let fb = Feedback {
        v: PROTOCOL_VERSION,
        id,
        device,
        outcome,
        reason,
        device_status,
        at_ms: now,
    };
    let body = serde_json::to_value(&fb).expect("feedback serializes");
    outbox::push(c, outbox::Kind::Feedback, fb.id.as_str(), &body).map(|_| ())
}

fn finish(
    c: &Connection,
    id: &str,
    device: &str,
    outcome: FeedbackOutcome,
    reason: Option<String>,
    device_status: Option<i64>,
    now: u64,
) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE inbox SET state = ?2, reason = ?3, device_status = ?4 WHERE id = ?1")?
        .execute(params![id, outcome_state(outcome), reason, device_status])?;
    push_feedback(c, id, device, outcome, reason, device_status, now)
}

struct Next {
    id: String,
    payload: Value,
    expires_at_ms: u64,
}

/// Executes one device's messages in order until `stop`. `idle`: the start-up query
/// ([`Inbox::pending_devices`]) found no pending message for this device, so the worker waits
/// for a wake-up before it reads the inbox.
pub async fn worker(device: Arc<Device>, inbox: Arc<Inbox>, idle: bool, stop: CancellationToken) {
    let Some(wake) = inbox.wakers.get(&device.id) else {
        return;
    };
    let mut wakeups = Wakeups::new(stop, wake, inbox.devices.presence.watch(&device.id));
    let mut idle = idle;
    loop {
        if idle && wakeups.event().await.is_err() {
            return;
        }
        idle = true;
        // Boxed: the state of the work lives only while there is some, so the ten thousand
        // idle workers of a big gateway stay small.
        let work = run_until_empty(&device, &inbox, &mut wakeups);
        if Box::pin(work).await.is_err() {
            return;
        }
    }
}

/// Executes the device's messages until none is pending (`Ok`), or until the worker is to stop.
async fn run_until_empty(
    device: &Arc<Device>,
    inbox: &Arc<Inbox>,
    wakeups: &mut Wakeups,
) -> Result<(), Ended> {
    let stop = &wakeups.stop.clone();
    // A debug span (an info one costs its field formatting at every round); the info and
    // warn events name the device themselves.
    let span = || tracing::debug_span!("messages", device = %device.id);
    let (min, max) = (inbox.config.retry_min_ms, inbox.config.retry_max_ms);
    let mut retry = Backoff::new(min, max);
    let mut store_retry = Backoff::new(100, 10_000);
    loop {
        let id = device.id.to_string();
        let next = inbox
            .store
            .call(move |c| {
                c.prepare_cached(
                    "SELECT id, payload, expires_at_ms FROM inbox WHERE device = ?1 AND state = 'pending' ORDER BY seq LIMIT 1",
                )?
                .query_row([id], |r| {
                    Ok(Next {
                        id: r.get(0)?,
                        payload: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(Value::Null),
                        expires_at_ms: r.get::<_, i64>(2)? as u64,
                    })
                })
                .optional()
            })
            .await;
        let next = match next {
            Ok(n) => n,
            Err(e) => {
                warn!(device = %device.id, error = %e, "cannot read the inbox");
                tokio::select! {
                    _ = stop.cancelled() => return Err(Ended),
                    _ = pause_after_failure(&inbox.store, store_retry.delay()) => {}
                }
                continue;
            }
        };
        let Some(msg) = next else {
            return Ok(());
        };
        let now = now_ms();
        let left = msg.expires_at_ms.saturating_sub(now);
        if left < inbox.config.min_remaining_ms {
            let reason = if left == 0 {
                "ttl passed before the device could be reached".to_string()
            } else {
                format!("only {left} ms of the ttl were left, too little to start it; not executed")
            };
            let end = inbox.end(
                device,
                &msg.id,
                FeedbackOutcome::Expired,
                Some(reason),
                None,
                stop,
            );
            if end.instrument(span()).await {
                continue;
            }
            return Err(Ended);
        }
        let until_expiry = Duration::from_millis(left);
        let sleep_for = if inbox.devices.presence.is_online(&device.id) {
            match execute(device, inbox, &msg, stop).instrument(span()).await {
                Attempt::Done => {
                    retry.reset();
                    store_retry.reset();
                    continue;
                }
                Attempt::Stopped => return Err(Ended),
                Attempt::StoreFailed => store_retry.delay(),
                Attempt::Again { why, after } => {
                    debug!(device = %device.id, message = %msg.id, %why, "device did not act; retrying");
                    after.unwrap_or_else(|| retry.delay()).min(until_expiry)
                }
            }
        } else {
            until_expiry
        };
        wakeups.event_or(sleep_for).await?;
    }
}

enum Attempt {
    /// The message reached a final state.
    Done,
    /// The device certainly did not act (not reached, or busy); the message stays pending and
    /// is tried again, after `after` when the device said when.
    Again {
        why: String,
        after: Option<Duration>,
    },
    /// A store write failed before the device call; nothing was sent.
    StoreFailed,
    /// Shutting down.
    Stopped,
}

/// The final outcome of a call that was made, as feedback.
fn outcome_of(result: Result<(), CallError>) -> (FeedbackOutcome, Option<String>, Option<i64>) {
    match result {
        Ok(()) => (FeedbackOutcome::Completed, None, None),
        // A 4xx, or a serial device's own error code: the device said no.
        Err(CallError::Status { status, detail }) if !(500..600).contains(&status) => (
            FeedbackOutcome::Rejected,
            Some(format!(
                "device answered {status}: {}",
                answer_text(&detail)
            )),
            Some(status),
        ),
        Err(CallError::Status { status, detail }) => (
            FeedbackOutcome::Failed,
            Some(format!(
                "device answered {status}: {}; not retried (at most once)",
                answer_text(&detail)
            )),
            Some(status),
        ),
        Err(CallError::Coded { code, detail }) => (
            FeedbackOutcome::Rejected,
            Some(format!(
                "device answered error {code}: {}",
                answer_text(&detail)
            )),
            None,
        ),
        Err(CallError::Refused(why)) => (FeedbackOutcome::Rejected, Some(why), None),
        Err(e) if e.may_have_run() => (
            FeedbackOutcome::MayHaveRun,
            Some(format!(
                "{e}: the command was sent, the device may have run it; not retried (at most once)"
            )),
            None,
        ),
        Err(e) => (FeedbackOutcome::Failed, Some(e.to_string()), None),
    }
}

async fn execute(device: &Device, inbox: &Inbox, msg: &Next, stop: &CancellationToken) -> Attempt {
    let field = &inbox.config.command_field;
    let action = match command_of(&msg.payload, field) {
        Err(_) => Err(format!("payload has no string '{field}'")),
        Ok(cmd) => device
            .actions
            .commands
            .get(cmd)
            .map(|a| (cmd, a))
            .ok_or_else(|| format!("no mapping for command '{cmd}'")),
    };
    let (cmd, action) = match action {
        Ok(a) => a,
        Err(why) => {
            return match inbox
                .end(
                    device,
                    &msg.id,
                    FeedbackOutcome::Rejected,
                    Some(why),
                    None,
                    stop,
                )
                .await
            {
                true => Attempt::Done,
                false => Attempt::Stopped,
            };
        }
    };
    let Ok(_slot) = device.slots.acquire().await else {
        return Attempt::Stopped;
    };
    // Committed before the call: a crash from here on can never lead to a second call.
    let id = msg.id.clone();
    if let Err(e) = inbox
        .store
        .call(move |c| {
            c.prepare_cached(
                "UPDATE inbox SET state = 'running', attempts = attempts + 1 WHERE id = ?1",
            )?
            .execute([id])
        })
        .await
    {
        warn!(device = %device.id, error = %e, "cannot mark the message running; not calling the device");
        return Attempt::StoreFailed;
    }
    let mut vars = args_of(&msg.payload, field);
    vars.insert("message_id".into(), Value::String(msg.id.clone()));
    vars.insert("command".into(), Value::String(cmd.to_string()));
    vars.insert("params".into(), Value::Object(args_of(&msg.payload, field)));
    // The full configured timeout: a command started before its TTL may finish after it, but
    // is never cut off and reported failed while the device is still running it.
    let timeout = Duration::from_millis(action.timeout_ms.unwrap_or(device.config.timeout_ms));
    let result = device.call(action, &vars, timeout).await;
    inbox
        .devices
        .presence
        .observe_call(&device.id, &result, now_ms());
    if let Err(e) = &result {
        if e.retryable() {
            // The device did not act: back to pending, tried again until the TTL.
            let after = match e {
                CallError::Busy { retry_after, .. } => *retry_after,
                _ => None,
            };
            let why = e.to_string();
            if !inbox.requeue(&msg.id, &why, stop).await {
                return Attempt::Stopped;
            }
            return Attempt::Again { why, after };
        }
    }
    let (outcome, reason, status) = outcome_of(result.map(|_| ()));
    match inbox
        .end(device, &msg.id, outcome, reason, status, stop)
        .await
    {
        true => Attempt::Done,
        false => Attempt::Stopped,
    }
}

impl Inbox {
    /// Records a final outcome and its feedback; a failed write is retried with backoff until
    /// it commits. Returns false if `stop` came first.
    async fn end(
        &self,
        device: &Device,
        id: &str,
        outcome: FeedbackOutcome,
        reason: Option<String>,
        status: Option<i64>,
        stop: &CancellationToken,
    ) -> bool {
        info!(device = %device.id, message = %id, outcome = ?outcome, reason = reason.as_deref().unwrap_or(""), "message finished");
        let stored = self
            .store
            .call_until_stored("record the message outcome", stop, || {
                let (msg, dev, why) = (id.to_string(), device.id.to_string(), reason.clone());
                move |c: &Connection| finish(c, &msg, &dev, outcome, why, status, now_ms())
            })
            .await;
        if stored.is_none() {
            return false;
        }
        let _ = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.metrics.message(outcome);
        self.outbox.wake();
        true
    }

    /// Puts a message the device did not act on back to `pending` with the reason; retried
    /// with backoff until it commits. Returns false if `stop` came first.
    async fn requeue(&self, id: &str, why: &str, stop: &CancellationToken) -> bool {
        self.store
            .call_until_stored("put the message back in the queue", stop, || {
                let (id, why) = (id.to_string(), why.to_string());
                move |c: &Connection| {
                    c.prepare_cached(
                        "UPDATE inbox SET state = 'pending', reason = ?2 WHERE id = ?1",
                    )?
                    .execute(params![id, why])
                }
            })
            .await
            .is_some()
    }
}

#[cfg(test)]
#[path = "inbox_tests.rs"]
mod tests;
