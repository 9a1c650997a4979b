//! The MQTT session. Tasks share one `AsyncClient`:
//! - the link task (`link.rs`) owns the `EventLoop`, forwards events and is the only way
//!   publishes enter the client;
//! - the dispatcher receives link events in one `select!`, (re)announces the gateway at every
//!   ConnAck, and hands each publish to its handler: RPCs are acknowledged at once and run on
//!   the work tracker; desired twin updates are acknowledged only after they are committed;
//! - the presence task republishes the retained device snapshot when it changes;
//! - the outbox sender (`outbox.rs`) delivers reported patches and feedback.

use super::link::{self, Link, LinkEvent, Publisher};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::{parse_broker, Config};
use crate::device::Devices;
use crate::inbox::{Inbox, Receipt};
use crate::metrics::Metrics;
use crate::outbox::{self, Wake};
use crate::rpc;
use crate::store::{Health, Store};
use crate::supervise::Supervisor;
use crate::twins::Twins;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::twin::DesiredDecision;
use gatewayd_protocol::{
    decode, C2dMessage, DecodeError, DesiredUpdate, DeviceId, Down, ErrorCode, GatewayId,
    GatewayState, RpcError, RpcOutcome, RpcRequest, RpcResponse, Topics, TwinSync, Up,
    PROTOCOL_VERSION,
};
use rand::Rng;
use rumqttc::{
    AsyncClient, LastWill, MqttOptions, NetworkOptions, Publish, QoS, TlsConfiguration, Transport,
};
use rusqlite::OptionalExtension;
use std::collections::BTreeMap;
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

/// What the session's handlers share with the rest of the daemon.
pub struct Shared {
    pub devices: Arc<Devices>,
    pub store: Store,
    pub twins: Arc<Twins>,
    pub inbox: Arc<Inbox>,
    pub outbox: Wake,
    pub metrics: Arc<Metrics>,
}

/// A running session.
pub struct Session {
    publisher: Publisher,
    gateway: GatewayId,
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
        let broker = parse_broker(&config.cloud.broker).map_err(SessionError::Broker)?;
        let security = config
            .cloud
            .security()
            .map_err(|problems| SessionError::Security(problems.join("; ")))?;
        let boot_id = format!("{:016x}", rand::rng().random::<u64>());
        let client_id = config
            .cloud
            .client_id
            .clone()
            .unwrap_or_else(|| gateway.to_string());

        // A clean session: what must survive an outage lives in SQLite (inbox, twin cache,
        // outbox) and the cloud re-sends on reconnect, so the broker keeps no state for us.
        let mut opts = MqttOptions::new(client_id, broker.host, broker.port);
        if let Some((username, password)) = &security.login {
            opts.set_credentials(username.clone(), password.expose());
        }
        if let Some(tls) = security.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        opts.set_keep_alive(Duration::from_secs(config.cloud.keep_alive_s))
            .set_clean_session(true)
            .set_manual_acks(true)
            // Nothing larger than the configured limit ever leaves: announcements are split,
            // oversize RPC results answered with a coded error.
            .set_max_packet_size(MAX_MQTT_PACKET, config.cloud.max_packet_bytes)
            .set_inflight(500)
            .set_last_will(LastWill::new(
                Topics::up(&gateway, Up::State),
                state_payload(false, &boot_id, shared.store.id(), None),
                QoS::AtLeastOnce,
                true,
            ));
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(config.cloud.connect_timeout_s);
        eventloop.set_network_options(net);

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
                    backoff: Backoff::new(
                        config.cloud.reconnect_min_ms,
                        config.cloud.reconnect_max_ms,
                    ),
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
                    gateway: gateway.clone(),
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
        let dispatcher = Dispatcher {
            max_publish: config.cloud.max_packet_bytes,
            client: client.clone(),
            publisher: publisher.clone(),
            gateway: gateway.clone(),
            boot_id: boot_id.clone(),
            shared: shared.clone(),
            work,
            accepting: accepting.clone(),
            acks,
            generation,
        };
        tasks.spawn(supervisor.critical("dispatcher", dispatcher.run(events, stop.clone())));
        tasks.spawn(supervisor.critical(
            "presence publisher",
            publish_presence(
                publisher.clone(),
                gateway.clone(),
                shared.devices.clone(),
                connected.clone(),
                stop.clone(),
            ),
        ));
        tasks.spawn(supervisor.critical(
            "store health publisher",
            publish_store_health(
                publisher.clone(),
                gateway.clone(),
                boot_id.clone(),
                shared.clone(),
                connected.clone(),
                stop.clone(),
            ),
        ));
        Ok(Session {
            publisher,
            gateway,
            boot_id,
            store_id: shared.store.id().to_string(),
            connected,
            accepting,
            stop,
            tasks,
        })
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
            self.publisher
                .publish_then_disconnect(
                    Topics::up(&self.gateway, Up::State),
                    state_payload(false, &self.boot_id, &self.store_id, None),
                )
                .await;
            let mut connected = self.connected.clone();
            let _ = tokio::time::timeout(wait, connected.wait_for(|c| !*c)).await;
        }
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(wait, self.tasks.wait()).await;
    }
}

fn state_payload(
    online: bool,
    boot_id: &str,
    store_id: &str,
    store_error: Option<String>,
) -> Vec<u8> {
    serde_json::to_vec(&GatewayState {
        v: PROTOCOL_VERSION,
        online,
        boot_id: boot_id.to_string(),
        software: concat!("gatewayd ", env!("CARGO_PKG_VERSION")).to_string(),
        at_ms: now_ms(),
        store_id: store_id.to_string(),
        store_error,
    })
    .expect("state serializes")
}

struct Dispatcher {
    /// `cloud.max_packet_bytes`.
    max_publish: usize,
    client: AsyncClient,
    publisher: Publisher,
    gateway: GatewayId,
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
    async fn run(self, mut rx: mpsc::UnboundedReceiver<LinkEvent>, stop: CancellationToken) {
        loop {
            // Cancel safety: `recv` loses nothing when the other branch wins.
            let event = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = stop.cancelled() => return,
            };
            match event {
                // The link counted the new connection: acks still queued belong to the
                // previous one's packet ids and are dropped.
                LinkEvent::Connected => self.announce().await,
                LinkEvent::Disconnected => {}
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

    /// Subscribes and publishes catalog, presence, birth and the twin sync, at every connect.
    async fn announce(&self) {
        let gw = &self.gateway;
        if let Err(e) = self
            .client
            .subscribe(Topics::down_filter(gw), QoS::AtLeastOnce)
            .await
        {
            warn!(error = %e, "cannot subscribe");
        }
        let devices = &self.shared.devices;
        let mut catalog_parts = 0;
        match devices.catalog_plan(self.max_publish) {
            Ok(plan) => {
                let n = plan.len() as u32;
                catalog_parts = n;
                for part in devices.catalog_parts(rand::random(), &plan) {
                    let body = serde_json::to_vec(&part).expect("catalog serializes");
                    self.publisher
                        .publish(
                            Topics::up_part(gw, Up::Catalog, part.part),
                            body,
                            true,
                            None,
                        )
                        .await;
                }
                self.clear_stale_parts(Up::Catalog, n).await;
            }
            // Checked at start; cannot happen with the running configuration.
            Err(e) => warn!(error = %e, "catalog not announced"),
        }
        let presence = &devices.presence;
        presence.take_dirty();
        for part in 0..presence.parts() {
            let body = serde_json::to_vec(&presence.part(part)).expect("presence serializes");
            self.publisher
                .publish(Topics::up_part(gw, Up::Devices, part), body, true, None)
                .await;
        }
        self.clear_stale_parts(Up::Devices, presence.parts()).await;
        self.publisher
            .publish(
                Topics::up(gw, Up::State),
                state_payload(
                    true,
                    &self.boot_id,
                    self.shared.store.id(),
                    store_error(&self.shared.store),
                ),
                true,
                None,
            )
            .await;
        match self.shared.twins.held_versions().await {
            Ok(held) => self.sync(held).await,
            Err(e) => warn!(error = %e, "cannot read twin versions for the sync"),
        }
        debug!(
            devices = devices.len(),
            catalog_parts,
            presence_parts = devices.presence.parts(),
            "announced"
        );
        crate::release_freed_memory();
    }

    /// Deletes retained parts a previous run published beyond today's `parts` (an empty
    /// retained publish deletes), remembering the count in the store for the next start.
    async fn clear_stale_parts(&self, kind: Up, parts: u32) {
        let key = format!("parts/{}", kind.suffix());
        let k = key.clone();
        let before = self
            .shared
            .store
            .call(move |c| {
                let old: Option<String> = c
                    .query_row("SELECT value FROM meta WHERE key = ?1", [&k], |r| r.get(0))
                    .optional()?;
                c.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = ?2",
                    rusqlite::params![k, parts.to_string()],
                )?;
                Ok(old.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0))
            })
            .await
            .unwrap_or(0);
        for stale in parts..before.min(100_000) {
            self.publisher
                .publish(
                    Topics::up_part(&self.gateway, kind, stale),
                    Vec::new(),
                    true,
                    None,
                )
                .await;
        }
    }

    async fn sync(&self, devices: BTreeMap<DeviceId, u64>) {
        publish_sync(&self.publisher, &self.gateway, devices).await;
    }

    async fn on_publish(&self, p: Publish) {
        let received_ms = now_ms();
        let kind = Topics::parse_down(&p.topic).filter(|(gw, _)| gw == &self.gateway);
        match kind {
            Some((_, Down::RpcRequest)) => {
                // RPCs are never stored: acknowledge as soon as the order allows.
                let payload = p.payload.clone();
                self.ack_now(p);
                self.on_rpc(&payload, received_ms).await;
            }
            Some((_, Down::TwinDesired)) => self.on_desired(p),
            Some((_, Down::Message)) => self.on_message(p, received_ms),
            None => {
                warn!(topic = %p.topic, "publish on an unexpected topic dropped");
                self.ack_now(p);
            }
        }
    }

    /// Commit, then acknowledge: a crash before the commit means the broker redelivers (or the
    /// sync at connect catches up), never a lost change.
    fn on_desired(&self, p: Publish) {
        let update: DesiredUpdate = match decode(&p.payload) {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "malformed desired update dropped");
                self.ack_now(p);
                return;
            }
        };
        if self.shared.devices.get(&update.device).is_none() {
            warn!(device = %update.device, "desired update for a device this gateway does not have");
            self.ack_now(p);
            return;
        }
        let device = update.device.clone();
        let version = update.version;
        let committed = self.shared.twins.receive(update);
        let acked = self.ack_after(p);
        let shared = self.shared.clone();
        let publisher = self.publisher.clone();
        let gateway = self.gateway.clone();
        self.work.spawn(async move {
            let committed = committed.await;
            let _ = acked.send(matches!(committed, Ok(Ok(_))));
            match committed {
                Ok(Ok(decision)) => match decision {
                    DesiredDecision::Apply => {
                        debug!(%device, version, "desired update stored");
                        shared.twins.wake(&device);
                    }
                    DesiredDecision::Ignore => {
                        debug!(%device, version, "stale desired update ignored")
                    }
                    DesiredDecision::Resync => {
                        info!(%device, version, "gap in desired versions: asking for a snapshot");
                        if let Ok(held) = shared.twins.load(&device).await {
                            let devices = BTreeMap::from([(device, held.desired_version)]);
                            publish_sync(&publisher, &gateway, devices).await;
                        }
                    }
                },
                // Not committed (the disk failed): not acknowledged, the connection is dropped
                // and the twin sync at the next connect catches up.
                Ok(Err(e)) => warn!(%device, version, error = %e, "desired update not stored"),
                Err(_) => warn!(%device, version, "desired update not stored: the store stopped"),
            }
        });
    }

    /// Commit (inbox row and `received` feedback), then acknowledge; a redelivered id is
    /// acknowledged again and nothing else happens.
    fn on_message(&self, p: Publish, received_ms: u64) {
        let (id, device, committed) = match decode::<C2dMessage>(&p.payload) {
            Ok(msg) => {
                let (id, device) = (msg.id.clone(), msg.device.clone());
                (id, device, self.shared.inbox.receive(msg, received_ms))
            }
            Err(e) => {
                // Answer with a coded feedback where the id and device can be read, so the
                // message ends at once instead of waiting for its TTL.
                #[derive(serde::Deserialize)]
                struct Head {
                    id: gatewayd_protocol::MessageId,
                    device: DeviceId,
                }
                let Ok(head) = serde_json::from_slice::<Head>(&p.payload) else {
                    warn!(error = %e, "malformed message dropped (no valid id to answer)");
                    self.ack_now(p);
                    return;
                };
                warn!(message = %head.id, error = %e, "malformed message rejected");
                let code = match e {
                    DecodeError::Version(_) => ErrorCode::UnsupportedVersion,
                    DecodeError::Json(_) => ErrorCode::BadRequest,
                };
                let reason = format!("{code}: message refused: {e}");
                let committed = self.shared.inbox.refuse(
                    head.id.clone(),
                    head.device.clone(),
                    reason,
                    received_ms,
                );
                (head.id, head.device, committed)
            }
        };
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
                        debug!(message = %id, "redelivered message acknowledged again")
                    }
                },
                // Not committed (the disk failed): not acknowledged, the connection is dropped,
                // and without a `received` feedback the cloud sends it again.
                Ok(Err(e)) => warn!(message = %id, error = %e, "message not stored"),
                Err(_) => warn!(message = %id, "message not stored: the store stopped"),
            }
        });
    }

    async fn on_rpc(&self, payload: &[u8], received_ms: u64) {
        let received = std::time::Instant::now();
        let req: RpcRequest = match decode(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "malformed RPC request dropped");
                // Answer if at least the id can be read, so the caller is not left waiting.
                if let Some(id) = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .and_then(|id| serde_json::from_value(id).ok())
                {
                    let code = match e {
                        DecodeError::Version(_) => ErrorCode::UnsupportedVersion,
                        DecodeError::Json(_) => ErrorCode::BadRequest,
                    };
                    let err = RpcError::new(code, format!("request refused: {e}"));
                    self.shared.metrics.rpc(Err(err.code), received.elapsed());
                    self.respond(RpcResponse {
                        v: PROTOCOL_VERSION,
                        id,
                        outcome: RpcOutcome::Error(err),
                    })
                    .await;
                }
                return;
            }
        };
        if !self.accepting.load(Ordering::SeqCst) {
            let err = RpcError::new(
                ErrorCode::ShuttingDown,
                "gateway is shutting down and takes no new calls",
            );
            self.shared.metrics.rpc(Err(err.code), received.elapsed());
            self.respond(RpcResponse {
                v: PROTOCOL_VERSION,
                id: req.id,
                outcome: RpcOutcome::Error(err),
            })
            .await;
            return;
        }
        let devices = self.shared.devices.clone();
        let metrics = self.shared.metrics.clone();
        let publisher = self.publisher.clone();
        let topic = Topics::up(&self.gateway, Up::RpcResponse);
        let max_publish = self.max_publish;
        let span =
            tracing::info_span!("rpc", id = %req.id, device = %req.device, method = %req.method);
        self.work.spawn(
            async move {
                let mut resp = rpc::handle(&devices, req, received_ms).await;
                let mut body = serde_json::to_vec(&resp).expect("response serializes");
                if body.len() > max_publish {
                    // Never a publish the broker would refuse (and drop the session over).
                    resp.outcome = RpcOutcome::Error(RpcError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "the answer is {} bytes, more than a publish may carry ({max_publish} bytes, cloud.max_packet_bytes)",
                            body.len()
                        ),
                    ));
                    body = serde_json::to_vec(&resp).expect("response serializes");
                }
                let elapsed = received.elapsed();
                match &resp.outcome {
                    RpcOutcome::Ok(_) => {
                        metrics.rpc(Ok(()), elapsed);
                        debug!(elapsed_us = elapsed.as_micros() as u64, "rpc ok")
                    }
                    RpcOutcome::Error(e) => {
                        metrics.rpc(Err(e.code), elapsed);
                        info!(code = %e.code, message = %e.message, "rpc failed")
                    }
                }
                publisher.publish(topic, body, false, None).await;
            }
            .instrument(span),
        );
    }

    async fn respond(&self, resp: RpcResponse) {
        let body = serde_json::to_vec(&resp).expect("response serializes");
        self.publisher
            .publish(
                Topics::up(&self.gateway, Up::RpcResponse),
                body,
                false,
                None,
            )
            .await;
    }
}

/// Publishes `up/twin/sync`: the desired version held for each of `devices`, so the cloud
/// answers with a snapshot for every one that is behind.
async fn publish_sync(
    publisher: &Publisher,
    gateway: &GatewayId,
    devices: BTreeMap<DeviceId, u64>,
) {
    let body = serde_json::to_vec(&TwinSync {
        v: PROTOCOL_VERSION,
        devices,
    })
    .expect("sync serializes");
    publisher
        .publish(Topics::up(gateway, Up::TwinSync), body, false, None)
        .await;
}

/// The store's failure, as the gateway state carries it.
fn store_error(store: &Store) -> Option<String> {
    match &*store.health().borrow() {
        Health::Ok => None,
        Health::Failing(why) => Some(why.clone()),
    }
}

/// Tells the cloud when the store starts or stops failing: a retained state with
/// `store_error` while it fails (the cloud holds messages back), and when it works again the
/// state without it and a twin sync, so what could not be stored meanwhile flows again.
async fn publish_store_health(
    publisher: Publisher,
    gateway: GatewayId,
    boot_id: String,
    shared: Arc<Shared>,
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
        let error = store_error(&shared.store);
        let recovered = error.is_none();
        publisher
            .publish(
                Topics::up(&gateway, Up::State),
                state_payload(true, &boot_id, shared.store.id(), error),
                true,
                None,
            )
            .await;
        if recovered {
            match shared.twins.held_versions().await {
                Ok(devices) => publish_sync(&publisher, &gateway, devices).await,
                Err(e) => warn!(error = %e, "cannot read twin versions for the sync"),
            }
        }
    }
}

/// Republishes the retained presence parts that changed, while connected.
async fn publish_presence(
    publisher: Publisher,
    gateway: GatewayId,
    devices: Arc<Devices>,
    connected: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut changes = devices.presence.subscribe();
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
        for part in devices.presence.take_dirty() {
            let body =
                serde_json::to_vec(&devices.presence.part(part)).expect("presence serializes");
            publisher
                .publish(
                    Topics::up_part(&gateway, Up::Devices, part),
                    body,
                    true,
                    None,
                )
                .await;
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
