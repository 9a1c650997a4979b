//! gatewayd: keeps one MQTT session to the cloud and turns cloud RPCs into calls against the
//! local APIs of the devices named in its configuration. `run` is the whole daemon; the binary
//! only parses arguments, loads configuration and installs logging and signals.

pub mod clock;
pub mod cloud;
pub mod config;
pub mod device;
pub mod inbox;
pub mod outbox;
pub mod rpc;
pub mod store;
pub mod template;
pub mod twin;
pub mod twins;

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
}

/// Runs the daemon until `shutdown` is cancelled, then drains: no new RPCs, in-flight ones get
/// `rpc.shutdown_grace_ms`, offline presence is published, the session closes.
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let store = store::Store::open(&config.store.path)?;
    let devices = Arc::new(
        device::Devices::from_config(&mut config, clock::now_ms())
            .map_err(GatewayError::Devices)?,
    );
    let background = TaskTracker::new();
    for d in devices.all() {
        background.spawn(device::health::probe_loop(
            d.clone(),
            devices.presence.clone(),
            shutdown.clone(),
        ));
    }
    let twins = Arc::new(twins::Twins::new(store.clone(), &devices));
    let outbox = outbox::Wake::default();
    for d in devices.all() {
        background.spawn(twins::worker(
            d.clone(),
            devices.clone(),
            twins.clone(),
            outbox.clone(),
            shutdown.clone(),
        ));
    }
    let inbox = Arc::new(inbox::Inbox::new(
        store.clone(),
        config.messages.clone(),
        devices.clone(),
        outbox.clone(),
    ));
    let recovered = inbox.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            messages = recovered,
            "messages interrupted by a restart during their device call ended failed"
        );
    }
    for d in devices.all() {
        background.spawn(inbox::worker(d.clone(), inbox.clone(), shutdown.clone()));
    }
    let shared = Arc::new(cloud::Shared {
        devices: devices.clone(),
        store: store.clone(),
        twins,
        inbox,
        outbox,
    });
    let work = TaskTracker::new();
    let session = cloud::Session::start(&config, shared, work.clone(), shutdown.clone())?;
    info!(
        gateway = %config.gateway.id,
        devices = devices.len(),
        broker = %config.cloud.broker,
        "gatewayd running"
    );

    shutdown.cancelled().await;
    info!("shutting down: draining in-flight calls");
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
    drop(store);
    info!("stopped");
    Ok(())
}
