//! The console's server side in-process: the event stream (`GET /api/v1/events`) carries
//! gateway, device, twin, message and RPC changes as they happen and ends at shutdown; the page
//! shell and its files are served to browsers, without the token, and nothing else is.

mod common;

use cloud_stub::security::Secret;
use cloud_stub::StubConfig;
use common::{setup, FakeGateway, Stub, DEVICE, GW, WAIT};
use gatewayd_protocol::Up;
use serde_json::{json, Value};

/// A subscriber to the event stream, parsing it as a browser would.
struct Events {
    res: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(stub: &Stub, token: Option<&str>) -> Events {
        let mut req = stub.http.get(format!("{}/api/v1/events", stub.api));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut events = Events {
            res,
            buffer: String::new(),
        };
        let (name, data) = events.next().await;
        assert_eq!(name, "ready");
        assert_eq!(
            data["kinds"],
            json!([
                "gateway",
                "device",
                "twin",
                "message",
                "rpc",
                "gateway_config"
            ])
        );
        events
    }

    /// The next event: (name, data).
    async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut name = String::from("message");
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            name = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if data.is_empty() {
                        continue; // a keep-alive comment
                    }
                    return (name, serde_json::from_str(&data).unwrap());
                }
                let chunk = self.res.chunk().await.unwrap().expect("stream open");
                self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("an event within 5 s")
    }

    /// Skips events until one named `name` matches `pred`.
    async fn until(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let (n, data) = self.next().await;
            if n == name && pred(&data) {
                return data;
            }
        }
    }
}

#[tokio::test]
async fn changes_arrive_as_events() {
    let stub = Stub::start().await;
    let mut events = Events::open(&stub, None).await;
    let mut gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;

    let g = events.until("gateway", |d| d["online"] == true).await;
    assert_eq!(g["gateway"], GW);
    let d = events.until("device", |d| d["device"] == DEVICE).await;
    assert_eq!(
        d,
        json!({"device": DEVICE, "gateway": GW, "online": true, "reason": null})
    );
    stub.wait_device(DEVICE, |d| d["online"] == true).await;

    // The device goes offline, with its reason.
    let presence = json!({"v": 1, "devices": {DEVICE: {"online": false, "since_ms": 2,
        "reason": "connection refused"}}});
    gateway.publish(Up::Devices, presence, true).await;
    let d = events.until("device", |d| d["online"] == false).await;
    assert_eq!(d["reason"], "connection refused");
    let presence = json!({"v": 1, "devices": {DEVICE: {"online": true, "since_ms": 3}}});
    gateway.publish(Up::Devices, presence, true).await;
    events.until("device", |d| d["online"] == true).await;

    // Twin: desired, then reported.
    let a = stub
        .patch_desired(DEVICE, json!({"maxSpeed": 30}), None)
        .await;
    assert_eq!(a.status, 200);
    let t = events.until("twin", |_| true).await;
    assert_eq!(
        t,
        json!({"device": DEVICE, "half": "desired", "desired_version": 1, "reported_version": 0})
    );
    let reported = json!({"v": 1, "device": DEVICE, "seq": 1, "patch": {"maxSpeed": 20},
        "apply": {"maxSpeed": {"state": "different", "desired_version": 1, "at_ms": 5}}});
    gateway.publish(Up::TwinReported, reported, false).await;
    let t = events.until("twin", |_| true).await;
    assert_eq!(t["half"], "reported");
    assert_eq!(t["reported_version"], 1);

    // A message: queued, sent, delivered, completed.
    let (status, queued) = stub
        .send(
            DEVICE,
            json!({"payload": {"command": "RESTART"}, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, 202);
    let id = queued["id"].as_str().unwrap().to_string();
    let mine = |d: &Value| d["id"] == id.as_str() && d["device"] == DEVICE;
    events
        .until("message", |d| mine(d) && d["status"] == "queued")
        .await;
    events
        .until("message", |d| mine(d) && d["status"] == "sent")
        .await;
    let m = gateway.messages.next().await;
    assert_eq!(m.id.as_str(), id);
    gateway.feedback(DEVICE, &id, "received", json!({})).await;
    events
        .until("message", |d| mine(d) && d["status"] == "delivered")
        .await;
    gateway.feedback(DEVICE, &id, "completed", json!({})).await;
    events
        .until("message", |d| mine(d) && d["status"] == "completed")
        .await;

    // RPC: a refused call and an answered one.
    let (status, _) = stub.call(DEVICE, "move", json!({"params": {}})).await;
    assert_eq!(status, 400);
    let r = events.until("rpc", |_| true).await;
    assert_eq!(r["outcome"], "invalid_params");
    assert_eq!(r["method"], "move");
    let call = {
        let stub_api = stub.api.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{stub_api}/api/v1/devices/{DEVICE}/methods/status"))
                .json(&json!({"timeout_seconds": 5}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let req = gateway.next_request().await;
    gateway
        .answer(
            &req,
            gatewayd_protocol::RpcOutcome::Ok(gatewayd_protocol::RpcSuccess {
                status: 200,
                result: json!(1),
            }),
        )
        .await;
    assert_eq!(call.await.unwrap(), 200);
    let r = events.until("rpc", |_| true).await;
    assert_eq!(r["outcome"], "ok");
    assert!(r["ms"].as_u64().is_some());

    // The gateway goes offline.
    gateway.set_online(false).await;
    events.until("gateway", |d| d["online"] == false).await;

    // An open stream does not hold up shutdown; it ends.
    stub.stop().await;
}

#[tokio::test]
async fn browsers_get_the_console_and_scripts_the_index() {
    let (stub, _gateway) = setup().await;
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let res = stub
        .http
        .get(format!("{}/", stub.api))
        .header("accept", browser)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["vary"], "Accept");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let page = res.text().await.unwrap();
    assert!(page.contains("/console/app.js"));
    assert!(!page.contains(DEVICE), "the shell holds no data");

    // curl and scripts keep the JSON index.
    for accept in [None, Some("*/*"), Some("application/json")] {
        let mut req = stub.http.get(format!("{}/", stub.api));
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.headers()["content-type"], "application/json");
        let index: Value = res.json().await.unwrap();
        assert!(index["routes"].is_array(), "{accept:?}");
    }

    // Files with their types, revalidated by ETag.
    for (file, ctype) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("views.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let url = format!("{}/console/{file}", stub.api);
        let res = stub.http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200, "{file}");
        assert_eq!(res.headers()["content-type"], ctype, "{file}");
        assert_eq!(res.headers()["cache-control"], "no-cache", "{file}");
        assert_eq!(res.headers()["x-content-type-options"], "nosniff");
        let etag = res.headers()["etag"].clone();
        let again = stub
            .http
            .get(&url)
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{file}");
    }
    let res = stub
        .http
        .get(format!("{}/console/../Cargo.toml", stub.api))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    stub.stop().await;
}

#[tokio::test]
async fn with_a_token_only_the_page_shell_is_open() {
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    config.api_token = Some(Secret::new("s3cret"));
    let stub = Stub::start_with(config).await;
    let browser = "text/html,*/*;q=0.8";
    let get = |path: &str, accept: &str, token: Option<&str>| {
        let mut req = stub
            .http
            .get(format!("{}{path}", stub.api))
            .header("accept", accept);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(get("/", browser, None).await.unwrap().status(), 200);
    assert_eq!(
        get("/console/app.js", "*/*", None).await.unwrap().status(),
        200
    );
    assert_eq!(get("/", "*/*", None).await.unwrap().status(), 401);
    for path in ["/api/v1/devices", "/api/v1/events", "/api/v1/openapi.json"] {
        let res = get(path, browser, None).await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
        let res = get(path, browser, Some("wrong")).await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let mut events = Events::open(&stub, Some("s3cret")).await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    gateway.announce().await;
    events.until("gateway", |d| d["online"] == true).await;
    stub.stop().await;
}

/// A subscriber that falls behind is told how many events it missed, and the stub goes on.
#[tokio::test]
async fn a_lagging_subscriber_is_told_and_does_not_hold_up_the_stub() {
    let broker = common::broker().await;
    let mut config = StubConfig::new(broker, cloud_stub::DbLocation::Memory);
    config.event_capacity = 4;
    let stub = Stub::start_with(config).await;
    let mut events = Events::open(&stub, None).await;
    let gateway = FakeGateway::connect(&stub.broker).await;
    let devices: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    // One presence snapshot brings 100 devices online: 100 events in one go, more than the
    // subscriber's 4.
    gateway.announce_devices(&names).await;
    let lagged = events.until("lagged", |_| true).await;
    assert!(lagged["missed"].as_u64().unwrap() > 0, "{lagged}");
    stub.wait_device("d99", |d| d["online"] == true).await;
    // The stream goes on after the gap.
    stub.patch_desired("d0", json!({"x": 1}), None).await;
    events.until("twin", |d| d["device"] == "d0").await;
    stub.stop().await;
}
