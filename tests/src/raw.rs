//! A raw MQTT client for tests: what an attacker holding one gateway's credentials can try,
//! or a cloud that publishes RPC requests itself, bypassing the stub's checks.

use anyhow::{anyhow, bail, Result};
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one expected MQTT event may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the broker did.
#[derive(Debug)]
pub enum RawEvent {
    ConnAck,
    SubAck(Vec<SubscribeReasonCode>),
    Publish(String, Vec<u8>),
    /// A QoS 1 publish was acknowledged.
    PubAck,
    Closed(String),
}

/// A raw MQTT 3.1.1 client without reconnects; a task collects its events.
pub struct Raw {
    /// Its client id.
    pub id: String,
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<RawEvent>,
    /// Publishes received so far (while waiting for something else).
    pub received: Vec<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

/// Login, TLS and last will of a [`Raw`] client.
#[derive(Default)]
pub struct RawOptions {
    /// User name and password.
    pub login: Option<(String, String)>,
    pub tls: Option<TlsConfiguration>,
    pub will: Option<LastWill>,
}

impl Raw {
    /// Connects (no reconnects) and returns the client once the broker answered, or why the
    /// connection was closed.
    pub async fn connect(id: &str, url: &str, o: RawOptions) -> Result<Result<Raw, String>> {
        let (host, port) = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.rsplit_once(':'))
            .ok_or_else(|| anyhow!("bad broker url {url}"))?;
        let mut opts = MqttOptions::new(id, host, port.parse::<u16>()?);
        opts.set_keep_alive(Duration::from_secs(30));
        // Room for oversize payloads an attacker would send.
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some((u, p)) = o.login {
            opts.set_credentials(u, p);
        }
        if let Some(tls) = o.tls {
            opts.set_transport(Transport::tls_with_config(tls));
        }
        if let Some(will) = o.will {
            opts.set_last_will(will);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(5);
        eventloop.set_network_options(net);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => RawEvent::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(a))) => RawEvent::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => RawEvent::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        RawEvent::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(RawEvent::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(WAIT, events.recv())
            .await
            .map_err(|_| anyhow!("{id}: no answer from the broker within {WAIT:?}"))?;
        Ok(match first {
            Some(RawEvent::ConnAck) => Ok(Raw {
                id: id.to_string(),
                client,
                events,
                received: Vec::new(),
                task,
            }),
            Some(RawEvent::Closed(why)) => Err(why),
            other => bail!("{id}: unexpected first event {other:?}"),
        })
    }

    pub async fn next(&mut self) -> Result<RawEvent> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .map_err(|_| anyhow!("{}: no MQTT event within {WAIT:?}", self.id))?
            .ok_or_else(|| anyhow!("{}: event task ended", self.id))
    }

    /// Subscribes to one filter and returns the broker's return code.
    pub async fn subscribe(&mut self, filter: &str) -> Result<SubscribeReasonCode> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            match self.next().await? {
                RawEvent::SubAck(codes) => return Ok(codes[0]),
                RawEvent::Publish(t, p) => self.received.push((t, p)),
                RawEvent::Closed(why) => bail!("{}: closed while subscribing: {why}", self.id),
                RawEvent::ConnAck | RawEvent::PubAck => {}
            }
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK (`Ok(false)` if the broker closed
    /// the connection instead).
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: &Value,
        retain: bool,
    ) -> Result<bool> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_string())
            .await?;
        loop {
            match self.next().await? {
                RawEvent::PubAck => return Ok(true),
                RawEvent::Closed(_) => return Ok(false),
                RawEvent::Publish(t, p) => self.received.push((t, p)),
                _ => {}
            }
        }
    }

    /// Waits until the broker closes the connection; returns why.
    pub async fn closed(&mut self) -> Result<String> {
        loop {
            match self.next().await? {
                RawEvent::Closed(why) => return Ok(why),
                RawEvent::Publish(t, p) => self.received.push((t, p)),
                _ => {}
            }
        }
    }

    /// Waits for a publish on `topic` whose JSON has `"id": id`.
    pub async fn response(&mut self, topic: &str, id: &str) -> Result<Value> {
        loop {
            if let RawEvent::Publish(t, p) = self.next().await? {
                let v: Value = serde_json::from_slice(&p)?;
                if t == topic && v["id"] == id {
                    return Ok(v);
                }
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a SUBACK return code refused the subscription.
pub fn failed(code: SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Failure)
}

/// The cloud's side of RPC as raw MQTT, so gatewayd's own checks are what a test exercises
/// (the stub refuses undeclared methods and params before publishing).
pub struct RawCloud {
    pub raw: Raw,
    /// The gateway whose `down/rpc/req` it publishes on.
    pub gateway: String,
    n: u32,
}

impl RawCloud {
    /// Subscribes to the gateway's RPC responses through `raw`.
    pub async fn new(mut raw: Raw, gateway: &str) -> Result<RawCloud> {
        let code = raw.subscribe(&format!("gw/{gateway}/up/rpc/res")).await?;
        anyhow::ensure!(!failed(code), "subscription refused");
        Ok(RawCloud {
            raw,
            gateway: gateway.to_string(),
            n: 0,
        })
    }

    /// Publishes an RPC request (5 s timeout) and returns the gateway's response.
    pub async fn call(&mut self, device: &str, method: &str, params: Value) -> Result<Value> {
        self.n += 1;
        let id = format!("esc-{}", self.n);
        let now = now_ms();
        let req = json!({"v": 1, "id": id, "device": device, "method": method,
            "params": params, "timeout_ms": 5000, "deadline_ms": now + 5000});
        self.raw
            .client
            .publish(
                format!("gw/{}/down/rpc/req", self.gateway),
                QoS::AtLeastOnce,
                false,
                req.to_string(),
            )
            .await?;
        let topic = format!("gw/{}/up/rpc/res", self.gateway);
        self.raw.response(&topic, &id).await
    }

    /// The result of a call that must succeed.
    pub async fn ok(&mut self, device: &str, method: &str, params: Value) -> Result<Value> {
        let r = self.call(device, method, params).await?;
        r.get("ok")
            .map(|ok| ok["result"].clone())
            .ok_or_else(|| anyhow!("{method} failed: {r}"))
    }

    /// The error code of a call that must fail.
    pub async fn error_code(
        &mut self,
        device: &str,
        method: &str,
        params: Value,
    ) -> Result<String> {
        let r = self.call(device, method, params).await?;
        r["error"]["code"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{method} did not fail: {r}"))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
