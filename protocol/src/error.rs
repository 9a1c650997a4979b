//! Error codes carried in RPC responses and operator API error bodies. Defined once here so the
//! gateway and the cloud agree on every code and its HTTP mapping.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A coded failure. The wire form is the snake_case name, e.g. `"device_offline"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The device's gateway has no live connection to the cloud.
    GatewayOffline,
    /// The gateway is connected but the device does not answer its health probe.
    DeviceOffline,
    /// No gateway declares this device.
    DeviceNotFound,
    /// The device declares no such method.
    MethodNotFound,
    /// The parameters do not match the method's declaration.
    InvalidParams,
    /// The device answered with a failure; `device_status` and `detail` say what it said.
    DeviceError,
    /// No answer before the caller's deadline.
    Timeout,
    /// A document exceeds its documented size limit.
    PayloadTooLarge,
    /// The request itself is malformed (bad JSON, out-of-range option).
    BadRequest,
    /// The gateway is shutting down and takes no new work.
    ShuttingDown,
    /// The peer speaks a newer protocol version.
    UnsupportedVersion,
    /// An `If-Match` version did not match the current one.
    PreconditionFailed,
    /// The device's message queue is full; nothing was queued.
    QueueFull,
    /// No message with this id for this device.
    MessageNotFound,
    /// Something failed inside the gateway or cloud itself.
    Internal,
    /// The operator API wants a valid bearer token.
    Unauthorized,
    /// The device said it is busy (HTTP 408, 429, 503 or a serial busy line) and did not act;
    /// the call may be made again later. RPCs are never retried by the gateway.
    DeviceBusy,
}

impl ErrorCode {
    /// Every code, in declaration order (`ALL[code as usize] == code`).
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::GatewayOffline,
        ErrorCode::DeviceOffline,
        ErrorCode::DeviceNotFound,
        ErrorCode::MethodNotFound,
        ErrorCode::InvalidParams,
        ErrorCode::DeviceError,
        ErrorCode::Timeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::BadRequest,
        ErrorCode::ShuttingDown,
        ErrorCode::UnsupportedVersion,
        ErrorCode::PreconditionFailed,
        ErrorCode::QueueFull,
        ErrorCode::MessageNotFound,
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::DeviceBusy,
    ];

    /// The HTTP status the operator API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::GatewayOffline
            | ErrorCode::DeviceOffline
            | ErrorCode::ShuttingDown
            | ErrorCode::DeviceBusy => 503,
            ErrorCode::DeviceNotFound | ErrorCode::MethodNotFound => 404,
            ErrorCode::InvalidParams | ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => 400,
            ErrorCode::DeviceError => 502,
            ErrorCode::Timeout => 504,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::QueueFull => 429,
            ErrorCode::MessageNotFound => 404,
            ErrorCode::Internal => 500,
            ErrorCode::Unauthorized => 401,
        }
    }

    /// The wire name, e.g. `device_offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::GatewayOffline => "gateway_offline",
            ErrorCode::DeviceOffline => "device_offline",
            ErrorCode::DeviceNotFound => "device_not_found",
            ErrorCode::MethodNotFound => "method_not_found",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::DeviceError => "device_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::MessageNotFound => "message_not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::DeviceBusy => "device_busy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A coded error as it travels in an RPC response and in operator API error bodies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    /// The code; decides the HTTP status.
    pub code: ErrorCode,
    /// Human-readable, lowercase, names what failed.
    pub message: String,
    /// For `device_error`: the device's own status (HTTP status, or the serial error code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_status: Option<i64>,
    /// For `device_error`: what the device said (its body, or the captured error text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// For `device_error`: the device's own error code when it is text (`ERR:RANGE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_code: Option<String>,
    /// For `timeout` and `device_error`: the request was written to the device, so it may
    /// have acted although no usable answer came back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_have_run: bool,
}

impl RpcError {
    /// An error with a code and message and no device details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            device_status: None,
            detail: None,
            device_code: None,
            may_have_run: false,
        }
    }

    /// A `device_error` carrying the device's status and what it said.
    pub fn device(status: i64, detail: serde_json::Value, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::DeviceError,
            message: message.into(),
            device_status: Some(status),
            detail: Some(detail),
            device_code: None,
            may_have_run: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_code_in_declaration_order() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, i, "{code}");
        }
    }

    #[test]
    fn codes_use_snake_case_on_the_wire() {
        let s = serde_json::to_string(&ErrorCode::GatewayOffline).unwrap();
        assert_eq!(s, "\"gateway_offline\"");
        let c: ErrorCode = serde_json::from_str("\"payload_too_large\"").unwrap();
        assert_eq!(c, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn as_str_matches_serde_name() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn http_statuses_fit_the_operator_api() {
        assert_eq!(ErrorCode::DeviceNotFound.http_status(), 404);
        assert_eq!(ErrorCode::DeviceOffline.http_status(), 503);
        assert_eq!(ErrorCode::GatewayOffline.http_status(), 503);
        assert_eq!(ErrorCode::Timeout.http_status(), 504);
        assert_eq!(ErrorCode::InvalidParams.http_status(), 400);
        assert_eq!(ErrorCode::DeviceError.http_status(), 502);
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
        assert_eq!(ErrorCode::Unauthorized.http_status(), 401);
    }

    #[test]
    fn device_error_keeps_status_and_detail() {
        let e = RpcError::device(
            500,
            serde_json::json!({"error": "jammed"}),
            "device answered 500",
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], "device_error");
        assert_eq!(v["device_status"], 500);
        assert_eq!(v["detail"]["error"], "jammed");
    }
}
