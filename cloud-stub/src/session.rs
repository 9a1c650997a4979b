//! The cloud's MQTT session: one rumqttc client whose event loop runs in its own task. That
//! task only polls and hands incoming messages to the [`Uplink`]; everything that sends
//! (subscribe, RPC requests, acknowledgements) goes through the client's bounded request
//! channel, which only `poll()` drains, so the polling task never waits on itself.
//!
//! Acknowledgements are manual, and leave strictly in the order the publishes arrived (MQTT
//! 3.1.1 §4.6; rumqttd drops a session that acknowledges out of order): the acker task sends
//! each one once its own store commit (feedback, reported patch, twin sync) and every earlier
//! one are done. The session is persistent, so a publish the stub received but never committed
//! (it crashed, or the store failed) is sent again by the broker. Acks still queued when the
//! connection drops are discarded: their packet ids belong to the old connection.

use crate::security::Secret;
use crate::store::Commit;
use crate::uplink::Uplink;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::Topics;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, Publish, QoS,
};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Keep-alive of the cloud's session.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Capacity of the client's request channel.
const REQUEST_CAPACITY: usize = 1024;
/// First retry delay after a connection error; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an orderly disconnect may take at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_millis(500);

/// The broker the stub's own client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTarget {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker url '{url}': {reason}")]
pub struct TargetError {
    url: String,
    reason: &'static str,
}

impl FromStr for MqttTarget {
    type Err = TargetError;

    /// Parses `mqtt://host:port`, `tcp://host:port` or `host:port`; the port defaults to 1883.
    fn from_str(url: &str) -> Result<Self, TargetError> {
        let fail = |reason| TargetError {
            url: url.to_string(),
            reason,
        };
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(_) => return Err(fail("only mqtt:// (plain TCP) is supported")),
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => {
                (h, p.parse().map_err(|_| fail("port is not a number"))?)
            }
            _ => (rest, 1883),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(fail("expected mqtt://host:port"));
        }
        if port == 0 {
            return Err(fail("port must not be 0"));
        }
        Ok(MqttTarget {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for MqttTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "mqtt://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "mqtt://{}:{}", self.host, self.port)
        }
    }
}

/// Unacknowledged publishes of the stub's own at most (rumqttc's outgoing window).
const INFLIGHT: u16 = 10_000;

/// Sends on the session; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
}

impl Publisher {
    /// Queues a QoS 1 retained publish (the broker keeps the latest for a later subscriber).
    pub async fn publish_retained(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ClientError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
    }

    /// Queues a QoS 1, not retained publish. Waits only while the request channel is full.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ClientError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
    }
}

/// Connects to `target` as `client_id` (logging in as user `client_id` with `password`, if
/// any) and polls until `stop` is cancelled, then disconnects.
pub fn spawn(
    target: &MqttTarget,
    client_id: &str,
    password: Option<&Secret>,
    uplink: Uplink,
    stop: CancellationToken,
) -> (Publisher, JoinHandle<()>) {
    let mut options = MqttOptions::new(client_id, target.host.clone(), target.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        // A persistent session: while the stub is down, an external broker keeps what the
        // gateways publish for it (feedback, reported patches), so nothing a gateway already
        // handed over is lost across a stub restart.
        .set_clean_session(false)
        .set_manual_acks(true)
        // Manual acks travel in the same request channel as the stub's own publishes, and
        // rumqttc stops reading that channel while its outgoing window is full. With the
        // default window (100) a burst of RPC requests and messages could hold back the acks
        // the broker waits for before it acknowledges those publishes: a stall. A window as
        // wide as the request channel keeps the acks moving.
        .set_inflight(INFLIGHT)
        .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET);
    if let Some(password) = password {
        options.set_credentials(client_id, password.expose());
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    // `new()`, not `default()`: the default has a zero connect timeout. TCP_NODELAY on: with
    // Nagle, each small publish waits for the delayed ACK of the previous one (~40 ms).
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let publisher = Publisher {
        client: client.clone(),
    };
    let target = target.clone();
    let (acks, slots) = mpsc::unbounded_channel();
    let acker = Acker {
        client: client.clone(),
        generation: Arc::new(AtomicU64::new(0)),
    };
    let mut acking = tokio::spawn(acker.clone().run(slots));
    let task = tokio::spawn(async move {
        tracing::info!(broker = %target, "mqtt session starting");
        let session = Session {
            client: &client,
            uplink: &uplink,
            acker: &acker,
            acks: &acks,
        };
        session.drive(&mut eventloop, &stop).await;
        // The acks of what is committed by now leave before the DISCONNECT (the request
        // channel is FIFO); the rest the broker sends again to the next run.
        drop(acks);
        if tokio::time::timeout(DISCONNECT_GRACE, &mut acking)
            .await
            .is_err()
        {
            acking.abort();
        }
        disconnect(&mut eventloop, &client).await;
        tracing::info!("mqtt session stopped");
    });
    (publisher, task)
}

/// One acknowledgement waiting for its turn.
struct AckSlot {
    /// Packet id and QoS of the publish (nothing else is kept).
    publish: Publish,
    /// The connection it arrived on.
    generation: u64,
    /// The store work it waits for; `None`: acknowledged as soon as the order allows.
    commit: Option<Commit>,
}

/// Sends acknowledgements in arrival order; see the module docs.
#[derive(Clone)]
struct Acker {
    client: AsyncClient,
    /// Bumped at every ConnAck.
    generation: Arc<AtomicU64>,
}

impl Acker {
    /// Runs until the session drops its sender and every queued slot is handled.
    async fn run(self, mut slots: mpsc::UnboundedReceiver<AckSlot>) {
        // Once one publish of a connection cannot be acknowledged (the store stopped), none
        // after it may be: that would break the order.
        let mut stalled: Option<u64> = None;
        while let Some(slot) = slots.recv().await {
            let committed = match slot.commit {
                Some(commit) => commit.done().await,
                None => true,
            };
            if !committed {
                stalled = Some(slot.generation);
            }
            let current = self.generation.load(Ordering::SeqCst);
            if slot.generation != current || stalled == Some(current) {
                continue;
            }
            if let Err(e) = self.client.ack(&slot.publish).await {
                tracing::debug!(error = %e, "cannot queue an acknowledgement");
            }
        }
    }
}

/// What the polling task holds.
struct Session<'a> {
    client: &'a AsyncClient,
    uplink: &'a Uplink,
    acker: &'a Acker,
    acks: &'a mpsc::UnboundedSender<AckSlot>,
}

impl Session<'_> {
    async fn drive(&self, eventloop: &mut EventLoop, stop: &CancellationToken) {
        let (client, uplink) = (self.client, self.uplink);
        let mut backoff = MIN_BACKOFF;
        let mut connected = false;
        loop {
            // Cancel safety: dropping `poll()` at shutdown may lose a half-read packet, which is
            // fine because the session ends there.
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, "connected to broker");
                    // Acks still queued belong to the previous connection's packet ids.
                    self.acker.generation.fetch_add(1, Ordering::SeqCst);
                    connected = true;
                    backoff = MIN_BACKOFF;
                    subscribe(client);
                    uplink.link_up();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let commit = uplink.handle(&p.topic, &p.payload, crate::now_ms());
                    if p.qos != QoS::AtMostOnce {
                        let mut publish = Publish::new("", p.qos, Vec::new());
                        publish.pkid = p.pkid;
                        let _ = self.acks.send(AckSlot {
                            publish,
                            generation: self.acker.generation.load(Ordering::SeqCst),
                            commit,
                        });
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    tracing::debug!(return_codes = ?ack.return_codes, "subscribed");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "mqtt connection error");
                    // rumqttc dropped the queued acks of this connection; drop ours too.
                    self.acker.generation.fetch_add(1, Ordering::SeqCst);
                    if std::mem::replace(&mut connected, false) {
                        uplink.link_lost();
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Subscribes from a separate task: the request channel is drained only by `poll()`, so
/// awaiting it here could wait on ourselves.
fn subscribe(client: &AsyncClient) {
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client
            .subscribe(Topics::all_up_filter(), QoS::AtLeastOnce)
            .await
        {
            tracing::error!(error = %e, "cannot subscribe to gateway topics");
        }
    });
}

async fn disconnect(eventloop: &mut EventLoop, client: &AsyncClient) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let t: MqttTarget = "mqtt://broker.local:1884".parse().unwrap();
        assert_eq!(
            t,
            MqttTarget {
                host: "broker.local".into(),
                port: 1884
            }
        );
        let t: MqttTarget = "127.0.0.1".parse().unwrap();
        assert_eq!(t.port, 1883);
        let t: MqttTarget = "tcp://[::1]:1900".parse().unwrap();
        assert_eq!(
            t,
            MqttTarget {
                host: "::1".into(),
                port: 1900
            }
        );
        assert_eq!(t.to_string(), "mqtt://[::1]:1900");
    }

    #[test]
    fn bad_broker_urls_are_refused() {
        for bad in [
            "mqtts://h:1",
            "mqtt://:1883",
            "mqtt://h:x",
            "mqtt://h:0",
            "mqtt://h/a:1",
        ] {
            assert!(bad.parse::<MqttTarget>().is_err(), "{bad}");
        }
    }
}
