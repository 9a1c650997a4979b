//! The system under test: a fleet of simulated devices and a gatewayd configured for them,
//! attached to a running cloud stub, started through the harness.

use crate::config::GatewayConfig;
use crate::{get, Fleet, Gateway, Proc, Stub};
use anyhow::{anyhow, bail, Context, Result};
use gatewayd_protocol::GatewayId;
use std::path::Path;
use std::time::{Duration, Instant};

/// A gatewayd and its devices. Field order is drop order: the gateway goes first.
pub struct Rig {
    pub gateway: Gateway,
    pub fleet: Fleet,
    pub gateway_id: GatewayId,
    /// From gatewayd's start until the stub showed every device online.
    pub ready_after: Duration,
}

impl Rig {
    /// Starts `n` devices named `{prefix}-1..` and a gatewayd `gateway_id` for them (logs and
    /// store under `dir`), and waits until the stub shows every device online.
    pub async fn start(
        stub: &Stub,
        dir: &Path,
        gateway_id: &str,
        prefix: &str,
        n: usize,
        probe_interval_ms: u64,
    ) -> Result<Rig> {
        std::fs::create_dir_all(dir)?;
        let fleet = Fleet::start(dir, prefix, n).await?;
        // From gatewayd's start: the simulators' own start-up is not the gateway's.
        let started = Instant::now();
        let store = dir.join("gatewayd.db");
        let config = GatewayConfig {
            gateway_id,
            broker: &stub.mqtt,
            store: &store,
            devices: &fleet.devices,
            probe_interval_ms,
        }
        .render();
        let gateway = Gateway::start(dir, &config).await?;
        let within = Duration::from_secs(30 + n as u64 / 20);
        await_all_online(&stub.api, gateway_id, n, within)
            .await
            .with_context(|| format!("see {}", gateway.proc.log.display()))?;
        Ok(Rig {
            gateway,
            fleet,
            gateway_id: GatewayId::new(gateway_id)?,
            ready_after: started.elapsed(),
        })
    }

    /// gatewayd's process id.
    pub fn gateway_pid(&self) -> Result<u32> {
        self.gateway.proc.child.id().context("gatewayd has exited")
    }

    /// The devices' processes, named for the CPU figures (one name: their use is summed).
    pub fn fleet_pids(&self) -> Result<Vec<(&'static str, u32)>> {
        let pids = self.fleet.pids();
        if pids.len() != 1 + self.fleet.shards.len() {
            bail!("a device-fixtures process has exited");
        }
        Ok(pids.into_iter().map(|p| ("device-fixtures", p)).collect())
    }

    /// Stops gatewayd (SIGTERM, so it leaves the broker cleanly) and then the devices.
    pub async fn stop(mut self) -> Result<()> {
        self.gateway.proc.terminate().await?;
        self.fleet.proc.kill9().await;
        for p in &mut self.fleet.shards {
            p.kill9().await;
        }
        Ok(())
    }
}

/// Starts the cloud stub for the bench: its embedded broker on a free port (or `broker`, an
/// external one), store in memory, and room for `max_queue` open messages per device (the
/// message phase queues more than the default 50 per device). Logs go to `dir/cloud-stub.log`.
pub async fn start_stub(dir: &Path, max_queue: usize, broker: Option<&str>) -> Result<Stub> {
    let mut args: Vec<String> = [
        "--api-listen",
        "127.0.0.1:0",
        "--db",
        ":memory:",
        "--max-queue",
        &max_queue.to_string(),
    ]
    .map(String::from)
    .into();
    match broker {
        Some(url) => args.extend(["--broker".to_string(), url.to_string()]),
        None => args.extend(["--mqtt-listen".to_string(), "127.0.0.1:0".to_string()]),
    }
    let (proc, ready) = Proc::start("cloud-stub", &args, dir, "cloud-stub").await?;
    let field = |k: &str| {
        ready[k]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("cloud-stub ready line lacks {k}: {ready}"))
    };
    Ok(Stub {
        api: field("api")?,
        mqtt: match broker {
            Some(url) => url.to_string(),
            None => field("mqtt")?,
        },
        proc,
    })
}

/// Waits until the stub's device list shows `n` devices of `gateway` online. Polls every
/// 50 ms: the list of a big gateway is large, and this runs while the gateway starts.
pub async fn await_all_online(api: &str, gateway: &str, n: usize, within: Duration) -> Result<()> {
    let url = format!("{api}/api/v1/devices");
    let deadline = Instant::now() + within;
    let mut online = 0;
    loop {
        if let Ok((200, list)) = get(&url).await {
            online = list.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|d| d["gateway"] == gateway && d["online"] == true)
                    .count()
            });
            if online >= n {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("the stub shows {online} of {n} devices of {gateway} online after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
