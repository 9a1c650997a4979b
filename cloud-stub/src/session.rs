//! The cloud's MQTT session: one rumqttc client whose event loop runs in its own task. That
//! task only polls and hands incoming messages to the [`Uplink`]; everything that sends
//! (subscribe, RPC requests) goes through the client's bounded request channel, which only
//! `poll()` drains, so the polling task never waits on itself.

use crate::security::Secret;
use crate::uplink::Uplink;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::Topics;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
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

/// Sends on the session; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
}

impl Publisher {
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
    let task = tokio::spawn(async move {
        tracing::info!(broker = %target, "mqtt session starting");
        drive(&mut eventloop, &client, &uplink, &stop).await;
        disconnect(&mut eventloop, &client).await;
        tracing::info!("mqtt session stopped");
    });
    (publisher, task)
}

async fn drive(
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    uplink: &Uplink,
    stop: &CancellationToken,
) {
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
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("connected to broker");
                connected = true;
                backoff = MIN_BACKOFF;
                subscribe(client);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                uplink.handle(&p.topic, &p.payload, crate::now_ms());
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::debug!(return_codes = ?ack.return_codes, "subscribed");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "mqtt connection error");
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
