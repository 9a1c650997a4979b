//! JSON payloads, one type per topic. Every payload carries `"v"` (the protocol version);
//! unknown fields are ignored so that a newer minor revision can add fields.

use crate::error::RpcError;
use crate::ids::{DeviceId, MessageId, RequestId};
use crate::PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

fn v() -> u32 {
    PROTOCOL_VERSION
}

/// `up/state`, retained: birth when connected, and the same shape with `online: false` as the
/// last will and at orderly shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayState {
    #[serde(default = "v")]
    pub v: u32,
    pub online: bool,
    /// Changes at every gatewayd start, so the cloud can tell a restart from a reconnect.
    #[serde(default)]
    pub boot_id: String,
    /// Gateway software version.
    #[serde(default)]
    pub software: String,
    /// Gateway wall clock, unix milliseconds.
    #[serde(default)]
    pub at_ms: u64,
    /// Identity of the gateway's store, made when the store was created. A new value for the
    /// same gateway means its store was replaced or lost: the cloud sends again what it had
    /// delivered there and never saw finish.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store_id: String,
    /// Set while the gateway cannot commit to its store (full disk, I/O error): it takes no
    /// messages or desired updates until a later state clears it. RPCs still work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

/// `up/catalog/{part}`, retained: the gateway's devices and what each supports, split into
/// `parts` publishes that each fit the broker's packet limit (see [`crate::chunk`]). The parts
/// of one announcement share a `generation`; the catalog is complete when all `parts` parts of
/// one generation have arrived, and then replaces the previous one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    #[serde(default = "v")]
    pub v: u32,
    /// Which announcement this part belongs to.
    #[serde(default)]
    pub generation: u64,
    /// This part's index, from 0.
    #[serde(default)]
    pub part: u32,
    /// How many parts the announcement has.
    #[serde(default = "one")]
    pub parts: u32,
    pub devices: Vec<DeviceInfo>,
}

fn one() -> u32 {
    1
}

/// One device in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: DeviceId,
    /// `http` or `serial`.
    pub kind: String,
    #[serde(default)]
    pub methods: Vec<MethodInfo>,
    /// Desired twin properties the gateway maps onto the device.
    #[serde(default)]
    pub twin_properties: Vec<String>,
    /// Message commands the gateway maps onto the device.
    #[serde(default)]
    pub commands: Vec<String>,
}

/// One RPC method a device supports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodInfo {
    pub name: String,
    /// Declared parameters; the gateway refuses calls that do not match.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
}

/// Type of a declared parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    Number,
    Integer,
    String,
    Bool,
    Object,
    Array,
    Any,
}

/// A declared parameter. On the wire unknown fields are ignored like everywhere else, so a newer
/// gateway may add to it; gatewayd's configuration is strict about them on its own side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// The JSON type the value must have.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Whether the caller must give it (default true).
    #[serde(default = "yes")]
    pub required: bool,
    /// Smallest allowed value for numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest allowed value for numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

fn yes() -> bool {
    true
}

/// Checks `params` against declared `specs`. Params must be an object (or null when nothing is
/// declared as required); undeclared keys are refused so that typos surface. Returns every
/// problem found, joined.
pub fn validate_params(specs: &BTreeMap<String, ParamSpec>, params: &Value) -> Result<(), String> {
    let empty = serde_json::Map::new();
    let obj = match params {
        Value::Object(m) => m,
        Value::Null => &empty,
        other => {
            return Err(format!(
                "params must be a JSON object, got {}",
                type_name(other)
            ))
        }
    };
    let mut problems = Vec::new();
    for (name, spec) in specs {
        match obj.get(name) {
            None | Some(Value::Null) if spec.required => {
                problems.push(format!("missing required param '{name}'"))
            }
            None | Some(Value::Null) => {}
            Some(v) => {
                if let Err(e) = check_type(name, spec, v) {
                    problems.push(e);
                }
            }
        }
    }
    for key in obj.keys() {
        if !specs.contains_key(key) {
            problems.push(format!("unknown param '{key}'"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn check_type(name: &str, spec: &ParamSpec, v: &Value) -> Result<(), String> {
    let ok = match spec.ty {
        ParamType::Number => v.is_number(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::String => v.is_string(),
        ParamType::Bool => v.is_boolean(),
        ParamType::Object => v.is_object(),
        ParamType::Array => v.is_array(),
        ParamType::Any => true,
    };
    if !ok {
        let want = serde_json::to_value(spec.ty).unwrap_or_default();
        return Err(format!(
            "param '{name}' must be {}, got {}",
            want.as_str().unwrap_or("?"),
            type_name(v)
        ));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = spec.min {
            if n < min {
                return Err(format!("param '{name}' is {n}, below the minimum {min}"));
            }
        }
        if let Some(max) = spec.max {
            if n > max {
                return Err(format!("param '{name}' is {n}, above the maximum {max}"));
            }
        }
    }
    Ok(())
}

/// JSON type name of a value, for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `up/devices/{part}`, retained: presence of the devices of one part, republished when one of
/// them changes. The gateway splits its devices (in id order) into `parts` fixed ranges that
/// each fit the broker's packet limit, so a change republishes one part, not the whole table;
/// the cloud merges each part into what it knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePresence {
    #[serde(default = "v")]
    pub v: u32,
    /// Which partition this part belongs to (new at every gateway start).
    #[serde(default)]
    pub generation: u64,
    /// This part's index, from 0.
    #[serde(default)]
    pub part: u32,
    /// How many parts the partition has.
    #[serde(default = "one")]
    pub parts: u32,
    pub devices: BTreeMap<DeviceId, DeviceStatus>,
}

/// Presence of one device as its gateway sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub online: bool,
    /// When the state last changed, gateway clock, unix milliseconds.
    #[serde(default)]
    pub since_ms: u64,
    /// Why the device is offline (last probe or call error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `down/rpc/req`: invoke a method now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcRequest {
    #[serde(default = "v")]
    pub v: u32,
    pub id: RequestId,
    pub device: DeviceId,
    pub method: String,
    #[serde(default)]
    pub params: Value,
    /// The caller's timeout, milliseconds.
    pub timeout_ms: u64,
    /// Absolute deadline, unix milliseconds (cloud clock). The gateway uses the earlier of this
    /// and receipt + `timeout_ms`, so a skewed clock can shorten but never extend a call, and a
    /// request redelivered after its deadline is never executed.
    pub deadline_ms: u64,
}

impl RpcRequest {
    /// The effective deadline in gateway time, unix ms, given the receipt time.
    pub fn effective_deadline_ms(&self, received_ms: u64) -> u64 {
        received_ms
            .saturating_add(self.timeout_ms)
            .min(self.deadline_ms)
    }
}

/// `up/rpc/res`: the answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcResponse {
    #[serde(default = "v")]
    pub v: u32,
    pub id: RequestId,
    #[serde(flatten)]
    pub outcome: RpcOutcome,
}

/// Success or a coded error. Wire form: `"ok": {"status", "result"}` or `"error": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcOutcome {
    Ok(RpcSuccess),
    Error(RpcError),
}

/// A successful call: the device's status (HTTP status; 200 for serial) and the mapped result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcSuccess {
    pub status: i64,
    #[serde(default)]
    pub result: Value,
}

/// `down/twin/desired`: a versioned change of one device's desired half.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredUpdate {
    #[serde(default = "v")]
    pub v: u32,
    pub device: DeviceId,
    /// Version of the desired document after this update.
    pub version: u64,
    #[serde(flatten)]
    pub body: DesiredBody,
}

/// A merge patch on top of `version - 1`, or the whole document at `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredBody {
    Patch(Value),
    Snapshot(Value),
}

/// `up/twin/sync`: the desired version the gateway holds per device. The cloud answers with a
/// snapshot for every listed device whose desired version is newer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinSync {
    #[serde(default = "v")]
    pub v: u32,
    pub devices: BTreeMap<DeviceId, u64>,
}

/// `up/twin/reported`: a merge patch of one device's reported half.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedUpdate {
    #[serde(default = "v")]
    pub v: u32,
    pub device: DeviceId,
    /// Grows with every reported patch of this device from this gateway; the cloud ignores a
    /// patch whose `seq` is not above the last one it applied.
    pub seq: u64,
    pub patch: Value,
    /// How each desired property fared when applied, by property name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub apply: BTreeMap<String, ApplyStatus>,
}

/// Outcome of applying one desired property to the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyStatus {
    pub state: ApplyState,
    /// Desired version this outcome belongs to.
    pub desired_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub at_ms: u64,
    /// For `pending`: how many times the gateway has tried so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Applied as asked, applied but the device holds a different value, refused, or still
/// being retried (the device was busy or not reachable; `reason` says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyState {
    Applied,
    Different,
    Refused,
    Pending,
}

/// `down/msg`: one cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct C2dMessage {
    #[serde(default = "v")]
    pub v: u32,
    pub id: MessageId,
    pub device: DeviceId,
    pub payload: Value,
    /// Unix milliseconds after which the message must never be executed.
    pub expires_at_ms: u64,
}

/// `up/msg/feedback`: progress or final outcome of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    #[serde(default = "v")]
    pub v: u32,
    pub id: MessageId,
    pub device: DeviceId,
    pub outcome: crate::message::FeedbackOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_status: Option<i64>,
    #[serde(default)]
    pub at_ms: u64,
}

/// Parses a payload and refuses a newer protocol version.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default = "v")]
        v: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(DecodeError::Json)?;
    if head.v > PROTOCOL_VERSION {
        return Err(DecodeError::Version(head.v));
    }
    serde_json::from_slice(bytes).map_err(DecodeError::Json)
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed payload: {0}")]
    Json(serde_json::Error),
    #[error("payload speaks protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    Version(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn specs() -> BTreeMap<String, ParamSpec> {
        serde_json::from_value(json!({
            "speed": {"type": "number", "min": 0, "max": 100},
            "note": {"type": "string", "required": false}
        }))
        .unwrap()
    }

    #[test]
    fn params_matching_the_declaration_pass() {
        assert!(validate_params(&specs(), &json!({"speed": 12.5})).is_ok());
        assert!(validate_params(&specs(), &json!({"speed": 1, "note": "x"})).is_ok());
        assert!(validate_params(&BTreeMap::new(), &Value::Null).is_ok());
    }

    #[test]
    fn every_param_problem_is_reported() {
        let err = validate_params(&specs(), &json!({"speed": "fast", "extra": 1})).unwrap_err();
        assert!(
            err.contains("param 'speed' must be number, got string"),
            "{err}"
        );
        assert!(err.contains("unknown param 'extra'"), "{err}");
        let err = validate_params(&specs(), &json!({})).unwrap_err();
        assert_eq!(err, "missing required param 'speed'");
        let err = validate_params(&specs(), &json!({"speed": 101})).unwrap_err();
        assert_eq!(err, "param 'speed' is 101, above the maximum 100");
        let err = validate_params(&specs(), &json!([1])).unwrap_err();
        assert_eq!(err, "params must be a JSON object, got array");
    }

    #[test]
    fn param_specs_from_a_newer_peer_still_decode() {
        let spec: ParamSpec =
            serde_json::from_value(json!({"type": "number", "description": "new"})).unwrap();
        assert_eq!(spec.ty, ParamType::Number);
    }

    #[test]
    fn rpc_response_wire_forms() {
        let ok = RpcResponse {
            v: 1,
            id: RequestId::new("r1").unwrap(),
            outcome: RpcOutcome::Ok(RpcSuccess {
                status: 200,
                result: json!({"speed": 3}),
            }),
        };
        let s = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            s,
            json!({"v":1,"id":"r1","ok":{"status":200,"result":{"speed":3}}})
        );
        let err: RpcResponse = serde_json::from_value(
            json!({"v":1,"id":"r2","error":{"code":"timeout","message":"no answer"}}),
        )
        .unwrap();
        match err.outcome {
            RpcOutcome::Error(e) => assert_eq!(e.code, ErrorCode::Timeout),
            other => panic!("expected error, got {other:?}"),
        }
    }

    #[test]
    fn effective_deadline_is_the_earlier_bound() {
        let r: RpcRequest = serde_json::from_value(json!({
            "v":1,"id":"r","device":"d","method":"m","timeout_ms":2000,"deadline_ms":10_000
        }))
        .unwrap();
        assert_eq!(r.effective_deadline_ms(7_000), 9_000);
        assert_eq!(r.effective_deadline_ms(9_000), 10_000);
    }

    #[test]
    fn desired_update_wire_forms() {
        let p: DesiredUpdate =
            serde_json::from_value(json!({"v":1,"device":"d","version":4,"patch":{"a":1}}))
                .unwrap();
        assert_eq!(p.body, DesiredBody::Patch(json!({"a":1})));
        let s: DesiredUpdate =
            serde_json::from_value(json!({"v":1,"device":"d","version":4,"snapshot":{}})).unwrap();
        assert_eq!(s.body, DesiredBody::Snapshot(json!({})));
    }

    #[test]
    fn decode_refuses_newer_versions_and_garbage() {
        let e = decode::<GatewayState>(br#"{"v":2,"online":true}"#).unwrap_err();
        assert!(matches!(e, DecodeError::Version(2)));
        assert!(matches!(
            decode::<GatewayState>(b"\xff"),
            Err(DecodeError::Json(_))
        ));
        let ok = decode::<GatewayState>(br#"{"v":1,"online":true,"future":1}"#).unwrap();
        assert!(ok.online);
    }
}

/// `down/config/desired`: the configuration the operator wants the gateway to add to its own
/// file: any of the `devices`, `profiles` and `serial_ports` sections, as a merge patch over
/// the file's (an entry added or replaced; `null` removes one). The gateway's local limits
/// decide what it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigDesired {
    #[serde(default = "v")]
    pub v: u32,
    /// Increases with every change the operator makes.
    pub version: u64,
    pub config: Value,
}

/// `up/config` (retained): the gateway's configuration as it runs (secrets left out) and what
/// became of the last remote configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigReport {
    #[serde(default = "v")]
    pub v: u32,
    /// Digest of the running configuration.
    pub fingerprint: String,
    pub software: String,
    pub boot_id: String,
    /// The running `devices`, `profiles`, `serial_ports` and `cloud` sections, secrets left
    /// out.
    pub running: Value,
    pub remote: RemoteConfigState,
    /// The last reload (SIGHUP or remote): `outcome`, `at_ms`, what it added, removed,
    /// replaced, and what waits for a restart; absent before the first.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub last_reload: Value,
}

/// What became of the last remote configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteConfigState {
    /// Whether this gateway takes remote configuration at all (`[remote_config] enabled`).
    pub enabled: bool,
    /// Version of the desired configuration this state is about (0: none yet).
    pub version: u64,
    /// `none`, `applied`, `refused` (nothing changed; `problems` says why) or `rolled_back`
    /// (applied, then the cloud session was lost within the grace period).
    pub state: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    pub at_ms: u64,
    /// `applied`, and on probation: rolled back if the cloud session does not hold for the
    /// grace period after it (`remote_config.rollback_grace_s`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probation: bool,
}
