//! The habits of real field devices on the simulated AGVs: busy answers, no health endpoint,
//! answers lost or mangled after acting, oversized answers, power cycles. Every test checks
//! what the device executed against what the client saw.

mod common;

use common::fleet::{exchange, json_of, request, Fleet};
use device_fixtures::http::faults::Faults;
use device_fixtures::HttpDeviceSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn command(fleet: &Fleet, id: &str) -> reqwest::Response {
    fleet
        .http
        .post(fleet.api("/api/commands"))
        .header("X-Message-Id", id)
        .json(&json!({"op": "beep"}))
        .send()
        .await
        .unwrap()
}

async fn command_result(
    http: reqwest::Client,
    url: String,
    id: &'static str,
) -> reqwest::Result<reqwest::Response> {
    http.post(url)
        .header("X-Message-Id", id)
        .json(&json!({"op": "beep"}))
        .send()
        .await
}

#[tokio::test]
async fn every_nth_request_is_busy_and_not_executed() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let faults = fleet.faults("agv-1", json!({"busy_every": 3})).await;
    assert_eq!(
        (faults["busy_every"].clone(), faults["busy_status"].clone()),
        (json!(3), json!(503))
    );
    let mut statuses = Vec::new();
    for n in 1..=6 {
        // Health probes in between neither count towards busy_every nor get busy answers.
        let health = fleet.http.get(fleet.api("/health")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let resp = command(&fleet, &format!("m-{n}")).await;
        statuses.push(resp.status().as_u16());
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(resp.headers()["retry-after"], "1");
            assert_eq!(
                resp.json::<Value>().await.unwrap(),
                json!({"error": "busy"})
            );
        }
    }
    assert_eq!(statuses, [200, 200, 503, 200, 200, 503]);
    let seen = fleet.inspect("agv-1").await;
    assert_eq!(
        seen["executions"],
        json!({"m-1": 1, "m-2": 1, "m-4": 1, "m-5": 1})
    );
    assert_eq!(seen["requests"]["/api/commands"], 6);
    assert_eq!(seen["executed"]["/api/commands"], 4);

    // Naming busy_every again starts the count again.
    fleet.faults("agv-1", json!({"busy_every": 2})).await;
    assert_eq!(command(&fleet, "n-1").await.status(), StatusCode::OK);
    assert_eq!(
        command(&fleet, "n-2").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    fleet.stop().await;
}

#[tokio::test]
async fn busy_on_demand_with_a_chosen_status() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet
        .faults("agv-1", json!({"busy": true, "busy_status": 429}))
        .await;
    for _ in 0..2 {
        let resp = fleet
            .http
            .put(fleet.api("/api/config"))
            .json(&json!({"led": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "1");
    }
    let resp = fleet.http.get(fleet.api("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    fleet.faults("agv-1", json!({"busy_status": 408})).await;
    let resp = fleet
        .http
        .get(fleet.api("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);

    let (status, body) = fleet
        .control_post("agv-1/faults", &json!({"busy_status": 200}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "fault 'busy_status' must be an HTTP status 400-599"
    );

    fleet.faults("agv-1", json!({"busy": false})).await;
    let seen = fleet.inspect("agv-1").await;
    assert_eq!(
        seen["config"]["led"], false,
        "busy requests are not acted on"
    );
    assert_eq!(seen["requests"]["/api/config"], 2);
    assert!(seen["executed"].get("/api/config").is_none(), "{seen}");
    fleet.stop().await;
}

#[tokio::test]
async fn a_device_without_health_endpoint() {
    let fleet = Fleet::start_specs(vec![
        HttpDeviceSpec::new("bare").with_faults(Faults {
            no_health: true,
            ..Faults::default()
        }),
        HttpDeviceSpec::new("agv-2"),
    ])
    .await;
    let health = |i: usize| fleet.http.get(format!("{}/health", fleet.apis[i].0)).send();
    let (status, body) = json_of(health(0).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "no route for /health"})
        )
    );
    let resp = fleet
        .http
        .get(fleet.api("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Resetting the faults goes back to the spec: still no health endpoint.
    let (status, faults) = fleet.control_post("bare/reset", &Value::Null).await;
    assert_eq!(
        (status, &faults["no_health"]),
        (StatusCode::OK, &json!(true))
    );
    assert_eq!(health(0).await.unwrap().status(), StatusCode::NOT_FOUND);

    // And at runtime, on a device that had one.
    assert_eq!(health(1).await.unwrap().status(), StatusCode::OK);
    fleet.faults("agv-2", json!({"no_health": true})).await;
    assert_eq!(health(1).await.unwrap().status(), StatusCode::NOT_FOUND);
    fleet.faults("agv-2", json!({"no_health": false})).await;
    assert_eq!(health(1).await.unwrap().status(), StatusCode::OK);
    fleet.stop().await;
}

#[tokio::test]
async fn drop_after_acting_executes_and_sends_nothing() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let addr = fleet.apis[0].1;
    fleet
        .faults("agv-1", json!({"drop_after_acting": true}))
        .await;

    let put = request(
        "PUT",
        "/api/config",
        &[("x-message-id", "d-1")],
        r#"{"maxSpeed": 15}"#,
    );
    assert_eq!(exchange(addr, &put).await, b"", "not a byte of the answer");
    let restart = request("POST", "/api/restart", &[("x-message-id", "d-2")], "");
    assert_eq!(exchange(addr, &restart).await, b"");
    let err = fleet
        .http
        .post(fleet.api("/api/commands"))
        .header("X-Message-Id", "d-3")
        .json(&json!({"op": "beep"}))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");

    let seen = fleet.inspect("agv-1").await;
    assert_eq!(seen["config"]["maxSpeed"], 15.0);
    assert_eq!(seen["restarts"], 1);
    assert_eq!(seen["executions"], json!({"d-1": 1, "d-2": 1, "d-3": 1}));
    assert_eq!(seen["executed"]["/api/commands"], 1);

    // Health is spared, so a prober still sees the device.
    let health = request("GET", "/health", &[], "");
    assert!(exchange(addr, &health)
        .await
        .starts_with(b"HTTP/1.1 200 OK\r\n"));
    fleet.stop().await;
}

#[tokio::test]
async fn malformed_status_after_acting() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let addr = fleet.apis[0].1;
    fleet
        .faults("agv-1", json!({"malformed_status": true}))
        .await;
    let mv = request(
        "POST",
        "/api/move",
        &[("x-message-id", "mv-1")],
        r#"{"x": 3, "y": 4}"#,
    );
    assert_eq!(exchange(addr, &mv).await, b"HTTP/1.1 2OO OK\r\n\r\n");
    let err = fleet
        .http
        .get(fleet.api("/api/status"))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");

    fleet
        .faults("agv-1", json!({"malformed_status": false}))
        .await;
    let (_, status) = json_of(
        fleet
            .http
            .get(fleet.api("/api/status"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status["position"],
        json!({"x": 3.0, "y": 4.0}),
        "the move was made"
    );
    let seen = fleet.inspect("agv-1").await;
    assert_eq!(seen["executions"], json!({"mv-1": 1}));
    assert_eq!(seen["executed"]["/api/status"], 2);
    fleet.stop().await;
}

#[tokio::test]
async fn huge_header_after_acting() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet.faults("agv-1", json!({"huge_header": true})).await;
    let put = request("PUT", "/api/config/led", &[], r#"{"value": true}"#);
    let answer = exchange(fleet.apis[0].1, &put).await;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(head_end > 1 << 20, "head of {head_end} bytes");
    let head = String::from_utf8_lossy(&answer[..head_end]);
    let padding = head
        .lines()
        .find_map(|l| l.strip_prefix("x-padding: "))
        .expect("padding header");
    assert_eq!(padding.len(), 1 << 20);
    assert_eq!(&answer[head_end + 4..], br#"{"value":true}"#);
    assert_eq!(fleet.inspect("agv-1").await["config"]["led"], true);
    fleet.stop().await;
}

#[tokio::test]
async fn huge_body_is_streamed_in_chunks() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet.faults("agv-1", json!({"huge_body_mb": 3})).await;
    let mut resp = fleet
        .http
        .get(fleet.api("/api/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert!(resp.headers().get("content-length").is_none());
    let (mut total, mut chunks, mut first, mut last) = (0usize, 0usize, None, 0u8);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        first.get_or_insert(chunk[0]);
        last = chunk[chunk.len() - 1];
        assert!(chunk.iter().all(|&b| b == b'x' || b == b'"'));
        total += chunk.len();
        chunks += 1;
    }
    assert_eq!(total, 3 << 20);
    assert!(chunks > 1, "{chunks} chunks");
    assert_eq!((first, last), (Some(b'"'), b'"'), "a JSON string");
    // Health keeps its small answer.
    let (_, body) = json_of(fleet.http.get(fleet.api("/health")).send().await.unwrap()).await;
    assert_eq!(body, json!({"ok": true}));
    fleet.stop().await;
}

#[tokio::test]
async fn reset_power_cycles_the_device() {
    let fleet = Fleet::start(&["agv-1"]).await;
    let initial = fleet.inspect("agv-1").await["config"].clone();
    let changed = json!({"maxSpeed": 15.0, "mode": "manual", "led": true});
    let put = |body: Value| fleet.http.put(fleet.api("/api/config")).json(&body).send();
    put(changed.clone()).await.unwrap();
    fleet
        .http
        .post(fleet.api("/api/move"))
        .json(&json!({"x": 6, "y": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(fleet.inspect("agv-1").await["config"], changed);

    let faults = fleet
        .faults("agv-1", json!({"reset": true, "latency_ms": 1}))
        .await;
    assert!(
        faults.get("reset").is_none(),
        "an action, not a fault: {faults}"
    );
    assert_eq!(faults["latency_ms"], 1);
    assert_eq!(fleet.inspect("agv-1").await["config"], initial);
    let (_, status) = json_of(
        fleet
            .http
            .get(fleet.api("/api/status"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status["position"], json!({"x": 0.0, "y": 0.0}));
    assert_eq!(status["state"], "idle");

    // The same through its own endpoint, which answers the device view.
    put(changed.clone()).await.unwrap();
    let (code, view) = fleet.control_post("agv-1/power-cycle", &Value::Null).await;
    assert_eq!((code, &view["config"]), (StatusCode::OK, &initial));
    assert_eq!(
        view["executed"]["/api/config"], 2,
        "counters survive: {view}"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn refused_and_cut_requests_are_not_executions() {
    let fleet = Fleet::start(&["agv-1"]).await;
    fleet.faults("agv-1", json!({"error_status": 500})).await;
    assert_eq!(
        command(&fleet, "e-1").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    fleet
        .faults("agv-1", json!({"error_status": null, "garbage": true}))
        .await;
    assert_eq!(command(&fleet, "e-2").await.status(), StatusCode::OK);
    fleet.faults("agv-1", json!({"garbage": false})).await;
    assert_eq!(command(&fleet, "e-3").await.status(), StatusCode::OK);

    // A request hanging when the device goes offline is never acted on.
    fleet.faults("agv-1", json!({"hang": true})).await;
    let hung = tokio::spawn(command_result(
        fleet.http.clone(),
        fleet.api("/api/commands"),
        "h-1",
    ));
    while fleet.inspect("agv-1").await["requests"]["/api/commands"] != 4 {
        tokio::task::yield_now().await;
    }
    fleet.faults("agv-1", json!({"offline": true})).await;
    assert!(hung.await.unwrap().is_err());
    fleet
        .faults("agv-1", json!({"offline": false, "hang": false}))
        .await;

    let seen = fleet.inspect("agv-1").await;
    assert_eq!(seen["executions"], json!({"e-3": 1}));
    assert_eq!(seen["requests"]["/api/commands"], 4);
    fleet.stop().await;
}
