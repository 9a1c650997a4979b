//! The bench's own cloud side on MQTT, independent of the cloud stub's client: one rumqttc
//! session ("bench-cloud") that publishes RPC requests the way the cloud does and matches the
//! answers by request id, and a second session ("bench-echo") that stands in for a gateway
//! that does nothing: it answers every RPC request on gateway [`ECHO_GATEWAY`]'s request topic
//! at once with a success on that gateway's answer topic, for the broker-only latency baseline
//! and throughput floor. The topics are a gateway's, so the broker routes each answer to the
//! same subscribers (the stub's session too) as a real gateway's answer: the floor costs the
//! broker and the stub what an RPC costs them, less the gateway and the device.
//!
//! Each session's event loop is polled in its own task, which never publishes (rumqttc
//! requests go through a bounded channel that only `poll()` drains). Arrival times are taken
//! in the polling task, so the waiting caller's own wake-up is not counted.

use anyhow::{anyhow, bail, Context, Result};
use gatewayd_protocol::limits::MAX_MQTT_PACKET;
use gatewayd_protocol::{
    decode, DeviceId, Down, ErrorCode, GatewayId, RequestId, RpcOutcome, RpcRequest, RpcResponse,
    RpcSuccess, Topics, Up, PROTOCOL_VERSION,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// The gateway the echo session stands in for (no such gateway is configured anywhere).
pub const ECHO_GATEWAY: &str = "bench-echo";

/// How an exchange ended, and when its answer reached the polling task.
#[derive(Debug, Clone)]
pub struct Reply {
    pub at: Instant,
    /// `None` for success (and for echoes), else the RPC error code.
    pub error: Option<ErrorCode>,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;

/// The cloud-side session.
pub struct Cloud {
    client: AsyncClient,
    pending: Pending,
    next: AtomicU64,
    poll: JoinHandle<()>,
}

impl Cloud {
    /// Connects as `bench-cloud` to `broker` (`mqtt://host:port`) and subscribes to RPC
    /// responses of every gateway and to the echo answers.
    pub async fn connect(broker: &str) -> Result<Cloud> {
        let (client, eventloop) = session("bench-cloud", broker)?;
        let pending: Pending = Arc::default();
        let (subacks_tx, subacks) = watch::channel(0usize);
        let poll = tokio::spawn(poll_cloud(eventloop, pending.clone(), subacks_tx));
        let rpc_res = format!(
            "{}/+/up/{}",
            gatewayd_protocol::topic::ROOT,
            Up::RpcResponse.suffix()
        );
        client.subscribe(rpc_res, QoS::AtLeastOnce).await?;
        await_subacks(subacks, 1).await?;
        Ok(Cloud {
            client,
            pending,
            next: AtomicU64::new(1),
            poll,
        })
    }

    /// Sends one RPC to `device` of `gateway` and waits for its answer; returns the reply and
    /// the time from handing the publish to the client until the answer arrived.
    pub async fn rpc(
        &self,
        gateway: &GatewayId,
        device: &str,
        method: &str,
        timeout: Duration,
    ) -> Result<(Reply, Duration)> {
        let (id, payload) = self.request(device, method, timeout)?;
        let topic = Topics::down(gateway, Down::RpcRequest);
        self.exchange(topic, id, payload, timeout).await
    }

    /// Sends the same RPC request through the broker to the echo session, which answers it at
    /// once.
    pub async fn echo(&self, device: &str, timeout: Duration) -> Result<(Reply, Duration)> {
        let gateway = GatewayId::new(ECHO_GATEWAY)?;
        self.rpc(&gateway, device, "status", timeout).await
    }

    fn request(&self, device: &str, method: &str, timeout: Duration) -> Result<(String, Vec<u8>)> {
        let id = format!("bench-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let timeout_ms = timeout.as_millis() as u64;
        let req = RpcRequest {
            v: PROTOCOL_VERSION,
            id: RequestId::new(id.clone())?,
            device: DeviceId::new(device)?,
            method: method.to_string(),
            params: serde_json::Value::Null,
            timeout_ms,
            deadline_ms: now_ms() + timeout_ms,
        };
        Ok((id, serde_json::to_vec(&req)?))
    }

    async fn exchange(
        &self,
        topic: String,
        id: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(Reply, Duration)> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(id.clone(), tx);
        let started = Instant::now();
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => {
                let took = reply.at.saturating_duration_since(started);
                Ok((reply, took))
            }
            _ => {
                self.pending.lock().expect("pending lock").remove(&id);
                bail!("no answer to {id} within {timeout:?}")
            }
        }
    }

    /// Disconnects and stops the polling task.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.poll).await;
    }
}

/// The echo session: answers every RPC request to [`ECHO_GATEWAY`] with a success carrying the
/// request's params as the result.
pub struct Echo {
    client: AsyncClient,
    tasks: [JoinHandle<()>; 2],
}

impl Echo {
    /// Connects as `bench-echo` and subscribes to [`ECHO_GATEWAY`]'s RPC request topic.
    pub async fn start(broker: &str) -> Result<Echo> {
        let gateway = GatewayId::new(ECHO_GATEWAY)?;
        let requests = Topics::down(&gateway, Down::RpcRequest);
        let answers = Topics::up(&gateway, Up::RpcResponse);
        let (client, mut eventloop) = session("bench-echo", broker)?;
        let (subacks_tx, subacks) = watch::channel(0usize);
        let (tx, mut rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
        let poll = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let replier = client.clone();
        let answer = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let Some(answer) = echo_answer(&p.payload) else {
                    continue;
                };
                let _ = replier
                    .publish(answers.as_str(), QoS::AtLeastOnce, false, answer)
                    .await;
            }
        });
        client.subscribe(requests, QoS::AtLeastOnce).await?;
        await_subacks(subacks, 1).await?;
        Ok(Echo {
            client,
            tasks: [poll, answer],
        })
    }

    /// Disconnects and stops both tasks.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        for t in self.tasks {
            t.abort();
        }
    }
}

fn session(client_id: &str, broker: &str) -> Result<(AsyncClient, EventLoop)> {
    let (host, port) = parse_broker(broker)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true)
        .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET)
        .set_inflight(1000)
        .set_request_channel_capacity(4096);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

/// Polls the cloud session: completes pending exchanges, counts SubAcks.
async fn poll_cloud(mut eventloop: EventLoop, pending: Pending, subacks: watch::Sender<usize>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                let Some((id, error)) = answer_of(&p.topic, &p.payload) else {
                    continue;
                };
                let waiter = pending.lock().expect("pending lock").remove(&id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Reply { at, error });
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => subacks.send_modify(|n| *n += 1),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                eprintln!("bench-cloud: mqtt connection error: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The echo session's answer to an RPC request: a success, the params as the result.
fn echo_answer(request: &[u8]) -> Option<Vec<u8>> {
    let req: RpcRequest = decode(request).ok()?;
    serde_json::to_vec(&RpcResponse {
        v: PROTOCOL_VERSION,
        id: req.id,
        outcome: RpcOutcome::Ok(RpcSuccess {
            status: 200,
            result: req.params,
        }),
    })
    .ok()
}

/// The request id an answer belongs to, and its error code if it is a failed RPC.
fn answer_of(topic: &str, payload: &[u8]) -> Option<(String, Option<ErrorCode>)> {
    match Topics::parse_up(topic)? {
        (_, Up::RpcResponse) => {
            let res: RpcResponse = decode(payload).ok()?;
            let error = match res.outcome {
                RpcOutcome::Ok(_) => None,
                RpcOutcome::Error(e) => Some(e.code),
            };
            Some((res.id.to_string(), error))
        }
        _ => None,
    }
}

async fn await_subacks(mut subacks: watch::Receiver<usize>, n: usize) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(10), subacks.wait_for(|&k| k >= n))
        .await
        .map_err(|_| anyhow!("broker did not acknowledge the bench's subscriptions within 10 s"))?
        .context("mqtt polling task ended")?;
    Ok(())
}

/// `mqtt://host:port` -> (host, port).
pub fn parse_broker(url: &str) -> Result<(String, u16)> {
    let rest = url.strip_prefix("mqtt://").unwrap_or(url);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("broker url {url} has no port"))?;
    Ok((host.to_string(), port.parse().context("broker port")?))
}

/// Wall clock, unix milliseconds (RPC deadlines are on the cloud clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_answers_a_request_as_a_gateway_would() {
        let req = RpcRequest {
            v: PROTOCOL_VERSION,
            id: RequestId::new("bench-7").unwrap(),
            device: DeviceId::new("agv-1").unwrap(),
            method: "status".into(),
            params: serde_json::json!({"x": 1}),
            timeout_ms: 5000,
            deadline_ms: now_ms() + 5000,
        };
        let answer = echo_answer(&serde_json::to_vec(&req).unwrap()).unwrap();
        let topic = Topics::up(&GatewayId::new(ECHO_GATEWAY).unwrap(), Up::RpcResponse);
        assert_eq!(answer_of(&topic, &answer), Some(("bench-7".into(), None)));
        let res: RpcResponse = decode(&answer).unwrap();
        assert_eq!(
            res.outcome,
            RpcOutcome::Ok(RpcSuccess {
                status: 200,
                result: serde_json::json!({"x": 1})
            })
        );
        assert_eq!(echo_answer(b"not json"), None);
    }
}
