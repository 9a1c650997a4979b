//! The OpenAPI document against the API itself: every route the router serves (the `ROUTES`
//! another test checks against the router) is documented, nothing else is, and each documented
//! route answers a running stub with a documented status and a body of the documented shape.

mod common;

use cloud_stub::security::Secret;
use cloud_stub::StubConfig;
use common::{setup, Stub, DEVICE, GW};
use gatewayd_protocol::{RpcOutcome, RpcSuccess};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// One request and the status it must get.
struct Case {
    method: Method,
    /// The documented path (template) and the concrete one.
    template: &'static str,
    path: String,
    body: Value,
    headers: Vec<(&'static str, String)>,
    status: u16,
}

fn case(method: Method, template: &'static str, path: &str, body: Value, status: u16) -> Case {
    Case {
        method,
        template,
        path: path.to_string(),
        body,
        headers: Vec::new(),
        status,
    }
}

#[tokio::test]
async fn every_route_is_documented_and_answers_as_documented() {
    let (stub, mut gateway) = setup().await;
    let spec = stub.get("/api/v1/openapi.json").await.1;
    assert_eq!(spec["openapi"], "3.1.0");

    // The document and the route list name the same operations.
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = cloud_stub::api::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, routed);

    // The simulated gateway answers every call.
    let answering = tokio::spawn(async move {
        while let Some(req) = gateway.requests.next_or_closed().await {
            let outcome = RpcOutcome::Ok(RpcSuccess {
                status: 200,
                result: json!({"battery": 87, "method": req.method}),
            });
            gateway.answer(&req, outcome).await;
        }
    });

    let (status, queued) = stub
        .send(
            DEVICE,
            json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, 202);
    let msg = format!(
        "/api/v1/devices/{DEVICE}/messages/{}",
        queued["id"].as_str().unwrap()
    );
    let dev = format!("/api/v1/devices/{DEVICE}");
    let html = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8".to_string();
    let mut cases = vec![
        case(Method::GET, "/", "/", Value::Null, 200),
        Case {
            headers: vec![("accept", html)],
            ..case(Method::GET, "/", "/", Value::Null, 200)
        },
        case(Method::GET, "/healthz", "/healthz", Value::Null, 200),
        case(
            Method::GET,
            "/console/{file}",
            "/console/app.js",
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/console/{file}",
            "/console/console.css",
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/console/{file}",
            "/console/nothing.js",
            Value::Null,
            404,
        ),
        case(
            Method::GET,
            "/api/v1/openapi.json",
            "/api/v1/openapi.json",
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/events",
            "/api/v1/events",
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/gateways",
            "/api/v1/gateways",
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/devices",
            "/api/v1/devices",
            Value::Null,
            200,
        ),
        case(
            Method::PATCH,
            "/api/v1/gateways/{id}/config",
            &format!("/api/v1/gateways/{GW}/config"),
            json!({"devices": {"agv-9": {"kind": "http", "base_url": "http://127.0.0.1:1"}}}),
            200,
        ),
        case(
            Method::PATCH,
            "/api/v1/gateways/{id}/config",
            &format!("/api/v1/gateways/{GW}/config"),
            json!({"store": {"path": "/tmp/elsewhere.db"}}),
            400,
        ),
        case(
            Method::PATCH,
            "/api/v1/gateways/{id}/config",
            "/api/v1/gateways/nobody/config",
            json!({}),
            404,
        ),
        case(
            Method::GET,
            "/api/v1/gateways/{id}/config",
            &format!("/api/v1/gateways/{GW}/config"),
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/gateways/{id}/config",
            "/api/v1/gateways/nobody/config",
            Value::Null,
            404,
        ),
        case(Method::GET, "/api/v1/devices/{id}", &dev, Value::Null, 200),
        case(
            Method::GET,
            "/api/v1/devices/{id}",
            "/api/v1/devices/nobody",
            Value::Null,
            404,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/methods/{method}",
            &format!("{dev}/methods/status"),
            json!({"timeout_seconds": 5}),
            200,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/methods/{method}",
            &format!("{dev}/methods/move"),
            json!({"params": {"x": "left"}}),
            400,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/methods/{method}",
            &format!("{dev}/methods/fly"),
            Value::Null,
            404,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/methods/{method}",
            &format!("{dev}/methods/status"),
            json!({"params": {"blob": "x".repeat(200 * 1024)}}),
            413,
        ),
        case(
            Method::GET,
            "/api/v1/devices/{id}/twin",
            &format!("{dev}/twin"),
            Value::Null,
            200,
        ),
        case(
            Method::PATCH,
            "/api/v1/devices/{id}/twin/desired",
            &format!("{dev}/twin/desired"),
            json!({"maxSpeed": 12}),
            200,
        ),
        Case {
            headers: vec![("if-match", "\"99\"".into())],
            ..case(
                Method::PATCH,
                "/api/v1/devices/{id}/twin/desired",
                &format!("{dev}/twin/desired"),
                json!({"maxSpeed": 13}),
                412,
            )
        },
        case(
            Method::PATCH,
            "/api/v1/devices/{id}/twin/desired",
            &format!("{dev}/twin/desired"),
            json!([1]),
            400,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/messages",
            &format!("{dev}/messages"),
            json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
            202,
        ),
        case(
            Method::POST,
            "/api/v1/devices/{id}/messages",
            &format!("{dev}/messages"),
            json!({"payload": 1, "ttl_seconds": 0}),
            400,
        ),
        case(
            Method::GET,
            "/api/v1/devices/{id}/messages",
            &format!("{dev}/messages"),
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/devices/{id}/messages",
            &format!("{dev}/messages?status=lost"),
            Value::Null,
            400,
        ),
        case(
            Method::GET,
            "/api/v1/devices/{id}/messages/{msg_id}",
            &msg,
            Value::Null,
            200,
        ),
        case(
            Method::GET,
            "/api/v1/devices/{id}/messages/{msg_id}",
            &format!("{dev}/messages/0123456789abcdef0123456789abcdef"),
            Value::Null,
            404,
        ),
        case(
            Method::DELETE,
            "/api/v1/devices/{id}/messages",
            &format!("{dev}/messages"),
            Value::Null,
            200,
        ),
        case(
            Method::DELETE,
            "/api/v1/devices/{id}/messages",
            "/api/v1/devices/nobody/messages",
            Value::Null,
            404,
        ),
    ];
    let mut exercised = BTreeSet::new();
    for c in cases.drain(..) {
        check(&stub, &spec, &c).await;
        exercised.insert((c.method.to_string(), c.template.to_string()));
    }
    assert_eq!(exercised, routed, "every route is exercised");

    // 401, as documented for every route but the open ones.
    let mut config = StubConfig::new(stub.broker.clone(), cloud_stub::DbLocation::Memory);
    config.client_id = "cloud-stub-locked".into();
    config.api_token = Some(Secret::new("s3cret"));
    let locked = Stub::start_with(config).await;
    for (method, template, path) in [
        (Method::GET, "/", "/"),
        (Method::GET, "/api/v1/devices", "/api/v1/devices"),
        (Method::GET, "/api/v1/events", "/api/v1/events"),
        (Method::GET, "/api/v1/openapi.json", "/api/v1/openapi.json"),
    ] {
        check(
            &locked,
            &spec,
            &case(method, template, path, Value::Null, 401),
        )
        .await;
    }
    check(
        &locked,
        &spec,
        &case(
            Method::GET,
            "/console/{file}",
            "/console/app.js",
            Value::Null,
            200,
        ),
    )
    .await;
    locked.stop().await;
    answering.abort();
    stub.stop().await;
}

/// Sends one case and checks its status and body against the document.
async fn check(stub: &Stub, spec: &Value, c: &Case) {
    let what = format!("{} {}", c.method, c.path);
    let mut req = stub
        .http
        .request(c.method.clone(), format!("{}{}", stub.api, c.path));
    if !c.body.is_null() {
        req = req.json(&c.body);
    }
    for (k, v) in &c.headers {
        req = req.header(*k, v.as_str());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    assert_eq!(status, c.status, "{what}");
    let op = &spec["paths"][c.template][c.method.as_str().to_lowercase()];
    assert!(op.is_object(), "{what}: {} not documented", c.template);
    let documented = &op["responses"][status.to_string()];
    assert!(
        documented.is_object(),
        "{what}: status {status} not documented"
    );
    let Some(content) = documented["content"].as_object() else {
        return;
    };
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_string();
    let media = content
        .get(&ctype)
        .unwrap_or_else(|| panic!("{what}: content type {ctype} not documented"));
    if ctype == "text/event-stream" {
        return; // never ends; its type is what the document promises
    }
    let text = res.text().await.unwrap();
    if ctype != "application/json" {
        assert!(!text.is_empty(), "{what}: empty {ctype}");
        return;
    }
    let body: Value = serde_json::from_str(&text).unwrap();
    let problems = conforms(spec, &media["schema"], &body, "$");
    assert!(
        problems.is_empty(),
        "{what}: body does not match the documented schema: {problems:?}\n{body}"
    );
}

/// The ways `v` departs from `schema` (the subset of JSON Schema the document uses).
fn conforms(spec: &Value, schema: &Value, v: &Value, at: &str) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &spec["components"]["schemas"][name];
        assert!(target.is_object(), "dangling $ref {r}");
        return conforms(spec, target, v, at);
    }
    let mut out = Vec::new();
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| is_type(v, t)) {
        out.push(format!("{at}: {v} is not {types:?}"));
        return out;
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            out.push(format!("{at}: {v} is not {c}"));
        }
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            out.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64()) {
        if n < min {
            out.push(format!("{at}: {n} below {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            if !obj.contains_key(key) {
                out.push(format!("{at}: lacks {key}"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, val) in obj {
            let sub = format!("{at}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => out.extend(conforms(spec, s, val, &sub)),
                None => {
                    if schema["additionalProperties"].is_object() {
                        out.extend(conforms(spec, &schema["additionalProperties"], val, &sub));
                    }
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            out.extend(conforms(spec, items, item, &format!("{at}[{i}]")));
        }
    }
    out
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => panic!("unknown type {t}"),
    }
}

#[test]
fn the_checker_catches_a_wrong_shape() {
    let spec = json!({"components": {"schemas": {"A": {"type": "object", "required": ["n"],
        "properties": {"n": {"type": "integer", "minimum": 0}, "s": {"type": ["string", "null"]}}}}}});
    let a = json!({"$ref": "#/components/schemas/A"});
    assert!(conforms(&spec, &a, &json!({"n": 1, "s": null}), "$").is_empty());
    assert_eq!(conforms(&spec, &a, &json!({"s": "x"}), "$").len(), 1);
    assert_eq!(conforms(&spec, &a, &json!({"n": -1}), "$").len(), 1);
    assert_eq!(conforms(&spec, &a, &json!({"n": "1"}), "$").len(), 1);
    assert_eq!(
        conforms(
            &spec,
            &json!({"type": "array", "items": a}),
            &json!([{}]),
            "$"
        )
        .len(),
        1
    );
}
