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
