//! gatewayd: keeps one MQTT session to the cloud and turns cloud RPCs into calls against the
//! local APIs of the devices named in its configuration. `run` is the whole daemon; the binary
//! only parses arguments, loads configuration and installs logging and signals.

pub mod admin;
pub mod backoff;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod device;
pub mod inbox;
pub mod live;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod reload;
pub mod remote;
pub mod rpc;
pub mod store;
pub mod supervise;
pub mod template;
pub mod twin;
pub mod twins;
pub mod wakeups;

#[cfg(test)]
mod serial_props;
#[cfg(test)]
mod template_props;

use config::Config;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("devices: {0}")]
    Devices(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Session(#[from] cloud::SessionError),
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
    #[error("critical task stopped: {0}")]
    TaskDied(String),
}

/// What the binary hands the daemon besides its configuration: the admin listener it bound
/// from `admin.listen` (none when `admin.enabled = false`) and the service manager notifier.
#[derive(Debug, Default)]
pub struct Operations {
    /// The admin HTTP listener; `admin.address_file` receives its address.
    pub admin: Option<std::net::TcpListener>,
    /// systemd notifications (`notify.rs`); the default sends nothing.
    pub notifier: notify::Notifier,
    /// Live reload: the running configuration's fingerprint (taken before `run` consumes the
    /// configuration) and the re-read files to apply (SIGHUP). None: no live reload.
    pub reloads: Option<(
        reload::Fingerprint,
        tokio::sync::mpsc::Receiver<reload::Request>,
    )>,
    /// The configuration file, re-read when the cloud sends a desired configuration (the
    /// file stays the root of trust). None: remote configuration is refused.
    pub config_path: Option<std::path::PathBuf>,
}

/// Runs the daemon until `shutdown` is cancelled, then drains: no new RPCs, in-flight ones get
/// `rpc.shutdown_grace_ms`, offline presence is published, the session closes. `ops` carries
/// the admin listener and the systemd notifier.
pub async fn run(
    mut config: Config,
    ops: Operations,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let notifier = ops.notifier;
    let metrics = Arc::new(metrics::Metrics::default());
    let store = store::Store::open(&config.store.path)?;
    // The cloud's overlay (remote configuration) over the file, if this gateway takes one.
    let limits = config.remote_config.clone();
    let overlay = store.call(remote::load).await?;
    let kept = store.call(remote::load_state).await?;
    let mut remote_state = remote::State::new(limits.enabled, kept);
    config = remote::overlay_file(config, overlay.as_ref(), &mut remote_state);
    // Applied only when a stored overlay was merged: the running configuration is then not
    // the file the binary fingerprinted.
    let merged_fingerprint = overlay.is_some().then(|| reload::Fingerprint::of(&config));
    let running_sections = limits.enabled.then(|| remote::running_sections(&config));
    let devices = Arc::new(
        device::Devices::from_config(&mut config, clock::now_ms())
            .map_err(GatewayError::Devices)?,
    );
    let background = TaskTracker::new();
    let supervisor = supervise::Supervisor::new(shutdown.clone());
    background
        .spawn(supervisor.critical("store health", store::heal(store.clone(), shutdown.clone())));
    let twins = Arc::new(twins::Twins::new(store.clone(), &devices, metrics.clone()));
    let outbox = outbox::Wake::default();
    let owing = twins.owing().await?;
    let inbox = Arc::new(inbox::Inbox::new(
        store.clone(),
        config.messages.clone(),
        devices.clone(),
        outbox.clone(),
        metrics.clone(),
    ));
    let recovered = inbox.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            messages = recovered,
            "messages interrupted by a restart during their device call ended failed"
        );
    }
    let pending = inbox.pending_devices().await?;
    let plant = live::Plant {
        devices: devices.clone(),
        twins: twins.clone(),
        inbox: inbox.clone(),
        outbox: outbox.clone(),
        background: background.clone(),
        shutdown: shutdown.clone(),
    };
    devices.presence.expect_first_probes(devices.len());
    for d in devices.all() {
        plant.start(
            &d,
            !owing.contains(d.id.as_str()),
            !pending.contains(d.id.as_str()),
        );
    }
    drop((owing, pending));
    let config_reports = cloud::ConfigReports::default();
    let (remote_tx, remote_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(cloud::Shared {
        remote: Some(remote_tx),
        config_reports: config_reports.clone(),
        devices: devices.clone(),
        store: store.clone(),
        twins,
        inbox,
        outbox,
        metrics: metrics.clone(),
    });
    let work = TaskTracker::new();
    let session = cloud::Session::start(&config, shared, work.clone(), supervisor.clone())?;
    let (running, reloads) = match ops.reloads {
        Some((fingerprint, rx)) => (merged_fingerprint.unwrap_or(fingerprint), Some(rx)),
        None => (reload::Fingerprint::of(&config), None),
    };
    let reload_status = Arc::new(reload::Status::new(&running));
    {
        let mut reloader = live::Reloader {
            plant,
            session: session.reconfigure(),
            switch: Some(session.switch()),
            cloud: config.cloud.clone(),
            moved: None,
            running,
            grace: Duration::from_millis(config.rpc.shutdown_grace_ms),
            max_publish: config.cloud.max_packet_bytes,
        };
        let (probation_tx, mut probations) = tokio::sync::mpsc::unbounded_channel();
        let mut remote = remote::Remote {
            limits,
            state: remote_state,
            config_path: ops.config_path.clone(),
            store: store.clone(),
            reports: config_reports,
            boot_id: session.boot_id(),
            connected: session.connected(),
            running_sections,
            probations: probation_tx,
            max_publish: config.cloud.max_packet_bytes,
        };
        remote.report(&reload_status);
        remote.resume_probation().await;
        let status = reload_status.clone();
        let stop = shutdown.clone();
        background.spawn(async move {
            let mut requests = reloads;
            let mut desired = remote_rx;
            loop {
                tokio::select! {
                    r = async {
                        match requests.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let Some(request) = r else { requests = None; continue };
                        let outcome = match request.loaded {
                            Err(e) => reload::Outcome::Invalid(e.problems),
                            Ok(file) => {
                                let config = remote.over_file(file).await;
                                let outcome = reloader.apply(config).await;
                                reloader.moved = None;
                                outcome
                            }
                        };
                        status.record(&reloader.running, outcome.clone(), clock::now_ms());
                        remote.report(&status);
                        let _ = request.reply.send(outcome);
                    }
                    d = desired.recv() => {
                        let Some(d) = d else { return };
                        if let Some(outcome) = remote.desired(d, &mut reloader).await {
                            status.record(&reloader.running, outcome, clock::now_ms());
                        }
                        remote.report(&status);
                    }
                    Some((version, how)) = probations.recv() => {
                        if let Some(outcome) = remote.probation_ended(version, how, &mut reloader).await {
                            status.record(&reloader.running, outcome, clock::now_ms());
                        }
                        remote.report(&status);
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    // Admin API, status and watchdog run until the very end, through the drain.
    let ops_stop = CancellationToken::new();
    let ops_tasks = TaskTracker::new();
    if let Some(listener) = ops.admin {
        let state = Arc::new(admin::AdminState {
            devices: devices.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            connected: session.connected(),
            shutdown: shutdown.clone(),
            tasks: supervisor.clone(),
            reload: reload_status.clone(),
        });
        match admin::serve(
            listener,
            state,
            config.admin.address_file.as_deref(),
            ops_stop.clone(),
        ) {
            Ok(server) => {
                ops_tasks.spawn(server);
            }
            Err(e) => {
                session.close(Duration::from_secs(2)).await;
                return Err(GatewayError::Admin(e));
            }
        }
    }
    // Configuration valid, store open, first connection attempt under way.
    notifier.ready(&notify::status_line(
        *session.connected().borrow(),
        &devices,
    ));
    ops_tasks.spawn(notify::status_loop(
        notifier.clone(),
        devices.clone(),
        session.connected(),
        ops_stop.clone(),
    ));
    ops_tasks.spawn(collect_freed_memory(ops_stop.clone()));
    if let Some(period) = notifier.watchdog_period() {
        ops_tasks.spawn(notify::watchdog(
            notifier.clone(),
            store.clone(),
            supervisor.clone(),
            period,
            ops_stop.clone(),
        ));
    }
    info!(
        gateway = %config.gateway.id,
        devices = devices.len(),
        broker = %config.cloud.broker,
        "gatewayd running"
    );

    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        _ = supervisor.failed() => Some(supervisor.dead().join(", ")),
    };
    if let Some(dead) = fatal {
        tracing::error!(tasks = %dead, "a critical task stopped: exiting so the service manager restarts gatewayd");
        notifier.stopping("a critical task stopped");
        shutdown.cancel();
        session.close(Duration::from_secs(2)).await;
        ops_stop.cancel();
        return Err(GatewayError::TaskDied(dead));
    }
    info!("shutting down: draining in-flight calls");
    notifier.stopping("shutting down: draining in-flight calls");
    session.stop_accepting();
    work.close();
    let grace = Duration::from_millis(config.rpc.shutdown_grace_ms);
    if tokio::time::timeout(grace, work.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = config.rpc.shutdown_grace_ms,
            "in-flight calls cut off at the end of the grace period"
        );
    }
    session.close(Duration::from_secs(2)).await;
    background.close();
    background.wait().await;
    ops_stop.cancel();
    ops_tasks.close();
    ops_tasks.wait().await;
    drop(store);
    info!("stopped");
    Ok(())
}

/// How often freed memory is handed back without waiting for more allocations.
const COLLECT_EVERY: Duration = Duration::from_secs(5);

/// mimalloc hands freed memory back only on later allocator activity, which an idle gateway
/// does not have: after a change to 10,000 devices their idle connections close 5 to 10 s
/// later, and their 200 MB would stay resident. A collection every few seconds returns it;
/// an idle gateway of 10,000 devices still measures 0.00 % of a core over 30 s with it (bench
/// phase 5).
async fn collect_freed_memory(stop: CancellationToken) {
    let mut every = tokio::time::interval(COLLECT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        // SAFETY: a collection only frees and purges unused memory; no preconditions.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

/// Parsing a large configuration, and building and publishing a large catalog, peak far above
/// what stays in use; this hands the freed pages back to the system so a gateway does not
/// carry that peak for the life of the process: mimalloc's (Rust allocations; an idle process
/// makes no allocation that would purge them) and the C library's (SQLite's).
pub fn release_freed_memory() {
    // SAFETY: a forced collection only frees and purges unused memory; no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
