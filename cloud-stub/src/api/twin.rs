//! `GET /api/v1/devices/{id}/twin` and `PATCH /api/v1/devices/{id}/twin/desired`: read a twin
//! (with its delta and an `ETag` of the desired version), and merge-patch its desired half,
//! optionally conditional on `If-Match`.

use super::error::{ApiError, JsonBody, PathParams};
use super::{known_device, AppState};
use crate::twins::{parse_if_match, PatchError};
use axum::extract::State;
use axum::http::header::{ETAG, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gatewayd_protocol::payload::type_name;
use gatewayd_protocol::ErrorCode;
use serde_json::Value;
use tracing::Instrument;

/// The twin, with `ETag: "<desired_version>"`.
pub async fn get_twin(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let device = known_device(&app, &id)?;
    let view = app.twins.get(device).await.map_err(ApiError::store)?;
    Ok((etag(view.desired_version), Json(view)).into_response())
}

/// Applies a JSON merge patch (RFC 7386) to the desired half; answers
/// `{"desired_version", "desired"}` once committed.
pub async fn patch_desired(
    State(app): State<AppState>,
    PathParams(id): PathParams<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let device = known_device(&app, &id)?;
    if !patch.is_object() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "a desired patch must be a JSON object, got {}",
                type_name(&patch)
            ),
        ));
    }
    let if_match = match headers.get(IF_MATCH) {
        None => None,
        Some(v) => {
            let raw = v.to_str().unwrap_or("(not text)");
            Some(parse_if_match(raw).map_err(|e| ApiError::new(ErrorCode::BadRequest, e))?)
        }
    };
    let span = tracing::info_span!("twin_patch", device = %device);
    let patched = app
        .twins
        .patch_desired(device, patch, if_match, crate::now_ms())
        .instrument(span)
        .await
        .map_err(|e| match e {
            PatchError::Precondition { .. } => {
                ApiError::new(ErrorCode::PreconditionFailed, e.to_string())
            }
            PatchError::Invalid(_) => ApiError::new(ErrorCode::BadRequest, e.to_string()),
            PatchError::TooLarge { .. } => ApiError::new(ErrorCode::PayloadTooLarge, e.to_string()),
            PatchError::VersionLimit { .. } => ApiError::new(ErrorCode::Internal, e.to_string()),
            PatchError::Store(e) => ApiError::store(e),
        })?;
    Ok((etag(patched.desired_version), Json(patched)).into_response())
}

fn etag(version: u64) -> [(axum::http::HeaderName, HeaderValue); 1] {
    let value =
        HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header");
    [(ETAG, value)]
}
