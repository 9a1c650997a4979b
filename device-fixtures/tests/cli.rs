//! The binary's command line: behaviours set at start with `--faults` and `--no-health`.

mod common;

use std::process::Stdio;

use common::GUARD;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_serial::SerialPortBuilderExt;

fn fixtures(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_device-fixtures"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Starts the binary and returns it with its one-line JSON announcement.
async fn start(args: &[&str]) -> (Child, Value) {
    let mut child = fixtures(args).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(GUARD, BufReader::new(stdout).read_line(&mut line))
        .await
        .expect("the binary announces itself")
        .unwrap();
    (child, serde_json::from_str(&line).unwrap())
}

#[tokio::test]
async fn http_devices_start_with_the_given_habits() {
    let (_child, ready) = start(&[
        "http",
        "--count",
        "2",
        "--no-health",
        "--faults",
        r#"{"busy_every": 2, "busy_status": 429}"#,
    ])
    .await;
    let http = reqwest::Client::builder().timeout(GUARD).build().unwrap();
    let api = ready["devices"][1]["api"].as_str().unwrap();
    let health = http.get(format!("{api}/health")).send().await.unwrap();
    assert_eq!(health.status(), 404);
    let statuses = [
        http.get(format!("{api}/api/status"))
            .send()
            .await
            .unwrap()
            .status(),
        http.get(format!("{api}/api/status"))
            .send()
            .await
            .unwrap()
            .status(),
    ];
    assert_eq!(statuses, [200, 429]);
    let control = ready["control"].as_str().unwrap();
    let view: Value = http
        .get(format!("{control}/_control/devices/agv-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["faults"]["no_health"], true);
    assert_eq!(view["faults"]["busy_every"], 2);
}

#[tokio::test]
async fn serial_line_starts_with_the_given_habits() {
    let (_child, ready) = start(&[
        "serial",
        "--faults",
        r#"{"echo": true, "text_errors": true}"#,
    ])
    .await;
    let mut port = tokio_serial::new(ready["path"].as_str().unwrap(), 115_200)
        .open_native_async()
        .unwrap();
    port.write_all(b"SETP 999\r").await.unwrap();
    let expected = b"SETP 999\rERR:RANGE setpoint out of range\r\n";
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(GUARD, port.read_exact(&mut got))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn bad_faults_are_a_usage_error() {
    for args in [
        &["http", "--faults", r#"{"busy_status": 200}"#][..],
        &["http", "--faults", "{nope"],
        &["serial", "--faults", r#"{"smoke": true}"#],
    ] {
        let out = tokio::time::timeout(GUARD, fixtures(args).output())
            .await
            .expect("the binary exits")
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: --faults: "), "{stderr}");
    }
}
