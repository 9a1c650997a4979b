//! The `gatewayd` command line: `check-config` on the shipped example and on a broken file.

use std::process::Command;

fn gatewayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatewayd"))
}

#[test]
fn the_example_config_is_valid() {
    let out = gatewayd()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gatewayd.example.toml"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ok (gateway plant-a-line-3, 4 devices)"),
        "{text}"
    );
}

#[test]
fn check_config_reports_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
        [gateway]
        id = "bad id"
        [cloud]
        broker = "http://x"
        [log]
        level = "info,=nonsense=="
        [devices.d1]
        kind = "http"
        [devices.d1.methods.m]
        path = "api/{{nope}}"
        "#,
    )
    .unwrap();
    let out = gatewayd().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "gateway.id: id contains ' '",
        "cloud.broker: 'http://x' must start with mqtt://",
        "log.level: 'info,=nonsense==' is not a log filter",
        "devices.d1.base_url: required for an http device",
        "devices.d1.methods.m.path: placeholder '{{nope}}' names no declared param",
        "devices.d1.methods.m.path: must start with '/'",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn environment_overrides_the_file() {
    let out = gatewayd()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gatewayd.example.toml"),
        ])
        .env("GATEWAYD_CLOUD__BROKER", "ftp://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cloud.broker: 'ftp://nope' must start with mqtt://"));
}

#[test]
fn check_config_reports_modbus_problems_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1883"
        [serial_ports.rs485]
        path = "/dev/ttyUSB0"
        [devices.meter-1]
        kind = "modbus_tcp"
        host = "10.0.0.5"
        port = 70000
        [devices.meter-1.methods.energy]
        table = "input_register"
        address = 0
        type = "f33"
        [devices.drive-1]
        kind = "modbus_rtu"
        port = "rs485"
        [devices.drive-1.commands.START]
        table = "discrete_input"
        address = 0
        write = true
        "#,
    )
    .unwrap();
    let out = gatewayd().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown variants are reported with their path before the semantic checks run.
    assert!(
        err.contains("devices.meter-1.methods.energy.type") && err.contains("f33"),
        "{err}"
    );
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("type = \"f33\"", "type = \"f32\""),
    )
    .unwrap();
    let out = gatewayd().arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "devices.meter-1.port: '70000' is not a TCP port (1 to 65535)",
        "devices.drive-1.unit_id: required for a modbus_rtu device",
        "devices.drive-1.commands.START.table: discrete_input is read-only; writes go to a coil or holding_register",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
