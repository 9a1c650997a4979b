//! Synchronous RPC: one request in, one response out. Checks run before any device call
//! (unknown device or method, bad params, device offline, deadline passed); the device call's
//! timeout is the smaller of the configured one and the time left to the caller's deadline.
//! This path never touches SQLite.

use crate::clock::now_ms;
use crate::device::{method_names, CallError, Devices};
use gatewayd_protocol::limits::MAX_RPC_PAYLOAD;
use gatewayd_protocol::{
    validate_params, ErrorCode, RpcError, RpcOutcome, RpcRequest, RpcResponse, RpcSuccess,
    PROTOCOL_VERSION,
};
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::time::Instant;

/// Handles one request received at `received_ms` and returns the response to publish.
pub async fn handle(devices: &Devices, req: RpcRequest, received_ms: u64) -> RpcResponse {
    let id = req.id.clone();
    let outcome = match call(devices, req, received_ms).await {
        Ok(s) => RpcOutcome::Ok(s),
        Err(e) => RpcOutcome::Error(e),
    };
    RpcResponse {
        v: PROTOCOL_VERSION,
        id,
        outcome,
    }
}

async fn call(
    devices: &Devices,
    req: RpcRequest,
    received_ms: u64,
) -> Result<RpcSuccess, RpcError> {
    let deadline_ms = req.effective_deadline_ms(received_ms);
    let left = deadline_ms.saturating_sub(now_ms());
    if left == 0 {
        return Err(RpcError::new(
            ErrorCode::Timeout,
            format!(
                "request {} reached the gateway after its deadline; not executed",
                req.id
            ),
        ));
    }
    let deadline = Instant::now() + Duration::from_millis(left);
    let device = devices.get(&req.device).ok_or_else(|| {
        RpcError::new(
            ErrorCode::DeviceNotFound,
            format!("this gateway has no device '{}'", req.device),
        )
    })?;
    let action = device.actions.methods.get(&req.method).ok_or_else(|| {
        RpcError::new(
            ErrorCode::MethodNotFound,
            format!(
                "device {} has no method '{}'; it has: {}",
                req.device,
                req.method,
                method_names(&device.actions.methods)
            ),
        )
    })?;
    if serde_json::to_vec(&req.params).map_or(usize::MAX, |v| v.len()) > MAX_RPC_PAYLOAD {
        return Err(RpcError::new(
            ErrorCode::PayloadTooLarge,
            format!("params exceed {MAX_RPC_PAYLOAD} bytes"),
        ));
    }
    validate_params(&action.params, &req.params).map_err(|e| {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("method '{}' of device {}: {e}", req.method, req.device),
        )
    })?;
    let presence = &devices.presence;
    if !presence.is_online(&req.device) {
        let why = presence
            .reason(&req.device)
            .unwrap_or_else(|| "not answering".into());
        return Err(RpcError::new(
            ErrorCode::DeviceOffline,
            format!("device {} is offline: {why}", req.device),
        ));
    }
    let _slot = tokio::time::timeout_at(deadline, device.slots.acquire())
        .await
        .map_err(|_| {
            RpcError::new(
                ErrorCode::Timeout,
                format!(
                    "device {} had no free call slot before the deadline; not executed",
                    req.device
                ),
            )
        })?
        .map_err(|_| RpcError::new(ErrorCode::ShuttingDown, "gateway is shutting down"))?;
    let now = Instant::now();
    if now >= deadline {
        return Err(RpcError::new(
            ErrorCode::Timeout,
            format!(
                "deadline passed before device {} could be called; not executed",
                req.device
            ),
        ));
    }
    let configured = Duration::from_millis(action.timeout_ms.unwrap_or(device.config.timeout_ms));
    let timeout = configured.min(deadline - now);
    let vars = vars_of(&req.params);
    let result = device.call(action, &vars, timeout).await;
    presence.observe_call(&req.device, &result, now_ms());
    result
        .map(|a| RpcSuccess {
            status: a.status,
            result: a.result,
        })
        .map_err(|e| to_rpc_error(req.device.as_str(), &req.method, e))
}

/// Params as template variables, with `params` itself bound to the whole object.
pub fn vars_of(params: &Value) -> Map<String, Value> {
    let mut vars = params.as_object().cloned().unwrap_or_default();
    vars.insert("params".into(), params.clone());
    vars
}

/// Maps a device call failure to its wire error. A failure after the request was written
/// carries `may_have_run`, so a caller knows the device may have acted.
pub fn to_rpc_error(device: &str, method: &str, e: CallError) -> RpcError {
    let may_have_run = e.may_have_run();
    let mut err = match e {
        CallError::Timeout(ms) => RpcError::new(
            ErrorCode::Timeout,
            format!("device {device} did not answer '{method}' within {ms} ms; it may have acted"),
        ),
        CallError::Unreachable(why) => RpcError::new(
            ErrorCode::DeviceOffline,
            format!("device {device} is unreachable: {why}"),
        ),
        CallError::Busy { reason, .. } => RpcError::new(
            ErrorCode::DeviceBusy,
            format!("device {device} is busy and did not run '{method}': {reason}"),
        ),
        CallError::Status { status, detail } => RpcError::device(
            status,
            detail,
            format!("device {device} answered status {status} to '{method}'"),
        ),
        CallError::Coded { code, detail } => RpcError {
            device_code: Some(code.clone()),
            detail: Some(detail),
            ..RpcError::new(
                ErrorCode::DeviceError,
                format!("device {device} answered error {code} to '{method}'"),
            )
        },
        CallError::BadAnswer(why) => RpcError::new(
            ErrorCode::DeviceError,
            format!(
                "device {device} sent an unreadable answer to '{method}': {why}; it may have acted"
            ),
        ),
        CallError::Refused(why) => RpcError::new(
            ErrorCode::InvalidParams,
            format!("'{method}' not called on device {device}: {why}"),
        ),
        CallError::TooLarge { limit } => RpcError::new(
            ErrorCode::DeviceError,
            format!(
                "device {device} answered '{method}' with more than {limit} bytes (the limit); reading stopped there"
            ),
        ),
    };
    err.may_have_run = may_have_run;
    err
}
