//! `GET /api/v1/events`: the stub's changes as server-sent events (`text/event-stream`).
//!
//! The first event is `ready` (the subscription is in place: anything that changes from now
//! on is sent). Then `gateway`, `device`, `twin`, `message`, `rpc` and `gateway_config`
//! events as [`crate::events::Kind`] describes them, each `data` one JSON object. A subscriber that fell
//! too far behind gets `lagged` `{"missed": n}` and should reload what it shows. A comment
//! line every 15 s keeps proxies from closing an idle stream. The stream ends when the stub
//! shuts down.

use super::AppState;
use crate::events::{Event, Kind};
use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::json;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How often an idle stream gets a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The event stream.
pub async fn stream(State(app): State<AppState>) -> Response {
    let rx = app.events.subscribe();
    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let ready = SseEvent::default()
        .event("ready")
        .data(json!({"kinds": kinds, "keep_alive_s": KEEP_ALIVE.as_secs()}).to_string());
    let shutdown = app.shutdown.clone();
    let changes = stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = rx.recv() => r,
        };
        let event = match next {
            Ok(e) => to_sse(&e),
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "event subscriber lagged");
                SseEvent::default()
                    .event("lagged")
                    .data(json!({"missed": missed}).to_string())
            }
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), (rx, shutdown)))
    });
    let events = stream::once(async move { Ok(ready) }).chain(changes);
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn to_sse(e: &Event) -> SseEvent {
    SseEvent::default().event(e.kind.as_str()).data(&*e.data)
}
