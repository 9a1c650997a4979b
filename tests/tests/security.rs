//! Security end to end, with the real processes: mutual TLS between gatewayd and the stub's
//! embedded broker and between gatewayd and Mosquitto, logins and the topic ACL (a gateway
//! cannot read or spoof another's traffic), the operator API token, secrets kept out of logs,
//! and a cloud that cannot make gatewayd call anything its configuration does not name.
//! Certificates are made by `openssl` into each test's temporary directory.

use anyhow::{anyhow, Context, Result};
use e2e::config::{GatewayConfig, SerialConfig};
use e2e::raw::{failed, Raw, RawCloud, RawOptions};
use e2e::tls::{CertPair, Pki};
use e2e::*;
use rumqttc::{LastWill, QoS};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// gatewayd's configuration for `devices`, with `cloud_extra` lines added to `[cloud]`.
fn gateway_config(
    id: &str,
    broker: &str,
    dir: &Path,
    devices: &[(String, String)],
    cloud_extra: &str,
) -> Result<PathBuf> {
    let store = dir.join(format!("{id}.db"));
    let text = GatewayConfig {
        gateway_id: id,
        broker,
        store: &store,
        devices,
        probe_interval_ms: 100,
    }
    .render();
    let line = format!("broker = \"{broker}\"\n");
    anyhow::ensure!(text.contains(&line), "rendered config lacks {line}");
    let text = text.replacen(&line, &format!("{line}{cloud_extra}"), 1);
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// TLS lines for `[cloud]`.
fn tls_lines(pki: &Pki, client: Option<&CertPair>) -> String {
    let mut s = format!("ca_file = \"{}\"\n", pki.ca.display());
    if let Some(c) = client {
        s += &format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        );
    }
    s
}

/// Starts gatewayd with debug logging, its log in `dir`.
fn gatewayd(dir: &Path, config: &Path) -> Result<Gateway> {
    std::fs::create_dir_all(dir)?;
    Gateway::spawn(
        dir,
        config,
        &[],
        &[("RUST_LOG", "debug,hyper=info,hyper_util=info,reqwest=info")],
    )
}

/// Waits until the file at `log` contains `needle`.
async fn await_log(log: &Path, needle: &str) -> Result<()> {
    eventually(
        &format!("{} containing {needle:?}", log.display()),
        Duration::from_secs(20),
        || async move {
            Ok(std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(needle)
                .then_some(()))
        },
    )
    .await
}

/// The stub's view of `gateway`: `Some(online)` once it was ever seen.
async fn gateway_online(api: &str, gateway: &str) -> Result<Option<bool>> {
    let (s, b) = get(&format!("{api}/api/v1/gateways")).await?;
    anyhow::ensure!(s == 200, "gateways: {s} {b}");
    Ok(b.as_array()
        .and_then(|a| a.iter().find(|g| g["id"] == gateway))
        .map(|g| g["online"] == true))
}

async fn device_online(api: &str, device: &str) -> Result<bool> {
    let (s, b) = get(&format!("{api}/api/v1/devices/{device}")).await?;
    anyhow::ensure!(s == 200, "device {device}: {s} {b}");
    Ok(b["online"] == true)
}

/// Checks, with `attacker` connected as another gateway, that `victim` stays confined: the
/// attacker can subscribe to none of the victim's topics (nor to wildcards), sees none of its
/// RPC traffic, and cannot spoof its presence, RPC answers or last will; a refused publish
/// closes the attacker's connection. `reconnect` makes a fresh attacker connection.
async fn victim_is_confined<F, Fut>(
    api: &str,
    stub_log: &Path,
    victim: &str,
    device: &str,
    reconnect: F,
) -> Result<()>
where
    F: Fn(Option<LastWill>) -> Fut,
    Fut: std::future::Future<Output = Result<Raw>>,
{
    let mut attacker = reconnect(None).await?;
    for filter in [
        format!("gw/{victim}/down/#"),
        format!("gw/{victim}/down/rpc/req"),
        "gw/+/down/#".to_string(),
        "gw/#".to_string(),
        "#".to_string(),
        format!("gw/{victim}/up/#"),
        format!("$share/g/gw/{victim}/down/#"),
    ] {
        let code = attacker.subscribe(&filter).await?;
        anyhow::ensure!(
            failed(code),
            "subscribing to {filter} was granted: {code:?}"
        );
    }
    let own = format!("gw/{}/down/#", attacker.id);
    let code = attacker.subscribe(&own).await?;
    anyhow::ensure!(!failed(code), "its own {own} was refused");

    // The victim's RPCs work, and none of their traffic reaches the attacker.
    for _ in 0..3 {
        let (s, b, _) = invoke(api, device, "status", Value::Null, 5).await?;
        anyhow::ensure!(s == 200, "rpc to {device}: {s} {b}");
    }
    attacker.subscribe(&own).await?; // one more round trip through the broker
    anyhow::ensure!(
        attacker.received.is_empty(),
        "the attacker received {:?}",
        attacker.received
    );

    // Spoofed device presence (retained, QoS 1): refused, the connection closed.
    let spoof =
        json!({"v": 1, "devices": {device: {"online": false, "since_ms": 1, "reason": "spoofed"}}});
    attacker
        .client
        .publish(
            format!("gw/{victim}/up/devices"),
            QoS::AtLeastOnce,
            true,
            spoof.to_string(),
        )
        .await?;
    attacker.closed().await?;
    // Spoofed offline state and an RPC answer (QoS 0): refused too.
    let mut attacker = reconnect(None).await?;
    let offline =
        json!({"v": 1, "online": false, "boot_id": "spoofed", "software": "x", "at_ms": 1});
    attacker
        .client
        .publish(
            format!("gw/{victim}/up/rpc/res"),
            QoS::AtMostOnce,
            false,
            json!({"v": 1, "id": "spoofed-1", "ok": {"status": 200, "result": "spoofed"}})
                .to_string(),
        )
        .await?;
    attacker.closed().await?;
    let attacker = reconnect(None).await?;
    attacker
        .client
        .publish(
            format!("gw/{victim}/up/state"),
            QoS::AtLeastOnce,
            true,
            offline.to_string(),
        )
        .await?;
    let mut attacker = attacker;
    attacker.closed().await?;
    // A last will on the victim's state topic, fired by dropping the connection: dropped.
    let will = LastWill::new(
        format!("gw/{victim}/up/state"),
        offline.to_string(),
        QoS::AtLeastOnce,
        true,
    );
    let attacker = reconnect(Some(will)).await?;
    drop(attacker);
    await_log(stub_log, "last will refused by the ACL").await?;

    // Nothing of it reached the cloud: the victim and its device are online, RPCs work.
    anyhow::ensure!(device_online(api, device).await?, "{device} shown offline");
    anyhow::ensure!(
        gateway_online(api, victim).await? == Some(true),
        "{victim} shown offline"
    );
    let (s, b, _) = invoke(api, device, "status", Value::Null, 5).await?;
    anyhow::ensure!(s == 200 && b["result"] != "spoofed", "{s} {b}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_embedded_broker() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let site1 = pki.client("site-1")?;
    let site3 = pki.client("site-3")?;
    let args: Vec<String> = [
        "--mqtts-listen",
        "127.0.0.1:0",
        "--tls-cert",
        pki.server_cert.to_str().unwrap(),
        "--tls-key",
        pki.server_key.to_str().unwrap(),
        "--tls-client-ca",
        pki.ca.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let (stub, ready) = Stub::start_with_args(dir.path(), &broker, ":memory:", &args).await?;
    let mqtts = ready["mqtts"]
        .as_str()
        .context("ready line lacks mqtts")?
        .to_string();
    let fleet = Fleet::start(dir.path(), "agv", 1).await?;
    let config = gateway_config(
        "site-1",
        &mqtts,
        dir.path(),
        &fleet.devices,
        &tls_lines(&pki, Some(&site1)),
    )?;
    let _gateway = gatewayd(&dir.path().join("site-1"), &config)?;
    await_device_online(&stub.api, "agv-1", true).await?;
    let (s, b, _) = invoke(&stub.api, "agv-1", "status", Value::Null, 5).await?;
    assert_eq!(s, 200, "{b}");

    // check-config reads the TLS files: a key of another certificate, and a certificate
    // without its key, are reported with their fields.
    let text = std::fs::read_to_string(&config)?;
    let mismatched = dir.path().join("mismatched.toml");
    let site1_key = site1.key.display().to_string();
    std::fs::write(
        &mismatched,
        text.replace(&site1_key, &site3.key.display().to_string()),
    )?;
    let (ok, out) = check_config(&mismatched)?;
    assert!(
        !ok && out.contains("cloud.client_key_file: does not fit"),
        "{out}"
    );
    let keyless = dir.path().join("keyless.toml");
    std::fs::write(
        &keyless,
        text.replace(&format!("client_key_file = \"{site1_key}\"\n"), ""),
    )?;
    let (ok, out) = check_config(&keyless)?;
    assert!(
        !ok && out.contains("cloud.client_cert_file: set without cloud.client_key_file"),
        "{out}"
    );

    // A gateway without a client certificate fails the handshake and is never online.
    let no_cert_dir = dir.path().join("site-2");
    std::fs::create_dir_all(&no_cert_dir)?;
    let config = gateway_config("site-2", &mqtts, &no_cert_dir, &[], &tls_lines(&pki, None))?;
    let no_cert = gatewayd(&no_cert_dir, &config)?;
    await_log(&no_cert.proc.log, "cloud connection attempt failed").await?;
    assert_ne!(gateway_online(&stub.api, "site-2").await?, Some(true));
    // Nor does a certificate from another CA get in.
    let rogue = pki.rogue_client("site-2")?;
    let tls = pki.rumqttc_tls(Some(&rogue))?;
    let refused = Raw::connect(
        "site-2",
        &mqtts,
        RawOptions {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await?;
    assert!(refused.is_err(), "a rogue certificate was accepted");

    // A certificate is one identity: site-3's cannot connect as site-1.
    let tls = pki.rumqttc_tls(Some(&site3))?;
    let refused = Raw::connect(
        "site-1",
        &mqtts,
        RawOptions {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await?;
    assert!(refused.is_err(), "site-3's certificate connected as site-1");

    // With its own certificate, site-3 is confined to its own topics.
    let log = stub.proc.log.clone();
    victim_is_confined(&stub.api, &log, "site-1", "agv-1", |will| {
        let (pki, site3, mqtts) = (&pki, &site3, &mqtts);
        async move {
            let tls = pki.rumqttc_tls(Some(site3))?;
            Raw::connect(
                "site-3",
                mqtts,
                RawOptions {
                    tls: Some(tls),
                    will,
                    ..Default::default()
                },
            )
            .await?
            .map_err(|why| anyhow!("site-3 refused: {why}"))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_are_confined_by_credentials_and_the_acl() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pw1 = format!("pw1-{}", std::process::id());
    let creds = dir.path().join("credentials.toml");
    std::fs::write(
        &creds,
        format!(
            "[gateways.site-1]\npassword = \"{pw1}\"\n\n[gateways.site-3]\npassword = \"pw3\"\n"
        ),
    )?;
    let args = ["--credentials".to_string(), creds.display().to_string()];
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let (stub, _) = Stub::start_with_args(dir.path(), &broker, ":memory:", &args).await?;
    let fleet = Fleet::start(dir.path(), "agv", 1).await?;
    let config = gateway_config(
        "site-1",
        &stub.mqtt,
        dir.path(),
        &fleet.devices,
        &format!("username = \"site-1\"\npassword = \"{pw1}\"\n"),
    )?;

    // check-config never prints the password, whether the file is good or bad.
    let out = check_config(&config)?;
    assert!(out.0 && !out.1.contains(&pw1), "{}", out.1);
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&config)?.replacen(
            "username = \"site-1\"\n",
            "username = \"\"\nca_file = \"/nonexistent/ca.pem\"\n",
            1,
        ),
    )?;
    let out = check_config(&bad)?;
    assert!(!out.0, "a bad config passed: {}", out.1);
    assert!(
        out.1.contains("cloud.ca_file") && !out.1.contains(&pw1),
        "{}",
        out.1
    );

    let mut gateway = gatewayd(&dir.path().join("site-1"), &config)?;
    await_device_online(&stub.api, "agv-1", true).await?;
    let (s, b, _) = invoke(&stub.api, "agv-1", "status", Value::Null, 5).await?;
    assert_eq!(s, 200, "{b}");

    // Logins: a wrong password, and a right one under another client id, are refused.
    let login = |id: &str, user: &str, pw: &str| {
        let (id, user, pw, url) = (
            id.to_string(),
            user.to_string(),
            pw.to_string(),
            stub.mqtt.clone(),
        );
        async move {
            Raw::connect(
                &id,
                &url,
                RawOptions {
                    login: Some((user, pw)),
                    ..Default::default()
                },
            )
            .await
        }
    };
    assert!(login("site-1", "site-1", "wrong").await?.is_err());
    assert!(login("site-1", "site-3", "pw3").await?.is_err());
    assert!(login("cloud-stub", "cloud-stub", "pw3").await?.is_err());
    let anonymous = Raw::connect("site-3", &stub.mqtt, RawOptions::default()).await?;
    assert!(anonymous.is_err(), "a gateway connected without a login");

    let log = stub.proc.log.clone();
    let url = stub.mqtt.clone();
    victim_is_confined(&stub.api, &log, "site-1", "agv-1", |will| {
        let url = url.clone();
        async move {
            Raw::connect(
                "site-3",
                &url,
                RawOptions {
                    login: Some(("site-3".into(), "pw3".into())),
                    will,
                    ..Default::default()
                },
            )
            .await?
            .map_err(|why| anyhow!("site-3 refused: {why}"))
        }
    })
    .await?;

    // The password appears in no log.
    assert_eq!(gateway.proc.terminate().await?, Some(0));
    let text = std::fs::read_to_string(&gateway.proc.log)?;
    assert!(text.contains("connected to the cloud"), "{text}");
    assert!(!text.contains(&pw1), "gatewayd logged its password");
    let text = std::fs::read_to_string(&stub.proc.log)?;
    assert!(!text.contains(&pw1), "cloud-stub logged a password");
    Ok(())
}

/// `gatewayd check-config FILE` -> (success, stdout + stderr).
fn check_config(config: &Path) -> Result<(bool, String)> {
    let out = std::process::Command::new(bin("gatewayd")?)
        .arg("check-config")
        .arg(config)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_mosquitto() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(&dir.path().join("pki"))?;
    let site1 = pki.client("site-1")?;
    let site3 = pki.client("site-3")?;
    let mosquitto = Mosquitto::start(dir.path(), &pki, "cloud-stub", "cloud-secret")?;
    let password_file = dir.path().join("cloud-password");
    std::fs::write(&password_file, "cloud-secret\n")?;
    let args = [
        "--cloud-user".to_string(),
        "cloud-stub".into(),
        "--cloud-password-file".into(),
        password_file.display().to_string(),
    ];
    let broker = Broker::External(mosquitto.plain.clone());
    let (stub, _) = Stub::start_with_args(dir.path(), &broker, ":memory:", &args).await?;
    let fleet = Fleet::start(dir.path(), "agv", 1).await?;
    let config = gateway_config(
        "site-1",
        &mosquitto.tls,
        dir.path(),
        &fleet.devices,
        &tls_lines(&pki, Some(&site1)),
    )?;
    let _gateway = gatewayd(&dir.path().join("site-1"), &config)?;
    await_device_online(&stub.api, "agv-1", true).await?;
    let (s, b, _) = invoke(&stub.api, "agv-1", "status", Value::Null, 5).await?;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = invoke(&stub.api, "agv-1", "echo", json!({"tag": "tls"}), 5).await?;
    assert_eq!((s, &b["result"]["query"]), (200, &json!("tag=tls")), "{b}");

    // Mosquitto's ACL (pattern read gw/%u/down/#, pattern write gw/%u/up/#) confines site-3:
    // it acknowledges subscriptions but delivers nothing of site-1's, and drops (after a
    // PUBACK) what site-3 publishes under site-1.
    let tls = pki.rumqttc_tls(Some(&site3))?;
    let mut attacker = Raw::connect(
        "site-3",
        &mosquitto.tls,
        RawOptions {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await?
    .map_err(|why| anyhow!("site-3 refused: {why}"))?;
    for filter in ["gw/site-1/down/#", "gw/+/down/#", "gw/#", "#"] {
        attacker.subscribe(filter).await?;
    }
    let spoof = json!({"v": 1, "devices": {"agv-1": {"online": false, "since_ms": 1, "reason": "spoofed"}}});
    assert!(
        attacker
            .publish_acked("gw/site-1/up/devices", &spoof, true)
            .await?
    );
    // The stub reads the broker in order: after these answers it would have seen the spoof.
    for _ in 0..3 {
        let (s, b, _) = invoke(&stub.api, "agv-1", "status", Value::Null, 5).await?;
        assert_eq!(s, 200, "{b}");
    }
    assert!(device_online(&stub.api, "agv-1").await?);
    attacker.subscribe("gw/site-3/down/#").await?;
    assert!(
        attacker.received.is_empty(),
        "site-3 received {:?}",
        attacker.received
    );
    Ok(())
}

/// Mosquitto with a plain listener for the cloud (password login) and a TLS listener for
/// gateways (client certificates required, common name = user name), and the ACL from
/// `docs/protocol.md`.
struct Mosquitto {
    _broker: e2e::Mosquitto,
    /// `mqtt://127.0.0.1:PORT` for the stub.
    plain: String,
    /// `mqtts://localhost:PORT` for gateways.
    tls: String,
}

impl Mosquitto {
    fn start(dir: &Path, pki: &Pki, cloud_user: &str, cloud_password: &str) -> Result<Mosquitto> {
        let passwords = dir.join("mosquitto.passwd");
        let status = std::process::Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwords)
            .args([cloud_user, cloud_password])
            .status()
            .context("cannot run mosquitto_passwd")?;
        anyhow::ensure!(status.success(), "mosquitto_passwd failed");
        let acl = dir.join("mosquitto.acl");
        std::fs::write(
            &acl,
            format!(
                "user {cloud_user}\ntopic readwrite gw/#\n\npattern write gw/%u/up/#\npattern read gw/%u/down/#\n"
            ),
        )?;
        let (plain, tls) = (free_port()?, free_port()?);
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let conf = format!(
            "{user}per_listener_settings false\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n\nlistener {plain} 127.0.0.1\n\nlistener {tls} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate true\nuse_identity_as_username true\n",
            user = if is_root { "user root\n" } else { "" },
            pw = passwords.display(),
            acl = acl.display(),
            ca = pki.ca.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        Ok(Mosquitto {
            _broker: e2e::Mosquitto::run(dir, &conf, &[plain, tls])?,
            plain: format!("mqtt://127.0.0.1:{plain}"),
            tls: format!("mqtts://localhost:{tls}"),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_requires_its_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, "s3cret-token\n")?;
    let args = [
        "--api-token-file".to_string(),
        token_file.display().to_string(),
    ];
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let (stub, _) = Stub::start_with_args(dir.path(), &broker, ":memory:", &args).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("{}/api/v1/gateways", stub.api);
    for (what, auth) in [
        ("no token", None),
        ("a wrong token", Some("Bearer wrong")),
        ("another scheme", Some("Basic czNjcmV0LXRva2Vu")),
        ("a token prefix", Some("Bearer s3cret")),
    ] {
        let mut req = client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    }
    // Unknown routes are not revealed either.
    let resp = client
        .post(format!("{}/api/v1/devices/agv-1/methods/status", stub.api))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = client
        .get(&url)
        .header("authorization", "Bearer s3cret-token")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    // Liveness stays open.
    let resp = client.get(format!("{}/healthz", stub.api)).send().await?;
    assert_eq!(resp.status().as_u16(), 200);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The cloud is not trusted to pick URLs, ports or serial commands: only what the configuration
// names is ever called, with cloud values escaped.

/// An echo method with the path, query and a header taken from params.
const ECHO_PATH: &str = r#"
[devices.agv-1.methods.echo_path]
verb = "POST"
path = "/api/echo/{{p}}"
query = { q = "{{q}}" }
headers = { X-Tag = "{{h}}" }
body = "{{params}}"
params = { p = { type = "string" }, q = { type = "string", required = false }, h = { type = "string", required = false } }
"#;

/// A serial method with a string value.
const RAW_SETP: &str = r#"
[devices.tc-1.methods.raw_setp]
request = "SETP {{v}}"
response = "OK"
errors = ['ERR (?P<code>[0-9]+) (?P<text>.*)']
params = { v = { type = "string" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_cannot_make_gatewayd_leave_its_configuration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let stub = Stub::start(dir.path(), &broker, ":memory:").await?;
    let fleet = Fleet::start(dir.path(), "agv", 1).await?;
    let sim = SerialSim::start(dir.path(), "ttySIM0", &[]).await?;
    let config = gateway_config("site-1", &stub.mqtt, dir.path(), &fleet.devices, "")?;
    let serial = SerialConfig {
        port: "bus1",
        path: &sim.path,
        timeout_ms: 2000,
        devices: &[("tc-1", None)],
    }
    .render();
    let text = std::fs::read_to_string(&config)? + ECHO_PATH + &serial + RAW_SETP;
    std::fs::write(&config, text)?;
    let _gateway = gatewayd(&dir.path().join("site-1"), &config)?;
    await_device_online(&stub.api, "agv-1", true).await?;
    await_device_online(&stub.api, "tc-1", true).await?;

    let raw = Raw::connect("escape-test-cloud", &stub.mqtt, RawOptions::default())
        .await?
        .map_err(|why| anyhow!("refused: {why}"))?;
    let mut cloud = RawCloud::new(raw, "site-1").await?;

    // Path values stay inside their segment; the echo shows the raw path that arrived.
    for (p, arrived) in [
        ("../../admin", "/api/echo/..%2F..%2Fadmin"),
        ("@evil:1/", "/api/echo/%40evil%3A1%2F"),
        ("x?admin=1#f", "/api/echo/x%3Fadmin%3D1%23f"),
        ("%2e%2e", "/api/echo/%252e%252e"),
        ("a..b", "/api/echo/a..b"),
    ] {
        let echo = cloud.ok("agv-1", "echo_path", json!({"p": p})).await?;
        assert_eq!(echo["path"], arrived, "{p}: {echo}");
    }
    // A whole `.` or `..` segment would be resolved away by URL normalisation: refused.
    for p in [".", ".."] {
        let code = cloud
            .error_code("agv-1", "echo_path", json!({"p": p}))
            .await?;
        assert_eq!(code, "invalid_params", "{p}");
    }
    // Query values cannot add parameters.
    let echo = cloud
        .ok("agv-1", "echo_path", json!({"p": "q", "q": "a&x=1"}))
        .await?;
    assert_eq!(echo["query"], "q=a%26x%3D1", "{echo}");
    // Header values cannot add header lines, and control characters cannot break the call
    // (which would also take the device offline).
    let echo = cloud
        .ok(
            "agv-1",
            "echo_path",
            json!({"p": "h", "h": "x\r\nX-Injected: 1"}),
        )
        .await?;
    assert_eq!(echo["headers"]["x-tag"], "x  X-Injected: 1", "{echo}");
    assert!(echo["headers"].get("x-injected").is_none(), "{echo}");
    let echo = cloud
        .ok(
            "agv-1",
            "echo_path",
            json!({"p": "h", "h": "a\u{0}b\u{7f}"}),
        )
        .await?;
    // NUL and DEL became spaces; HTTP drops the trailing one.
    assert_eq!(echo["headers"]["x-tag"], "a b", "{echo}");
    assert!(device_online(&stub.api, "agv-1").await?);

    // Names and params the configuration does not declare are refused before any call.
    for method in ["../../admin", "echo_path/../status", "ECHO", "http://evil/"] {
        let code = cloud.error_code("agv-1", method, json!({})).await?;
        assert_eq!(code, "method_not_found", "{method}");
    }
    let code = cloud
        .error_code(
            "agv-1",
            "status",
            json!({"url": "http://evil:1/", "port": 1}),
        )
        .await?;
    assert_eq!(code, "invalid_params");
    let code = cloud.error_code("agv-2", "status", json!(null)).await?;
    assert_eq!(code, "device_not_found");

    // Every request the device saw went to a configured path.
    let view = fleet.view("agv-1").await?;
    let paths: Vec<&String> = view["requests"]
        .as_object()
        .context("requests")?
        .keys()
        .collect();
    for path in &paths {
        assert!(
            path.as_str() == "/health" || path.starts_with("/api/echo/"),
            "unexpected path {path}; all: {paths:?}"
        );
    }

    // A serial value cannot inject a second command: one line reached the controller, and
    // the setpoint it carries was not applied.
    let before = sim.state().await?;
    let code = cloud
        .error_code("tc-1", "raw_setp", json!({"v": "20\r\nSETP 99"}))
        .await?;
    assert_eq!(code, "device_error");
    let after = sim.state().await?;
    assert_eq!(after["setpoints"], before["setpoints"], "{after}");
    assert_ne!(after["setpoints"][""], json!(99.0));
    assert_eq!(
        after["requests"].as_u64(),
        before["requests"].as_u64().map(|n| n + 1),
        "{before} -> {after}"
    );
    Ok(())
}
