//! A swarm of simulated gateways for load on the cloud side: N gateways, each on its own MQTT
//! connection (client id = gateway id, clean session, last will on `up/state`), with cheap
//! simulated devices in the same process and no HTTP anywhere. Each gateway speaks the protocol
//! of `docs/protocol.md` through the `gatewayd-protocol` crate: at every connect it subscribes
//! to its `down/#` and publishes its catalog and presence parts, its birth (with a boot id and
//! a store id) and its twin sync; it answers every RPC at once, acknowledges each message with
//! `received` and then its outcome, applies desired updates by the version rule and reports
//! them with their apply state, and reconnects by itself with jittered backoff.
//!
//! - `sim`: one gateway and its devices, no I/O (what it announces and answers);
//! - `link`: one gateway's connection task (rumqttc, backlog, reconnects);
//! - `observe`: what the stub's operator API and log, and the broker, show of a swarm.
//!
//! One tokio task per gateway; a thousand of them cost a few tens of megabytes and little CPU
//! while idle (a keep-alive ping each 10 s).

mod link;
pub mod observe;
pub mod sim;

use anyhow::{bail, Context, Result};
use gatewayd_protocol::limits::DEFAULT_MAX_PUBLISH;
use gatewayd_protocol::{DeviceId, GatewayId};
use serde::Serialize;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// The gateway id prefix unless told otherwise.
pub const DEFAULT_PREFIX: &str = "swarm";

/// How long [`Swarm::stop`] waits for the gateways to leave in order.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Reconnect delays: capped exponential, each drawn with full jitter in `0..=current`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// gatewayd's defaults: 200 ms doubling to 30 s.
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SwarmOptions {
    /// The broker, `mqtt://host:port`.
    pub broker: String,
    /// How many gateways (and connections).
    pub gateways: usize,
    /// Devices behind each gateway.
    pub devices: usize,
    /// Gateway ids are `{prefix}-00000`.., device ids `{gateway}-d000`..
    pub prefix: String,
    /// Largest publish a gateway sends; announcements are split to fit.
    pub max_publish: usize,
    pub keep_alive: Duration,
    pub backoff: Backoff,
}

impl SwarmOptions {
    /// `gateways` gateways of `devices` devices each on `broker`, with gatewayd's defaults
    /// (128 KiB publishes, keep-alive 10 s, reconnects 200 ms doubling to 30 s).
    pub fn new(broker: &str, gateways: usize, devices: usize) -> SwarmOptions {
        SwarmOptions {
            broker: broker.to_string(),
            gateways,
            devices,
            prefix: DEFAULT_PREFIX.into(),
            max_publish: DEFAULT_MAX_PUBLISH,
            keep_alive: Duration::from_secs(10),
            backoff: Backoff::default(),
        }
    }
}

/// What the gateways of a swarm have seen and done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SwarmStats {
    /// Gateways connected now (ConnAck seen, connection not lost since).
    pub connected: u64,
    /// ConnAcks so far, all gateways.
    pub connects: u64,
    /// Connections lost or refused so far.
    pub connection_errors: u64,
    pub rpc_ok: u64,
    pub rpc_errors: u64,
    pub messages_completed: u64,
    /// New messages that ended otherwise (rejected, expired).
    pub messages_not_completed: u64,
    /// Redelivered messages whose latest feedback was repeated.
    pub messages_repeated: u64,
    pub desired_applied: u64,
    pub desired_ignored: u64,
    /// Desired patches that skipped a version, answered with a twin sync.
    pub desired_resyncs: u64,
    /// Publishes not meant for the gateway or unreadable.
    pub ignored: u64,
}

/// The counters every gateway task updates.
#[derive(Default)]
struct Counters {
    connected: AtomicI64,
    connects: AtomicU64,
    connection_errors: AtomicU64,
    rpc_ok: AtomicU64,
    rpc_errors: AtomicU64,
    messages_completed: AtomicU64,
    messages_not_completed: AtomicU64,
    messages_repeated: AtomicU64,
    desired_applied: AtomicU64,
    desired_ignored: AtomicU64,
    desired_resyncs: AtomicU64,
    ignored: AtomicU64,
    /// Woken at every change, for [`Swarm::until`].
    changed: Notify,
}

impl Counters {
    fn connected(&self, delta: i64) {
        self.connected.fetch_add(delta, Relaxed);
        if delta > 0 {
            self.connects.fetch_add(1, Relaxed);
        }
        self.changed.notify_waiters();
    }

    fn connection_error(&self) {
        self.connection_errors.fetch_add(1, Relaxed);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> SwarmStats {
        SwarmStats {
            connected: self.connected.load(Relaxed).max(0) as u64,
            connects: self.connects.load(Relaxed),
            connection_errors: self.connection_errors.load(Relaxed),
            rpc_ok: self.rpc_ok.load(Relaxed),
            rpc_errors: self.rpc_errors.load(Relaxed),
            messages_completed: self.messages_completed.load(Relaxed),
            messages_not_completed: self.messages_not_completed.load(Relaxed),
            messages_repeated: self.messages_repeated.load(Relaxed),
            desired_applied: self.desired_applied.load(Relaxed),
            desired_ignored: self.desired_ignored.load(Relaxed),
            desired_resyncs: self.desired_resyncs.load(Relaxed),
            ignored: self.ignored.load(Relaxed),
        }
    }
}

/// A running swarm. Dropping it aborts every gateway at once (their wills fire);
/// [`Swarm::stop`] makes them leave in order.
pub struct Swarm {
    gateways: Vec<GatewayId>,
    devices: usize,
    prefix: String,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Swarm {
    /// Starts every gateway's connection task on the current runtime and returns at once; use
    /// [`Swarm::until`] to wait for them to connect.
    pub fn start(opts: &SwarmOptions) -> Result<Swarm> {
        anyhow::ensure!(
            opts.gateways > 0 && opts.devices > 0,
            "a swarm needs at least one gateway with one device"
        );
        let (host, port) = crate::bench::cloud::parse_broker(&opts.broker)?;
        let config = Arc::new(link::LinkConfig {
            host,
            port,
            keep_alive: opts.keep_alive,
            backoff: opts.backoff,
        });
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let mut rng = Rng::seeded();
        let mut tasks = JoinSet::new();
        let mut gateways = Vec::with_capacity(opts.gateways);
        let now = now_ms();
        for g in 0..opts.gateways {
            let id = GatewayId::new(gateway_id(&opts.prefix, g))
                .with_context(|| format!("gateway prefix {:?}", opts.prefix))?;
            let devices = (0..opts.devices)
                .map(|d| DeviceId::new(device_id(&opts.prefix, g, d)))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("device ids of {id}"))?;
            let sim = sim::SimGateway::new(
                id.clone(),
                devices,
                opts.max_publish,
                format!("{:016x}", rng.next_u64()),
                format!("swarm-store-{:016x}", rng.next_u64()),
                rng.next_u64(),
                now,
            );
            let task_rng = Rng(rng.next_u64());
            tasks.spawn(link::run(
                sim,
                config.clone(),
                counters.clone(),
                stopped.clone(),
                task_rng,
            ));
            gateways.push(id);
        }
        Ok(Swarm {
            gateways,
            devices: opts.devices,
            prefix: opts.prefix.clone(),
            counters,
            stop,
            tasks,
        })
    }

    /// Every gateway id, in order.
    pub fn gateways(&self) -> &[GatewayId] {
        &self.gateways
    }

    /// Devices behind each gateway.
    pub fn devices_per_gateway(&self) -> usize {
        self.devices
    }

    /// Device `device` of gateway `gateway` (both counted from 0).
    pub fn device(&self, gateway: usize, device: usize) -> DeviceId {
        DeviceId::new(device_id(&self.prefix, gateway, device)).expect("checked at start")
    }

    /// The counters now.
    pub fn stats(&self) -> SwarmStats {
        self.counters.snapshot()
    }

    /// Waits until `done` holds for the counters, at most `within`; returns them.
    pub async fn until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&SwarmStats) -> bool,
    ) -> Result<SwarmStats> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.counters.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let stats = self.stats();
            if done(&stats) {
                return Ok(stats);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!("swarm: {what} not reached within {within:?}; counters: {stats:?}");
            }
        }
    }

    /// Makes every connected gateway leave in order (offline state, retained announcements
    /// deleted, DISCONNECT) and waits for them, at most [`STOP_GRACE`].
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// Gateway `g` of a swarm with ids starting `prefix`.
pub fn gateway_id(prefix: &str, g: usize) -> String {
    format!("{prefix}-{g:05}")
}

/// Device `d` of gateway `g`.
pub fn device_id(prefix: &str, g: usize, d: usize) -> String {
    format!("{}-d{d:03}", gateway_id(prefix, g))
}

/// A small non-cryptographic generator (splitmix64): backoff jitter, ids, random picks.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the process's random hash keys and the clock.
    pub fn seeded() -> Rng {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Rng(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A delay drawn uniformly from `0..=max` (full jitter).
    pub fn jitter(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(self.next_u64() % nanos.saturating_add(1))
    }
}

/// Wall clock, unix milliseconds (deadlines, TTLs and stamps are on the cloud's clock, which
/// is this machine's).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_unique_across_gateways() {
        assert_eq!(gateway_id("swarm", 7), "swarm-00007");
        assert_eq!(device_id("swarm", 7, 3), "swarm-00007-d003");
        assert!(DeviceId::new(device_id("swarm", 99_999, 999)).is_ok());
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let mut rng = Rng(1);
        let max = Duration::from_millis(200);
        let draws: Vec<Duration> = (0..1000).map(|_| rng.jitter(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        assert!(draws.iter().any(|d| *d < max / 4) && draws.iter().any(|d| *d > max * 3 / 4));
        assert_eq!(rng.jitter(Duration::ZERO), Duration::ZERO);
        assert!((0..100).all(|_| rng.below(3) < 3));
    }
}
