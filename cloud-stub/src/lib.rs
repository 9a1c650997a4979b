//! The cloud side of gatewayd for development and tests: an embedded MQTT broker (or an
//! external one), an operator HTTP API, and a SQLite store. This version covers the gateway
//! and device registry, presence, and synchronous RPC.
//!
//! [`run`] takes an already bound API listener and a shutdown token, so tests run the real
//! thing in-process on `127.0.0.1:0`. The broker is separate ([`start_embedded_broker`]) because
//! it can also be external.

pub mod api;
pub mod broker;
pub mod calls;
mod error;
pub mod registry;
pub mod session;
pub mod store;
pub mod uplink;

pub use broker::{resolve_listen, start_embedded_broker, wait_until_accepting};
pub use error::StubError;
pub use session::{MqttTarget, TargetError};
pub use store::DbLocation;

use axum::serve::ListenerExt;
use calls::PendingCalls;
use gatewayd_protocol::{ErrorCode, RpcError};
use registry::Registry;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uplink::Uplink;

/// MQTT client id of the stub unless told otherwise.
pub const DEFAULT_CLIENT_ID: &str = "cloud-stub";

/// How long calls in flight may still finish after shutdown begins.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What the stub needs to run.
#[derive(Debug, Clone)]
pub struct StubConfig {
    /// Where the stub's own MQTT client connects.
    pub mqtt: MqttTarget,
    /// Where the SQLite database lives.
    pub db: DbLocation,
    /// The stub's MQTT client id.
    pub client_id: String,
}

impl StubConfig {
    /// A config with the default client id.
    pub fn new(mqtt: MqttTarget, db: DbLocation) -> Self {
        StubConfig {
            mqtt,
            db,
            client_id: DEFAULT_CLIENT_ID.to_string(),
        }
    }
}

/// Runs the stub until `shutdown` is cancelled: loads the store, starts the MQTT session and
/// serves the operator API on `api`. On shutdown it stops taking connections, gives calls in
/// flight a short grace period, fails the rest with `shutting_down`, disconnects from the
/// broker and waits for the last store write.
pub async fn run(
    config: StubConfig,
    api: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StubError> {
    let db = config.db.clone();
    let (store, (gateways, devices)) = tokio::task::spawn_blocking(move || {
        let store = Store::open(&db)?;
        let loaded = store.load()?;
        Ok::<_, store::StoreError>((store, loaded))
    })
    .await
    .map_err(|e| task_failed("store open", e))??;
    tracing::info!(
        gateways = gateways.len(),
        devices = devices.len(),
        "registry loaded"
    );
    let registry = Arc::new(Mutex::new(Registry::from_records(gateways, devices)));
    let (writer, writer_thread) = store.spawn_writer()?;
    let calls = Arc::new(PendingCalls::default());

    let session_stop = CancellationToken::new();
    let uplink = Uplink::new(Arc::clone(&registry), Arc::clone(&calls), writer);
    let (publisher, session) = session::spawn(
        &config.mqtt,
        &config.client_id,
        uplink,
        session_stop.clone(),
    );

    let app = api::router(api::AppState {
        registry,
        calls: Arc::clone(&calls),
        publisher,
        shutdown: shutdown.clone(),
    });
    tracing::info!(addr = %api.local_addr()?, "operator api listening");
    let api = api.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an api connection");
        }
    });
    let mut server = tokio::spawn(
        axum::serve(api, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );

    let early = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = &mut server => Some(r),
    };
    if early.is_none() {
        tracing::info!(in_flight = calls.len(), "shutting down");
        if tokio::time::timeout(DRAIN_GRACE, calls.wait_idle())
            .await
            .is_err()
        {
            let err = RpcError::new(ErrorCode::ShuttingDown, "cloud-stub is shutting down");
            let failed = calls.fail_all(&err);
            tracing::warn!(
                failed_calls = failed,
                "calls still in flight after the grace period"
            );
        }
    }
    session_stop.cancel();
    let served = match early {
        Some(r) => r,
        None => server.await,
    };
    let session_done = session.await;
    // The session owned the last store writer; once it is gone the writer thread drains and ends.
    let writer_done = tokio::task::spawn_blocking(move || writer_thread.join()).await;

    served
        .map_err(|e| task_failed("api server", e))?
        .map_err(StubError::Api)?;
    session_done.map_err(|e| task_failed("mqtt session", e))?;
    match writer_done {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(StubError::Task {
                name: "store writer",
                reason: "panicked".into(),
            })
        }
        Err(e) => return Err(task_failed("store writer", e)),
    }
    tracing::info!("stopped");
    Ok(())
}

fn task_failed(name: &'static str, e: tokio::task::JoinError) -> StubError {
    StubError::Task {
        name,
        reason: e.to_string(),
    }
}

/// Current wall clock, unix milliseconds (the cloud's clock for deadlines and last-seen times).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
