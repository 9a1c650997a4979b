//! The MQTT session. Tasks share one `AsyncClient`:
//! - the link task (`link.rs`) owns the `EventLoop`, forwards events and is the only way
//!   publishes enter the client;
//! - the dispatcher receives link events in one `select!`, (re)announces the gateway at every
//!   ConnAck, and hands each publish to its handler: RPCs are acknowledged at once and run on
//!   the work tracker; desired twin updates are acknowledged only after they are committed;
//! - the presence task republishes the retained device snapshot when it changes;
//! - the outbox sender (`outbox.rs`) delivers reported patches and feedback.

use super::adapter::{Adapter, Ctx, Inbound, ReplyTo};
use super::link::{self, Link, LinkEvent, Publisher};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::cloud::CloudConfig;
use crate::config::{parse_broker, Config};
use crate::device::Devices;
use crate::inbox::{Inbox, Receipt};
use crate::metrics::Metrics;
use crate::outbox::{self, Wake};
use crate::rpc;
use crate::store::{Health, Store, StoreError};
use crate::supervise::Supervisor;
use crate::twins::Twins;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::twin::DesiredDecision;
use gatewayd_protocol::{
    DeviceId, ErrorCode, GatewayId, MessageId, RequestId, RpcError, RpcOutcome, RpcRequest,
    RpcResponse, PROTOCOL_VERSION,
};
use rand::Rng;
use rumqttc::{
    AsyncClient, MqttOptions, NetworkOptions, Publish, QoS, TlsConfiguration, Transport,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Why the session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cloud.broker: {0}")]
    Broker(String),
    /// A file of the `[cloud]` section could not be read or used; never carries a secret.
    #[error("{0}")]
    Security(String),
}

/// A desired configuration for the daemon's remote-configuration task, and the
/// acknowledgement it fires once the configuration is stored (or refused for good).
pub struct RemoteDesired {
    pub desired: gatewayd_protocol::ConfigDesired,
    pub acked: oneshot::Sender<bool>,
}

/// The gateway's latest configuration report: published (retained) at every connect and
/// whenever it changes.
#[derive(Clone, Default)]
pub struct ConfigReports(Arc<(std::sync::Mutex<Option<Vec<u8>>>, tokio::sync::Notify)>);

impl ConfigReports {
    /// A new report: published now if connected, and at every connect.
    pub fn set(&self, report: Vec<u8>) {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        self.0 .1.notify_one();
    }

    fn latest(&self) -> Option<Vec<u8>> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the session's handlers share with the rest of the daemon.
pub struct Shared {
    /// Where desired configurations go; none: the daemon takes none.
    pub remote: Option<mpsc::UnboundedSender<RemoteDesired>>,
    /// The configuration report to publish.
    pub config_reports: ConfigReports,
    pub devices: Arc<Devices>,
    pub store: Store,
    pub twins: Arc<Twins>,
    pub inbox: Arc<Inbox>,
    pub outbox: Wake,
    pub metrics: Arc<Metrics>,
}

/// Asks the session to announce the gateway again (the device set changed); cheap to clone.
#[derive(Clone, Default)]
pub struct Reconfigure(Arc<(tokio::sync::Notify, std::sync::Mutex<Vec<DeviceId>>)>);

impl Reconfigure {
    /// The catalog and presence are announced once more (now if connected, else at the next
    /// connect, which announces anyway); `replaced` devices' desired state is asked again
    /// where the cloud keeps it (their twin properties may have changed).
    pub fn announce(&self, replaced: Vec<DeviceId>) {
        self.0
             .1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(replaced);
        self.0 .0.notify_one();
    }

    fn take_replaced(&self) -> Vec<DeviceId> {
        std::mem::take(&mut *self.0 .1.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Where and how the session connects: what the `[cloud]` settings that can change live
/// (broker, identity, credentials, TLS files, timers) make of the MQTT options.
pub struct Endpoint {
    pub options: MqttOptions,
    pub network: NetworkOptions,
    pub backoff: Backoff,
    /// Published before the link leaves the old connection (offline presence), so the cloud
    /// sees the gateway go rather than lose it.
    pub goodbye: Option<super::adapter::Out>,
    /// Fired by the link once the old connection is dropped and the next attempt uses these.
    pub done: Option<oneshot::Sender<()>>,
}

impl Endpoint {
    /// Reads the files `config.cloud` names (credentials, certificates); an error names the
    /// field, never a secret.
    pub fn of(
        cloud: &CloudConfig,
        gateway_id: &str,
        adapter: &Adapter,
        boot_id: &str,
        store_id: &str,
    ) -> Result<Endpoint, SessionError> {
        let broker = parse_broker(&cloud.broker).map_err(SessionError::Broker)?;
        let security = cloud
            .security()
            .map_err(|problems| SessionError::Security(problems.join("; ")))?;
        let client_id = cloud
            .client_id
            .clone()
            .unwrap_or_else(|| gateway_id.to_string());
        // A clean session: what must survive an outage lives in SQLite (inbox, twin cache,
        // outbox) and the cloud re-sends on reconnect, so the broker keeps no state for us.
        let mut options = MqttOptions::new(client_id, broker.host, broker.port);
        if let Some((username, password)) = &security.login {
            options.set_credentials(username.clone(), password.expose());
        }
        if let Some(tls) = security.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        options
            .set_keep_alive(Duration::from_secs(cloud.keep_alive_s))
            .set_clean_session(true)
            .set_manual_acks(true)
            // Nothing larger than the configured limit ever leaves: announcements are split,
            // oversize RPC results answered with a coded error.
            .set_max_packet_size(MAX_MQTT_PACKET, cloud.max_packet_bytes)
            .set_inflight(500);
        if let Some(will) = adapter.last_will(boot_id, store_id) {
            options.set_last_will(will);
        }
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(cloud.connect_timeout_s);
        Ok(Endpoint {
            options,
            network,
            backoff: Backoff::new(cloud.reconnect_min_ms, cloud.reconnect_max_ms),
            goodbye: None,
            done: None,
        })
    }
}

/// Moves the running session to other `[cloud]` connection settings; cheap to clone.
#[derive(Clone)]
pub struct Switch {
    tx: mpsc::UnboundedSender<Endpoint>,
    adapter: Arc<Adapter>,
    boot_id: String,
    store_id: String,
}

impl Switch {
    /// The endpoint of `config`, built before anything changes (its files may be missing).
    pub fn prepare(&self, cloud: &CloudConfig, gateway_id: &str) -> Result<Endpoint, String> {
        let mut endpoint = Endpoint::of(
            cloud,
            gateway_id,
            &self.adapter,
            &self.boot_id,
            &self.store_id,
        )
        .map_err(|e| e.to_string())?;
        endpoint.goodbye = Some(self.adapter.goodbye(&self.boot_id, &self.store_id));
        Ok(endpoint)
    }

    /// Drops the connection and connects with `endpoint` from now on; the receiver fires once
    /// the link has moved.
    pub fn to(&self, mut endpoint: Endpoint) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        endpoint.done = Some(tx);
        let _ = self.tx.send(endpoint);
        rx
    }
}

/// A running session.
pub struct Session {
    reconfigure: Reconfigure,
    switch: Switch,
    publisher: Publisher,
    adapter: Arc<Adapter>,
    boot_id: String,
    store_id: String,
    connected: watch::Receiver<bool>,
    accepting: Arc<AtomicBool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Session {
    /// Starts the session tasks; RPC work is spawned on `work`. The session runs until
    /// [`Session::close`], so it can still publish offline presence after the daemon's shutdown
    /// signal.
    pub fn start(
        config: &Config,
        shared: Arc<Shared>,
        work: TaskTracker,
        supervisor: Supervisor,
    ) -> Result<Session, SessionError> {
        let gateway = GatewayId::new(config.gateway.id.clone())
            .map_err(|e| SessionError::Broker(format!("gateway id: {e}")))?;
        let boot_id = format!("{:016x}", rand::rng().random::<u64>());
        let adapter = Arc::new(Adapter::new(
            config,
            gateway.clone(),
            shared.devices.clone(),
        ));

        let endpoint = Endpoint::of(
            &config.cloud,
            &config.gateway.id,
            &adapter,
            &boot_id,
            shared.store.id(),
        )?;
        let (client, mut eventloop) = AsyncClient::new(endpoint.options, 4096);
        eventloop.set_network_options(endpoint.network);
        let (switch_tx, switch_rx) = mpsc::unbounded_channel();
        let switch = Switch {
            tx: switch_tx,
            adapter: adapter.clone(),
            boot_id: boot_id.clone(),
            store_id: shared.store.id().to_string(),
        };

        let (publisher, outbound) = link::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(false);
        let (reset_tx, reset) = mpsc::unbounded_channel();
        let (acks_out, acks_in) = mpsc::unbounded_channel();
        let generation = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(
            supervisor.critical(
                "mqtt link",
                Link {
                    eventloop,
                    client: client.clone(),
                    outbound,
                    events: events_tx,
                    acks: acks_tx,
                    connected: connected_tx,
                    reset,
                    acks_in,
                    generation: generation.clone(),
                    backoff: endpoint.backoff,
                    switch: switch_rx,
                    stop: stop.clone(),
                    metrics: shared.metrics.clone(),
                }
                .run()
                .instrument(tracing::info_span!("mqtt", gateway = %gateway)),
            ),
        );
        tasks.spawn(
            supervisor.critical(
                "outbox sender",
                outbox::Sender {
                    store: shared.store.clone(),
                    adapter: adapter.clone(),
                    publisher: publisher.clone(),
                    acks,
                    connected: connected.clone(),
                    wake: shared.outbox.clone(),
                    stop: stop.clone(),
                }
                .run(),
            ),
        );
        let accepting = Arc::new(AtomicBool::new(true));
        let (acks, ack_slots) = mpsc::unbounded_channel();
        tasks.spawn(supervisor.critical(
            "acker",
            acker(
                acks_out,
                ack_slots,
                generation.clone(),
                reset_tx,
                stop.clone(),
            ),
        ));
        let max_publish = config.cloud.max_packet_bytes;
        let dispatcher = Dispatcher {
            max_publish,
            client: client.clone(),
            publisher: publisher.clone(),
            adapter: adapter.clone(),
            boot_id: boot_id.clone(),
            shared: shared.clone(),
            work,
            accepting: accepting.clone(),
            acks,
            generation,
        };
        let reconfigure = Reconfigure::default();
        tasks.spawn(supervisor.critical(
            "dispatcher",
            dispatcher.run(events, reconfigure.clone(), stop.clone()),
        ));
        tasks.spawn(supervisor.critical(
            "presence publisher",
            publish_presence(
                adapter.clone(),
                publisher.clone(),
                boot_id.clone(),
                shared.clone(),
                max_publish,
                connected.clone(),
                stop.clone(),
            ),
        ));
        tasks.spawn(supervisor.critical(
            "store health publisher",
            publish_store_health(
                adapter.clone(),
                publisher.clone(),
                boot_id.clone(),
                shared.clone(),
                max_publish,
                connected.clone(),
                stop.clone(),
            ),
        ));
        Ok(Session {
            reconfigure,
            switch,
            publisher,
            adapter,
            boot_id,
            store_id: shared.store.id().to_string(),
            connected,
            accepting,
            stop,
            tasks,
        })
    }

    /// The handle a live reload uses to have the gateway announced again.
    pub fn reconfigure(&self) -> Reconfigure {
        self.reconfigure.clone()
    }

    /// The handle a live reload uses to move the session to other `[cloud]` settings.
    pub fn switch(&self) -> Switch {
        self.switch.clone()
    }

    /// This run's boot id, as the cloud sees it.
    pub fn boot_id(&self) -> String {
        self.boot_id.clone()
    }

    /// Whether the cloud connection is up.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Stop taking new RPCs; later requests are answered `shutting_down`.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Publishes offline presence, disconnects cleanly (waiting at most `wait`) and stops.
    pub async fn close(self, wait: Duration) {
        self.stop_accepting();
        if *self.connected.borrow() {
            // The link disconnects right after this publish, so nothing overtakes it.
            let bye = self.adapter.goodbye(&self.boot_id, &self.store_id);
            self.publisher
                .publish_then_disconnect(bye.topic, bye.payload, bye.retain)
                .await;
            let mut connected = self.connected.clone();
            let _ = tokio::time::timeout(wait, connected.wait_for(|c| !*c)).await;
        }
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(wait, self.tasks.wait()).await;
    }
}

struct Dispatcher {
    /// `cloud.max_packet_bytes`.
    max_publish: usize,
    client: AsyncClient,
    publisher: Publisher,
    adapter: Arc<Adapter>,
    boot_id: String,
    shared: Arc<Shared>,
    work: TaskTracker,
    accepting: Arc<AtomicBool>,
    acks: mpsc::UnboundedSender<AckSlot>,
    generation: Arc<AtomicU64>,
}

/// One acknowledgement waiting for its turn.
struct AckSlot {
    publish: Publish,
    /// The connection the publish arrived on.
    generation: u64,
    /// Fires when the publish may be acknowledged (`true`: committed) or must not be
    /// (`false`: the commit failed); `None`: at once.
    ready: Option<oneshot::Receiver<bool>>,
}

/// Sends acknowledgements strictly in the order the publishes arrived, as MQTT requires (and
/// rumqttd enforces by dropping the connection): each waits for its own commit and for every
/// earlier one. Acks of an earlier connection are dropped, their packet ids mean nothing now.
///
/// A publish whose commit failed is never acknowledged: the connection is dropped instead (a
/// later ack would break the order), nothing else that arrived on that connection is
/// acknowledged, and the cloud sends again what it has no `received` feedback for once the
/// gateway reconnects. Acks go to the link, which sends one only on the connection its
/// publish came in on.
async fn acker(
    acks: mpsc::UnboundedSender<(u64, Publish)>,
    mut slots: mpsc::UnboundedReceiver<AckSlot>,
    generation: Arc<AtomicU64>,
    reset: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
) {
    // The connection whose acks stopped at a failed commit.
    let mut dropped: Option<u64> = None;
    loop {
        let slot = tokio::select! {
            s = slots.recv() => match s { Some(s) => s, None => return },
            _ = stop.cancelled() => return,
        };
        let stale = |g: u64| g != generation.load(Ordering::SeqCst) || dropped == Some(g);
        if stale(slot.generation) {
            continue;
        }
        let stored = match slot.ready {
            Some(ready) => ready.await.unwrap_or(false),
            None => true,
        };
        if stale(slot.generation) {
            continue;
        }
        if stored {
            let _ = acks.send((slot.generation, slot.publish));
        } else {
            dropped = Some(slot.generation);
            warn!(topic = %slot.publish.topic, "not stored, so not acknowledged: dropping the connection so the cloud sends it again");
            let _ = reset.send("a received publish could not be stored".into());
        }
    }
}

impl Dispatcher {
    fn ctx(&self) -> Ctx<'_> {
        Ctx::new(
            &self.publisher,
            &self.shared,
            &self.boot_id,
            self.max_publish,
        )
    }

    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<LinkEvent>,
        reconfigure: Reconfigure,
        stop: CancellationToken,
    ) {
        let mut connected = false;
        loop {
            // Cancel safety: `recv` and `notified` lose nothing when another branch wins
            // (a `Notify` keeps one permit).
            let event = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = reconfigure.0 .0.notified() => {
                    let replaced = reconfigure.take_replaced();
                    if connected {
                        self.adapter.reconfigured(&self.ctx(), replaced).await;
                        crate::release_freed_memory();
                    }
                    continue;
                }
                _ = self.shared.config_reports.0 .1.notified() => {
                    if connected {
                        self.publish_config_report().await;
                    }
                    continue;
                }
                _ = stop.cancelled() => return,
            };
            match event {
                // The link counted the new connection: acks still queued belong to the
                // previous one's packet ids and are dropped.
                LinkEvent::Connected => {
                    connected = true;
                    self.announce().await
                }
                LinkEvent::Disconnected => connected = false,
                LinkEvent::Publish(p) => self.on_publish(p).await,
            }
        }
    }

    /// Queues the acknowledgement of `p` behind those of earlier publishes.
    fn ack_now(&self, p: Publish) {
        let _ = self.acks.send(AckSlot {
            publish: p,
            generation: self.generation.load(Ordering::SeqCst),
            ready: None,
        });
    }

    /// Queues the acknowledgement of `p`, to be sent once the returned sender fires (after
    /// the commit) and every earlier one was sent.
    fn ack_after(&self, p: Publish) -> oneshot::Sender<bool> {
        let (tx, rx) = oneshot::channel();
        let _ = self.acks.send(AckSlot {
            publish: p,
            generation: self.generation.load(Ordering::SeqCst),
            ready: Some(rx),
        });
        tx
    }

    /// Subscribes, then lets the adapter announce the gateway, at every connect.
    async fn announce(&self) {
        for filter in self.adapter.subscriptions() {
            if let Err(e) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                warn!(error = %e, "cannot subscribe");
            }
        }
        self.adapter.announce(&self.ctx()).await;
        self.publish_config_report().await;
        crate::release_freed_memory();
    }

    async fn publish_config_report(&self) {
        let report = self.shared.config_reports.latest();
        if let (Some(topic), Some(report)) = (self.adapter.config_report_topic(), report) {
            self.publisher.publish(topic, report, true, None).await;
        }
    }

    async fn on_publish(&self, p: Publish) {
        let received_ms = now_ms();
        match self.adapter.decode(&p.topic, &p.payload, received_ms) {
            Inbound::Rpc { req, reply } => {
                // RPCs are never stored: acknowledge as soon as the order allows.
                self.ack_now(p);
                self.on_rpc(req, reply, received_ms);
            }
            Inbound::RpcRefused { reply, error } => {
                self.ack_now(p);
                warn!(code = %error.code, message = %error.message, "RPC request refused");
                self.shared.metrics.rpc(Err(error.code), Duration::ZERO);
                let resp = RpcResponse {
                    v: PROTOCOL_VERSION,
                    id: reply_id(&reply),
                    outcome: RpcOutcome::Error(error),
                };
                let out = self.adapter.rpc_reply(&reply, &resp);
                self.publisher
                    .publish(out.topic, out.payload, out.retain, None)
                    .await;
            }
            Inbound::Desired(update) => {
                let (device, version) = (update.device.clone(), update.version);
                if self.unknown_device(&device) {
                    return self.ack_now(p);
                }
                let committed = self.shared.twins.receive(update);
                self.after_desired(p, device, Some(version), committed);
            }
            Inbound::DesiredUnversioned { device, body } => {
                if self.unknown_device(&device) {
                    return self.ack_now(p);
                }
                let committed = self.shared.twins.receive_unversioned(device.clone(), body);
                self.after_desired(p, device, None, committed);
            }
            Inbound::Message(msg) => {
                let (id, device) = (msg.id.clone(), msg.device.clone());
                let committed = self.shared.inbox.receive(msg, received_ms);
                self.after_message(p, id, device, committed);
            }
            Inbound::MessageRefused { id, device, reason } => {
                warn!(message = %id, %reason, "malformed message rejected");
                let committed =
                    self.shared
                        .inbox
                        .refuse(id.clone(), device.clone(), reason, received_ms);
                self.after_message(p, id, device, committed);
            }
            Inbound::GatewayConfig(desired) => match &self.shared.remote {
                Some(remote) => {
                    let acked = self.ack_after(p);
                    let _ = remote.send(RemoteDesired { desired, acked });
                }
                None => {
                    warn!("desired configuration dropped: this daemon takes none");
                    self.ack_now(p);
                }
            },
            Inbound::Drop(why) => {
                warn!(topic = %p.topic, "publish dropped: {why}");
                self.ack_now(p);
            }
            Inbound::Nothing => self.ack_now(p),
        }
    }

    fn unknown_device(&self, device: &DeviceId) -> bool {
        let unknown = self.shared.devices.get(device).is_none();
        if unknown {
            warn!(%device, "desired update for a device this gateway does not have");
        }
        unknown
    }

    /// Commit, then acknowledge: a crash before the commit means the broker redelivers (or the
    /// sync at connect catches up), never a lost change.
    fn after_desired(
        &self,
        p: Publish,
        device: DeviceId,
        version: Option<u64>,
        committed: oneshot::Receiver<Result<DesiredDecision, StoreError>>,
    ) {
        let acked = self.ack_after(p);
        let shared = self.shared.clone();
        let adapter = self.adapter.clone();
        let publisher = self.publisher.clone();
        let boot_id = self.boot_id.clone();
        let max_publish = self.max_publish;
        self.work.spawn(async move {
            let committed = committed.await;
            let _ = acked.send(matches!(committed, Ok(Ok(_))));
            match committed {
                Ok(Ok(decision)) => match decision {
                    DesiredDecision::Apply => {
                        debug!(%device, ?version, "desired update stored");
                        shared.twins.wake(&device);
                    }
                    DesiredDecision::Ignore => match version {
                        Some(version) => debug!(%device, version, "stale desired update ignored"),
                        None => debug!(%device, "unchanged desired state ignored"),
                    },
                    DesiredDecision::Resync => {
                        info!(%device, ?version, "gap in desired versions: asking for a snapshot");
                        let ctx = Ctx::new(&publisher, &shared, &boot_id, max_publish);
                        adapter.resync(&ctx, &device).await;
                    }
                },
                // Not committed (the disk failed): not acknowledged, the connection is dropped
                // and the twin sync at the next connect catches up.
                Ok(Err(e)) => warn!(%device, ?version, error = %e, "desired update not stored"),
                Err(_) => warn!(%device, ?version, "desired update not stored: the store stopped"),
            }
        });
    }

    /// Commit (inbox row and `received` feedback), then acknowledge; a redelivered id is
    /// acknowledged again and nothing else happens.
    fn after_message(
        &self,
        p: Publish,
        id: MessageId,
        device: DeviceId,
        committed: oneshot::Receiver<Result<Receipt, StoreError>>,
    ) {
        let acked = self.ack_after(p);
        let shared = self.shared.clone();
        self.work.spawn(async move {
            let committed = committed.await;
            let _ = acked.send(matches!(committed, Ok(Ok(_))));
            match committed {
                Ok(Ok(receipt)) => match receipt {
                    Receipt::Queued => shared.inbox.wake(&device),
                    Receipt::Finished(outcome) => {
                        info!(message = %id, %device, ?outcome, "message ended on receipt");
                        shared.metrics.message(outcome);
                        shared.outbox.wake();
                    }
                    Receipt::Duplicate => {
                        debug!(message = %id, "redelivered message acknowledged again");
                        shared.outbox.wake();
                    }
                },
                // Not committed (the disk failed): not acknowledged, the connection is dropped,
                // and without a `received` feedback the cloud sends it again.
                Ok(Err(e)) => warn!(message = %id, error = %e, "message not stored"),
                Err(_) => warn!(message = %id, "message not stored: the store stopped"),
            }
        });
    }

    fn on_rpc(&self, req: RpcRequest, reply: ReplyTo, received_ms: u64) {
        let received = std::time::Instant::now();
        if !self.accepting.load(Ordering::SeqCst) {
            let err = RpcError::new(
                ErrorCode::ShuttingDown,
                "gateway is shutting down and takes no new calls",
            );
            self.shared.metrics.rpc(Err(err.code), received.elapsed());
            let out = self.adapter.rpc_reply(
                &reply,
                &RpcResponse {
                    v: PROTOCOL_VERSION,
                    id: req.id,
                    outcome: RpcOutcome::Error(err),
                },
            );
            let publisher = self.publisher.clone();
            self.work.spawn(async move {
                publisher
                    .publish(out.topic, out.payload, out.retain, None)
                    .await;
            });
            return;
        }
        let devices = self.shared.devices.clone();
        let metrics = self.shared.metrics.clone();
        let publisher = self.publisher.clone();
        let adapter = self.adapter.clone();
        let max_publish = self.max_publish;
        // A debug span: an info span per RPC cost gatewayd about 7 % of its CPU per RPC
        // (formatting its fields for the log at every call); the one info event names them.
        let span =
            tracing::debug_span!("rpc", id = %req.id, device = %req.device, method = %req.method);
        let (device, method) = (req.device.clone(), req.method.clone());
        self.work.spawn(
            async move {
                let mut resp = rpc::handle(&devices, req, received_ms).await;
                let mut out = adapter.rpc_reply(&reply, &resp);
                if out.payload.len() > max_publish {
                    // Never a publish the broker would refuse (and drop the session over).
                    resp.outcome = RpcOutcome::Error(RpcError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "the answer is {} bytes, more than a publish may carry ({max_publish} bytes, cloud.max_packet_bytes)",
                            out.payload.len()
                        ),
                    ));
                    out = adapter.rpc_reply(&reply, &resp);
                }
                let elapsed = received.elapsed();
                match &resp.outcome {
                    RpcOutcome::Ok(_) => {
                        metrics.rpc(Ok(()), elapsed);
                        debug!(elapsed_us = elapsed.as_micros() as u64, "rpc ok")
                    }
                    RpcOutcome::Error(e) => {
                        metrics.rpc(Err(e.code), elapsed);
                        info!(id = %resp.id, %device, %method, code = %e.code, message = %e.message, "rpc failed")
                    }
                }
                publisher.publish(out.topic, out.payload, out.retain, None).await;
            }
            .instrument(span),
        );
    }
}

/// The request id an answer carries (a ThingsBoard request's is derived from its number).
fn reply_id(reply: &ReplyTo) -> RequestId {
    match reply {
        ReplyTo::Native(id) => id.clone(),
        ReplyTo::ThingsBoard { id, .. } => {
            RequestId::new(format!("tb-{id}")).expect("a number makes a valid id")
        }
    }
}

/// The store's failure, as the gateway state carries it.
pub(super) fn store_error(store: &Store) -> Option<String> {
    match &*store.health().borrow() {
        Health::Ok => None,
        Health::Failing(why) => Some(why.clone()),
    }
}

/// Tells the cloud when the store starts or stops failing (through the adapter: a state with
/// the error while it fails, so the cloud holds messages back; when it works again, the state
/// without it and a request for what could not be stored meanwhile).
async fn publish_store_health(
    adapter: Arc<Adapter>,
    publisher: Publisher,
    boot_id: String,
    shared: Arc<Shared>,
    max_publish: usize,
    connected: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut health = shared.store.health();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = health.changed() => { if r.is_err() { return } }
        }
        if !*connected.borrow() {
            continue; // the next announce carries the current state
        }
        let ctx = Ctx::new(&publisher, &shared, &boot_id, max_publish);
        adapter
            .store_changed(&ctx, store_error(&shared.store))
            .await;
    }
}

/// Publishes presence changes (through the adapter) while connected.
async fn publish_presence(
    adapter: Arc<Adapter>,
    publisher: Publisher,
    boot_id: String,
    shared: Arc<Shared>,
    max_publish: usize,
    connected: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut changes = shared.devices.presence.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => { if r.is_err() { return } }
        }
        // Coalesce a burst of changes into one publish per changed part.
        tokio::time::sleep(Duration::from_millis(20)).await;
        changes.mark_unchanged();
        if !*connected.borrow() {
            continue; // the next announce carries every part
        }
        let ctx = Ctx::new(&publisher, &shared, &boot_id, max_publish);
        adapter.presence_changed(&ctx).await;
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
