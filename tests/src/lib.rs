//! Harness for end-to-end runs: starts the real `cloud-stub`, `device-fixtures` and `gatewayd`
//! binaries on loopback ports they pick themselves, reads the addresses each prints on its
//! first stdout line, and offers small helpers for the operator API. Used by the tests in
//! `tests/`, by the `demo` binary, and by the benchmark (the `bench` module and binary).

pub mod bench;
pub mod config;
pub mod modbus;
pub mod raw;
pub mod swarm;
pub mod thingsboard;
pub mod tls;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary next to the running executable (`target/<profile>/<name>`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary '{name}' not found next to {}; build the workspace first (`cargo build --workspace --bins`)",
        exe.display()
    )
}

/// A child process killed when dropped; its stderr goes to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `name` with `args`, logging to `dir/<log_name>.log`, and returns it with its first
    /// stdout line parsed as JSON (the ready line).
    pub async fn start(
        name: &str,
        args: &[String],
        dir: &Path,
        log_name: &str,
    ) -> Result<(Proc, Value)> {
        let (mut proc, _) = Self::spawn(name, args, dir, log_name, &[])?;
        let stdout = proc.child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "{name} printed no ready line within 30 s; see {}",
                    proc.log.display()
                )
            })??
            .ok_or_else(|| {
                anyhow!(
                    "{name} exited before its ready line; see {}:\n{}",
                    proc.log.display(),
                    proc.tail()
                )
            })?;
        let ready: Value =
            serde_json::from_str(&line).with_context(|| format!("{name} ready line: {line}"))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((proc, ready))
    }

    /// Starts `name` without waiting for a ready line.
    pub fn spawn(
        name: &str,
        args: &[String],
        dir: &Path,
        log_name: &str,
        env: &[(&str, &str)],
    ) -> Result<(Proc, ())> {
        let log = dir.join(format!("{log_name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(bin(name)?);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,rumqttd=warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok((
            Proc {
                child,
                log,
                name: log_name.to_string(),
            },
            (),
        ))
    }

    /// The last lines of the process log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) without waiting for anything.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
        Ok(())
    }

    /// Waits at most `within` for the exit; returns the exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<Option<i32>> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit within {within:?}", self.name))??;
        Ok(status.code())
    }

    /// SIGKILL, and wait for the exit.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, and wait for the exit; returns the exit code.
    pub async fn terminate(&mut self) -> Result<Option<i32>> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit within 20 s of SIGTERM", self.name))??;
        Ok(status.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- last log lines of {} ----\n{}", self.name, self.tail());
        }
    }
}

/// The cloud stub: its process and addresses.
pub struct Stub {
    pub proc: Proc,
    /// Operator API base, `http://127.0.0.1:PORT`.
    pub api: String,
    /// Broker URL, `mqtt://127.0.0.1:PORT`.
    pub mqtt: String,
}

impl Stub {
    /// Starts the stub with its embedded broker on a free port (or on `mqtt_listen`), or against
    /// an external broker.
    pub async fn start(dir: &Path, broker: &Broker, db: &str) -> Result<Stub> {
        Ok(Self::start_with_args(dir, broker, db, &[]).await?.0)
    }

    /// Like [`Stub::start`], with extra command-line arguments; also returns the ready line
    /// (it carries `mqtts` when the stub was given a TLS listener).
    pub async fn start_with_args(
        dir: &Path,
        broker: &Broker,
        db: &str,
        extra: &[String],
    ) -> Result<(Stub, Value)> {
        let mut args = vec![
            "--api-listen".to_string(),
            "127.0.0.1:0".into(),
            "--db".into(),
            db.into(),
        ];
        match broker {
            Broker::Embedded(listen) => {
                args.push("--mqtt-listen".into());
                args.push(listen.clone());
            }
            Broker::External(url) => {
                args.push("--broker".into());
                args.push(url.clone());
            }
        }
        args.extend_from_slice(extra);
        let (proc, ready) = Proc::start("cloud-stub", &args, dir, "cloud-stub").await?;
        let field = |k: &str| {
            ready[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ready line lacks {k}: {ready}"))
        };
        let stub = Stub {
            api: field("api")?,
            mqtt: match broker {
                Broker::External(url) => url.clone(),
                Broker::Embedded(_) => field("mqtt")?,
            },
            proc,
        };
        Ok((stub, ready))
    }
}

/// Which broker the stub uses.
#[derive(Clone, Debug)]
pub enum Broker {
    /// The stub's embedded broker on this listen address (`127.0.0.1:0` for a free port).
    Embedded(String),
    /// An external broker URL.
    External(String),
}

/// Simulated HTTP devices in one process.
pub struct Fleet {
    pub proc: Proc,
    /// Further processes of a fleet larger than [`DEVICES_PER_PROCESS`] (no control API used).
    pub shards: Vec<Proc>,
    /// Control API base (of the first process's devices).
    pub control: String,
    /// (name, API base) per device.
    pub devices: Vec<(String, String)>,
}

/// Devices one simulator process serves at most. Each device holds a listening socket and the
/// gateway's keep-alive connections to it, and a process may open 20,000 files on the machines
/// the tests run on; a real site's devices are separate hosts with no such shared limit.
pub const DEVICES_PER_PROCESS: usize = 4000;

impl Fleet {
    /// Starts devices named `prefix-1..=prefix-n`; above [`DEVICES_PER_PROCESS`], in several
    /// processes, the second one's devices named `prefix2-1..`, and so on.
    pub async fn start(dir: &Path, prefix: &str, n: usize) -> Result<Fleet> {
        let (proc, control, mut devices) =
            Self::start_one(dir, prefix, n.min(DEVICES_PER_PROCESS), "devices").await?;
        let mut shards = Vec::new();
        let mut left = n.saturating_sub(DEVICES_PER_PROCESS);
        while left > 0 {
            let k = shards.len() + 2;
            let count = left.min(DEVICES_PER_PROCESS);
            let (p, _, more) =
                Self::start_one(dir, &format!("{prefix}{k}"), count, &format!("devices-{k}"))
                    .await?;
            shards.push(p);
            devices.extend(more);
            left -= count;
        }
        Ok(Fleet {
            proc,
            shards,
            control,
            devices,
        })
    }

    async fn start_one(
        dir: &Path,
        prefix: &str,
        n: usize,
        log: &str,
    ) -> Result<(Proc, String, Vec<(String, String)>)> {
        let args = vec![
            "http".to_string(),
            "--name".into(),
            prefix.into(),
            "--count".into(),
            n.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--control".into(),
            "127.0.0.1:0".into(),
        ];
        let (proc, ready) = Proc::start("device-fixtures", &args, dir, log).await?;
        let control = ready["control"].as_str().context("control")?.to_string();
        let devices = ready["devices"]
            .as_array()
            .context("devices")?
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or_default().to_string(),
                    d["api"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        Ok((proc, control, devices))
    }

    /// The simulator processes' ids.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.proc)
            .chain(&self.shards)
            .filter_map(|p| p.child.id())
            .collect()
    }

    /// Sets faults on one device, e.g. `{"offline": true}`.
    pub async fn fault(&self, name: &str, faults: Value) -> Result<Value> {
        let (status, body) = post(
            &format!("{}/_control/devices/{name}/faults", self.control),
            &faults,
        )
        .await?;
        if status != 200 {
            bail!("setting faults on {name}: {status} {body}");
        }
        Ok(body)
    }

    /// The device's control view (faults, config, counters).
    pub async fn view(&self, name: &str) -> Result<Value> {
        let (status, body) = get(&format!("{}/_control/devices/{name}", self.control)).await?;
        if status != 200 {
            bail!("device view {name}: {status} {body}");
        }
        Ok(body)
    }
}

/// A simulated serial temperature controller on a pseudo-terminal.
pub struct SerialSim {
    pub proc: Proc,
    /// Control API base.
    pub control: String,
    /// The stable link to the current pty: the path a gateway configuration uses.
    pub path: String,
}

impl SerialSim {
    /// Starts units with these addresses (none: one unaddressed unit), linked at `dir/<link>`.
    pub async fn start(dir: &Path, link: &str, addresses: &[&str]) -> Result<SerialSim> {
        let path = dir.join(link);
        let mut args = vec![
            "serial".to_string(),
            "--link".into(),
            path.display().to_string(),
            "--control".into(),
            "127.0.0.1:0".into(),
        ];
        for a in addresses {
            args.push("--address".into());
            args.push(a.to_string());
        }
        let (proc, ready) = Proc::start("device-fixtures", &args, dir, link).await?;
        let control = ready["control"].as_str().context("control")?.to_string();
        Ok(SerialSim {
            proc,
            control,
            path: path.display().to_string(),
        })
    }

    /// Sets faults, e.g. `{"no_reply": true}`; answers once a `disappear` change is done.
    pub async fn fault(&self, faults: Value) -> Result<Value> {
        let (status, body) = post(&format!("{}/_control/faults", self.control), &faults).await?;
        if status != 200 {
            bail!("setting serial faults: {status} {body}");
        }
        Ok(body)
    }

    /// Path, setpoints per unit, request count and faults.
    pub async fn state(&self) -> Result<Value> {
        let (status, body) = get(&format!("{}/_control/state", self.control)).await?;
        if status != 200 {
            bail!("serial state: {status} {body}");
        }
        Ok(body)
    }
}

/// gatewayd with a generated configuration.
pub struct Gateway {
    pub proc: Proc,
    pub config_path: PathBuf,
    /// `[admin] address_file` of the configuration, if it names one.
    pub admin_file: Option<PathBuf>,
}

impl Gateway {
    /// Writes `config` to `dir/gatewayd.toml` and starts `gatewayd run`.
    pub async fn start(dir: &Path, config: &str) -> Result<Gateway> {
        let config_path = dir.join("gatewayd.toml");
        std::fs::write(&config_path, config)?;
        Self::start_with(dir, &config_path).await
    }

    /// Starts `gatewayd run` on an existing config file.
    pub async fn start_with(dir: &Path, config_path: &Path) -> Result<Gateway> {
        Self::spawn(dir, config_path, &[], &[])
    }

    /// Starts `gatewayd [extra args] run --config FILE` with extra environment. A stale admin
    /// address file is removed first, so [`Gateway::admin`] only sees this run's address.
    pub fn spawn(
        dir: &Path,
        config_path: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Gateway> {
        let text = std::fs::read_to_string(config_path)?;
        let admin_file = text.lines().find_map(|l| {
            let v = l.trim().strip_prefix("address_file")?.trim_start();
            Some(PathBuf::from(v.strip_prefix('=')?.trim().trim_matches('"')))
        });
        if let Some(f) = &admin_file {
            let _ = std::fs::remove_file(f);
        }
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.extend([
            "run".to_string(),
            "--config".into(),
            config_path.display().to_string(),
        ]);
        let (proc, ()) = Proc::spawn("gatewayd", &args, dir, "gatewayd", env)?;
        Ok(Gateway {
            proc,
            config_path: config_path.to_path_buf(),
            admin_file,
        })
    }

    /// Base URL of the admin API (`http://127.0.0.1:PORT`), once gatewayd has written it.
    pub async fn admin(&self) -> Result<String> {
        let file = self
            .admin_file
            .clone()
            .context("the configuration sets no [admin] address_file")?;
        eventually(
            "gatewayd admin address file",
            Duration::from_secs(20),
            || {
                let file = file.clone();
                async move {
                    let text = std::fs::read_to_string(&file).unwrap_or_default();
                    Ok(text
                        .trim()
                        .parse::<std::net::SocketAddr>()
                        .ok()
                        .map(|a| format!("http://{a}")))
                }
            },
        )
        .await
    }
}

fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .expect("client builds")
    })
}

async fn read(resp: reqwest::Response) -> Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Ok((status, body))
}

/// `GET url` -> (status, JSON body).
pub async fn get(url: &str) -> Result<(u16, Value)> {
    read(client().get(url).send().await?).await
}

/// `GET url` -> (status, body as text): the admin API's `/metrics` and `/healthz`.
pub async fn get_text(url: &str) -> Result<(u16, String)> {
    let r = client().get(url).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

/// The value of the sample line `series` (name and labels exactly) in a metrics page.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `POST url` with a JSON body -> (status, JSON body).
pub async fn post(url: &str, body: &Value) -> Result<(u16, Value)> {
    read(client().post(url).json(body).send().await?).await
}

/// Invokes a method through the operator API; returns (status, body, elapsed).
pub async fn invoke(
    api: &str,
    device: &str,
    method: &str,
    params: Value,
    timeout_s: u64,
) -> Result<(u16, Value, Duration)> {
    let started = Instant::now();
    let (s, b) = post(
        &format!("{api}/api/v1/devices/{device}/methods/{method}"),
        &serde_json::json!({"params": params, "timeout_seconds": timeout_s}),
    )
    .await?;
    Ok((s, b, started.elapsed()))
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `within`. Used to await a
/// state the system announces (presence), never as a fixed delay.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the stub shows `device` with the given effective online state.
pub async fn await_device_online(api: &str, device: &str, online: bool) -> Result<Value> {
    let url = format!("{api}/api/v1/devices/{device}");
    eventually(
        &format!("device {device} online={online}"),
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let (s, b) = get(&url).await?;
                Ok((s == 200 && b["online"] == online).then_some(b))
            }
        },
    )
    .await
}

/// Waits until the stub shows `gateway` with the given online state.
pub async fn await_gateway_online(api: &str, gateway: &str, online: bool) -> Result<()> {
    let url = format!("{api}/api/v1/gateways");
    eventually(
        &format!("gateway {gateway} online={online}"),
        Duration::from_secs(20),
        || {
            let url = url.clone();
            let gateway = gateway.to_string();
            async move {
                let (_, b) = get(&url).await?;
                let found = b
                    .as_array()
                    .and_then(|a| a.iter().find(|g| g["id"] == gateway.as_str()))
                    .is_some_and(|g| g["online"] == online);
                Ok(found.then_some(()))
            }
        },
    )
    .await
}

/// Picks a free loopback port (for a process that must be restarted on the same port).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `PATCH url` with a JSON body and an optional `If-Match` -> (status, JSON body).
pub async fn patch(url: &str, body: &Value, if_match: Option<&str>) -> Result<(u16, Value)> {
    let mut req = client().patch(url).json(body);
    if let Some(v) = if_match {
        req = req.header("if-match", v);
    }
    read(req.send().await?).await
}

/// `DELETE url` -> (status, JSON body).
pub async fn delete(url: &str) -> Result<(u16, Value)> {
    read(client().delete(url).send().await?).await
}

/// A whole site on loopback: the cloud stub, `n` simulated AGVs (`agv-1..`) and gatewayd
/// configured for them, all started and the devices online.
pub struct Site {
    pub gateway: Gateway,
    pub fleet: Fleet,
    pub stub: Stub,
    /// Broker the stub was started with (to restart it on the same port).
    pub broker: Broker,
    pub stub_db: String,
    /// Field order is drop order: processes first, their log directory last.
    pub dir: tempfile::TempDir,
}

/// How [`Site::start_opts`] sets gatewayd up.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// TOML appended to the generated configuration.
    pub extra: String,
    /// Whether the AGVs are probed on `/health` (else: no health path, as many devices have).
    pub health_path: bool,
    /// Directory of gatewayd's store (default: the site directory).
    pub store_dir: Option<PathBuf>,
    /// Lines added to gatewayd's `[cloud]` section.
    pub cloud_extra: String,
}

impl Default for SiteOptions {
    fn default() -> Self {
        Self {
            extra: String::new(),
            health_path: true,
            store_dir: None,
            cloud_extra: String::new(),
        }
    }
}

/// Gateway id used by [`Site`].
pub const SITE_GATEWAY: &str = "site-1";

impl Site {
    /// Starts a site whose stub keeps its SQLite file in the site directory and whose embedded
    /// broker listens on a port that stays the same across stub restarts.
    pub async fn start(n: usize) -> Result<Site> {
        Self::start_with(n, "").await
    }

    /// Like [`Site::start`], with `extra` TOML appended to gatewayd's configuration.
    pub async fn start_with(n: usize, extra: &str) -> Result<Site> {
        // The port is free when chosen; another test's process may take it before the stub
        // binds it, and the stub then refuses to start: choose again.
        let mut attempt = 0;
        loop {
            let broker = Broker::Embedded(format!("127.0.0.1:{}", free_port()?));
            match Self::start_on(broker, n, extra).await {
                Err(e) if attempt < 2 && format!("{e:#}").contains("cannot listen") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// A site whose stub uses `broker` (e.g. an external Mosquitto).
    pub async fn start_on(broker: Broker, n: usize, extra: &str) -> Result<Site> {
        Self::start_opts(
            broker,
            n,
            SiteOptions {
                extra: extra.to_string(),
                ..SiteOptions::default()
            },
        )
        .await
    }

    /// A site with [`SiteOptions`].
    pub async fn start_opts(broker: Broker, n: usize, opts: SiteOptions) -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let stub_db = dir.path().join("cloud-stub.db").display().to_string();
        let stub = Stub::start(dir.path(), &broker, &stub_db).await?;
        let fleet = Fleet::start(dir.path(), "agv", n).await?;
        let store = match &opts.store_dir {
            Some(d) => d.join("gatewayd.db"),
            None => dir.path().join("gatewayd.db"),
        };
        let mut text = config::GatewayConfig {
            gateway_id: SITE_GATEWAY,
            broker: &stub.mqtt,
            store: &store,
            devices: &fleet.devices,
            probe_interval_ms: 100,
        }
        .render();
        if !opts.cloud_extra.is_empty() {
            text = text.replacen(
                "reconnect_max_ms = 1000\n",
                &format!("reconnect_max_ms = 1000\n{}\n", opts.cloud_extra),
                1,
            );
        }
        if !opts.health_path {
            text = text.replace("path = \"/health\"\n", "");
        }
        text += &opts.extra;
        let config_path = dir.path().join("gatewayd.toml");
        std::fs::write(&config_path, text)?;
        let gateway = Self::gatewayd(dir.path(), &config_path)?;
        for (name, _) in &fleet.devices {
            // On failure, what gatewayd and the stub said: a start-up that never came online is
            // otherwise hard to read after the fact.
            await_device_online(&stub.api, name, true)
                .await
                .map_err(|e| {
                    e.context(format!(
                        "gatewayd log:\n{}\ncloud-stub log:\n{}",
                        gateway.proc.tail(),
                        stub.proc.tail()
                    ))
                })?;
        }
        Ok(Site {
            gateway,
            fleet,
            stub,
            broker,
            stub_db,
            dir,
        })
    }

    fn gatewayd(dir: &Path, config_path: &Path) -> Result<Gateway> {
        Gateway::spawn(
            dir,
            config_path,
            &[],
            &[("RUST_LOG", "info,gatewayd=debug")],
        )
    }

    /// Starts gatewayd again (after a stop or kill) and waits until the gateway is online.
    pub async fn restart_gatewayd(&mut self) -> Result<()> {
        self.gateway = Self::gatewayd(self.dir.path(), &self.gateway.config_path.clone())?;
        await_gateway_online(&self.stub.api, SITE_GATEWAY, true).await
    }

    /// Stops gatewayd with SIGTERM and waits until the stub shows the gateway offline.
    pub async fn stop_gatewayd(&mut self) -> Result<()> {
        let code = self.gateway.proc.terminate().await?;
        anyhow::ensure!(code == Some(0), "gatewayd exited with {code:?}");
        await_gateway_online(&self.stub.api, SITE_GATEWAY, false).await
    }

    /// Kills gatewayd with SIGKILL and waits until the stub shows the gateway offline.
    pub async fn kill_gatewayd(&mut self) -> Result<()> {
        self.gateway.proc.kill9().await;
        await_gateway_online(&self.stub.api, SITE_GATEWAY, false).await
    }

    /// Kills the stub (and its embedded broker) and starts it again on the same port and file.
    pub async fn restart_stub(&mut self) -> Result<()> {
        self.stub.proc.kill9().await;
        self.stub = Stub::start(self.dir.path(), &self.broker, &self.stub_db).await?;
        Ok(())
    }

    /// Waits until gatewayd's log contains `needle` (debug logging is on for gatewayd).
    pub async fn await_log(&self, needle: &str) -> Result<()> {
        let log = self.gateway.proc.log.clone();
        eventually(
            &format!("gatewayd log line containing {needle:?}"),
            Duration::from_secs(20),
            || {
                let log = log.clone();
                let needle = needle.to_string();
                async move {
                    Ok(std::fs::read_to_string(&log)?
                        .contains(&needle)
                        .then_some(()))
                }
            },
        )
        .await
    }

    /// `GET /api/v1/devices/{device}/twin`.
    pub async fn twin(&self, device: &str) -> Result<Value> {
        let (s, b) = get(&format!("{}/api/v1/devices/{device}/twin", self.stub.api)).await?;
        anyhow::ensure!(s == 200, "twin of {device}: {s} {b}");
        Ok(b)
    }

    /// `PATCH /api/v1/devices/{device}/twin/desired`.
    pub async fn patch_desired(
        &self,
        device: &str,
        patch_body: Value,
        if_match: Option<&str>,
    ) -> Result<(u16, Value)> {
        patch(
            &format!("{}/api/v1/devices/{device}/twin/desired", self.stub.api),
            &patch_body,
            if_match,
        )
        .await
    }

    /// Waits until the reported half of `device` satisfies `check`.
    pub async fn await_twin<F>(&self, device: &str, what: &str, check: F) -> Result<Value>
    where
        F: Fn(&Value) -> bool,
    {
        let url = format!("{}/api/v1/devices/{device}/twin", self.stub.api);
        let check = &check;
        eventually(what, Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let (s, b) = get(&url).await?;
                Ok((s == 200 && check(&b)).then_some(b))
            }
        })
        .await
    }

    /// `POST /api/v1/devices/{device}/messages`.
    pub async fn send(
        &self,
        device: &str,
        payload: Value,
        ttl_seconds: u64,
    ) -> Result<(u16, Value)> {
        post(
            &format!("{}/api/v1/devices/{device}/messages", self.stub.api),
            &serde_json::json!({"payload": payload, "ttl_seconds": ttl_seconds}),
        )
        .await
    }

    /// Sends a message (must be accepted with 202) and returns its id.
    pub async fn send_ok(&self, device: &str, payload: Value, ttl_seconds: u64) -> Result<String> {
        let (s, b) = self.send(device, payload, ttl_seconds).await?;
        anyhow::ensure!(s == 202, "send: {s} {b}");
        Ok(b["id"].as_str().unwrap_or_default().to_string())
    }

    /// `GET /api/v1/devices/{device}/messages/{id}`.
    pub async fn message(&self, device: &str, id: &str) -> Result<Value> {
        let (s, b) = get(&format!(
            "{}/api/v1/devices/{device}/messages/{id}",
            self.stub.api
        ))
        .await?;
        anyhow::ensure!(s == 200, "message {id}: {s} {b}");
        Ok(b)
    }

    /// Waits until message `id` has a final status, and returns it.
    pub async fn await_final(&self, device: &str, id: &str, within: Duration) -> Result<Value> {
        eventually(&format!("message {id} final"), within, || async move {
            let m = self.message(device, id).await?;
            let done = !matches!(m["status"].as_str(), Some("queued") | Some("delivered"));
            Ok(done.then_some(m))
        })
        .await
    }
}

/// How many times a simulated AGV executed the message `id` (its `X-Message-Id` counter in the
/// device's control view).
pub fn executions(view: &Value, id: &str) -> u64 {
    view["executions"][id].as_u64().unwrap_or(0)
}

/// `PUT url` with a JSON body -> (status, JSON body).
pub async fn put_json(url: &str, body: &Value) -> Result<(u16, Value)> {
    read(client().put(url).json(body).send().await?).await
}

/// A Mosquitto broker, stopped on drop.
pub struct Mosquitto {
    child: std::process::Child,
    /// `mqtt://127.0.0.1:PORT` (for [`Mosquitto::start`]'s plain listener).
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Mosquitto {
    /// An open broker on a free port (fails with a clear message when Mosquitto is not
    /// installed).
    pub fn start() -> Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\n");
        let mut m = Self::run(dir.path(), &conf, &[port])?;
        m._dir = Some(dir);
        Ok(m)
    }

    /// Starts Mosquitto in `dir` with `conf` plus the settings every test wants (no
    /// persistence, 4 MiB packets, TCP_NODELAY) and waits until each of `ports` accepts; its
    /// log is `dir/mosquitto.log`.
    pub fn run(dir: &Path, conf: &str, ports: &[u16]) -> Result<Mosquitto> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                anyhow!("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
            })?;
        let path = dir.join("mosquitto.conf");
        std::fs::write(
            &path,
            format!("persistence false\nmax_packet_size 4194304\nset_tcp_nodelay true\n{conf}"),
        )?;
        let log = dir.join("mosquitto.log");
        let child = std::process::Command::new(exe)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let m = Mosquitto {
            child,
            url: format!("mqtt://127.0.0.1:{}", ports.first().copied().unwrap_or(0)),
            _dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "mosquitto did not start; see {}",
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
