//! `GET /`: a JSON index of the operator API, so a person or a script can find its way
//! without the docs; a browser gets the console instead ([`super::console::wants_html`]).
//! Keep [`ROUTES`] in step with [`super::router`] (a test walks every entry) and with
//! [`super::openapi`] (a test compares them).

use axum::http::header::VARY;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub description: &'static str,
}

const fn route(method: &'static str, path: &'static str, description: &'static str) -> RouteDoc {
    RouteDoc {
        method,
        path,
        description,
    }
}

/// Every route, in the order a newcomer would use them.
pub const ROUTES: &[RouteDoc] = &[
    route(
        "GET",
        "/",
        "this index; a browser (Accept prefers text/html) gets the operator console",
    ),
    route("GET", "/healthz", "liveness; never needs the bearer token"),
    route(
        "GET",
        "/console/{file}",
        "the console's static files (HTML, CSS, JavaScript); never need the bearer token",
    ),
    route(
        "GET",
        "/api/v1/openapi.json",
        "this API as an OpenAPI 3.1 document",
    ),
    route(
        "GET",
        "/api/v1/events",
        "server-sent events: gateway, device, twin, message, rpc (and ready, lagged)",
    ),
    route(
        "GET",
        "/api/v1/gateways",
        "gateways: online, boot id, software, store error, devices",
    ),
    route(
        "GET",
        "/api/v1/gateways/{id}/config",
        "the gateway's own twin: desired configuration, its report, in sync or not",
    ),
    route(
        "PATCH",
        "/api/v1/gateways/{id}/config",
        "merge-patch the gateway's desired configuration (devices, profiles, serial_ports, cloud); sent retained",
    ),
    route(
        "GET",
        "/api/v1/devices",
        "devices with their methods, twin properties, commands and presence",
    ),
    route("GET", "/api/v1/devices/{id}", "one device"),
    route(
        "POST",
        "/api/v1/devices/{id}/methods/{method}",
        "synchronous call: {\"params\", \"timeout_seconds\"} -> {\"status\", \"result\"}",
    ),
    route(
        "GET",
        "/api/v1/devices/{id}/twin",
        "desired and reported halves, versions, delta and apply states (ETag: desired version)",
    ),
    route(
        "PATCH",
        "/api/v1/devices/{id}/twin/desired",
        "JSON merge patch of the desired half, optionally If-Match: \"<version>\"",
    ),
    route(
        "POST",
        "/api/v1/devices/{id}/messages",
        "queue a message: {\"payload\", \"ttl_seconds\"} -> 202 {\"id\", \"status\": \"queued\"}",
    ),
    route(
        "GET",
        "/api/v1/devices/{id}/messages",
        "the device's messages in enqueue order; ?status= filters",
    ),
    route(
        "DELETE",
        "/api/v1/devices/{id}/messages",
        "purge every message that is not final",
    ),
    route(
        "GET",
        "/api/v1/devices/{id}/messages/{msg_id}",
        "one message with its status, reason and times",
    ),
];

/// `GET /`: the console for a browser, the JSON index for anything else.
pub async fn index(headers: HeaderMap) -> Response {
    let mut resp = if super::console::wants_html(&headers) {
        super::console::shell()
    } else {
        json_index().into_response()
    };
    resp.headers_mut()
        .insert(VARY, axum::http::HeaderValue::from_static("Accept"));
    resp
}

fn json_index() -> Json<Value> {
    let routes: Vec<Value> = ROUTES
        .iter()
        .map(|r| json!({"method": r.method, "path": r.path, "description": r.description}))
        .collect();
    Json(json!({
        "name": "cloud-stub operator API",
        "version": env!("CARGO_PKG_VERSION"),
        "auth": "Authorization: Bearer <token> on every route but /healthz and the console's \
                 static files, when a token is set",
        "console": "open / in a browser",
        "openapi": "/api/v1/openapi.json",
        "errors": "{\"code\", \"message\"} with the code's HTTP status",
        "message_statuses": super::messages::STATUSES,
        "routes": routes,
    }))
}
