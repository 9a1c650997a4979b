//! Watching a swarm from outside: what the cloud stub's operator API and log show of it, and
//! what the broker keeps for it (retained publishes, persistent sessions). Used by the bench's
//! swarm phase and the swarm's end-to-end test.

use super::Swarm;
use crate::{eventually, get, Stub};
use anyhow::Result;
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::Topics;
use serde::Serialize;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Pause between two reads of the gateway list while waiting for a swarm to come online.
const LIST_PAUSE: Duration = Duration::from_millis(100);
/// Longest a look at the broker may take.
const BROKER_DEADLINE: Duration = Duration::from_secs(30);

/// When the operator API showed a swarm online, seconds after the wait began.
#[derive(Debug, Clone, Serialize)]
pub struct Online {
    /// Every gateway online with its whole catalog (`GET /api/v1/gateways`).
    pub gateways_s: f64,
    /// Every device online (`GET /api/v1/devices`).
    pub devices_s: f64,
}

/// What the stub logs when its MQTT session connects, and when it fails.
pub const SESSION_UP: &str = "connected to broker";
pub const SESSION_ERROR: &str = "mqtt connection error";

/// Lines of the stub's log (all its runs) containing `what`.
pub fn log_count(stub: &Stub, what: &str) -> usize {
    std::fs::read_to_string(&stub.proc.log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// How many times the stub's MQTT session connected (all its runs).
pub fn session_connects(stub: &Stub) -> usize {
    log_count(stub, SESSION_UP)
}

/// Waits until the stub's MQTT session has connected more than `before` times (its
/// subscription follows at once): gateways that connect later reach it live, not through
/// retained publishes.
pub async fn await_stub_session(stub: &Stub, before: usize, within: Duration) -> Result<()> {
    eventually("the stub's MQTT session", within, || async move {
        Ok((session_connects(stub) > before).then_some(()))
    })
    .await
}

/// What the operator API shows of a swarm.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// Gateways online with their whole catalog.
    pub gateways: HashSet<String>,
    /// Devices online.
    pub devices: usize,
}

/// Reads the gateway list (and, once every gateway is online, the much larger device list)
/// every [`LIST_PAUSE`] until every gateway and device of `swarm` shows online or `within`
/// passed. Returns when each was first seen complete, and what was shown last.
pub async fn watch_online(api: &str, swarm: &Swarm, within: Duration) -> (Option<Online>, Shown) {
    let started = Instant::now();
    let deadline = started + within;
    let ids: HashSet<&str> = swarm.gateways().iter().map(|g| g.as_str()).collect();
    let per = swarm.devices_per_gateway();
    let mut shown = Shown::default();
    let mut gateways_s = None;
    loop {
        if gateways_s.is_none() {
            if let Ok((200, list)) = get(&format!("{api}/api/v1/gateways")).await {
                shown.gateways = list
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|g| {
                                g["online"] == true
                                    && g["devices"].as_array().is_some_and(|d| d.len() == per)
                            })
                            .filter_map(|g| g["id"].as_str())
                            .filter(|id| ids.contains(id))
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                if shown.gateways.len() == ids.len() {
                    gateways_s = Some(started.elapsed().as_secs_f64());
                }
            }
        }
        if let Some(gateways_s) = gateways_s {
            shown.devices = devices_online(api, &ids).await;
            if shown.devices == ids.len() * per {
                let devices_s = started.elapsed().as_secs_f64();
                let online = Online {
                    gateways_s,
                    devices_s,
                };
                return (Some(online), shown);
            }
        }
        if Instant::now() >= deadline {
            if gateways_s.is_none() {
                shown.devices = devices_online(api, &ids).await;
            }
            return (None, shown);
        }
        tokio::time::sleep(LIST_PAUSE).await;
    }
}

/// Devices of the gateways `ids` that the device list shows online (0 when it cannot be read).
async fn devices_online(api: &str, ids: &HashSet<&str>) -> usize {
    let Ok((200, list)) = get(&format!("{api}/api/v1/devices")).await else {
        return 0;
    };
    list.as_array().map_or(0, |a| {
        a.iter()
            .filter(|d| {
                d["online"] == true && d["gateway"].as_str().is_some_and(|g| ids.contains(g))
            })
            .count()
    })
}

/// Like [`watch_online`], failing unless everything showed online within `within`.
pub async fn await_online(api: &str, swarm: &Swarm, within: Duration) -> Result<Online> {
    match watch_online(api, swarm, within).await {
        (Some(online), _) => Ok(online),
        (None, shown) => anyhow::bail!(
            "the stub shows {} of {} gateways and {} of {} devices online after {within:?}",
            shown.gateways.len(),
            swarm.gateways().len(),
            shown.devices,
            swarm.gateways().len() * swarm.devices_per_gateway()
        ),
    }
}

/// The topics of gateways named `{prefix}-...` on which the broker at `url` holds a retained
/// publish, each deleted (an empty retained publish) when `delete`. Retained publishes arrive
/// right after the subscription, before anything published later: once a marker published
/// after subscribing comes back, all of them are in.
pub async fn retained_topics(url: &str, prefix: &str, delete: bool) -> Result<Vec<String>> {
    use rumqttc::{Event, Packet, QoS};
    let (host, port) = crate::bench::cloud::parse_broker(url)?;
    let me = format!("{prefix}-cleaner");
    let mut options = rumqttc::MqttOptions::new(&me, host, port);
    options
        .set_clean_session(true)
        .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    let marker = format!("{}/{me}/up/marker", gatewayd_protocol::topic::ROOT);
    let ours = format!("{}/{prefix}-", gatewayd_protocol::topic::ROOT);
    let mut found: Vec<String> = Vec::new();
    // Deletions queued so far (once the marker is back), and acknowledgements counted.
    let mut queued: Option<usize> = None;
    let mut acked = 0;
    let done = tokio::time::timeout(BROKER_DEADLINE, async {
        loop {
            let event = eventloop.poll().await?;
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client.try_subscribe(Topics::all_up_filter(), QoS::AtLeastOnce)?;
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    client.try_publish(marker.clone(), QoS::AtLeastOnce, false, Vec::new())?;
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == marker => {
                    if found.is_empty() || !delete {
                        return Ok(());
                    }
                    queued = Some(0);
                }
                Event::Incoming(Packet::Publish(p))
                    if p.retain && !p.payload.is_empty() && p.topic.starts_with(&ours) =>
                {
                    found.push(p.topic.clone());
                }
                Event::Incoming(Packet::PubAck(_)) => {
                    acked += 1;
                    // The marker's acknowledgement counts too.
                    if acked == found.len() + 1 {
                        return Ok::<(), anyhow::Error>(());
                    }
                }
                _ => {}
            }
            // Only `poll()` drains the request channel: queue what fits, the rest after the
            // next event.
            if let Some(next) = queued.as_mut() {
                while let Some(topic) = found.get(*next) {
                    if client
                        .try_publish(topic.clone(), QoS::AtLeastOnce, true, Vec::new())
                        .is_err()
                    {
                        break;
                    }
                    *next += 1;
                }
            }
        }
    })
    .await;
    match done {
        Ok(result) => result?,
        Err(_) => {
            anyhow::bail!("reading retained publishes on {url} took over {BROKER_DEADLINE:?}")
        }
    }
    Ok(found)
}

/// Ends the persistent session `client_id` holds on the broker at `url`, if any: a connect
/// with a clean session discards it (and whatever is queued for it), then a disconnect.
pub async fn forget_session(url: &str, client_id: &str) -> Result<()> {
    let (host, port) = crate::bench::cloud::parse_broker(url)?;
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options.set_clean_session(true);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let ended = tokio::time::timeout(BROKER_DEADLINE, async {
        loop {
            match eventloop.poll().await? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                    client.disconnect().await?;
                }
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => return Ok(()),
                _ => {}
            }
        }
    })
    .await;
    match ended {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "broker {url} did not take a connect of {client_id} within {BROKER_DEADLINE:?}"
        ),
    }
}
