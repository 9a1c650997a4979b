//! Cloud-to-device messages: `POST`, `GET` (list, optionally by status), `DELETE` (purge) on
//! `/api/v1/devices/{id}/messages`, and `GET /api/v1/devices/{id}/messages/{msg_id}`.
//! Queued messages are durable and sent by the outbox; nothing here waits for a gateway.

use super::error::{ApiError, JsonBody, PathParams};
use super::{known_device, AppState};
use crate::messages::EnqueueError;
use crate::store::MessageRecord;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use gatewayd_protocol::limits::{
    MAX_MESSAGE_PAYLOAD, MESSAGE_TTL_DEFAULT_S, MESSAGE_TTL_MAX_S, MESSAGE_TTL_MIN_S,
};
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{ErrorCode, MessageId};
use serde::Deserialize;
use serde_json::{json, Value};

/// The request body of `POST .../messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    /// What the gateway maps onto the device, e.g. `{"command": "RESTART"}`. Required.
    #[serde(default)]
    pub payload: Value,
    /// How long the message may wait before it is dropped, 1 s to 2 days.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: i64,
}

fn default_ttl() -> i64 {
    MESSAGE_TTL_DEFAULT_S as i64
}

impl Default for SendBody {
    fn default() -> Self {
        SendBody {
            payload: Value::Null,
            ttl_seconds: default_ttl(),
        }
    }
}

/// Every status a message can have, as `?status=` takes it: `queued` and `delivered` are open,
/// the others final.
pub const STATUSES: [MessageStatus; 8] = [
    MessageStatus::Queued,
    MessageStatus::Delivered,
    MessageStatus::Completed,
    MessageStatus::Rejected,
    MessageStatus::Expired,
    MessageStatus::Failed,
    MessageStatus::MayHaveRun,
    MessageStatus::Purged,
];

/// `?status=queued` and the like.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
}

/// Queues a message: `202 {"id", "status": "queued", "enqueued_at_ms", "expires_at_ms",
/// "expires_at"}` once committed.
pub async fn send(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    JsonBody(body): JsonBody<SendBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let ttl_s = check_body(&body)?;
    let device = known_device(&app, &id)?;
    let accepted = app
        .outbox
        .enqueue(device.clone(), body.payload, ttl_s * 1000, crate::now_ms())
        .await
        .map_err(|e| match e {
            EnqueueError::QueueFull { .. } => ApiError::new(ErrorCode::QueueFull, e.to_string()),
            EnqueueError::Store(e) => ApiError::store(e),
        })?;
    tracing::info!(device = %device, message = %accepted.id, ttl_s, "message queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": accepted.id,
            "status": MessageStatus::Queued,
            "enqueued_at_ms": accepted.enqueued_at_ms,
            "expires_at_ms": accepted.expires_at_ms,
            "expires_at": crate::clock::rfc3339_ms(accepted.expires_at_ms),
        })),
    ))
}

/// One message with its status and times.
pub async fn get_one(
    State(app): State<AppState>,
    PathParams((id, msg_id)): PathParams<(String, String)>,
) -> Result<Json<MessageRecord>, ApiError> {
    let device = known_device(&app, &id)?;
    let not_found = || {
        ApiError::new(
            ErrorCode::MessageNotFound,
            format!("no message {msg_id} for device {device}"),
        )
    };
    let Ok(message) = MessageId::new(&msg_id) else {
        return Err(not_found());
    };
    app.outbox
        .get(device.clone(), message)
        .await
        .map_err(ApiError::store)?
        .map(Json)
        .ok_or_else(not_found)
}

/// The device's messages in enqueue order.
pub async fn list(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<MessageRecord>>, ApiError> {
    let device = known_device(&app, &id)?;
    let Query(query) = query.map_err(|r| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("invalid query: {}", r.body_text()),
        )
    })?;
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(MessageStatus::parse(s).ok_or_else(|| {
            let known: Vec<&str> = STATUSES.iter().map(|s| s.as_str()).collect();
            ApiError::new(
                ErrorCode::BadRequest,
                format!("unknown status '{s}'; one of {}", known.join(", ")),
            )
        })?),
    };
    app.outbox
        .list(device, status)
        .await
        .map(Json)
        .map_err(ApiError::store)
}

/// Purges every message that is not final: `200 {"purged": n}`.
pub async fn purge(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let device = known_device(&app, &id)?;
    let n = app
        .outbox
        .purge(&device, crate::now_ms())
        .await
        .map_err(ApiError::store)?;
    tracing::info!(device = %device, purged = n, "messages purged");
    Ok(Json(json!({"purged": n})))
}

/// Checks the body: payload present, TTL range, payload size. Returns the TTL in seconds.
fn check_body(body: &SendBody) -> Result<u64, ApiError> {
    let t = body.ttl_seconds;
    let range = MESSAGE_TTL_MIN_S as i64..=MESSAGE_TTL_MAX_S as i64;
    if !range.contains(&t) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "ttl_seconds must be between {MESSAGE_TTL_MIN_S} and {MESSAGE_TTL_MAX_S}, got {t}"
            ),
        ));
    }
    if body.payload.is_null() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "payload is required (any JSON value except null)",
        ));
    }
    let size = serde_json::to_vec(&body.payload).map_or(usize::MAX, |v| v.len());
    if size > MAX_MESSAGE_PAYLOAD {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("payload is {size} bytes, above the limit of {MAX_MESSAGE_PAYLOAD}"),
        ));
    }
    Ok(t as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> SendBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_ttl_defaults_to_an_hour_and_is_bounded() {
        assert_eq!(check_body(&body(json!({"payload": 1}))).unwrap(), 3600);
        for t in [0, -5, 172_801] {
            let err = check_body(&body(json!({"payload": 1, "ttl_seconds": t}))).unwrap_err();
            assert_eq!(err.error().code, ErrorCode::BadRequest);
            assert_eq!(
                err.error().message,
                format!("ttl_seconds must be between 1 and 172800, got {t}")
            );
        }
        assert_eq!(
            check_body(&body(json!({"payload": 1, "ttl_seconds": 172_800}))).unwrap(),
            172_800
        );
    }

    #[test]
    fn every_status_is_listed_once() {
        for s in STATUSES {
            assert_eq!(MessageStatus::parse(s.as_str()), Some(s));
        }
        let names: std::collections::BTreeSet<&str> = STATUSES.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), STATUSES.len());
        assert!(names.contains("may_have_run"));
    }

    #[test]
    fn payload_is_required_and_bounded() {
        let err = check_body(&SendBody::default()).unwrap_err();
        assert_eq!(err.error().code, ErrorCode::BadRequest);
        let big = json!({"payload": {"blob": "x".repeat(MAX_MESSAGE_PAYLOAD)}});
        let err = check_body(&body(big)).unwrap_err();
        assert_eq!(err.error().code, ErrorCode::PayloadTooLarge);
        assert!(serde_json::from_value::<SendBody>(json!({"payload": 1, "ttl": 5})).is_err());
    }
}
