//! `GET /api/v1/openapi.json`: the operator API as an OpenAPI 3.1 document, written by hand
//! next to the handlers it describes. A test checks that every route of [`super::ROUTES`] is
//! in it and that each answers with a documented status and a body of the documented shape.

use axum::Json;
use serde_json::{json, Value};

/// `GET /api/v1/openapi.json`.
pub async fn document() -> Json<Value> {
    Json(spec())
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema(name)})
}

fn gateway_id() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "gateway id",
        "schema": {"type": "string"}})
}

fn device_id() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "device id",
        "schema": {"type": "string"}})
}

/// Errors every authenticated route may answer.
fn with_common(mut responses: Value) -> Value {
    responses["401"] = error("`unauthorized`: missing or wrong bearer token");
    responses
}

/// The whole document.
pub fn spec() -> Value {
    let no_auth = json!([]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cloud-stub operator API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The cloud side of gatewayd: gateways and devices, synchronous RPC, \
                device twins and cloud-to-device messages. Every error is {\"code\", \
                \"message\"} with the code's HTTP status. With --api-token set, every route but \
                /healthz and the console's static files needs `Authorization: Bearer <token>`."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {
                "summary": "route index (JSON); a browser gets the operator console (HTML)",
                "description": "The HTML console is answered when Accept prefers text/html; it \
                    then needs no token. The JSON index does.",
                "responses": with_common(json!({
                    "200": {"description": "the index, or the console page",
                        "content": {
                            "application/json": {"schema": schema("Index")},
                            "text/html": {"schema": {"type": "string"}}
                        }}
                }))
            }},
            "/healthz": {"get": {
                "summary": "liveness",
                "security": no_auth,
                "responses": {"200": ok("alive", json!({"type": "object", "required": ["ok"],
                    "properties": {"ok": {"type": "boolean"}}}))}
            }},
            "/console/{file}": {"get": {
                "summary": "the console's static files",
                "security": no_auth,
                "parameters": [{"name": "file", "in": "path", "required": true,
                    "schema": {"type": "string"}, "example": "app.js"}],
                "responses": {
                    "200": {"description": "the file (ETag, Cache-Control: no-cache)", "content": {
                        "text/html": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                        "text/javascript": {"schema": {"type": "string"}},
                        "image/svg+xml": {"schema": {"type": "string"}}
                    }},
                    "304": {"description": "If-None-Match names the current ETag"},
                    "404": {"description": "no such file",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                }
            }},
            "/api/v1/openapi.json": {"get": {
                "summary": "this document",
                "responses": with_common(json!({"200": ok("OpenAPI 3.1",
                    json!({"type": "object", "required": ["openapi", "paths"]}))}))
            }},
            "/api/v1/events": {"get": {
                "summary": "live changes as server-sent events",
                "description": "First `ready` {\"kinds\", \"keep_alive_s\"}; then `gateway` \
                    {gateway, online, devices?}, `device` {device, gateway, online, reason}, \
                    `twin` {device, half: desired|reported, desired_version, \
                    reported_version}, `message` {device, id, status (a message status, or \
                    `sent` when published)}, `rpc` {device, method, outcome: ok or an error \
                    code, ms}, `gateway_config` {gateway, version, state} when a gateway \
                    reports its configuration. `lagged` {missed} means events were dropped \
                    for this subscriber: reload. A comment line every 15 s keeps the stream alive.",
                "responses": with_common(json!({"200": {"description": "the stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}))
            }},
            "/api/v1/gateways": {"get": {
                "summary": "gateways",
                "responses": with_common(json!({"200": ok("sorted by id", array_of("Gateway"))}))
            }},
            "/api/v1/gateways/{id}/config": {
                "get": {
                    "summary": "the gateway's own twin (remote configuration)",
                    "parameters": [gateway_id()],
                    "responses": with_common(json!({
                        "200": ok("desired and reported halves", schema("GatewayConfig")),
                        "404": error("`device_not_found`: no gateway of that id announced itself")
                    }))
                },
                "patch": {
                    "summary": "merge-patch the desired configuration; sent retained",
                    "description": "A JSON merge patch of the sections devices, profiles and \
                        serial_ports (entries are objects, null removes one) and cloud (fields \
                        of the connection: broker, client_id, username, password_file, TLS \
                        files, timers). The stub checks the structure; the gateway checks its \
                        own limits ([remote_config]), applies it on probation, rolls it back if \
                        its cloud session does not hold for the grace period, and reports what \
                        it made of it (reported.remote).",
                    "parameters": [gateway_id()],
                    "requestBody": {"required": true, "content": {"application/json": {
                        "schema": {"type": "object"}}}},
                    "responses": with_common(json!({
                        "200": ok("the twin after the change", schema("GatewayConfig")),
                        "400": error("`bad_request`: not sections of objects, or too large"),
                        "404": error("`device_not_found`: no gateway of that id announced itself")
                    }))
                }
            },
            "/api/v1/devices": {"get": {
                "summary": "devices with their catalog and presence",
                "responses": with_common(json!({"200": ok("sorted by id", array_of("Device"))}))
            }},
            "/api/v1/devices/{id}": {"get": {
                "summary": "one device",
                "parameters": [device_id()],
                "responses": with_common(json!({
                    "200": ok("the device", schema("Device")),
                    "404": error("`device_not_found`")
                }))
            }},
            "/api/v1/devices/{id}/methods/{method}": {"post": {
                "summary": "synchronous call; fails at once when the device or gateway is offline",
                "parameters": [device_id(), {"name": "method", "in": "path", "required": true,
                    "schema": {"type": "string"}}],
                "requestBody": {"required": false, "content": {"application/json": {
                    "schema": schema("Invoke")}}},
                "responses": with_common(json!({
                    "200": ok("the device answered", schema("RpcResult")),
                    "400": error("`invalid_params` (params do not match the declaration) or \
                        `bad_request`"),
                    "404": error("`device_not_found` or `method_not_found`"),
                    "413": error("`payload_too_large`"),
                    "502": error("`device_error`"),
                    "503": error("`gateway_offline`, `device_offline`, `device_busy` or \
                        `shutting_down`"),
                    "504": error("`timeout`")
                }))
            }},
            "/api/v1/devices/{id}/twin": {"get": {
                "summary": "desired and reported halves, delta and apply states",
                "parameters": [device_id()],
                "responses": with_common(json!({
                    "200": ok("the twin; ETag: the desired version", schema("Twin")),
                    "404": error("`device_not_found`")
                }))
            }},
            "/api/v1/devices/{id}/twin/desired": {"patch": {
                "summary": "JSON merge patch (RFC 7386) of the desired half",
                "parameters": [device_id(), {"name": "If-Match", "in": "header",
                    "required": false, "description": "the desired version the patch is \
                    based on, e.g. \"7\"", "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "responses": with_common(json!({
                    "200": ok("committed; ETag: the new desired version", schema("Patched")),
                    "400": error("`bad_request`: not an object, too deep, bad If-Match"),
                    "404": error("`device_not_found`"),
                    "412": error("`precondition_failed`: If-Match names another version"),
                    "413": error("`payload_too_large`: the desired half would exceed 32 KiB")
                }))
            }},
            "/api/v1/devices/{id}/messages": {
                "post": {
                    "summary": "queue a message",
                    "parameters": [device_id()],
                    "requestBody": {"required": true, "content": {"application/json": {
                        "schema": schema("Send")}}},
                    "responses": with_common(json!({
                        "202": ok("committed and queued", schema("Accepted")),
                        "400": error("`bad_request`: no payload, TTL out of range"),
                        "404": error("`device_not_found`"),
                        "413": error("`payload_too_large`"),
                        "429": error("`queue_full`")
                    }))
                },
                "get": {
                    "summary": "the device's messages in enqueue order",
                    "parameters": [device_id(), {"name": "status", "in": "query",
                        "required": false, "schema": schema("MessageStatus")}],
                    "responses": with_common(json!({
                        "200": ok("messages", array_of("Message")),
                        "400": error("`bad_request`: unknown status"),
                        "404": error("`device_not_found`")
                    }))
                },
                "delete": {
                    "summary": "purge every message that is not final",
                    "parameters": [device_id()],
                    "responses": with_common(json!({
                        "200": ok("how many", json!({"type": "object", "required": ["purged"],
                            "properties": {"purged": {"type": "integer", "minimum": 0}}})),
                        "404": error("`device_not_found`")
                    }))
                }
            },
            "/api/v1/devices/{id}/messages/{msg_id}": {"get": {
                "summary": "one message",
                "parameters": [device_id(), {"name": "msg_id", "in": "path", "required": true,
                    "schema": {"type": "string"}}],
                "responses": with_common(json!({
                    "200": ok("the message", schema("Message")),
                    "404": error("`device_not_found` or `message_not_found`")
                }))
            }}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                "description": "--api-token of the stub"}},
            "schemas": schemas()
        }
    })
}

fn schemas() -> Value {
    let ms = json!({"type": "integer", "minimum": 0, "description": "unix milliseconds"});
    let opt_ms = json!({"type": ["integer", "null"], "minimum": 0});
    json!({
        "Error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "enum": [
                "gateway_offline", "device_offline", "device_not_found", "method_not_found",
                "invalid_params", "device_error", "timeout", "payload_too_large",
                "bad_request", "shutting_down", "unsupported_version", "precondition_failed",
                "queue_full", "message_not_found", "internal", "unauthorized", "device_busy"]},
            "message": {"type": "string"},
            "device_status": {"type": "integer"},
            "detail": {}
        }},
        "Index": {"type": "object", "required": ["name", "version", "routes"], "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "routes": {"type": "array", "items": {"type": "object",
                "required": ["method", "path", "description"], "properties": {
                    "method": {"type": "string"}, "path": {"type": "string"},
                    "description": {"type": "string"}}}},
            "message_statuses": {"type": "array", "items": schema("MessageStatus")}
        }},
        "GatewayConfig": {"type": "object",
            "required": ["gateway", "desired", "reported", "in_sync"],
            "properties": {
                "gateway": {"type": "string"},
                "desired": {"type": "object", "required": ["version", "config"],
                    "properties": {
                        "version": {"type": "integer"},
                        "config": {"type": "object",
                            "description": "devices, profiles, serial_ports, cloud: what the gateway adds to its file"}
                    }},
                "reported": {"type": ["object", "null"],
                    "description": "the gateway's retained report: fingerprint, software, boot_id, running sections (credentials left out), remote {enabled, version, state: none|applied|refused|rolled_back, problems, at_ms}"},
                "in_sync": {"type": "boolean",
                    "description": "the gateway reports the desired version applied"}
            }},
        "Gateway": {"type": "object",
            "required": ["id", "online", "boot_id", "software", "last_seen_ms", "store_id",
                "store_error", "devices"],
            "properties": {
                "id": {"type": "string"},
                "online": {"type": "boolean"},
                "boot_id": {"type": "string", "description": "changes at every gatewayd start"},
                "software": {"type": "string"},
                "last_seen_ms": ms,
                "store_id": {"type": "string"},
                "store_error": {"type": ["string", "null"],
                    "description": "set while the gateway cannot commit; it gets no messages"},
                "devices": {"type": "array", "items": {"type": "string"}}
            }},
        "ParamSpec": {"type": "object", "required": ["type", "required"], "properties": {
            "type": {"type": "string",
                "enum": ["number", "integer", "string", "bool", "object", "array", "any"]},
            "required": {"type": "boolean"},
            "min": {"type": "number"},
            "max": {"type": "number"}
        }},
        "Method": {"type": "object", "required": ["name", "params"], "properties": {
            "name": {"type": "string"},
            "params": {"type": "object", "additionalProperties": schema("ParamSpec")}
        }},
        "Device": {"type": "object",
            "required": ["id", "gateway", "kind", "online", "gateway_online", "device_online",
                "offline_reason", "methods", "twin_properties", "commands", "last_seen_ms"],
            "properties": {
                "id": {"type": "string"},
                "gateway": {"type": "string"},
                "kind": {"type": "string"},
                "online": {"type": "boolean", "description": "gateway and device online"},
                "gateway_online": {"type": "boolean"},
                "device_online": {"type": "boolean"},
                "offline_reason": {"type": ["string", "null"]},
                "methods": {"type": "array", "items": schema("Method")},
                "twin_properties": {"type": "array", "items": {"type": "string"}},
                "commands": {"type": "array", "items": {"type": "string"}},
                "last_seen_ms": ms
            }},
        "Invoke": {"type": "object", "properties": {
            "params": {"description": "as the method declares them"},
            "timeout_seconds": {"type": "number", "minimum": 1, "maximum": 300, "default": 30}
        }},
        "RpcResult": {"type": "object", "required": ["status", "result"], "properties": {
            "status": {"type": "integer", "description": "the device's own status"},
            "result": {}
        }},
        "ApplyStatus": {"type": "object", "required": ["state", "desired_version", "at_ms"],
            "properties": {
                "state": {"type": "string", "enum": ["applied", "different", "refused", "pending"]},
                "desired_version": {"type": "integer", "minimum": 0},
                "reason": {"type": "string"},
                "at_ms": ms,
                "attempts": {"type": "integer", "minimum": 0}
            }},
        "Twin": {"type": "object",
            "required": ["device", "desired", "desired_version", "reported", "reported_version",
                "delta", "desired_updated_ms", "reported_updated_ms", "apply"],
            "properties": {
                "device": {"type": "string"},
                "desired": {"type": "object"},
                "desired_version": {"type": "integer", "minimum": 0},
                "reported": {"type": "object"},
                "reported_version": {"type": "integer", "minimum": 0},
                "delta": {"type": "array", "items": {"type": "string"},
                    "description": "desired properties whose reported value differs or is missing"},
                "desired_updated_ms": {"type": "object", "additionalProperties": ms},
                "reported_updated_ms": {"type": "object", "additionalProperties": ms},
                "apply": {"type": "object", "additionalProperties": schema("ApplyStatus")}
            }},
        "Patched": {"type": "object", "required": ["desired_version", "desired"], "properties": {
            "desired_version": {"type": "integer", "minimum": 0},
            "desired": {"type": "object"}
        }},
        "MessageStatus": {"type": "string", "enum": ["queued", "delivered", "completed",
            "rejected", "expired", "failed", "may_have_run", "purged"]},
        "Send": {"type": "object", "required": ["payload"], "properties": {
            "payload": {"description": "any JSON value but null, e.g. {\"command\": \"RESTART\"}"},
            "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 172800, "default": 3600}
        }},
        "Accepted": {"type": "object",
            "required": ["id", "status", "enqueued_at_ms", "expires_at_ms", "expires_at"],
            "properties": {
                "id": {"type": "string"},
                "status": {"const": "queued"},
                "enqueued_at_ms": ms,
                "expires_at_ms": ms,
                "expires_at": {"type": "string", "format": "date-time"}
            }},
        "Message": {"type": "object",
            "required": ["id", "device", "payload", "status", "reason", "device_status",
                "enqueued_at_ms", "expires_at_ms", "sent_at_ms", "delivered_at_ms",
                "finished_at_ms"],
            "properties": {
                "id": {"type": "string"},
                "device": {"type": "string"},
                "payload": {},
                "status": schema("MessageStatus"),
                "reason": {"type": ["string", "null"]},
                "device_status": {"type": ["integer", "null"]},
                "enqueued_at_ms": ms,
                "expires_at_ms": ms,
                "sent_at_ms": opt_ms,
                "delivered_at_ms": opt_ms,
                "finished_at_ms": opt_ms
            }}
    })
}
