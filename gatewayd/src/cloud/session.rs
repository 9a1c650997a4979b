//! The MQTT session. Three tasks share one `AsyncClient`:
//! - the poll task owns the `EventLoop`; it only forwards events and never publishes (rumqttc
//!   requests go through a bounded channel that only `poll()` drains);
//! - the dispatcher receives those events in one `select!`, (re)announces the gateway at every
//!   ConnAck, acknowledges publishes and hands work to its handler;
//! - the presence task republishes the retained device snapshot when it changes.

use crate::clock::now_ms;
use crate::config::{parse_broker, Config};
use crate::device::Devices;
use crate::rpc;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::{
    decode, Down, ErrorCode, GatewayId, GatewayState, RpcError, RpcOutcome, RpcRequest,
    RpcResponse, Topics, Up, PROTOCOL_VERSION,
};
use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet,
    Publish, QoS,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

/// Why the session could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cloud.broker: {0}")]
    Broker(String),
}

/// What the poll task forwards to the dispatcher.
enum Inbound {
    Connected { session_present: bool },
    Disconnected,
    Publish(Publish),
}

/// A running session.
pub struct Session {
    client: AsyncClient,
    gateway: GatewayId,
    boot_id: String,
    connected: watch::Receiver<bool>,
    accepting: Arc<AtomicBool>,
    poll_stop: CancellationToken,
    tasks: TaskTracker,
}

impl Session {
    /// Starts the session tasks; RPC work is spawned on `work`.
    pub fn start(
        config: &Config,
        devices: Arc<Devices>,
        work: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Session, SessionError> {
        let gateway = GatewayId::new(config.gateway.id.clone())
            .map_err(|e| SessionError::Broker(format!("gateway id: {e}")))?;
        let (host, port) = parse_broker(&config.cloud.broker).map_err(SessionError::Broker)?;
        let boot_id = format!("{:016x}", rand::rng().random::<u64>());
        let client_id = config
            .cloud
            .client_id
            .clone()
            .unwrap_or_else(|| gateway.to_string());

        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(config.cloud.keep_alive_s))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET)
            .set_inflight(500)
            .set_request_channel_capacity(4096)
            .set_last_will(LastWill::new(
                Topics::up(&gateway, Up::State),
                state_payload(false, &boot_id),
                QoS::AtLeastOnce,
                true,
            ));
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(config.cloud.connect_timeout_s);
        eventloop.set_network_options(net);

        let (tx, rx) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(false);
        let poll_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let backoff = Backoff::new(config.cloud.reconnect_min_ms, config.cloud.reconnect_max_ms);
        tasks.spawn(
            poll(eventloop, tx, connected_tx, backoff, poll_stop.clone())
                .instrument(tracing::info_span!("mqtt", gateway = %gateway)),
        );
        let accepting = Arc::new(AtomicBool::new(true));
        let dispatcher = Dispatcher {
            client: client.clone(),
            gateway: gateway.clone(),
            boot_id: boot_id.clone(),
            devices: devices.clone(),
            work,
            accepting: accepting.clone(),
        };
        tasks.spawn(dispatcher.run(rx, shutdown.clone()));
        tasks.spawn(publish_presence(
            client.clone(),
            gateway.clone(),
            devices,
            connected.clone(),
            shutdown,
        ));
        Ok(Session {
            client,
            gateway,
            boot_id,
            connected,
            accepting,
            poll_stop,
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
            let _ = self
                .client
                .publish(
                    Topics::up(&self.gateway, Up::State),
                    QoS::AtLeastOnce,
                    true,
                    state_payload(false, &self.boot_id),
                )
                .await;
            let _ = self.client.disconnect().await;
            let mut connected = self.connected.clone();
            let _ = tokio::time::timeout(wait, connected.wait_for(|c| !*c)).await;
        }
        self.poll_stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(wait, self.tasks.wait()).await;
    }
}

fn state_payload(online: bool, boot_id: &str) -> Vec<u8> {
    serde_json::to_vec(&GatewayState {
        v: PROTOCOL_VERSION,
        online,
        boot_id: boot_id.to_string(),
        software: concat!("gatewayd ", env!("CARGO_PKG_VERSION")).to_string(),
        at_ms: now_ms(),
    })
    .expect("state serializes")
}

/// Capped exponential backoff with full jitter.
struct Backoff {
    min: u64,
    max: u64,
    next: u64,
}

impl Backoff {
    fn new(min: u64, max: u64) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
    fn delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
    }
}

/// Owns the event loop. Cancel safety: `poll()` is cancelled only at shutdown, when losing an
/// in-progress read no longer matters.
async fn poll(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Inbound>,
    connected: watch::Sender<bool>,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(
                    session_present = ack.session_present,
                    "connected to the cloud"
                );
                backoff.reset();
                connected.send_replace(true);
                let _ = tx.send(Inbound::Connected {
                    session_present: ack.session_present,
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Inbound::Publish(p));
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                connected.send_replace(false);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if connected.send_replace(false) {
                    warn!(error = %e, "cloud connection lost");
                    let _ = tx.send(Inbound::Disconnected);
                } else {
                    debug!(error = %e, "cloud connection attempt failed");
                }
                if matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                let delay = backoff.delay();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

struct Dispatcher {
    client: AsyncClient,
    gateway: GatewayId,
    boot_id: String,
    devices: Arc<Devices>,
    work: TaskTracker,
    accepting: Arc<AtomicBool>,
}

impl Dispatcher {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Inbound>, shutdown: CancellationToken) {
        loop {
            // Cancel safety: `recv` loses nothing when the other branch wins.
            let inbound = tokio::select! {
                biased;
                i = rx.recv() => match i { Some(i) => i, None => return },
                _ = shutdown.cancelled(), if self.accepting.load(Ordering::SeqCst) => {
                    self.accepting.store(false, Ordering::SeqCst);
                    continue;
                }
            };
            match inbound {
                Inbound::Connected { session_present } => self.announce(session_present).await,
                Inbound::Disconnected => {}
                Inbound::Publish(p) => self.on_publish(p).await,
            }
        }
    }

    /// Subscribes and publishes birth, catalog and presence, at every (re)connect.
    async fn announce(&self, session_present: bool) {
        let gw = &self.gateway;
        if let Err(e) = self
            .client
            .subscribe(Topics::down_filter(gw), QoS::AtLeastOnce)
            .await
        {
            warn!(error = %e, "cannot subscribe");
        }
        let catalog = serde_json::to_vec(&self.devices.catalog()).expect("catalog serializes");
        let presence =
            serde_json::to_vec(&self.devices.presence.snapshot()).expect("presence serializes");
        for (kind, payload) in [
            (Up::Catalog, catalog),
            (Up::Devices, presence),
            (Up::State, state_payload(true, &self.boot_id)),
        ] {
            if let Err(e) = self
                .client
                .publish(Topics::up(gw, kind), QoS::AtLeastOnce, true, payload)
                .await
            {
                warn!(error = %e, "cannot announce");
            }
        }
        debug!(session_present, devices = self.devices.len(), "announced");
    }

    async fn on_publish(&self, p: Publish) {
        let received_ms = now_ms();
        let kind = Topics::parse_down(&p.topic).filter(|(gw, _)| gw == &self.gateway);
        match kind {
            Some((_, Down::RpcRequest)) => {
                // RPCs are never stored: acknowledge at once.
                let _ = self.client.ack(&p).await;
                self.on_rpc(&p.payload, received_ms).await;
            }
            Some((_, Down::TwinDesired)) | Some((_, Down::Message)) => {
                let _ = self.client.ack(&p).await;
                debug!(topic = %p.topic, "not handled by this version");
            }
            None => {
                let _ = self.client.ack(&p).await;
                warn!(topic = %p.topic, "publish on an unexpected topic dropped");
            }
        }
    }

    async fn on_rpc(&self, payload: &[u8], received_ms: u64) {
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
                    let err =
                        RpcError::new(ErrorCode::BadRequest, format!("malformed request: {e}"));
                    self.respond(RpcResponse {
                        v: PROTOCOL_VERSION,
                        id,
                        outcome: RpcOutcome::Error(err),
                    });
                }
                return;
            }
        };
        if !self.accepting.load(Ordering::SeqCst) {
            self.respond(RpcResponse {
                v: PROTOCOL_VERSION,
                id: req.id,
                outcome: RpcOutcome::Error(RpcError::new(
                    ErrorCode::ShuttingDown,
                    "gateway is shutting down and takes no new calls",
                )),
            });
            return;
        }
        let devices = self.devices.clone();
        let client = self.client.clone();
        let topic = Topics::up(&self.gateway, Up::RpcResponse);
        let span =
            tracing::info_span!("rpc", id = %req.id, device = %req.device, method = %req.method);
        self.work.spawn(
            async move {
                let started = std::time::Instant::now();
                let resp = rpc::handle(&devices, req, received_ms).await;
                match &resp.outcome {
                    RpcOutcome::Ok(_) => {
                        debug!(elapsed_us = started.elapsed().as_micros() as u64, "rpc ok")
                    }
                    RpcOutcome::Error(e) => {
                        info!(code = %e.code, message = %e.message, "rpc failed")
                    }
                }
                let body = serde_json::to_vec(&resp).expect("response serializes");
                if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, body).await {
                    warn!(error = %e, "cannot publish RPC response");
                }
            }
            .instrument(span),
        );
    }

    fn respond(&self, resp: RpcResponse) {
        let client = self.client.clone();
        let topic = Topics::up(&self.gateway, Up::RpcResponse);
        let body = serde_json::to_vec(&resp).expect("response serializes");
        self.work.spawn(async move {
            let _ = client.publish(topic, QoS::AtLeastOnce, false, body).await;
        });
    }
}

/// Republishes the retained device snapshot after each presence change while connected.
async fn publish_presence(
    client: AsyncClient,
    gateway: GatewayId,
    devices: Arc<Devices>,
    connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = devices.presence.changed() => {}
        }
        // Coalesce a burst of changes into one publish.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !*connected.borrow() {
            continue; // the next announce carries the current snapshot
        }
        let body = serde_json::to_vec(&devices.presence.snapshot()).expect("presence serializes");
        if let Err(e) = client
            .publish(
                Topics::up(&gateway, Up::Devices),
                QoS::AtLeastOnce,
                true,
                body,
            )
            .await
        {
            warn!(error = %e, "cannot publish device presence");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(100, 1000);
        let d: Vec<u64> = (0..6).map(|_| b.delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&d[0]), "{d:?}");
        assert!((100..=200).contains(&d[1]), "{d:?}");
        assert!(d[5] <= 1000 && d[5] >= 500, "{d:?}");
        b.reset();
        assert!(b.delay().as_millis() <= 100);
    }
}
