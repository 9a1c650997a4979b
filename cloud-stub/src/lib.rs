//! The cloud side of gatewayd for development and tests: an embedded MQTT broker (or an
//! external one), an operator HTTP API with its event stream and a web console on top of it,
//! and a SQLite store. It covers the gateway and device registry, presence, synchronous RPC,
//! device twins and cloud-to-device messages.
//!
//! [`run`] takes an already bound API listener and a shutdown token, so tests run the real
//! thing in-process on `127.0.0.1:0`. The broker is separate ([`start_embedded_broker`]) because
//! it can also be external.

pub mod api;
pub mod broker;
pub mod calls;
pub mod clock;
mod error;
pub mod events;
pub mod gwconfig;
pub mod messages;
pub mod registry;
pub mod security;
pub mod session;
pub mod store;
pub mod twins;
pub mod uplink;

pub use broker::{
    check_tls_files, resolve_listen, start_broker, start_embedded_broker, wait_until_accepting,
    EmbeddedBroker, TlsListener,
};
pub use clock::now_ms;
pub use error::StubError;
pub use session::{MqttTarget, TargetError};
pub use store::DbLocation;

use axum::serve::ListenerExt;
use calls::PendingCalls;
use gatewayd_protocol::{ErrorCode, RpcError};
use messages::Outbox;
use registry::Registry;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twins::Twins;
use uplink::Uplink;

/// MQTT client id of the stub unless told otherwise.
pub const DEFAULT_CLIENT_ID: &str = "cloud-stub";
/// Open (queued or delivered) messages allowed per device unless told otherwise.
pub const DEFAULT_MAX_QUEUE: usize = 50;
/// Messages published to a gateway and not yet acknowledged, at most, unless told otherwise.
pub const DEFAULT_SEND_WINDOW: usize = 200;
/// How long after its TTL a delivered message waits for its final feedback, unless told
/// otherwise (see [`messages::queue::VERDICT_GRACE_MS`]).
pub const DEFAULT_VERDICT_GRACE: Duration =
    Duration::from_millis(messages::queue::VERDICT_GRACE_MS);

/// How long calls in flight may still finish after shutdown begins.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What the stub needs to run.
#[derive(Debug, Clone)]
pub struct StubConfig {
    /// Where the stub's own MQTT client connects.
    pub mqtt: MqttTarget,
    /// Where the SQLite database lives.
    pub db: DbLocation,
    /// The stub's MQTT client id; also its user name when it has a password.
    pub client_id: String,
    /// The password of the stub's MQTT login (user name = `client_id`); none: no login.
    pub password: Option<security::Secret>,
    /// Bearer token the operator API requires (`/healthz` excepted); none: open API.
    pub api_token: Option<security::Secret>,
    /// Open (queued or delivered) messages allowed per device; more are refused with
    /// `queue_full`.
    pub max_queue: usize,
    /// Messages published to one gateway and not yet acknowledged (`received`), at most.
    pub send_window: usize,
    /// How long after its TTL a delivered message waits for the gateway's final feedback: at
    /// a third of it the message is sent again (the gateway repeats its latest feedback), at
    /// the end it is final `may_have_run`.
    pub verdict_grace: Duration,
    /// Events a subscriber of `GET /api/v1/events` may fall behind before it misses some (and
    /// is told so).
    pub event_capacity: usize,
}

impl StubConfig {
    /// A config with the default client id and limits.
    pub fn new(mqtt: MqttTarget, db: DbLocation) -> Self {
        StubConfig {
            mqtt,
            db,
            client_id: DEFAULT_CLIENT_ID.to_string(),
            password: None,
            api_token: None,
            max_queue: DEFAULT_MAX_QUEUE,
            send_window: DEFAULT_SEND_WINDOW,
            verdict_grace: DEFAULT_VERDICT_GRACE,
            event_capacity: events::CAPACITY,
        }
    }
}

/// Runs the stub until `shutdown` is cancelled: loads the store, starts the MQTT session, the
/// message sender and expiry tasks and the twin publisher, and serves the operator API on
/// `api`. On shutdown it stops taking connections, gives calls in flight a short grace period,
/// fails the rest with `shutting_down`, stops the tasks, disconnects from the broker and waits
/// for the last store write.
pub async fn run(
    config: StubConfig,
    api: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StubError> {
    let db = config.db.clone();
    let (store, (gateways, devices), known, open) = tokio::task::spawn_blocking(move || {
        let store = Store::open(&db)?;
        let registry = store.load()?;
        let known = store.load_known_devices()?;
        let open = store.load_open_messages()?;
        Ok::<_, store::StoreError>((store, registry, known, open))
    })
    .await
    .map_err(|e| task_failed("store open", e))??;
    tracing::info!(
        gateways = gateways.len(),
        devices = devices.len(),
        twins = known.len(),
        open_messages = open.len(),
        "store loaded"
    );
    let mut registry = Registry::from_records(gateways, devices);
    registry.remember(known);
    let registry = Arc::new(Mutex::new(registry));
    let (store, store_thread) = store.spawn()?;
    let calls = Arc::new(PendingCalls::default());
    let events = events::Events::new(config.event_capacity);
    let (twins, desired_out) = Twins::new(store.clone(), events.clone());
    let limits = messages::Limits {
        max_queue: config.max_queue,
        window: config.send_window,
        verdict_grace_ms: config
            .verdict_grace
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    let outbox = Outbox::new(
        store.clone(),
        Arc::clone(&registry),
        limits,
        open,
        events.clone(),
    );

    let tasks_stop = CancellationToken::new();
    let gateway_configs = gwconfig::GatewayConfigs::default();
    let uplink = Uplink::new(
        Arc::clone(&registry),
        Arc::clone(&calls),
        store.clone(),
        twins.clone(),
        Arc::clone(&outbox),
        events.clone(),
    )
    .with_configs(gateway_configs.clone());
    let (publisher, session) = session::spawn(
        &config.mqtt,
        &config.client_id,
        config.password.as_ref(),
        uplink,
        tasks_stop.clone(),
    );
    let sender = tokio::spawn(messages::sender::run(
        Arc::clone(&outbox),
        publisher.clone(),
        tasks_stop.clone(),
    ));
    let expiry = tokio::spawn(messages::expiry::run(
        Arc::clone(&outbox),
        tasks_stop.clone(),
    ));
    let twin_publisher = tokio::spawn(twins::run_publisher(
        desired_out,
        Arc::clone(&registry),
        publisher.clone(),
        tasks_stop.clone(),
    ));

    let app = api::router(api::AppState {
        registry,
        calls: Arc::clone(&calls),
        publisher,
        shutdown: shutdown.clone(),
        twins,
        outbox,
        api_token: config.api_token.clone().map(Arc::new),
        events,
        gateway_configs,
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
    // The API drains first (its requests may wait on the store), then the tasks stop, then the
    // store finishes what is queued.
    let served = match early {
        Some(r) => r,
        None => server.await,
    };
    tasks_stop.cancel();
    let session_done = session.await;
    let tasks_done = [
        ("message sender", sender.await),
        ("message expiry", expiry.await),
        ("twin publisher", twin_publisher.await),
    ];
    store.stop();
    let store_done = tokio::task::spawn_blocking(move || store_thread.join()).await;

    served
        .map_err(|e| task_failed("api server", e))?
        .map_err(StubError::Api)?;
    session_done.map_err(|e| task_failed("mqtt session", e))?;
    for (name, done) in tasks_done {
        done.map_err(|e| task_failed(name, e))?;
    }
    match store_done {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(StubError::Task {
                name: "store",
                reason: "panicked".into(),
            })
        }
        Err(e) => return Err(task_failed("store", e)),
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
