//! Message rows: every message ever accepted, in enqueue order, with its status and times.

use super::{i64_of, to_json, u64_of, StoreError};
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{DeviceId, GatewayId, MessageId};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use serde_json::Value;

/// One message as stored, and as `GET /api/v1/devices/{id}/messages/{msg_id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub device: DeviceId,
    pub payload: Value,
    pub status: MessageStatus,
    /// Why it ended as it did (the gateway's reason, or the cloud's).
    pub reason: Option<String>,
    /// The device's own status code, when the gateway reported one.
    pub device_status: Option<i64>,
    /// The gateway it was last published to.
    #[serde(skip)]
    pub gateway: Option<GatewayId>,
    pub enqueued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Last time it was published.
    pub sent_at_ms: Option<u64>,
    /// When the gateway confirmed it was committed to its inbox.
    pub delivered_at_ms: Option<u64>,
    /// When it reached a final status.
    pub finished_at_ms: Option<u64>,
}

/// A change to stored messages, produced by the in-memory queue in the order it decided them.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageWrite {
    /// Published to `gateway` at `at_ms`.
    Sent {
        id: MessageId,
        device: DeviceId,
        gateway: GatewayId,
        at_ms: u64,
    },
    /// A new status. `None` fields keep their stored value; the times are set only once.
    Status {
        id: MessageId,
        /// Its device, when the queue still held the message (for the event stream only).
        device: Option<DeviceId>,
        status: MessageStatus,
        reason: Option<String>,
        device_status: Option<i64>,
        delivered_at_ms: Option<u64>,
        finished_at_ms: Option<u64>,
    },
}

const COLUMNS: &str = "id, device, payload_json, status, reason, device_status, gateway,
    enqueued_at_ms, expires_at_ms, sent_at_ms, delivered_at_ms, finished_at_ms";

impl MessageRecord {
    /// Appends a new message.
    pub fn insert(&self, conn: &Connection) -> Result<(), StoreError> {
        let payload = to_json(|| format!("message {}", self.id), &self.payload)?;
        conn.prepare_cached(
            "INSERT INTO messages (id, device, payload_json, status, reason, device_status,
                gateway, enqueued_at_ms, expires_at_ms, sent_at_ms, delivered_at_ms,
                finished_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?
        .execute(params![
            self.id.as_str(),
            self.device.as_str(),
            payload,
            self.status.as_str(),
            self.reason,
            self.device_status,
            self.gateway.as_ref().map(|g| g.as_str()),
            i64_of(self.enqueued_at_ms),
            i64_of(self.expires_at_ms),
            self.sent_at_ms.map(i64_of),
            self.delivered_at_ms.map(i64_of),
            self.finished_at_ms.map(i64_of),
        ])?;
        Ok(())
    }

    /// One message of one device.
    pub fn get(
        conn: &Connection,
        device: &DeviceId,
        id: &MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM messages WHERE id = ?1 AND device = ?2");
        let row = conn
            .prepare_cached(&sql)?
            .query_row([id.as_str(), device.as_str()], raw)
            .optional()?;
        Ok(row.and_then(parse))
    }

    /// A device's messages in enqueue order, optionally only those with `status`.
    pub fn list(
        conn: &Connection,
        device: &DeviceId,
        status: Option<MessageStatus>,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM messages WHERE device = ?1 AND (?2 IS NULL OR status = ?2)
             ORDER BY seq"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![device.as_str(), status.map(|s| s.as_str())], raw)?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(parse(row?));
        }
        Ok(out)
    }
}

/// Applies writes in order. A status write never changes a final row, so a write retried
/// after a later one (see [`super::Commit`]) cannot move a message backwards.
pub fn apply(conn: &Connection, writes: &[MessageWrite]) -> Result<(), StoreError> {
    for w in writes {
        match w {
            MessageWrite::Sent {
                id, gateway, at_ms, ..
            } => {
                conn.prepare_cached(
                    "UPDATE messages SET sent_at_ms = ?2, gateway = ?3 WHERE id = ?1",
                )?
                .execute(params![
                    id.as_str(),
                    i64_of(*at_ms),
                    gateway.as_str()
                ])?;
            }
            MessageWrite::Status {
                id,
                status,
                reason,
                device_status,
                delivered_at_ms,
                finished_at_ms,
                ..
            } => {
                conn.prepare_cached(
                    "UPDATE messages SET status = ?2,
                        reason = COALESCE(?3, reason),
                        device_status = COALESCE(?4, device_status),
                        delivered_at_ms = COALESCE(delivered_at_ms, ?5),
                        finished_at_ms = COALESCE(finished_at_ms, ?6)
                     WHERE id = ?1 AND status IN ('queued', 'delivered')",
                )?
                .execute(params![
                    id.as_str(),
                    status.as_str(),
                    reason,
                    device_status,
                    delivered_at_ms.map(i64_of),
                    finished_at_ms.map(i64_of),
                ])?;
            }
        }
    }
    Ok(())
}

/// Every message that is not final, in enqueue order.
pub(super) fn load_open(conn: &Connection) -> Result<Vec<MessageRecord>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM messages WHERE status IN ('queued', 'delivered') ORDER BY seq"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], raw)?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(parse(row?));
    }
    Ok(out)
}

type Raw = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn raw(r: &Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

/// A row as a record; rows that no longer parse are skipped with a warning.
fn parse(raw: Raw) -> Option<MessageRecord> {
    let (id, device, payload, status, reason, device_status, gateway, enq, exp, sent, deliv, fin) =
        raw;
    let parsed = (|| {
        Ok::<_, String>(MessageRecord {
            id: MessageId::new(&id).map_err(|e| e.to_string())?,
            device: DeviceId::new(&device).map_err(|e| e.to_string())?,
            payload: serde_json::from_str(&payload).map_err(|e| e.to_string())?,
            status: MessageStatus::parse(&status).ok_or(format!("unknown status '{status}'"))?,
            reason,
            device_status,
            gateway: gateway.and_then(|g| GatewayId::new(g).ok()),
            enqueued_at_ms: u64_of(enq),
            expires_at_ms: u64_of(exp),
            sent_at_ms: sent.map(u64_of),
            delivered_at_ms: deliv.map(u64_of),
            finished_at_ms: fin.map(u64_of),
        })
    })();
    match parsed {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(message = %id, error = %e, "skipping stored message");
            None
        }
    }
}
