//! The control API shared by a whole fleet: list devices, inspect them, switch their faults.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::api::{parse_json, ApiError};
use super::device::Device;
use super::faults::{Actions, Faults};

/// How long a faults change may take to open or close a device's listener.
const LISTENER_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// All devices of one process, in the order they were given.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    devices: Vec<Arc<Device>>,
    by_name: HashMap<String, usize>,
}

impl Fleet {
    /// Adds a device; names must be unique.
    pub fn insert(&mut self, device: Arc<Device>) -> io::Result<()> {
        if self.by_name.contains_key(&device.name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("two devices named '{}'", device.name),
            ));
        }
        self.by_name.insert(device.name.clone(), self.devices.len());
        self.devices.push(device);
        Ok(())
    }

    fn get(&self, name: &str) -> Result<&Arc<Device>, ApiError> {
        self.by_name
            .get(name)
            .map(|&i| &self.devices[i])
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no device named '{name}'")))
    }
}

#[derive(Clone)]
struct Control {
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
}

/// The control API router.
pub(crate) fn router(fleet: Arc<Fleet>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/_control/devices", get(list))
        .route("/_control/devices/{name}", get(inspect))
        .route("/_control/devices/{name}/faults", post(set_faults))
        .route("/_control/devices/{name}/reset", post(reset))
        .route("/_control/devices/{name}/power-cycle", post(power_cycle))
        .with_state(Control { fleet, shutdown })
}

async fn list(State(ctl): State<Control>) -> Json<Value> {
    let devices: Vec<Value> = ctl
        .fleet
        .devices
        .iter()
        .map(|d| json!({ "name": d.name, "api": d.api_url() }))
        .collect();
    Json(Value::Array(devices))
}

async fn inspect(
    State(ctl): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(view(ctl.fleet.get(&name)?)))
}

/// What the control API shows of a device.
fn view(device: &Device) -> Value {
    let faults = device.faults.borrow().clone();
    let state = device.state();
    json!({
        "name": device.name,
        "api": device.api_url(),
        "faults": faults,
        "config": state.config.to_json(),
        "restarts": state.restarts,
        "requests": state.requests,
        "executed": state.executed,
        "executions": state.executions,
    })
}

async fn set_faults(
    State(ctl): State<Control>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Faults>, ApiError> {
    let device = ctl.fleet.get(&name)?;
    let patch = parse_json(&body)?;
    let mut faults = device.faults.borrow().clone();
    let actions = faults
        .apply_patch(&patch)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    perform(device, actions);
    apply(&ctl, device, faults).await
}

/// Puts the faults back to those the device started with (none unless its spec says).
async fn reset(
    State(ctl): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Faults>, ApiError> {
    let device = ctl.fleet.get(&name)?;
    perform(
        device,
        Actions {
            restart_busy_count: true,
            ..Actions::default()
        },
    );
    apply(&ctl, device, device.initial_faults.clone()).await
}

/// Power-cycles the device (the `{"reset": true}` action) and answers its view.
async fn power_cycle(
    State(ctl): State<Control>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let device = ctl.fleet.get(&name)?;
    perform(
        device,
        Actions {
            power_cycle: true,
            ..Actions::default()
        },
    );
    Ok(Json(view(device)))
}

/// Carries out the one-off actions of a faults update.
fn perform(device: &Device, actions: Actions) {
    let mut state = device.state();
    if actions.power_cycle {
        state.power_cycle(device.limit, tokio::time::Instant::now());
        tracing::info!(device = %device.name, "power cycled");
    }
    if actions.restart_busy_count {
        state.busy_seen = 0;
    }
}

/// Installs `faults` and answers once the API listener is closed or open to match `offline`.
async fn apply(ctl: &Control, device: &Device, faults: Faults) -> Result<Json<Faults>, ApiError> {
    let listening = !faults.offline;
    let mut observed = device.listening.subscribe();
    device.faults.send_replace(faults.clone());
    tracing::info!(device = %device.name, ?faults, "faults changed");
    let reached = tokio::select! {
        reached = tokio::time::timeout(LISTENER_CHANGE_TIMEOUT, listening_is(&mut observed, listening)) => reached,
        _ = ctl.shutdown.cancelled() => {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "fleet shutting down".into()));
        }
    };
    match reached {
        Ok(()) => Ok(Json(faults)),
        Err(_) => Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "device '{}' api listener did not {} in time",
                device.name,
                if listening { "open" } else { "close" }
            ),
        )),
    }
}

async fn listening_is(observed: &mut tokio::sync::watch::Receiver<bool>, listening: bool) {
    if observed.wait_for(|&l| l == listening).await.is_err() {
        std::future::pending::<()>().await;
    }
}
