//! The devices at work, and changing them while the daemon runs.
//!
//! Each device has its own tasks (health probes, twin worker, reported polling, message
//! worker), each holding the device. A live reload (SIGHUP with a changed, valid file)
//! works out which devices the change touches, builds their replacements from the new file,
//! swaps them into the registry in one step, waits for the old ones' tasks to finish what they
//! started, and starts the new ones':
//!
//! - untouched devices, their ports and their tasks keep running; nothing of theirs is rebuilt;
//! - an added device starts; a removed one stops after its in-flight calls, its queued
//!   messages end `failed` with the reason, and its twin stays (in the store and the cloud);
//! - a changed device (its entry, its profile, or its serial port changed) is replaced between
//!   calls: new calls go to the new device at once, the old one finishes its own. A serial port
//!   or Modbus TCP endpoint is rebuilt with every device on it when any of them changes, since
//!   one task owns the bus;
//! - sections that cannot change live (gateway, store, admin, log, rpc, messages, and of
//!   `cloud` its profile and packet limit) are named in the outcome and wait for a restart;
//!   the rest is applied;
//! - the cloud session stays up and announces the new catalog and presence once; changed
//!   `[cloud]` connection settings (broker, identity, credentials, timers) instead drop the
//!   connection and connect with the new ones, which announces everything anew.

use crate::cloud::{Reconfigure, Switch};
use crate::config::cloud::CloudConfig;
use crate::config::{Config, DeviceKind};
use crate::device::{health, Device, Devices};
use crate::inbox::{self, Inbox};
use crate::outbox::Wake;
use crate::reload::{Fingerprint, Outcome};
use crate::twins::{self, Twins};
use gatewayd_protocol::DeviceId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Prefixes of the fingerprint entries a live reload applies.
const LIVE: [&str; 3] = ["devices.", "profiles.", "serial_ports."];

/// What starts and stops device tasks.
#[derive(Clone)]
pub struct Plant {
    pub devices: Arc<Devices>,
    pub twins: Arc<Twins>,
    pub inbox: Arc<Inbox>,
    pub outbox: Wake,
    /// Every device task is also tracked here, so shutdown waits for all of them.
    pub background: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Plant {
    /// Starts the tasks of `d`.
    pub fn start(&self, d: &Arc<Device>, twin_idle: bool, inbox_idle: bool) {
        self.start_probes(d);
        self.start_workers(d, twin_idle, inbox_idle);
    }

    /// Starts the health probes of `d`; they end when it leaves the configuration.
    pub fn start_probes(&self, d: &Arc<Device>) {
        self.background.spawn(health::probe_loop(
            d.clone(),
            self.devices.presence.clone(),
            self.shutdown.clone(),
        ));
    }

    /// Starts the twin and message workers of `d` (and its polling, if it polls).
    /// `twin_idle` / `inbox_idle`: the start-up queries found no work for it, so its workers
    /// wait for a wake-up before they read the store. The workers end by themselves, between
    /// calls, when the device's presence channel closes (it left or was replaced).
    pub fn start_workers(&self, d: &Arc<Device>, twin_idle: bool, inbox_idle: bool) {
        let presence = &self.devices.presence;
        // Only devices that poll get a polling task: a task per device that ends at once
        // leaves holes in the heap between long-lived allocations (measured: about 20 MB of
        // idle RSS at 10,000 devices).
        if d.config.reported_poll.is_some() {
            self.background.spawn(until_retired(
                presence.watch(&d.id),
                Box::pin(twins::poll_reported(
                    d.clone(),
                    self.devices.clone(),
                    self.twins.clone(),
                    self.outbox.clone(),
                    self.shutdown.clone(),
                )),
            ));
        }
        self.background.spawn(twins::worker(
            d.clone(),
            self.devices.clone(),
            self.twins.clone(),
            self.outbox.clone(),
            twin_idle,
            self.shutdown.clone(),
        ));
        self.background.spawn(inbox::worker(
            d.clone(),
            self.inbox.clone(),
            inbox_idle,
            self.shutdown.clone(),
        ));
    }
}

/// Runs `task` until the device's presence channel closes (the device left or was replaced).
/// The task comes boxed: an `async fn` keeps a by-value future argument and the copy moved
/// into `select!` side by side, twice the task's size for every device (measured: 30 MB more
/// idle at 10,000 devices).
async fn until_retired<F: std::future::Future<Output = ()>>(
    mut presence: watch::Receiver<bool>,
    task: std::pin::Pin<Box<F>>,
) {
    let retired = async { while presence.changed().await.is_ok() {} };
    tokio::select! {
        _ = task => {}
        _ = retired => {}
    }
}

/// Applies changed configurations to the running daemon.
pub struct Reloader {
    pub plant: Plant,
    pub session: Reconfigure,
    /// Moves the cloud session to changed `[cloud]` connection settings.
    pub switch: Option<Switch>,
    /// The `[cloud]` section the session runs on.
    pub cloud: CloudConfig,
    /// Set by an `apply` that moved the session: fires once the old connection is dropped.
    pub moved: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What the running configuration is (the live sections as applied, the others as started).
    pub running: Fingerprint,
    /// How long a removed or replaced device may take to finish its in-flight work.
    pub grace: Duration,
    pub max_publish: usize,
}

impl Reloader {
    /// Moves the session to new connection settings: `endpoint`, made of `cloud`; `whole`:
    /// nothing of the new `[cloud]` waits for a restart, so it is what runs now.
    fn move_session(
        &mut self,
        switch: Switch,
        (endpoint, cloud, whole): (crate::cloud::Endpoint, CloudConfig, bool),
        newer: &Fingerprint,
    ) {
        info!(broker = %cloud.broker, "cloud connection settings changed: reconnecting with them");
        self.moved = Some(switch.to(endpoint));
        self.cloud = cloud;
        if whole {
            self.running = self.running.with_live(newer, &["cloud"]);
        }
    }
}

/// A device's bus: the serial port or Modbus TCP endpoint whose task it shares.
fn bus(c: &crate::config::DeviceConfig) -> Option<String> {
    match c.kind {
        DeviceKind::Serial | DeviceKind::ModbusRtu => c.port.as_ref().map(|p| format!("port {p}")),
        DeviceKind::ModbusTcp => Some(format!(
            "endpoint {}:{}",
            c.host.as_deref().unwrap_or_default(),
            crate::config::modbus::tcp_port(c).unwrap_or_default()
        )),
        DeviceKind::Http => None,
    }
}

impl Reloader {
    /// Applies `new` (valid) and says what happened.
    pub async fn apply(&mut self, mut new: Config) -> Outcome {
        let newer = Fingerprint::of(&new);
        let changes = self.running.changes(&newer);
        if changes.is_empty() {
            return Outcome::Unchanged;
        }
        let (live, restart): (Vec<String>, Vec<String>) = changes
            .into_iter()
            .partition(|c| LIVE.iter().any(|p| c.starts_with(p)));
        let mut restart: Vec<String> = restart
            .into_iter()
            .filter(|c| !c.starts_with("devices") && !c.starts_with("profiles"))
            .collect();
        // `[cloud]` connection settings move the session; built first, so a missing
        // certificate or password file changes nothing.
        let mut endpoint = None;
        if let Some(switch) = self
            .switch
            .as_ref()
            .filter(|_| restart.iter().any(|c| c == "cloud"))
        {
            // The fields that wait for a restart keep their running values meanwhile.
            let fixed = self.cloud.restart_fields(&new.cloud);
            let cloud = new.cloud.clone().keeping_restart_fields_of(&self.cloud);
            // Compared as values: serialized, a changed inline password would look the same.
            if cloud != self.cloud {
                match switch.prepare(&cloud, &new.gateway.id) {
                    Ok(e) => endpoint = Some((e, cloud, fixed.is_empty())),
                    Err(e) => return Outcome::Failed(e),
                }
            }
            restart.retain(|c| c != "cloud");
            restart.extend(fixed.iter().map(|f| format!("cloud.{f}")));
        }
        if live.is_empty() {
            if let (Some(e), Some(switch)) = (endpoint, &self.switch) {
                self.move_session(switch.clone(), e, &newer);
            }
            return Outcome::Applied {
                added: Vec::new(),
                removed: Vec::new(),
                replaced: Vec::new(),
                restart_needed: restart,
            };
        }

        // Which devices the live changes touch.
        let old: Vec<Arc<Device>> = self.plant.devices.all();
        let old_view: Vec<(String, Option<String>, Option<String>)> = old
            .iter()
            .map(|d| (d.id.to_string(), d.config.profile.clone(), bus(&d.config)))
            .collect();
        // Held no longer: a retired device is waited for until its last holder lets go.
        drop(old);
        let new_view: Vec<(String, Option<String>, Option<String>)> = new
            .devices
            .iter()
            .map(|(id, c)| (id.clone(), c.profile.clone(), bus(c)))
            .collect();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut buses: BTreeSet<String> = BTreeSet::new();
        for c in &live {
            if let Some(id) = c.strip_prefix("devices.") {
                touched.insert(id.to_string());
            } else if let Some(p) = c.strip_prefix("profiles.") {
                for (id, profile, _) in old_view.iter().chain(&new_view) {
                    if profile.as_deref() == Some(p) {
                        touched.insert(id.clone());
                    }
                }
            } else if let Some(s) = c.strip_prefix("serial_ports.") {
                buses.insert(format!("port {s}"));
            }
        }
        // A bus is rebuilt whole: every device on a bus that any touched device is (or was) on.
        loop {
            for (id, _, b) in old_view.iter().chain(&new_view) {
                if touched.contains(id) {
                    if let Some(b) = b {
                        buses.insert(b.clone());
                    }
                }
            }
            let before = touched.len();
            for (id, _, b) in old_view.iter().chain(&new_view) {
                if b.as_ref().is_some_and(|b| buses.contains(b)) {
                    touched.insert(id.clone());
                }
            }
            if touched.len() == before {
                break;
            }
        }
        let old_ids: BTreeSet<String> = old_view.iter().map(|(id, ..)| id.clone()).collect();
        let new_ids: BTreeSet<String> = new_view.iter().map(|(id, ..)| id.clone()).collect();
        let removed: Vec<String> = touched
            .iter()
            .filter(|id| old_ids.contains(*id) && !new_ids.contains(*id))
            .cloned()
            .collect();
        let added: Vec<String> = touched
            .iter()
            .filter(|id| new_ids.contains(*id) && !old_ids.contains(*id))
            .cloned()
            .collect();
        let replaced: Vec<String> = touched
            .iter()
            .filter(|id| new_ids.contains(*id) && old_ids.contains(*id))
            .cloned()
            .collect();

        // Build the new devices before touching anything: a failure changes nothing.
        let build: Vec<String> = added.iter().chain(&replaced).cloned().collect();
        let built = match self.plant.devices.build(&mut new, &build) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        if let Err(e) = gatewayd_protocol::chunk::plan_catalog(
            built.devices.iter().map(|d| d.info()),
            self.max_publish,
        ) {
            return Outcome::Failed(format!(
                "{e}; raise cloud.max_packet_bytes or shorten its methods"
            ));
        }
        let presence = self.plant.devices.presence.clone();
        let fresh = match built.start(&presence) {
            Ok(d) => d,
            Err(e) => return Outcome::Failed(e),
        };

        // One swap: new calls reach the new devices from here on.
        let removed_ids: Vec<DeviceId> = removed
            .iter()
            .filter_map(|id| DeviceId::new(id.clone()).ok())
            .collect();
        for d in &fresh {
            self.plant.twins.wakers.add(d.id.clone());
            self.plant.inbox.wakers.add(d.id.clone());
        }
        let retired = self
            .plant
            .devices
            .swap(&removed_ids, fresh.clone(), crate::clock::now_ms());
        for id in &removed_ids {
            self.plant.twins.wakers.remove(id);
            self.plant.inbox.wakers.remove(id);
        }
        // The old devices finish what they started (their presence channel closed, so their
        // workers stop between calls; in-flight RPCs finish on them), then the new ones start:
        // each old device tells when its last holder let go of it.
        let mut gone = Vec::with_capacity(retired.len());
        for d in retired {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = d.gone.set(tx);
            gone.push((d.id.clone(), rx));
        }
        for (id, rx) in gone {
            if tokio::time::timeout(self.grace, rx).await.is_err() {
                warn!(device = %id, grace_ms = self.grace.as_millis() as u64, "a retired device was still in use at the end of the grace period");
            }
        }
        for id in &removed_ids {
            match self
                .plant
                .inbox
                .fail_device(
                    id,
                    "the device was removed from the gateway's configuration",
                )
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    info!(device = %id, messages = n, "queued messages of a removed device ended failed");
                    self.plant.outbox.wake();
                }
                Err(e) => {
                    warn!(device = %id, error = %e, "cannot end the queued messages of a removed device")
                }
            }
        }
        for d in &fresh {
            self.plant.start(d, false, false);
        }
        self.session.announce(
            replaced
                .iter()
                .filter_map(|id| DeviceId::new(id.clone()).ok())
                .collect(),
        );
        // The running configuration now has the new live sections; the others stay as started.
        self.running = self.running.with_live(&newer, &LIVE);
        if let (Some(e), Some(switch)) = (endpoint, &self.switch) {
            self.move_session(switch.clone(), e, &newer);
        }
        crate::release_freed_memory();
        Outcome::Applied {
            added,
            removed,
            replaced,
            restart_needed: restart,
        }
    }
}
