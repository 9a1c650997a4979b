//! The operator HTTP API: ThingsBoard's REST calls a test needs (shared attributes, two-way,
//! one-way and persistent RPC) plus views of gateways, devices, telemetry and the event log,
//! and a way to drop a gateway's session.

use super::rpc::{Refused, RpcRequest};
use super::{now_ms, Shared};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

type Shr = State<Arc<Shared>>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/gateways", get(gateways).post(add_gateway))
        .route("/api/devices", get(devices))
        .route("/api/devices/{name}", get(device))
        .route(
            "/api/devices/{name}/attributes/SHARED_SCOPE",
            post(set_shared).delete(delete_shared),
        )
        .route("/api/devices/{name}/attributes", get(attributes))
        .route("/api/devices/{name}/telemetry", get(telemetry))
        .route("/api/events", get(events))
        .route("/api/sessions/{gateway}/drop", post(drop_session))
        .route("/api/rpc/twoway/{device}", post(twoway))
        .route("/api/rpc/oneway/{device}", post(oneway))
        .route("/api/rpc/persistent/{id}", get(persistent))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
}

fn not_found(what: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("{what} not found"))
}

#[derive(Deserialize)]
struct NewGateway {
    name: String,
    token: String,
}

async fn add_gateway(State(sh): Shr, body: Result<Json<NewGateway>, JsonRejection>) -> Response {
    let Json(g) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if sh.lock().register_gateway(&g.name, &g.token) {
        Json(json!({"name": g.name})).into_response()
    } else {
        error(StatusCode::CONFLICT, "another gateway holds this token")
    }
}

async fn gateways(State(sh): Shr) -> Json<Value> {
    Json(sh.lock().gateways_view())
}

async fn devices(State(sh): Shr) -> Json<Value> {
    let st = sh.lock();
    Json(Value::Array(
        st.devices
            .keys()
            .filter_map(|n| st.device_view(n))
            .collect(),
    ))
}

async fn device(State(sh): Shr, Path(name): Path<String>) -> Response {
    match sh.lock().device_view(&name) {
        Some(v) => Json(v).into_response(),
        None => not_found("device"),
    }
}

async fn set_shared(
    State(sh): Shr,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let values: Map<String, Value> = match body {
        Ok(Json(Value::Object(m))) if m.values().all(|v| !v.is_null()) => m,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "body is not an object of non-null values",
            )
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let pushed = sh.lock().set_shared(&name, values, now_ms());
    Json(json!({"pushed": pushed})).into_response()
}

async fn delete_shared(
    State(sh): Shr,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let keys: Vec<String> = q
        .get("keys")
        .map(|k| {
            k.split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if keys.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no keys");
    }
    match sh.lock().delete_shared(&name, &keys, now_ms()) {
        Some(pushed) => Json(json!({"pushed": pushed})).into_response(),
        None => not_found("device"),
    }
}

async fn attributes(State(sh): Shr, Path(name): Path<String>) -> Response {
    match sh.lock().devices.get(&name) {
        Some(d) => Json(json!({"client": d.client, "shared": d.shared})).into_response(),
        None => not_found("device"),
    }
}

async fn telemetry(State(sh): Shr, Path(name): Path<String>) -> Response {
    match sh.lock().devices.get(&name) {
        Some(d) => Json(Value::Array(d.telemetry.clone())).into_response(),
        None => not_found("device"),
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn events(State(sh): Shr, Query(q): Query<Since>) -> Json<Value> {
    Json(Value::Array(sh.lock().events_since(q.since)))
}

async fn drop_session(State(sh): Shr, Path(gateway): Path<String>) -> Response {
    let mut st = sh.lock();
    let Some(g) = st.gateways.get(&gateway) else {
        return not_found("gateway");
    };
    let dropped = match g.session {
        Some(id) => {
            st.end_session(id, "dropped by the operator", now_ms());
            true
        }
        None => false,
    };
    Json(json!({"dropped": dropped})).into_response()
}

async fn twoway(
    State(sh): Shr,
    Path(device): Path<String>,
    body: Result<Json<RpcRequest>, JsonRejection>,
) -> Response {
    call(sh, device, false, body).await
}

async fn oneway(
    State(sh): Shr,
    Path(device): Path<String>,
    body: Result<Json<RpcRequest>, JsonRejection>,
) -> Response {
    call(sh, device, true, body).await
}

/// A random id shaped like a UUID.
fn rpc_id() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

async fn call(
    sh: Arc<Shared>,
    device: String,
    oneway: bool,
    body: Result<Json<RpcRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let timeout = Duration::from_millis(req.timeout_ms());
    if req.persistent {
        let id = sh
            .lock()
            .create_persistent(&device, oneway, req, rpc_id(), now_ms());
        sh.wake.notify_one();
        return Json(json!({"rpcId": id})).into_response();
    }
    let offline = || error(StatusCode::GATEWAY_TIMEOUT, "device is offline");
    let timed_out = || error(StatusCode::GATEWAY_TIMEOUT, "timeout");
    if oneway {
        let started = sh.lock().start_oneway(&device, &req, now_ms());
        match started {
            Err(Refused::Offline) => offline(),
            Ok(acked) => match tokio::time::timeout(timeout, acked).await {
                Ok(Ok(())) => Json(json!({})).into_response(),
                Ok(Err(_)) => error(StatusCode::GATEWAY_TIMEOUT, "session closed before PUBACK"),
                Err(_) => timed_out(),
            },
        }
    } else {
        let started = sh.lock().start_twoway(&device, &req, now_ms());
        match started {
            Err(Refused::Offline) => offline(),
            Ok((id, reply)) => match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(data)) => Json(data).into_response(),
                _ => {
                    sh.lock().cancel_twoway(&device, id);
                    timed_out()
                }
            },
        }
    }
}

async fn persistent(State(sh): Shr, Path(id): Path<String>) -> Response {
    match sh.lock().persistent(&id) {
        Some(v) => Json(v).into_response(),
        None => not_found("persistent rpc"),
    }
}
