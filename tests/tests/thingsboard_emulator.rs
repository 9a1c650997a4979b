//! The ThingsBoard emulator (`tb-emulator`) checked twice: against ThingsBoard's official
//! Python gateway client (tb-mqtt-client, an implementation nobody here wrote), and with
//! rumqttc for the cases a well-behaved client never shows (refused tokens, answer shapes,
//! persistent RPC across a dropped session, expiry).

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use e2e::thingsboard::TbEmulator;
use rumqttc::mqttbytes::v4;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The official Python client
// ---------------------------------------------------------------------------------------------

/// The Python of the virtual environment `.ci/run` installs tb-mqtt-client into.
fn tb_client_python() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .map(|d| d.join("tb-client-venv/bin/python"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no tb-mqtt-client virtual environment above {}; run .ci/run, which installs it \
                 (python3 -m venv target/tb-client-venv && \
                 target/tb-client-venv/bin/pip install 'tb-mqtt-client==1.13.14')",
                exe.display()
            )
        })
}

/// `tests/py/tb_gateway_check.py` running, its stdout lines as JSON events.
struct PyGateway {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    log: PathBuf,
}

impl PyGateway {
    async fn start(dir: &std::path::Path, port: u16, token: &str) -> Result<PyGateway> {
        let python = tb_client_python()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/tb_gateway_check.py");
        let log = dir.join("tb-client.log");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .args(["--port", &port.to_string(), "--token", token])
            .args([
                "--device", "Sensor-1", "--type", "thermo", "--key", "target",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the tb-mqtt-client check script")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let v =
                    serde_json::from_str(&line).unwrap_or(json!({"event": "raw", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Ok(PyGateway {
            child,
            stdin,
            lines,
            log,
        })
    }

    async fn command(&mut self, command: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next event named `name`; an `error` event or the script's end fails.
    async fn next(&mut self, name: &str) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "no {name} event from the script within {WAIT:?}; see {}",
                        self.log.display()
                    )
                })?
                .ok_or_else(|| {
                    anyhow!("the script ended before {name}; see {}", self.log.display())
                })?;
            match line["event"].as_str() {
                Some(n) if n == name => return Ok(line),
                Some("error") => bail!("the script reported {line}; see {}", self.log.display()),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_gateway_client_agrees_with_the_emulator() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "gw-token")]).await?;
    assert!(!emu.set_shared("Sensor-1", json!({"target": 22.5})).await?);

    let mut py = PyGateway::start(dir.path(), emu.mqtt_port(), "gw-token").await?;
    py.next("connected").await?;
    let device = emu.await_active("Sensor-1", true).await?;
    assert_eq!(
        (device["type"].clone(), device["gateway"].clone()),
        (json!("thermo"), json!("gw-1")),
        "{device}"
    );
    // The client subscribes on its own after CONNACK; wait for the gateway topics so no push
    // is dropped for want of a subscription.
    e2e::eventually("gateway subscriptions", WAIT, || async {
        let g = emu.gateways().await?;
        let subs = g[0]["subscriptions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let all = [
            "v1/gateway/attributes",
            "v1/gateway/attributes/response",
            "v1/gateway/rpc",
        ]
        .iter()
        .all(|t| subs.contains(&json!(t)));
        Ok(all.then_some(()))
    })
    .await?;

    // Client attributes, telemetry, and a shared attribute request answered with the value set
    // before the device connected (the client asks with "keys": a "values" object).
    py.command("send").await?;
    py.next("sent").await?;
    let answer = py.next("attributes_response").await?;
    assert_eq!(answer["content"]["device"], "Sensor-1", "{answer}");
    assert_eq!(
        answer["content"]["values"],
        json!({"target": 22.5}),
        "{answer}"
    );
    let attrs = emu.attributes("Sensor-1").await?;
    assert_eq!(
        attrs["client"],
        json!({"firmware": "1.2.3", "serial": 42}),
        "{attrs}"
    );
    let telemetry = emu.telemetry("Sensor-1").await?;
    let points = telemetry.as_array().context("telemetry list")?;
    assert!(
        points.contains(&json!({"ts": 1700000000000u64, "values": {"temperature": 21.5}})),
        "{telemetry}"
    );
    assert!(
        points
            .iter()
            .any(|p| p["values"] == json!({"humidity": 40}) && p["ts"].is_u64()),
        "{telemetry}"
    );

    // Shared attribute changes and deletions reach the client's subscription.
    assert!(emu.set_shared("Sensor-1", json!({"target": 23})).await?);
    let update = py.next("attribute_update").await?;
    assert_eq!(
        update["content"],
        json!({"device": "Sensor-1", "data": {"target": 23}})
    );
    assert!(emu.delete_shared("Sensor-1", &["target"]).await?);
    let update = py.next("attribute_update").await?;
    assert_eq!(
        update["content"],
        json!({"device": "Sensor-1", "data": {"deleted": ["target"]}})
    );

    // A two-way RPC: the client's reply is the HTTP body.
    let (status, body) = emu
        .rpc_twoway(
            "Sensor-1",
            json!({"method": "getTemp", "params": {"unit": "C"}, "timeout": 10000}),
        )
        .await?;
    assert_eq!(
        (status, body.clone()),
        (200, json!({"ok": true, "echo": {"unit": "C"}})),
        "{body}"
    );
    let rpc = py.next("rpc").await?;
    assert_eq!(rpc["content"]["device"], "Sensor-1");
    assert_eq!(rpc["content"]["data"]["method"], "getTemp");
    assert_eq!(rpc["content"]["data"]["params"], json!({"unit": "C"}));
    assert!(rpc["content"]["data"]["id"].is_u64(), "{rpc}");

    // A persistent one-way RPC reaches the client and ends SUCCESSFUL on its PUBACK.
    let id = emu
        .rpc_persistent(
            "Sensor-1",
            true,
            json!({"method": "blink", "params": {"times": 2}}),
        )
        .await?;
    let rpc = py.next("rpc").await?;
    assert_eq!(rpc["content"]["data"]["method"], "blink", "{rpc}");
    let done = emu.await_persistent(&id, "SUCCESSFUL").await?;
    assert_eq!(
        done["history"],
        json!(["QUEUED", "SENT", "DELIVERED", "SUCCESSFUL"]),
        "{done}"
    );

    // The client disconnects the device: inactive, the gateway stays connected.
    py.command("disconnect").await?;
    py.next("device_disconnected").await?;
    let device = emu.await_active("Sensor-1", false).await?;
    assert_eq!(device["disconnects"], 1, "{device}");
    assert_eq!(emu.gateways().await?[0]["connected"], true);

    let events = emu.events(0).await?;
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(count("attribute_request"), 1, "{events:#?}");
    assert_eq!(count("protocol_error"), 0, "{events:#?}");
    assert_eq!(count("connect"), 1, "{events:#?}");

    py.command("quit").await?;
    let status = tokio::time::timeout(WAIT, py.child.wait()).await??;
    assert!(status.success(), "the script exited with {status}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// rumqttc against the emulator
// ---------------------------------------------------------------------------------------------

/// A gateway session over rumqttc; the event loop runs in a task and forwards what it sees.
struct Gw {
    mqtt: AsyncClient,
    events: mpsc::UnboundedReceiver<std::result::Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gw {
    async fn connect(emu: &TbEmulator, token: &str, manual_acks: bool) -> Result<Gw> {
        let mut opts = MqttOptions::new(format!("gw-{token}"), "127.0.0.1", emu.mqtt_port());
        opts.set_credentials(token, "");
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_manual_acks(manual_acks);
        let (mqtt, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await.map_err(|e| e.to_string());
                let failed = ev.is_err();
                if tx.send(ev).is_err() {
                    break;
                }
                if failed {
                    // rumqttc reconnects on the next poll.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        let mut gw = Gw { mqtt, events, task };
        gw.next(|p| matches!(p, Packet::ConnAck(_)), "CONNACK")
            .await?;
        Ok(gw)
    }

    /// The next incoming packet that `want` accepts; connection errors are skipped.
    async fn next(&mut self, want: impl Fn(&Packet) -> bool, what: &str) -> Result<Packet> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow!("no {what} within {WAIT:?}"))?
                .context("event loop gone")?;
            if let Ok(Event::Incoming(p)) = ev {
                if want(&p) {
                    return Ok(p);
                }
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.mqtt.subscribe(filter, QoS::AtLeastOnce).await?;
        self.next(|p| matches!(p, Packet::SubAck(_)), "SUBACK")
            .await?;
        Ok(())
    }

    async fn publish(&self, topic: &str, body: Value) -> Result<()> {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await?;
        Ok(())
    }

    /// The next publish on `topic`, with its JSON payload.
    async fn next_publish(&mut self, topic: &str) -> Result<(Publish, Value)> {
        let p = self
            .next(
                |p| matches!(p, Packet::Publish(p) if p.topic == topic),
                &format!("publish on {topic}"),
            )
            .await?;
        let Packet::Publish(p) = p else {
            unreachable!()
        };
        let v = serde_json::from_slice(&p.payload)?;
        Ok((p, v))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_token_is_not_authorized() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "right")]).await?;
    for token in [Some("wrong"), None] {
        let mut opts = MqttOptions::new("intruder", "127.0.0.1", emu.mqtt_port());
        if let Some(t) = token {
            opts.set_credentials(t, "");
        }
        let (_client, mut eventloop) = AsyncClient::new(opts, 4);
        let err = tokio::time::timeout(WAIT, eventloop.poll())
            .await?
            .expect_err("CONNECT must be refused");
        assert!(
            matches!(
                err,
                rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::NotAuthorized
                )
            ),
            "{token:?}: {err:?}"
        );
    }
    let g = emu.gateways().await?;
    assert_eq!(g[0]["connects"], 0, "{g}");
    let refused = emu
        .events(0)
        .await?
        .iter()
        .filter(|e| e["kind"] == "protocol_error" && e["detail"]["error"] == "not authorized")
        .count();
    assert_eq!(refused, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_requests_answer_with_value_for_key_and_values_for_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "tok")]).await?;
    emu.set_shared("Dev", json!({"a": 1, "b": {"nested": true}}))
        .await?;
    let mut gw = Gw::connect(&emu, "tok", false).await?;
    gw.subscribe("v1/gateway/attributes/response").await?;
    gw.publish("v1/gateway/connect", json!({"device": "Dev"}))
        .await?;
    gw.publish("v1/gateway/attributes", json!({"Dev": {"fw": "1.0"}}))
        .await?;
    // A null value refuses the whole publish, and nothing of it is stored.
    gw.publish(
        "v1/gateway/attributes",
        json!({"Dev": {"fw": "2.0"}, "Other": {"x": null}}),
    )
    .await?;

    let cases = [
        (
            json!({"id": 1, "device": "Dev", "client": false, "key": "a"}),
            json!({"id": 1, "device": "Dev", "value": 1}),
        ),
        (
            json!({"id": 2, "device": "Dev", "client": false, "keys": ["a"]}),
            json!({"id": 2, "device": "Dev", "values": {"a": 1}}),
        ),
        (
            json!({"id": 3, "device": "Dev", "client": false, "keys": ["a", "b", "zz"]}),
            json!({"id": 3, "device": "Dev", "values": {"a": 1, "b": {"nested": true}}}),
        ),
        (
            json!({"id": 4, "device": "Dev", "client": false, "keys": ["zz"]}),
            json!({"id": 4, "device": "Dev"}),
        ),
        (
            json!({"id": 5, "device": "Dev", "client": true, "key": "fw"}),
            json!({"id": 5, "device": "Dev", "value": "1.0"}),
        ),
        (
            json!({"id": 6, "device": "Dev", "client": false, "key": "fw"}),
            json!({"id": 6, "device": "Dev"}),
        ),
    ];
    for (request, expected) in cases {
        gw.publish("v1/gateway/attributes/request", request.clone())
            .await?;
        let (_, answer) = gw.next_publish("v1/gateway/attributes/response").await?;
        assert_eq!(answer, expected, "request {request}");
    }
    let attrs = emu.attributes("Dev").await?;
    assert_eq!(attrs["client"], json!({"fw": "1.0"}), "{attrs}");
    assert!(emu.device("Other").await?.is_none());
    let errors = emu
        .events(0)
        .await?
        .into_iter()
        .filter(|e| e["kind"] == "protocol_error")
        .count();
    assert_eq!(errors, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_rpc_waits_for_the_device_survives_a_dropped_session_and_expires() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "tok")]).await?;
    let mut gw = Gw::connect(&emu, "tok", true).await?;
    gw.subscribe("v1/gateway/rpc").await?;

    // Queued while the device is not connected.
    let id = emu
        .rpc_persistent(
            "Dev",
            false,
            json!({"method": "reboot", "params": {"delay": 1}, "timeout": 10000}),
        )
        .await?;
    let late = emu
        .rpc_persistent(
            "Late",
            true,
            json!({"method": "late", "expirationTime": e2e::thingsboard::now_ms() + 300}),
        )
        .await?;
    assert_eq!(emu.persistent(&id).await?["status"], "QUEUED");

    // Sent when the device connects; not acknowledged, then the session drops.
    gw.publish(
        "v1/gateway/connect",
        json!({"device": "Dev", "type": "plc"}),
    )
    .await?;
    let (_, first) = gw.next_publish("v1/gateway/rpc").await?;
    let request_id = first["data"]["id"].as_u64().context("request id")?;
    assert_eq!(
        first,
        json!({"device": "Dev", "data": {"id": request_id, "method": "reboot", "params": {"delay": 1}}})
    );
    assert_eq!(emu.persistent(&id).await?["status"], "SENT");
    assert!(emu.drop_session("gw-1").await?);
    assert_eq!(emu.persistent(&id).await?["status"], "QUEUED");
    assert_eq!(emu.device("Dev").await?.context("Dev")?["active"], false);

    // After the reconnect, and once the device is connected again: the same request id.
    gw.next(
        |p| matches!(p, Packet::ConnAck(_)),
        "CONNACK after the drop",
    )
    .await?;
    gw.subscribe("v1/gateway/rpc").await?;
    gw.publish("v1/gateway/connect", json!({"device": "Dev"}))
        .await?;
    let (publish, again) = gw.next_publish("v1/gateway/rpc").await?;
    assert_eq!(again, first);
    gw.mqtt.ack(&publish).await?;
    emu.await_persistent(&id, "DELIVERED").await?;
    gw.publish(
        "v1/gateway/rpc",
        json!({"device": "Dev", "id": request_id, "data": {"rebooted": true}}),
    )
    .await?;
    let done = emu.await_persistent(&id, "SUCCESSFUL").await?;
    assert_eq!(done["response"], json!({"rebooted": true}), "{done}");
    assert_eq!(done["sends"], 2, "{done}");
    assert_eq!(
        done["history"],
        json!([
            "QUEUED",
            "SENT",
            "QUEUED",
            "SENT",
            "DELIVERED",
            "SUCCESSFUL"
        ]),
        "{done}"
    );
    assert_eq!(emu.gateways().await?[0]["connects"], 2);

    // Expired before its device ever connected: never sent, even once it does connect.
    let expired = emu.await_persistent(&late, "EXPIRED").await?;
    assert_eq!(expired["sends"], 0, "{expired}");
    gw.publish("v1/gateway/connect", json!({"device": "Late"}))
        .await?;
    let marker = emu
        .rpc_persistent("Late", true, json!({"method": "marker"}))
        .await?;
    let (publish, sent) = gw.next_publish("v1/gateway/rpc").await?;
    assert_eq!(sent["data"]["method"], "marker", "{sent}");
    gw.mqtt.ack(&publish).await?;
    emu.await_persistent(&marker, "SUCCESSFUL").await?;
    let expired = emu.persistent(&late).await?;
    assert_eq!(
        expired["history"],
        json!(["QUEUED", "EXPIRED"]),
        "{expired}"
    );
    assert_eq!(expired["sends"], 0, "{expired}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twoway_rpc_to_an_offline_device_or_without_reply_is_504() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "tok")]).await?;
    let (status, body) = emu
        .rpc_twoway("Dev", json!({"method": "m", "timeout": 500}))
        .await?;
    assert_eq!((status, body), (504, json!({"error": "device is offline"})));
    let mut gw = Gw::connect(&emu, "tok", false).await?;
    gw.subscribe("v1/gateway/rpc").await?;
    gw.publish("v1/gateway/connect", json!({"device": "Dev"}))
        .await?;
    emu.await_active("Dev", true).await?;
    let (status, body) = emu
        .rpc_twoway(
            "Dev",
            json!({"method": "m", "params": {}, "timeout": 300, "forwardTimeout": true}),
        )
        .await?;
    assert_eq!((status, body), (504, json!({"error": "timeout"})));
    let (_, pushed) = gw.next_publish("v1/gateway/rpc").await?;
    assert_eq!(pushed["data"]["timeout"], 300, "{pushed}");
    // A late reply is logged and ignored.
    let id = pushed["data"]["id"].clone();
    gw.publish(
        "v1/gateway/rpc",
        json!({"device": "Dev", "id": id, "data": {}}),
    )
    .await?;
    let reply = emu
        .await_event(0, "rpc_reply event", |e| e["kind"] == "rpc_reply")
        .await?;
    assert_eq!(reply["detail"]["matched"], false, "{reply}");
    Ok(())
}

/// A bare MQTT 3.1.1 session: CONNECT with `keep_alive` seconds, CONNACK checked, then silence.
async fn raw_session(emu: &TbEmulator, token: &str, keep_alive: u16) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(&emu.mqtt_addr).await?;
    let mut connect = v4::Connect::new(format!("raw-{token}"));
    connect.keep_alive = keep_alive;
    connect.set_login(token, "");
    let mut buf = BytesMut::new();
    v4::Packet::Connect(connect).write(&mut buf, usize::MAX)?;
    stream.write_all(&buf).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    Ok(stream)
}

/// Waits until the server closes `stream`.
async fn closed_by_server(stream: &mut TcpStream) -> Result<()> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(WAIT, stream.read(&mut byte)).await? {
        Ok(0) | Err(_) => Ok(()),
        Ok(_) => bail!("unexpected data instead of a close"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_replaces_the_session_and_silence_past_keep_alive_ends_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = TbEmulator::start(dir.path(), &[("gw-1", "tok"), ("gw-2", "tok2")]).await?;
    let mut first = raw_session(&emu, "tok", 60).await?;
    let _second = raw_session(&emu, "tok", 60).await?;
    closed_by_server(&mut first).await?;
    let g = emu.gateways().await?;
    assert_eq!(
        (g[0]["connected"].clone(), g[0]["connects"].clone()),
        (json!(true), json!(2)),
        "{g}"
    );

    let started = std::time::Instant::now();
    let mut quiet = raw_session(&emu, "tok2", 1).await?;
    closed_by_server(&mut quiet).await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}, expected 1.5 x keep-alive"
    );
    let reasons: Vec<Value> = emu
        .events(0)
        .await?
        .into_iter()
        .filter(|e| e["kind"] == "session_close")
        .map(|e| e["detail"]["reason"].clone())
        .collect();
    assert_eq!(
        reasons,
        vec![
            json!("replaced by a new connection"),
            json!("keep-alive timeout")
        ]
    );
    Ok(())
}
