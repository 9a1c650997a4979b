//! API errors as JSON, and the extractors that turn axum's plain-text rejections into them.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gatewayd_protocol::{ErrorCode, RpcError};
use serde::de::DeserializeOwned;

/// A coded error answered as `{"code", "message", "device_status"?, "detail"?}` with the code's
/// HTTP status (or an explicit one for routing errors).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: RpcError,
}

impl ApiError {
    /// An error answered with `error.code.http_status()`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError::new(code, message).into()
    }

    /// An error answered with an explicit status (404 and 405 for routing).
    pub fn with_status(status: u16, error: RpcError) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error,
        }
    }

    /// A store failure: 500 `internal`.
    pub fn store(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store failure answered as internal");
        ApiError::new(ErrorCode::Internal, format!("store: {e}"))
    }

    /// The coded error.
    pub fn error(&self) -> &RpcError {
        &self.error
    }
}

impl From<RpcError> for ApiError {
    fn from(error: RpcError) -> Self {
        ApiError::with_status(error.code.http_status(), error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.error)).into_response()
    }
}

/// A JSON body where an empty body means `T::default()`. Too big: 413 `payload_too_large`;
/// unreadable or malformed: 400 `bad_request` with serde's message. The content type is not
/// checked, so `curl -d` works as is.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("request body exceeds {} bytes", super::MAX_BODY),
                )
            } else {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("cannot read request body: {}", r.body_text()),
                )
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))
    }
}

/// Path parameters with a JSON rejection.
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| PathParams(v))
            .map_err(|r: PathRejection| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("invalid path: {}", r.body_text()),
                )
            })
    }
}
