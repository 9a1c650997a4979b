//! `GET /api/v1/gateways/{id}/config` and `PATCH /api/v1/gateways/{id}/config`: the gateway's
//! own twin (remote configuration). See `crate::gwconfig`.

use super::error::{ApiError, JsonBody, PathParams};
use super::AppState;
use crate::registry;
use axum::extract::State;
use axum::Json;
use gatewayd_protocol::{ErrorCode, GatewayId, Topics};
use serde_json::Value;

fn known_gateway(app: &AppState, id: &str) -> Result<GatewayId, ApiError> {
    GatewayId::new(id)
        .ok()
        .filter(|g| {
            registry::lock(&app.registry)
                .gateways()
                .any(|(k, _)| k == g)
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::DeviceNotFound,
                format!("no gateway {id} has announced itself"),
            )
        })
}

/// Desired and reported halves of the gateway's configuration, and whether it runs the
/// desired version.
pub async fn get_config(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<Value>, ApiError> {
    let gateway = known_gateway(&app, &id)?;
    Ok(Json(app.gateway_configs.view(&gateway)))
}

/// Merges a patch into the desired configuration (structure checked here; the gateway checks
/// its own limits) and sends it, retained, so an offline gateway gets it when it connects.
pub async fn patch_config(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    JsonBody(patch): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let gateway = known_gateway(&app, &id)?;
    let desired = app
        .gateway_configs
        .patch(&gateway, &patch)
        .map_err(|problems| ApiError::new(ErrorCode::BadRequest, problems.join("; ")))?;
    let body = serde_json::to_vec(&desired).expect("desired configuration serializes");
    app.publisher
        .publish_retained(
            Topics::down(&gateway, gatewayd_protocol::Down::ConfigDesired),
            body,
        )
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot send it: {e}")))?;
    Ok(Json(app.gateway_configs.view(&gateway)))
}
