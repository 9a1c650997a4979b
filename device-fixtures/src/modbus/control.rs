//! The Modbus simulator's control API: inspect the units, switch faults, reset.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::Shared;

/// The control API router.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_control/state", get(state))
        .route("/_control/faults", post(set_faults))
        .route("/_control/reset", post(reset))
        .route("/_control/registers", post(set_registers))
        .with_state(shared)
}

fn view(shared: &Shared) -> Value {
    let state = shared.state();
    let units: serde_json::Map<String, Value> = state
        .units
        .iter()
        .map(|(id, u)| (id.to_string(), u.view()))
        .collect();
    json!({
        "units": units,
        "collisions": state.collisions,
        "rtu_frames": state.rtu_frames,
        "connections": state.connections,
        "tcp": shared.tcp.to_string(),
        "rtu_tcp": shared.rtu_tcp.to_string(),
        "path": shared.path.borrow().clone(),
        "faults": shared.faults.borrow().clone(),
    })
}

async fn state(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(view(&shared))
}

/// Patches the faults; answers once a `gone` change took effect on both sides.
async fn set_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    };
    let mut faults = shared.faults.borrow().clone();
    if let Err(e) = faults.apply_patch(&patch) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response();
    }
    let gone = faults.gone;
    shared.faults.send_replace(faults);
    // Wait until the pty side followed (the TCP side follows at once).
    let mut path = shared.path.subscribe();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        path.wait_for(|p| p.is_none() == gone),
    )
    .await;
    Json(view(&shared)).into_response()
}

/// Units back to the map file's values, counters and faults cleared (not `gone`).
async fn reset(State(shared): State<Arc<Shared>>) -> Json<Value> {
    {
        let mut state = shared.state();
        state.units = shared.initial.clone();
        state.collisions = 0;
        state.rtu_frames = 0;
    }
    let gone = shared.faults.borrow().gone;
    shared.faults.send_replace(super::faults::Faults {
        gone,
        ..Default::default()
    });
    Json(view(&shared))
}

/// What the local panel sets: `{"unit": 1, "table": "holding_registers", "address": 100,
/// "values": [1200]}` (coils and discrete inputs take booleans). Not counted as a request.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Panel {
    unit: u8,
    table: String,
    address: u16,
    values: Vec<Value>,
}

async fn set_registers(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let bad = |e: String| (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response();
    let panel: Panel = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad(e.to_string()),
    };
    {
        let mut state = shared.state();
        let Some(unit) = state.units.get_mut(&panel.unit) else {
            return bad(format!("no unit {}", panel.unit));
        };
        for (i, v) in panel.values.iter().enumerate() {
            let a = panel.address.wrapping_add(i as u16);
            let done = match (panel.table.as_str(), v) {
                ("coils", Value::Bool(b)) => unit.coils.insert(a, *b).map(drop),
                ("discrete_inputs", Value::Bool(b)) => unit.discrete_inputs.insert(a, *b).map(drop),
                ("holding_registers", Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .and_then(|n| unit.holding_registers.insert(a, n))
                    .map(drop),
                ("input_registers", Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .and_then(|n| unit.input_registers.insert(a, n))
                    .map(drop),
                _ => None,
            };
            if done.is_none() {
                return bad(format!("cannot set {} {a} to {v}", panel.table));
            }
        }
    }
    Json(view(&shared)).into_response()
}
