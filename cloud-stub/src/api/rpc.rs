//! `POST /api/v1/devices/{id}/methods/{method}`: a synchronous RPC. Every check runs before
//! anything is published, and fails fast with its own code; an accepted call is published once
//! (QoS 1, not retained), awaited until its deadline, and never stored or retried.

use super::error::{ApiError, JsonBody, PathParams};
use super::AppState;
use crate::registry;
use axum::extract::State;
use axum::Json;
use gatewayd_protocol::limits::{
    MAX_RPC_PAYLOAD, RPC_TIMEOUT_DEFAULT_S, RPC_TIMEOUT_MAX_S, RPC_TIMEOUT_MIN_S,
};
use gatewayd_protocol::{
    validate_params, DeviceId, Down, ErrorCode, RequestId, RpcError, RpcOutcome, RpcRequest,
    Topics, PROTOCOL_VERSION,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The request body; an empty body means all defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeBody {
    /// The method's parameters.
    #[serde(default)]
    pub params: Value,
    /// How long to wait for the answer, 1 to 300 seconds; fractions allowed (`1.5`).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: f64,
}

fn default_timeout() -> f64 {
    RPC_TIMEOUT_DEFAULT_S as f64
}

impl Default for InvokeBody {
    fn default() -> Self {
        InvokeBody {
            params: Value::Null,
            timeout_seconds: default_timeout(),
        }
    }
}

/// Invokes a method and answers `{"status", "result"}` or the coded error; either way the
/// event stream gets an `rpc` event with the outcome and how long the caller waited.
pub async fn invoke(
    State(app): State<AppState>,
    PathParams((device, method)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<InvokeBody>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let events = app.events.clone();
    let answer = call(app, &device, &method, body).await;
    let outcome = match &answer {
        Ok(_) => "ok",
        Err(e) => e.error().code.as_str(),
    };
    let ms = started.elapsed().as_millis().try_into().unwrap_or(u64::MAX);
    events.rpc(&device, &method, outcome, ms);
    answer
}

async fn call(
    app: AppState,
    device: &str,
    method: &str,
    body: InvokeBody,
) -> Result<Json<Value>, ApiError> {
    let method = method.to_string();
    let timeout = check_body(&body)?;
    let device = DeviceId::new(device).map_err(|e| {
        ApiError::new(
            ErrorCode::DeviceNotFound,
            format!("no device '{device}': {e}"),
        )
    })?;
    if app.shutdown.is_cancelled() {
        return Err(ApiError::new(
            ErrorCode::ShuttingDown,
            "cloud-stub is shutting down",
        ));
    }
    let route = registry::lock(&app.registry).route(&device, &method)?;
    validate_params(&route.params, &body.params).map_err(|problems| {
        ApiError::new(
            ErrorCode::InvalidParams,
            format!("invalid params for {device} '{method}': {problems}"),
        )
    })?;

    let id = new_request_id();
    let span = tracing::info_span!("rpc", request_id = %id, device = %device, method = %method);
    async move {
        let started = Instant::now();
        let (_guard, answer) = app.calls.register(id.clone(), route.gateway.clone());
        // The gateway may have gone offline between routing and registering; the session fails
        // registered calls when it does, so checking again here closes the gap.
        if !registry::lock(&app.registry).gateway_online(&route.gateway) {
            let gw = &route.gateway;
            return Err(ApiError::new(
                ErrorCode::GatewayOffline,
                format!("gateway {gw} went offline"),
            ));
        }
        let timeout_ms = timeout.as_millis() as u64;
        let request = RpcRequest {
            v: PROTOCOL_VERSION,
            id,
            device: device.clone(),
            method: method.clone(),
            params: body.params,
            timeout_ms,
            deadline_ms: crate::now_ms() + timeout_ms,
        };
        let payload = serde_json::to_vec(&request).map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("cannot encode request: {e}"))
        })?;
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let topic = Topics::down(&route.gateway, Down::RpcRequest);
        let published = tokio::time::timeout_at(deadline, app.publisher.publish(topic, payload));
        match published.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot publish request: {e}"),
                ))
            }
            Err(_) => return Err(timed_out(&device, &method, timeout)),
        }
        let outcome = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "call was dropped without an answer",
                ))
            }
            Err(_) => Err(timed_out(&device, &method, timeout))?,
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            RpcOutcome::Ok(success) => {
                tracing::info!(elapsed_ms, status = success.status, "rpc answered");
                Ok(Json(
                    json!({"status": success.status, "result": success.result}),
                ))
            }
            RpcOutcome::Error(error) => {
                tracing::info!(elapsed_ms, code = %error.code, "rpc failed");
                Err(error.into())
            }
        }
    }
    .instrument(span)
    .await
}

/// Checks the body before anything else: timeout range, then params size.
fn check_body(body: &InvokeBody) -> Result<Duration, ApiError> {
    let t = body.timeout_seconds;
    let range = RPC_TIMEOUT_MIN_S as f64..=RPC_TIMEOUT_MAX_S as f64;
    if !range.contains(&t) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("timeout_seconds must be between {RPC_TIMEOUT_MIN_S} and {RPC_TIMEOUT_MAX_S}, got {t}"),
        ));
    }
    let size = serde_json::to_vec(&body.params).map_or(usize::MAX, |v| v.len());
    if size > MAX_RPC_PAYLOAD {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("params are {size} bytes, above the limit of {MAX_RPC_PAYLOAD}"),
        ));
    }
    Ok(Duration::from_secs_f64(t))
}

fn timed_out(device: &DeviceId, method: &str, timeout: Duration) -> ApiError {
    let error = RpcError::new(
        ErrorCode::Timeout,
        format!(
            "device {device} did not answer '{method}' within {}s",
            timeout.as_secs()
        ),
    );
    tracing::info!(code = %error.code, "rpc timed out");
    error.into()
}

/// 16 random hex digits.
fn new_request_id() -> RequestId {
    RequestId::new(format!("{:016x}", rand::random::<u64>())).expect("hex digits are a valid id")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> InvokeBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_apply_when_fields_are_missing() {
        let b = body(json!({}));
        assert_eq!(b.timeout_seconds, 30.0);
        assert_eq!(b.params, Value::Null);
        assert_eq!(check_body(&b).unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn timeout_out_of_range_is_a_bad_request() {
        for t in [0, -1, 301] {
            let err = check_body(&body(json!({"timeout_seconds": t}))).unwrap_err();
            assert_eq!(err.error().code, ErrorCode::BadRequest);
            assert_eq!(
                err.error().message,
                format!("timeout_seconds must be between 1 and 300, got {t}")
            );
        }
    }

    #[test]
    fn fractional_timeouts_are_taken() {
        let b = body(json!({"timeout_seconds": 1.5}));
        assert_eq!(check_body(&b).unwrap(), Duration::from_millis(1500));
        let err = check_body(&body(json!({"timeout_seconds": 0.5}))).unwrap_err();
        assert_eq!(err.error().code, ErrorCode::BadRequest);
    }

    #[test]
    fn oversized_params_are_refused() {
        let big = "x".repeat(MAX_RPC_PAYLOAD);
        let err = check_body(&body(json!({"params": {"blob": big}}))).unwrap_err();
        assert_eq!(err.error().code, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_value::<InvokeBody>(json!({"timeout": 5})).is_err());
    }

    #[test]
    fn request_ids_are_16_hex_digits() {
        let id = new_request_id();
        assert_eq!(id.as_str().len(), 16);
        assert!(id.as_str().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
