//! The MQTT link: one task owns the rumqttc `EventLoop` and is the only way publishes enter the
//! client, so it knows the order in which they are written and can tell which publish a PUBACK
//! acknowledges. That is what lets the outbox delete a row only once the broker has it.
//!
//! rumqttc hands out no per-publish acknowledgement. The link records each accepted publish's
//! tag in write order, pairs it with the packet id of the next `Outgoing::Publish` event, and
//! reports the tag when the PUBACK for that packet id arrives. The session is clean, so at every
//! ConnAck rumqttc has dropped whatever was unacknowledged: the link forgets its bookkeeping and
//! the outbox sends its unacknowledged rows again (receivers de-duplicate).
//!
//! Publishing never happens from inside `poll()`'s caller through an awaiting send: the link uses
//! `try_publish` and keeps what does not fit for the next turn, so it never waits on itself.

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, Outgoing, Packet, Publish, QoS,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A session that lasted this long counts as a successful connect for the backoff.
const HEALTHY_SESSION: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest wait, after the DISCONNECT that leaves a connection for other settings, for the
/// broker to close it.
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One publish to send (always QoS 1).
#[derive(Debug)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Reported back through the ack channel once the broker acknowledged it.
    pub tag: Option<u64>,
    /// Disconnect cleanly right after this publish (orderly shutdown).
    pub then_disconnect: bool,
}

/// Handle to queue publishes on the link.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outbound>,
}

impl Publisher {
    /// Queues a publish. Publishes queued while the link is down are dropped: what must arrive
    /// goes through the outbox, which sends again after every reconnect.
    pub async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool, tag: Option<u64>) {
        let _ = self
            .tx
            .send(Outbound {
                topic,
                payload,
                retain,
                tag,
                then_disconnect: false,
            })
            .await;
    }

    /// Queues a publish followed by a clean disconnect.
    pub async fn publish_then_disconnect(&self, topic: String, payload: Vec<u8>, retain: bool) {
        let _ = self
            .tx
            .send(Outbound {
                topic,
                payload,
                retain,
                tag: None,
                then_disconnect: true,
            })
            .await;
    }
}

/// What the link reports to the dispatcher.
#[derive(Debug)]
pub enum LinkEvent {
    Connected,
    Disconnected,
    Publish(Publish),
}

/// Creates the publisher and the link task's inbox.
pub fn channel() -> (Publisher, mpsc::Receiver<Outbound>) {
    let (tx, rx) = mpsc::channel(4096);
    (Publisher { tx }, rx)
}

/// The link task.
pub struct Link {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub outbound: mpsc::Receiver<Outbound>,
    pub events: mpsc::UnboundedSender<LinkEvent>,
    pub acks: mpsc::UnboundedSender<u64>,
    pub connected: watch::Sender<bool>,
    /// Drop the connection (without DISCONNECT, so the broker forgets every unacknowledged
    /// publish and the cloud sends them again), with the reason; the link then reconnects.
    pub reset: mpsc::UnboundedReceiver<String>,
    /// Acknowledgements of received publishes, each with the connection it belongs to; one
    /// of an earlier connection is dropped (its packet id means nothing now).
    pub acks_in: mpsc::UnboundedReceiver<(u64, Publish)>,
    /// The connection count: bumped at every ConnAck and at every loss, so nothing stamped
    /// with an earlier value is acknowledged on a later connection.
    pub generation: Arc<AtomicU64>,
    pub backoff: Backoff,
    /// Other connection settings (a live reload of `[cloud]`): the link drops the connection
    /// and connects with them at once.
    pub switch: mpsc::UnboundedReceiver<crate::cloud::session::Endpoint>,
    pub stop: CancellationToken,
    /// Counts reconnects (every ConnAck after the first).
    pub metrics: Arc<Metrics>,
}

impl Link {
    /// Runs until `stop` or an orderly disconnect. Cancel safety: `poll()` keeps its state in
    /// the event loop, and `recv()` loses nothing when another branch wins.
    pub async fn run(self) {
        let Link {
            mut eventloop,
            client,
            mut outbound,
            events,
            acks,
            connected,
            mut reset,
            mut acks_in,
            generation,
            mut backoff,
            mut switch,
            stop,
            metrics,
        } = self;
        let mut moving: Option<crate::cloud::session::Endpoint> = None;
        let mut leaving: Option<tokio::time::Instant> = None;
        let mut connected_at: Option<std::time::Instant> = None;
        let mut waiting: VecDeque<Outbound> = VecDeque::new();
        let mut acks_waiting: VecDeque<Publish> = VecDeque::new();
        let mut written: VecDeque<Option<u64>> = VecDeque::new();
        let mut inflight: HashMap<u16, Option<u64>> = HashMap::new();
        let mut up = false;
        let mut connected_before = false;
        loop {
            // One `poll()` future lives until it yields an event: taking publishes off the
            // queue meanwhile never abandons a half-done connect or read.
            let event = {
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    while let Some(p) = acks_waiting.pop_front().filter(|_| up) {
                        if let Err(ClientError::TryRequest(_)) = client.try_ack(&p) {
                            acks_waiting.push_front(p);
                            break;
                        }
                    }
                    while let Some(o) = waiting.pop_front().filter(|_| up) {
                        match client.try_publish(
                            o.topic.clone(),
                            QoS::AtLeastOnce,
                            o.retain,
                            o.payload.clone(),
                        ) {
                            Ok(()) => {
                                written.push_back(o.tag);
                                if o.then_disconnect {
                                    let _ = client.try_disconnect();
                                }
                            }
                            Err(ClientError::TryRequest(_)) => {
                                waiting.push_front(o);
                                break;
                            }
                            Err(e) => warn!(topic = %o.topic, error = %e, "publish refused"),
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        e = &mut poll => break e,
                        Some(why) = reset.recv(), if up => break Err(ConnectionError::Io(
                            std::io::Error::other(why),
                        )),
                        Some(mut endpoint) = switch.recv() => {
                            let goodbye = endpoint.goodbye.take();
                            moving = Some(endpoint);
                            match goodbye.filter(|_| up) {
                                // Leave in order: offline presence, DISCONNECT (the broker
                                // drops the will), and connect anew once the broker closed
                                // the connection, so nothing of the old one outlives it.
                                Some(bye) => {
                                    up = false;
                                    let _ = client.try_publish(bye.topic, QoS::AtLeastOnce, bye.retain, bye.payload);
                                    let _ = client.try_disconnect();
                                    leaving = Some(tokio::time::Instant::now() + LEAVE_WAIT);
                                }
                                None => break Err(ConnectionError::Io(std::io::Error::other(
                                    "the cloud settings changed",
                                ))),
                            }
                        }
                        _ = tokio::time::sleep_until(leaving.unwrap_or_else(tokio::time::Instant::now)), if leaving.is_some() => {
                            break Err(ConnectionError::Io(std::io::Error::other(
                                "the cloud did not close the connection after DISCONNECT",
                            )));
                        }
                        Some((g, p)) = acks_in.recv() => {
                            if up && g == generation.load(Ordering::SeqCst) {
                                acks_waiting.push_back(p);
                            }
                        }
                        o = outbound.recv(), if waiting.len() < 1024 => match o {
                            Some(o) if up => waiting.push_back(o),
                            Some(o) => debug!(topic = %o.topic, "link down: publish dropped"),
                            None => return,
                        },
                    }
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    info!(
                        session_present = ack.session_present,
                        "connected to the cloud"
                    );
                    connected_at = Some(std::time::Instant::now());
                    if connected_before {
                        metrics.cloud_reconnected();
                    }
                    connected_before = true;
                    written.clear();
                    inflight.clear();
                    waiting.clear();
                    acks_waiting.clear();
                    generation.fetch_add(1, Ordering::SeqCst);
                    up = true;
                    connected.send_replace(true);
                    let _ = events.send(LinkEvent::Connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = events.send(LinkEvent::Publish(p));
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if pkid != 0 && !inflight.contains_key(&pkid) {
                        let tag = written.pop_front().flatten();
                        inflight.insert(pkid, tag);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(Some(tag)) = inflight.remove(&ack.pkid) {
                        let _ = acks.send(tag);
                    }
                }
                // Moving to other settings: wait for the broker to close the connection.
                Ok(Event::Outgoing(Outgoing::Disconnect)) if moving.is_some() => {}
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    connected.send_replace(false);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    // A reset, or an error the event loop already acted on: either way the
                    // connection is gone. No ack of it may reach the next one: the count
                    // moves on, and `clean` drops acks already handed to the client.
                    generation.fetch_add(1, Ordering::SeqCst);
                    acks_waiting.clear();
                    eventloop.clean();
                    // Only a session that lived a while resets the backoff: one lost within
                    // seconds of its ConnAck (a broker refusing a publish, a store failing)
                    // counts as a failed attempt, so nothing can make the link reconnect in a
                    // tight loop.
                    if connected_at
                        .take()
                        .is_some_and(|t| t.elapsed() >= HEALTHY_SESSION)
                    {
                        backoff.reset();
                    }
                    up = false;
                    written.clear();
                    inflight.clear();
                    waiting.clear();
                    if connected.send_replace(false) {
                        if moving.is_some() {
                            info!(reason = %e, "left the cloud connection for the new settings");
                        } else {
                            warn!(error = %e, "cloud connection lost");
                        }
                        let _ = events.send(LinkEvent::Disconnected);
                    } else {
                        debug!(error = %e, "cloud connection attempt failed");
                    }
                    if matches!(e, ConnectionError::RequestsDone) {
                        return;
                    }
                    // New settings: the next attempt uses them, at once and with their own
                    // backoff.
                    leaving = None;
                    if let Some(endpoint) = moving.take() {
                        backoff = take_endpoint(&mut eventloop, endpoint);
                        continue;
                    }
                    // New settings while waiting to reconnect are taken at once.
                    let delay = backoff.delay();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                        Some(endpoint) = switch.recv() => backoff = take_endpoint(&mut eventloop, endpoint),
                    }
                }
            }
        }
    }
}

/// The next connection attempt uses `endpoint`; returns its backoff.
fn take_endpoint(eventloop: &mut EventLoop, endpoint: crate::cloud::session::Endpoint) -> Backoff {
    let (host, port) = endpoint.options.broker_address();
    info!(broker = %format!("{host}:{port}"), "connecting with the new cloud settings");
    eventloop.mqtt_options = endpoint.options;
    eventloop.network_options = endpoint.network;
    if let Some(done) = endpoint.done {
        let _ = done.send(());
    }
    endpoint.backoff
}
