//! The operator HTTP API: routes, shared state, and the JSON shape of every answer, errors
//! included (`{"code", "message", ...}` with the code's HTTP status); the event stream
//! (`events.rs`), the OpenAPI document (`openapi.rs`) and the console's files (`console.rs`).

mod auth;
pub mod console;
mod devices;
mod error;
mod events;
mod gwconfig;
mod index;
mod messages;
pub mod openapi;
mod rpc;
mod twin;

pub use error::ApiError;
pub use index::{RouteDoc, ROUTES};

use crate::calls::PendingCalls;
use crate::events::Events;
use crate::messages::Outbox;
use crate::registry::{self, SharedRegistry};
use crate::session::Publisher;
use crate::twins::Twins;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use gatewayd_protocol::{DeviceId, ErrorCode, RpcError};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Largest request body, bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Gateways and devices; the RPC path reads only this.
    pub registry: SharedRegistry,
    /// Calls awaiting their answer.
    pub calls: Arc<PendingCalls>,
    /// Sends RPC requests to gateways.
    pub publisher: Publisher,
    /// Cancelled when the stub shuts down; new calls are then refused.
    pub shutdown: CancellationToken,
    /// Twin reads and desired patches.
    pub twins: Twins,
    /// Cloud-to-device messages.
    pub outbox: Arc<Outbox>,
    /// The bearer token every request but `/healthz` must carry; none: open API.
    pub api_token: Option<Arc<crate::security::Secret>>,
    /// Changes for the event stream.
    pub events: Events,
    /// The gateways' own configuration twins.
    pub gateway_configs: crate::gwconfig::GatewayConfigs,
}

/// The API's routes ([`ROUTES`] lists them for `GET /`), behind the bearer token check when a
/// token is configured.
pub fn router(state: AppState) -> Router {
    let token = state.api_token.clone();
    Router::new()
        .route("/", get(index::index))
        .route("/healthz", get(healthz))
        .route("/console/{file}", get(console::asset))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/gateways", get(devices::list_gateways))
        .route(
            "/api/v1/gateways/{id}/config",
            get(gwconfig::get_config).patch(gwconfig::patch_config),
        )
        .route("/api/v1/devices", get(devices::list_devices))
        .route("/api/v1/devices/{id}", get(devices::get_device))
        .route("/api/v1/devices/{id}/methods/{method}", post(rpc::invoke))
        .route("/api/v1/devices/{id}/twin", get(twin::get_twin))
        .route(
            "/api/v1/devices/{id}/twin/desired",
            patch(twin::patch_desired),
        )
        .route(
            "/api/v1/devices/{id}/messages",
            post(messages::send)
                .get(messages::list)
                .delete(messages::purge),
        )
        .route(
            "/api/v1/devices/{id}/messages/{msg_id}",
            get(messages::get_one),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            token,
            auth::require_token,
        ))
        .with_state(state)
}

/// The device named in the path, if any catalog ever declared it; else 404
/// `device_not_found`. Twins and messages outlive a device's presence in catalogs.
fn known_device(app: &AppState, id: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(id)
        .ok()
        .filter(|d| registry::lock(&app.registry).is_known(d))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::DeviceNotFound,
                format!("no gateway declares device {id}"),
            )
        })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"ok": true}))
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::with_status(
        404,
        RpcError::new(
            ErrorCode::BadRequest,
            format!("no route for {method} {}", uri.path()),
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::with_status(
        405,
        RpcError::new(
            ErrorCode::BadRequest,
            format!("method {method} is not allowed on {}", uri.path()),
        ),
    )
}
