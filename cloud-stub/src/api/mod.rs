//! The operator HTTP API: routes, shared state, and the JSON shape of every answer, errors
//! included (`{"code", "message", ...}` with the code's HTTP status).

mod devices;
mod error;
mod rpc;

pub use error::ApiError;

use crate::calls::PendingCalls;
use crate::registry::SharedRegistry;
use crate::session::Publisher;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use gatewayd_protocol::{ErrorCode, RpcError};
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
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/gateways", get(devices::list_gateways))
        .route("/api/v1/devices", get(devices::list_devices))
        .route("/api/v1/devices/{id}", get(devices::get_device))
        .route("/api/v1/devices/{id}/methods/{method}", post(rpc::invoke))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
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
