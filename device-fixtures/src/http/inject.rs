//! The fault injection layer in front of every route of a device API.
//!
//! In order: count the arrival, wait out `latency_ms` and `hang`, answer for a missing
//! `/health`, for `error_status`, `garbage` and busy without acting; otherwise the route
//! acts (and is counted as executed), and its answer is then shaped or replaced
//! (`drop_after_acting`, `malformed_status`, `huge_body_mb`, `huge_header`).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::io::ReaderStream;

use super::api::{no_route, Api, ApiError};
use super::conn::{Conn, Takeover};
use super::faults::Faults;

/// Body of every answer while the `garbage` fault is set.
const GARBAGE: &[u8] = b"\x00\x01garbage{{";

/// Header whose value is counted per request, to prove at-most-once execution.
const MESSAGE_ID: &str = "x-message-id";

/// The one path the answer-shaping habits and busy spare.
const HEALTH: &str = "/health";

/// What `malformed_status` writes instead of the answer: letters O in the status code.
const MALFORMED_STATUS: &[u8] = b"HTTP/1.1 2OO OK\r\n\r\n";

/// Header added by `huge_header`.
const HUGE_HEADER: &str = "x-padding";
/// Size of the `huge_header` value, bytes.
const HUGE_HEADER_BYTES: usize = 1 << 20;

const MIB: u64 = 1 << 20;
/// Chunk size of a streamed `huge_body_mb` body.
const CHUNK: usize = 64 * 1024;

/// Counts the request, then applies the device's faults around the real handler.
pub(crate) async fn inject_faults(State(api): State<Api>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let message_id = req
        .headers()
        .get(MESSAGE_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    api.device.state().arrived(&path);
    tracing::debug!(device = %api.device.name, method = %req.method(), path, "request");

    let latency = api.device.faults.borrow().latency_ms;
    if latency > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(latency)) => {}
            _ = api.conns.cancelled() => return connection_gone(),
        }
    }
    let mut faults = api.device.faults.subscribe();
    tokio::select! {
        _ = hang_cleared(&mut faults) => {}
        _ = api.conns.cancelled() => return connection_gone(),
    }
    let faults = api.device.faults.borrow().clone();
    let health = path == HEALTH;
    if health && faults.no_health {
        return no_route(&path).into_response();
    }
    if let Some(status) = faults.error_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return ApiError(status, "injected fault".into()).into_response();
    }
    if faults.garbage {
        return ([(header::CONTENT_TYPE, "application/json")], GARBAGE).into_response();
    }
    if !health && faults.is_busy(api.device.state().next_busy_count()) {
        tracing::debug!(device = %api.device.name, path, "busy");
        return busy(faults.busy_status);
    }

    let conn = req
        .extensions()
        .get::<ConnectInfo<Conn>>()
        .map(|c| c.0.clone());
    let response = next.run(req).await;
    api.device.state().acted(&path, message_id.as_deref());
    if health {
        return response;
    }
    shape(response, &faults, conn.as_ref())
}

/// Resolves at once unless `hang` is set, else when it is cleared (or never, if the device is dropped).
async fn hang_cleared(faults: &mut watch::Receiver<Faults>) {
    if faults.wait_for(|f| !f.hang).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Answer for a request whose connection is being torn down; it is never delivered.
fn connection_gone() -> Response {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "device offline".into()).into_response()
}

/// A busy answer: `status`, `Retry-After: 1`, `{"error":"busy"}`.
fn busy(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [(header::RETRY_AFTER, "1")],
        Json(json!({ "error": "busy" })),
    )
        .into_response()
}

/// The answer of a request the device acted on, as the faults deliver it.
fn shape(response: Response, faults: &Faults, conn: Option<&Conn>) -> Response {
    let takeover = if faults.drop_after_acting {
        Some(Takeover::Close)
    } else if faults.malformed_status {
        Some(Takeover::Raw(Bytes::from_static(MALFORMED_STATUS)))
    } else {
        None
    };
    if let Some(takeover) = takeover {
        match conn {
            // hyper still writes `response`, into the void: the connection carries the takeover.
            Some(conn) => conn.take_over(takeover),
            None => tracing::warn!("no connection handle; answering normally"),
        }
        return response;
    }
    let mut response = if faults.huge_body_mb > 0 {
        huge_body(faults.huge_body_mb)
    } else {
        response
    };
    if faults.huge_header {
        let padding = HeaderValue::from_bytes(&vec![b'x'; HUGE_HEADER_BYTES])
            .expect("letters are a valid header value");
        response
            .headers_mut()
            .insert(HeaderName::from_static(HUGE_HEADER), padding);
    }
    response
}

/// 200 with a JSON string of exactly `mb` MiB (quotes included), streamed in chunks and
/// chunked on the wire, so neither side needs to know its length up front.
fn huge_body(mb: u64) -> Response {
    let len = mb * MIB;
    let reader = (&b"\""[..])
        .chain(tokio::io::repeat(b'x').take(len - 2))
        .chain(&b"\""[..]);
    let body = Body::from_stream(ReaderStream::with_capacity(reader, CHUNK));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
