//! One simulated gateway's MQTT connection: a single task owns its rumqttc event loop, hands
//! every incoming publish to the [`SimGateway`] and queues the answers, and reconnects with
//! capped exponential backoff and full jitter when the broker goes away.
//!
//! The client's request channel is drained only by `poll()`, which runs in this same task, so
//! the task never waits to queue a publish: what does not fit the channel waits in a backlog
//! that is moved into the channel after every event. The one `poll()` future lives until it
//! yields (it owns the event loop and hands it back), so a stop never cuts a packet in half.
//!
//! Clean session: at every ConnAck the backlog of the previous connection is dropped (rumqttc
//! drops its queued requests too) and the gateway announces itself again. What was in flight
//! is recovered the way the protocol recovers it for a gateway without an outbox: the cloud
//! sends again the messages it saw no `received` for and answers the twin sync with the
//! desired state the gateway lacks.

use super::sim::{Handled, Publish, SimGateway};
use super::{Backoff, Counters, Rng};
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::Topics;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    NetworkOptions, Outgoing, Packet, QoS, Request,
};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Publishes a connection may have unacknowledged.
const INFLIGHT: u16 = 32;
/// Capacity of the client's request channel.
const CHANNEL: usize = 64;
/// A session lost sooner than this after its ConnAck counts as a failed connect for the
/// backoff (as in gatewayd), so nothing reconnects in a tight loop.
const STABLE: Duration = Duration::from_secs(10);
/// How long an orderly leave may take.
const LEAVE_GRACE: Duration = Duration::from_secs(5);

/// Where and how a gateway connects.
pub(super) struct LinkConfig {
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub backoff: Backoff,
}

type Polling = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

fn poll_once(mut eventloop: EventLoop) -> Polling {
    Box::pin(async move {
        let event = eventloop.poll().await;
        (eventloop, event)
    })
}

/// Publishes waiting for room in the client's request channel.
struct Backlog {
    client: AsyncClient,
    queue: VecDeque<Publish>,
}

impl Backlog {
    fn push(&mut self, publishes: impl IntoIterator<Item = Publish>) {
        self.queue.extend(publishes);
        self.flush();
    }

    /// Moves what fits into the request channel, in order.
    fn flush(&mut self) {
        while let Some(p) = self.queue.pop_front() {
            match self
                .client
                .try_publish(p.topic, QoS::AtLeastOnce, p.retain, p.payload)
            {
                Ok(()) => {}
                Err(ClientError::TryRequest(Request::Publish(back))) => {
                    self.queue.push_front(Publish {
                        topic: back.topic,
                        payload: back.payload.to_vec(),
                        retain: back.retain,
                    });
                    return;
                }
                // The event loop is gone (only at the very end).
                Err(_) => return,
            }
        }
    }
}

/// Runs one gateway until `stop` turns true; then, if connected, it leaves in order (offline
/// state, retained announcements deleted, DISCONNECT, and the broker's close awaited).
pub(super) async fn run(
    mut sim: SimGateway,
    config: Arc<LinkConfig>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    mut rng: Rng,
) {
    let mut options = MqttOptions::new(sim.id().as_str(), config.host.clone(), config.port);
    let will = sim.will();
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET)
        .set_inflight(INFLIGHT)
        .set_last_will(LastWill::new(
            will.topic,
            will.payload,
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = AsyncClient::new(options, CHANNEL);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let filter = Topics::down_filter(sim.id());
    let mut backlog = Backlog {
        client: client.clone(),
        queue: VecDeque::new(),
    };
    let mut backoff = config.backoff.min;
    let mut connected_at: Option<Instant> = None;
    let mut leaving: Option<tokio::time::Instant> = None;
    let mut disconnecting = false;
    let mut polling = poll_once(eventloop);
    loop {
        let (eventloop, event) = match leaving {
            None => tokio::select! {
                polled = &mut polling => polled,
                _ = stop.wait_for(|s| *s) => {
                    if connected_at.is_none() {
                        return;
                    }
                    // Leave in order: the goodbye goes out behind what is queued, then the
                    // DISCONNECT once the backlog is empty.
                    backlog.push(sim.goodbye(super::now_ms()));
                    leaving = Some(tokio::time::Instant::now() + LEAVE_GRACE);
                    disconnect_when_drained(&client, &backlog, &mut disconnecting);
                    continue;
                }
            },
            Some(deadline) => match tokio::time::timeout_at(deadline, &mut polling).await {
                Ok(polled) => polled,
                Err(_) => break,
            },
        };
        polling = poll_once(eventloop);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if leaving.is_some() {
                    break;
                }
                connected_at = Some(Instant::now());
                counters.connected(1);
                backlog.queue.clear();
                // The channel is empty after a (re)connect: the subscription goes first.
                let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                backlog.push(sim.announce(rng.next_u64(), super::now_ms()));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let (handled, answers) = sim.handle(&p.topic, &p.payload, super::now_ms());
                counters.handled(handled);
                backlog.push(answers);
            }
            // The broker closes the connection once it has read the DISCONNECT: until then
            // keep reading, because closing a socket with unread input (acknowledgements)
            // resets it, and the broker would drop what it had not read yet (the goodbye, the
            // DISCONNECT itself; the will would fire instead).
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {}
            Ok(_) => backlog.flush(),
            Err(_) => {
                if leaving.is_none() {
                    counters.connection_error();
                }
                if let Some(at) = connected_at.take() {
                    counters.connected(-1);
                    if at.elapsed() >= STABLE {
                        backoff = config.backoff.min;
                    }
                }
                if leaving.is_some() {
                    // Closed by the broker after the DISCONNECT (or lost while leaving).
                    return;
                }
                backlog.queue.clear();
                let delay = rng.jitter(backoff);
                backoff = (backoff * 2).min(config.backoff.max);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
        if leaving.is_some() {
            disconnect_when_drained(&client, &backlog, &mut disconnecting);
        }
    }
    if connected_at.is_some() {
        counters.connected(-1);
    }
}

/// Queues the DISCONNECT once everything before it is in the request channel.
fn disconnect_when_drained(client: &AsyncClient, backlog: &Backlog, disconnecting: &mut bool) {
    if !*disconnecting && backlog.queue.is_empty() {
        *disconnecting = client.try_disconnect().is_ok();
    }
}

impl Counters {
    fn handled(&self, handled: Handled) {
        use gatewayd_protocol::message::FeedbackOutcome;
        use gatewayd_protocol::twin::DesiredDecision;
        use std::sync::atomic::Ordering::Relaxed;
        let counter = match handled {
            Handled::Rpc { ok: true } => &self.rpc_ok,
            Handled::Rpc { ok: false } => &self.rpc_errors,
            Handled::Message(FeedbackOutcome::Completed) => &self.messages_completed,
            Handled::Message(_) => &self.messages_not_completed,
            Handled::MessageRepeated => &self.messages_repeated,
            Handled::Desired(DesiredDecision::Apply) => &self.desired_applied,
            Handled::Desired(DesiredDecision::Ignore) => &self.desired_ignored,
            Handled::Desired(DesiredDecision::Resync) => &self.desired_resyncs,
            Handled::Ignored => &self.ignored,
        };
        counter.fetch_add(1, Relaxed);
        self.changed.notify_waiters();
    }
}
