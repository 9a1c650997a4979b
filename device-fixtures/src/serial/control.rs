//! The serial simulator's control API: inspect the line, switch its faults.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::faults::{Actions, Faults};
use super::Shared;

/// How long a `disappear` change may take to close or recreate the pty.
const PORT_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Control {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// The control API router.
pub(crate) fn router(shared: Arc<Shared>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/_control/state", get(state))
        .route("/_control/faults", post(set_faults))
        .route("/_control/reset", post(reset))
        .route("/_control/power-cycle", post(power_cycle))
        .with_state(Control { shared, shutdown })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn view(shared: &Shared) -> Value {
    let counters = {
        let state = shared.state();
        let (executed, total) = state.executed_totals();
        json!({
            "setpoints": state.controller.setpoints(),
            "requests": state.requests,
            "executed": executed,
            "executed_total": total,
            "executed_by_unit": state.executed,
        })
    };
    let mut view = json!({
        "path": shared.path.borrow().clone(),
        "link": shared.link.as_ref().map(|l| l.display().to_string()),
        "faults": shared.faults.borrow().clone(),
    });
    if let (Some(view), Value::Object(counters)) = (view.as_object_mut(), counters) {
        view.extend(counters);
    }
    view
}

/// Carries out the one-off actions of a faults update.
fn perform(shared: &Shared, actions: Actions) {
    let mut state = shared.state();
    if actions.power_cycle {
        state.controller.reset();
        tracing::info!("power cycled");
    }
    if actions.restart_busy_count {
        state.busy_seen = 0;
    }
}

async fn state(State(ctl): State<Control>) -> Json<Value> {
    Json(view(&ctl.shared))
}

async fn set_faults(State(ctl): State<Control>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let mut faults = ctl.shared.faults.borrow().clone();
    match faults.apply_patch(&patch) {
        Ok(actions) => perform(&ctl.shared, actions),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    }
    apply(&ctl, faults).await
}

/// Puts the faults back to those the line started with (none unless its spec says).
async fn reset(State(ctl): State<Control>) -> Response {
    perform(
        &ctl.shared,
        Actions {
            restart_busy_count: true,
            ..Actions::default()
        },
    );
    apply(&ctl, ctl.shared.initial_faults.clone()).await
}

/// Power-cycles the units (the `{"reset": true}` action) and answers the state.
async fn power_cycle(State(ctl): State<Control>) -> Json<Value> {
    perform(
        &ctl.shared,
        Actions {
            power_cycle: true,
            ..Actions::default()
        },
    );
    Json(view(&ctl.shared))
}

/// Installs `faults` and answers once the port is gone or back to match `disappear`.
async fn apply(ctl: &Control, faults: Faults) -> Response {
    let present = !faults.disappear;
    let mut path = ctl.shared.path.subscribe();
    ctl.shared.faults.send_replace(faults.clone());
    tracing::info!(?faults, "faults changed");
    let reached = tokio::select! {
        r = tokio::time::timeout(PORT_CHANGE_TIMEOUT, path.wait_for(|p| p.is_some() == present)) => r,
        _ = ctl.shutdown.cancelled() => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "simulator shutting down");
        }
    };
    match reached {
        Ok(Ok(_)) => Json(view(&ctl.shared)).into_response(),
        _ => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the port did not {} in time",
                if present { "come back" } else { "go away" }
            ),
        ),
    }
}
