//! Runs a real fleet in-process on 127.0.0.1:0 and drives it over HTTP.

mod common;

use std::time::Duration;

use common::fleet::{json_of, Fleet, GUARD};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn control_lists_devices_and_rejects_unknown_names() {
    let fleet = Fleet::start(&["agv-1", "agv-2"]).await;
    let list: Value = fleet
        .http
        .get(format!("{}/_control/devices", fleet.control))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list,
        json!([{"name": "agv-1", "api": fleet.apis[0].0}, {"name": "agv-2", "api": fleet.apis[1].0}])
    );
    let (status, body) = json_of(
        fleet
            .http
            .get(format!("{}/_control/devices/nope", fleet.control))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"error": "no device named 'nope'"}));

    let (status, body) = json_of(
        fleet
            .http
            .get(fleet.api("/api/status"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "agv-1");
    assert_eq!(body["state"], "idle");
    fleet.stop().await;
}

#[tokio::test]
async fn config_is_validated_and_clamped() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let (status, body) = json_of(
        fleet
            .http
            .get(fleet.api("/api/config"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"maxSpeed": 10.0, "mode": "auto", "led": false})
    );

    let put = |body: Value| fleet.http.put(fleet.api("/api/config")).json(&body).send();
    let (status, body) = json_of(put(json!({"maxSpeed": 30, "led": true})).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"maxSpeed": 20.0, "mode": "auto", "led": true}));

    let (status, body) = json_of(put(json!({"colour": "red"})).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, json!({"error": "unknown setting 'colour'"}));
    let (status, _) = json_of(put(json!({"mode": "turbo"})).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = json_of(
        fleet
            .http
            .put(fleet.api("/api/config/mode"))
            .json(&json!({"value": "manual"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"value": "manual"})));
    let (status, body) = json_of(
        fleet
            .http
            .get(fleet.api("/api/config/maxSpeed"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"value": 20.0})));
    let (status, _) = json_of(
        fleet
            .http
            .get(fleet.api("/api/config/colour"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(fleet.inspect("agv-1").await["config"]["mode"], "manual");
    fleet.stop().await;
}

#[tokio::test]
async fn moves_above_max_speed_are_refused() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let mv = |body: Value| fleet.http.post(fleet.api("/api/move")).json(&body).send();
    fleet
        .http
        .put(fleet.api("/api/config"))
        .json(&json!({"maxSpeed": 20}))
        .send()
        .await
        .unwrap();

    let (status, body) = json_of(mv(json!({"x": 3, "y": 4, "speed": 30})).await.unwrap()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body, json!({"error": "speed 30 above maxSpeed 20"}));

    let (status, _) = json_of(mv(json!({"x": 3})).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = json_of(mv(json!({"x": 30, "y": 40, "speed": 10})).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"accepted": true, "eta_s": 5.0}));
    let status: Value = fleet
        .http
        .get(fleet.api("/api/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["position"], json!({"x": 30.0, "y": 40.0}));
    assert_eq!(status["state"], "moving");

    let resp = fleet
        .http
        .post(fleet.api("/api/restart"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let seen = fleet.inspect("agv-1").await;
    assert_eq!(seen["restarts"], 1);
    assert_eq!(seen["requests"]["/api/move"], 3);
    fleet.stop().await;
}

#[tokio::test]
async fn echo_returns_query_headers_and_body() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let (status, body) = json_of(
        fleet
            .http
            .post(fleet.api("/api/echo?a=1&b=x%20y"))
            .header("Authorization", "Bearer s3cret")
            .header("X-Custom", "v")
            .json(&json!({"speed": 5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/api/echo");
    assert_eq!(body["query"], "a=1&b=x%20y");
    assert_eq!(body["headers"]["authorization"], "Bearer s3cret");
    assert_eq!(body["headers"]["x-custom"], "v");
    assert_eq!(body["headers"]["content-type"], "application/json");
    assert!(body["headers"].get("host").is_none());
    assert!(body["headers"].get("content-length").is_none());
    assert_eq!(body["body"], json!({"speed": 5}));

    let (_, body) = json_of(fleet.http.get(fleet.api("/api/echo")).send().await.unwrap()).await;
    assert_eq!(
        (&body["method"], &body["query"], &body["body"]),
        (&json!("GET"), &json!(""), &Value::Null)
    );
    let (_, body) = json_of(
        fleet
            .http
            .post(fleet.api("/api/echo"))
            .body("hello")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["body"], "hello");
    fleet.stop().await;
}

#[tokio::test]
async fn error_status_and_garbage_faults_apply_to_everything() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let faults = fleet.faults("agv-1", json!({"error_status": 503})).await;
    for (key, value) in [
        ("latency_ms", json!(0)),
        ("error_status", json!(503)),
        ("hang", json!(false)),
        ("offline", json!(false)),
        ("garbage", json!(false)),
    ] {
        assert_eq!(faults[key], value, "{key}");
    }
    for path in ["/health", "/api/status"] {
        let (status, body) = json_of(fleet.http.get(fleet.api(path)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, json!({"error": "injected fault"}));
    }
    fleet
        .faults("agv-1", json!({"error_status": null, "garbage": true}))
        .await;
    let resp = fleet.http.get(fleet.api("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = resp.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&body).is_err());

    let resp = fleet
        .http
        .post(format!("{}/_control/devices/agv-1/reset", fleet.control))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = json_of(fleet.http.get(fleet.api("/health")).send().await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"ok": true})));

    let resp = fleet
        .http
        .post(format!("{}/_control/devices/agv-1/faults", fleet.control))
        .json(&json!({"smoke": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    fleet.stop().await;
}

#[tokio::test]
async fn latency_fault_delays_answers() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet.faults("agv-1", json!({"latency_ms": 150})).await;
    let started = std::time::Instant::now();
    let resp = fleet.http.get(fleet.api("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    fleet.stop().await;
}

#[tokio::test]
async fn offline_refuses_connections_and_comes_back_on_the_same_port() {
    let fleet = Fleet::start(&["agv-1", "agv-2"]).await;
    let addr = fleet.apis[0].1;

    // A keep-alive connection opened while online is cut when the device goes offline.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: device\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let faults = fleet.faults("agv-1", json!({"offline": true})).await;
    assert_eq!(faults["offline"], true);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = fleet
        .http
        .get(fleet.api("/health"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    let closed = tokio::time::timeout(GUARD, kept.read(&mut buf))
        .await
        .expect("open connection is cut");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // The other device is unaffected, and nothing counted so far is lost.
    let resp = fleet
        .http
        .get(format!("{}/health", fleet.apis[1].0))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(fleet.inspect("agv-1").await["requests"]["/health"], 1);

    fleet.faults("agv-1", json!({"offline": false})).await;
    let (status, body) = json_of(fleet.http.get(fleet.api("/health")).send().await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"ok": true})));

    // Twice more, through reset this time.
    fleet.faults("agv-1", json!({"offline": true})).await;
    assert!(TcpStream::connect(addr).await.is_err());
    let resp = fleet
        .http
        .post(format!("{}/_control/devices/agv-1/reset", fleet.control))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["offline"], false);
    TcpStream::connect(addr).await.unwrap();
    assert_eq!(fleet.inspect("agv-1").await["requests"]["/health"], 2);
    fleet.stop().await;
}

#[tokio::test]
async fn hang_fault_never_answers_until_cleared() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet.faults("agv-1", json!({"hang": true})).await;
    let err = fleet
        .http
        .get(fleet.api("/health"))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The hung request still arrived.
    assert_eq!(fleet.inspect("agv-1").await["requests"]["/health"], 1);

    // A request hanging when the fault is cleared is answered.
    let pending = tokio::spawn(fleet.http.get(fleet.api("/api/status")).send());
    while fleet.inspect("agv-1").await["requests"]
        .get("/api/status")
        .is_none()
    {
        tokio::task::yield_now().await;
    }
    fleet.faults("agv-1", json!({"hang": false})).await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Shutdown is not held up by a hung request.
    fleet.faults("agv-1", json!({"hang": true})).await;
    let _hung = tokio::spawn(fleet.http.get(fleet.api("/health")).send());
    while fleet.inspect("agv-1").await["requests"]["/health"] != 2 {
        tokio::task::yield_now().await;
    }
    fleet.stop().await;
}

#[tokio::test]
async fn message_ids_are_counted_per_execution() {
    let fleet = Fleet::start(&["agv-1"]).await;
    for id in ["m-1", "m-1", "m-2"] {
        let resp = fleet
            .http
            .post(fleet.api("/api/commands"))
            .header("X-Message-Id", id)
            .json(&json!({"op": "beep"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"executed": true})
        );
    }
    let seen = fleet.inspect("agv-1").await;
    assert_eq!(seen["executions"], json!({"m-1": 2, "m-2": 1}));
    assert_eq!(seen["requests"]["/api/commands"], 3);
    fleet.stop().await;
}

#[tokio::test]
async fn a_device_may_start_offline() {
    let offline = device_fixtures::http::faults::Faults {
        offline: true,
        ..Default::default()
    };
    let fleet = Fleet::start_specs(vec![
        device_fixtures::HttpDeviceSpec::new("agv-1").with_faults(offline)
    ])
    .await;
    let addr = fleet.apis[0].1;
    assert_eq!(fleet.inspect("agv-1").await["faults"]["offline"], true);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    fleet.faults("agv-1", json!({"offline": false})).await;
    let (status, _) = json_of(fleet.http.get(fleet.api("/health")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    fleet.stop().await;
}
