//! The operator console: a static page shell and its assets (`cloud-stub/console/`), embedded
//! in the binary. The shell holds no data and loads without the bearer token; the page then
//! reads everything through the operator API and `GET /api/v1/events`, with the token.
//!
//! `GET /` answers the shell when the request's `Accept` prefers `text/html` over JSON (a
//! browser), and the JSON route index otherwise (curl's `*/*`, scripts).

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::hash::{Hash, Hasher};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const SHELL: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("../../console/index.html"),
};

/// The files under `/console/`.
const ASSETS: &[Asset] = &[
    SHELL,
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../console/console.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/api.js"),
    },
    Asset {
        name: "views.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/views.js"),
    },
    Asset {
        name: "gateway.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../console/gateway.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../../console/favicon.svg"),
    },
];

/// Scripts and styles from this origin only; data from this origin only.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Whether the request's `Accept` header ranks `text/html` above JSON: listed explicitly
/// (not only through `*/*`) with a quality above zero and at least that of
/// `application/json`.
pub fn wants_html(headers: &HeaderMap) -> bool {
    let Some(accept) = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut html: Option<f32> = None;
    let mut json: Option<f32> = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "text/html" | "application/xhtml+xml" => html = Some(html.map_or(q, |h| h.max(q))),
            "application/json" => json = Some(json.map_or(q, |j| j.max(q))),
            _ => {}
        }
    }
    html.is_some_and(|h| h > 0.0 && h >= json.unwrap_or(0.0))
}

/// The page shell, as `GET /` answers it to a browser.
pub fn shell() -> Response {
    serve(&SHELL, None)
}

/// `GET /console/{file}`.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => serve(a, headers.get(IF_NONE_MATCH)),
        None => (
            StatusCode::NOT_FOUND,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no console file {file}"),
        )
            .into_response(),
    }
}

/// Serves a file with its type, an `ETag` of its content and `no-cache` (the browser asks
/// again each time and gets `304` while the binary is the same).
fn serve(a: &Asset, if_none_match: Option<&HeaderValue>) -> Response {
    let etag = etag(a);
    let headers = [
        (CONTENT_TYPE, HeaderValue::from_static(a.content_type)),
        (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (
            ETAG,
            HeaderValue::from_str(&etag).expect("hex digits are a valid header"),
        ),
    ];
    let fresh = if_none_match
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, a.body).into_response()
}

fn etag(a: &Asset) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.body.hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::ACCEPT;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn browsers_get_the_console_and_scripts_the_index() {
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,\
                      image/webp,*/*;q=0.8";
        let firefox = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(wants_html(&accept(chrome)));
        assert!(wants_html(&accept(firefox)));
        assert!(!wants_html(&accept("*/*")));
        assert!(!wants_html(&HeaderMap::new()));
        assert!(!wants_html(&accept("application/json")));
        assert!(!wants_html(&accept("application/json, text/html;q=0.5")));
        assert!(!wants_html(&accept("text/html;q=0")));
    }

    #[test]
    fn every_asset_has_a_type_and_a_stable_tag() {
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            assert_eq!(etag(a), etag(a));
        }
        let tag = etag(&ASSETS[1]);
        let resp = serve(&ASSETS[1], Some(&HeaderValue::from_str(&tag).unwrap()));
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    }
}
