//! The device API of one simulated AGV, wrapped in the fault injection layer (`inject`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::ConfigError;
use super::device::{Device, MoveError};
use super::inject::inject_faults;

/// What every handler of one device API sees.
#[derive(Clone)]
pub(crate) struct Api {
    pub device: Arc<Device>,
    /// Cancelled when this listener generation goes away (offline fault or shutdown).
    pub conns: CancellationToken,
}

/// The device API router for one listener generation; `conns` ends its waiting requests.
pub(crate) fn router(device: Arc<Device>, conns: CancellationToken) -> Router {
    let api = Api { device, conns };
    Router::new()
        .route("/health", get(health))
        .route("/api/status", get(status))
        .route("/api/config", get(get_config).put(put_config))
        .route("/api/config/{key}", get(get_setting).put(put_setting))
        .route("/api/move", post(move_to))
        .route("/api/restart", post(restart))
        .route("/api/commands", post(commands))
        .route("/api/echo", any(echo))
        // Any path below /api/echo too: the echo shows the raw path exactly as it arrived.
        .route("/api/echo/{*rest}", any(echo))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(api.clone(), inject_faults))
        .with_state(api)
}

/// An error answer: `{"error": message}` with a status.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ConfigError> for ApiError {
    fn from(err: ConfigError) -> Self {
        ApiError(StatusCode::BAD_REQUEST, err.to_string())
    }
}

impl From<MoveError> for ApiError {
    fn from(err: MoveError) -> Self {
        let status = match err {
            MoveError::TooFast { .. } | MoveError::TooSlow(_) => StatusCode::UNPROCESSABLE_ENTITY,
            MoveError::NotAnObject | MoveError::NotANumber(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, err.to_string())
    }
}

/// Parses a request body as JSON; an empty body is `null`.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn health() -> Json<Value> {
    Json(json!({ "ok": true }))
}

async fn status(State(api): State<Api>) -> Json<Value> {
    Json(api.device.state().status(&api.device.name, Instant::now()))
}

async fn get_config(State(api): State<Api>) -> Json<Value> {
    Json(api.device.state().config.to_json())
}

async fn put_config(State(api): State<Api>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let patch = parse_json(&body)?;
    let mut state = api.device.state();
    state.config.merge(&patch, api.device.limit)?;
    Ok(Json(state.config.to_json()))
}

async fn get_setting(
    State(api): State<Api>,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let value = api
        .device
        .state()
        .config
        .get(&key)
        .map_err(not_found_setting)?;
    Ok(Json(json!({ "value": value })))
}

async fn put_setting(
    State(api): State<Api>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = parse_json(&body)?;
    let value = body
        .as_object()
        .and_then(|o| o.get("value"))
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "body must be {\"value\": ...}".into(),
            )
        })?;
    let mut state = api.device.state();
    let stored = state
        .config
        .set(&key, value, api.device.limit)
        .map_err(not_found_setting)?;
    Ok(Json(json!({ "value": stored })))
}

/// An unknown key in the path is a missing resource; a bad value is a bad request.
fn not_found_setting(err: ConfigError) -> ApiError {
    match err {
        ConfigError::UnknownSetting(_) => ApiError(StatusCode::NOT_FOUND, err.to_string()),
        other => other.into(),
    }
}

async fn move_to(State(api): State<Api>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let body = parse_json(&body)?;
    let eta_s = api.device.state().start_move(&body, Instant::now())?;
    Ok(Json(json!({ "accepted": true, "eta_s": eta_s })))
}

async fn restart(State(api): State<Api>) -> (StatusCode, Json<Value>) {
    api.device.state().restart(Instant::now());
    (StatusCode::ACCEPTED, Json(json!({ "restarting": true })))
}

async fn commands(body: Bytes) -> Result<Json<Value>, ApiError> {
    parse_json(&body)?;
    Ok(Json(json!({ "executed": true })))
}

/// Mirrors the request back so tests can check templating and auth headers.
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Json<Value> {
    Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query().unwrap_or(""),
        "headers": echo_headers(&headers),
        "body": echo_body(&body),
    }))
}

fn echo_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in headers {
        if name == header::HOST || name == header::CONTENT_LENGTH {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(name.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                out.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    out
}

fn echo_body(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

async fn not_found(uri: Uri) -> ApiError {
    no_route(uri.path())
}

/// The answer for a path the device does not serve.
pub(crate) fn no_route(path: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no route for {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_body_is_json_text_or_null() {
        assert_eq!(echo_body(b""), Value::Null);
        assert_eq!(echo_body(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(echo_body(b"plain text"), json!("plain text"));
    }

    #[test]
    fn echo_headers_skip_host_and_join_repeats() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:1".parse().unwrap());
        headers.insert(header::CONTENT_LENGTH, "2".parse().unwrap());
        headers.append("x-tag", "a".parse().unwrap());
        headers.append("x-tag", "b".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        assert_eq!(
            Value::Object(echo_headers(&headers)),
            json!({"x-tag": "a, b", "authorization": "Bearer t"})
        );
    }
}
