//! The operator API's bearer token: with one configured, every request but `GET /healthz`
//! must carry `Authorization: Bearer <token>`, or gets 401 `unauthorized` before any routing.
//! The console's static shell (`GET /` for a browser, `/console/...`) holds no data and loads
//! without it; the page then asks for the token and sends it with every data request.

use super::ApiError;
use crate::security::Secret;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gatewayd_protocol::ErrorCode;
use std::sync::Arc;

/// Middleware: lets the request through when no token is configured, for `/healthz`, or when
/// the bearer token matches (compared in constant time).
pub async fn require_token(
    State(token): State<Option<Arc<Secret>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    if open(&req) || presented(&req).is_some_and(|t| token.matches(t)) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        ErrorCode::Unauthorized,
        "missing or invalid bearer token (Authorization: Bearer <token>)",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Routes that need no token: liveness and the console's static files.
fn open(req: &Request) -> bool {
    let path = req.uri().path();
    path == "/healthz"
        || path.starts_with("/console/")
        || (path == "/" && super::console::wants_html(req.headers()))
}

/// The token of an `Authorization: Bearer <token>` header.
fn presented(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
