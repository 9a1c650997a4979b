//! The MQTT side: accepts connections, authenticates a gateway by the access token in its
//! user name, and runs one task per session that owns the socket. ThingsBoard's transport
//! routes each session itself (no broker: a gateway never gets its own publishes back), so a
//! session only ever receives what the state pushes to it. Also the delivery loop of
//! persistent RPCs.

use super::state::Command;
use super::wire::{self, Inbound, Outbound, Version};
use super::{now_ms, Shared};
use bytes::BytesMut;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a new connection may take to send its CONNECT.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// How often persistent RPCs are checked for expiry and retries without a wake-up.
const DELIVERY_TICK: Duration = Duration::from_millis(100);

/// Accepts MQTT connections until `shutdown`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(session(shared.clone(), stream, peer, shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Sends persistent RPCs when due, on a wake-up (a device connected, a gateway subscribed, an
/// RPC was created) or every [`DELIVERY_TICK`] for expiry and retries.
pub async fn deliver(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(DELIVERY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tick.tick() => {}
        }
        shared.lock().deliver_due(now_ms());
    }
}

async fn session(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    if let Err(e) = run_session(&shared, stream, &stop).await {
        tracing::info!(%peer, error = %e, "connection ended");
    }
}

/// Reads until `buf` holds the whole CONNECT; returns its protocol version and fields.
async fn read_connect(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> anyhow::Result<Result<(Version, Inbound), u8>> {
    let level = loop {
        if let Some(level) = wire::connect_level(buf)? {
            break level;
        }
        anyhow::ensure!(stream.read_buf(buf).await? > 0, "closed before CONNECT");
    };
    let version = match level {
        4 => Version::V4,
        5 => Version::V5,
        other => return Ok(Err(other)),
    };
    loop {
        if let Some(frame) = wire::read(buf, version)? {
            return Ok(Ok((version, frame)));
        }
        anyhow::ensure!(stream.read_buf(buf).await? > 0, "closed inside CONNECT");
    }
}

async fn send(stream: &mut TcpStream, version: Version, frames: &[Outbound]) -> anyhow::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        wire::write(f, version, &mut out)?;
    }
    stream.write_all(&out).await?;
    Ok(())
}

async fn run_session(
    shared: &Shared,
    mut stream: TcpStream,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    let connect = tokio::time::timeout(CONNECT_WITHIN, read_connect(&mut stream, &mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("no CONNECT within {CONNECT_WITHIN:?}"))??;
    let (version, connect) = match connect {
        Ok(c) => c,
        Err(level) => {
            // CONNACK "unacceptable protocol version", in 3.1.1 framing.
            stream.write_all(&[0x20, 2, 0, 1]).await?;
            anyhow::bail!("unsupported protocol level {level}");
        }
    };
    let Inbound::Connect {
        client_id,
        username,
        keep_alive,
    } = connect
    else {
        anyhow::bail!("first packet is not CONNECT");
    };
    let gateway = {
        let st = shared.lock();
        username.as_deref().and_then(|t| st.gateway_of_token(t))
    };
    let Some(gateway) = gateway else {
        {
            let mut st = shared.lock();
            st.event(
                now_ms(),
                "protocol_error",
                None,
                json!({"error": "not authorized", "client_id": client_id}),
            );
        }
        send(
            &mut stream,
            version,
            &[Outbound::ConnAck { accepted: false }],
        )
        .await?;
        let _ = stream.shutdown().await;
        anyhow::bail!("CONNECT refused: unknown access token");
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = shared.lock().open_session(
        &gateway,
        tx,
        json!({"client_id": client_id, "mqtt": if version == Version::V5 { 5 } else { 4 }}),
        now_ms(),
    );
    tracing::info!(
        gateway,
        session = id,
        ?version,
        keep_alive,
        "gateway connected"
    );
    let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let ended = serve_session(
        shared,
        &mut stream,
        &mut buf,
        version,
        id,
        &mut rx,
        idle,
        stop,
    )
    .await;
    let reason = match &ended {
        Ok(reason) => reason.to_string(),
        Err(e) => format!("error: {e}"),
    };
    tracing::info!(gateway, session = id, reason, "session ended");
    shared.lock().end_session(id, &reason, now_ms());
    let _ = stream.shutdown().await;
    Ok(())
}

/// The session's loop; returns why it ended. Cancel safety: `read_buf` and `recv` lose
/// nothing when another branch wins; writes happen outside the `select!`.
#[allow(clippy::too_many_arguments)]
async fn serve_session(
    shared: &Shared,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    version: Version,
    id: u64,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    idle: Option<Duration>,
    stop: &CancellationToken,
) -> anyhow::Result<&'static str> {
    send(stream, version, &[Outbound::ConnAck { accepted: true }]).await?;
    let far = Duration::from_secs(365 * 24 * 3600);
    let mut deadline = Instant::now() + idle.unwrap_or(far);
    loop {
        while let Some(frame) = wire::read(buf, version)? {
            let mut replies = Vec::new();
            match frame {
                Inbound::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } => {
                    anyhow::ensure!(qos < 2, "QoS 2 publish on {topic}");
                    let gateway = shared.lock().sessions.get(&id).map(|s| s.gateway.clone());
                    let Some(gateway) = gateway else {
                        return Ok("closed by the server");
                    };
                    let outcome = super::topics::handle(
                        &mut shared.lock(),
                        id,
                        &gateway,
                        &topic,
                        &payload,
                        now_ms(),
                    );
                    if outcome.wake_delivery {
                        shared.wake.notify_one();
                    }
                    if qos == 1 {
                        replies.push(Outbound::PubAck { pkid });
                    }
                }
                Inbound::PubAck { pkid } => shared.lock().puback(id, pkid, now_ms()),
                Inbound::Subscribe { pkid, filters } => {
                    shared.lock().subscribe(id, &filters);
                    shared.wake.notify_one();
                    replies.push(Outbound::SubAck {
                        pkid,
                        count: filters.len(),
                    });
                }
                Inbound::Unsubscribe { pkid, filters } => {
                    shared.lock().unsubscribe(id, &filters);
                    replies.push(Outbound::UnsubAck {
                        pkid,
                        count: filters.len(),
                    });
                }
                Inbound::PingReq => replies.push(Outbound::PingResp),
                Inbound::Disconnect => return Ok("DISCONNECT"),
                Inbound::Connect { .. } => anyhow::bail!("second CONNECT on a session"),
                Inbound::Unsupported(what) => anyhow::bail!("unsupported packet {what}"),
            }
            if !replies.is_empty() {
                send(stream, version, &replies).await?;
            }
        }
        tokio::select! {
            n = stream.read_buf(buf) => {
                if n? == 0 {
                    return Ok("connection closed by the gateway");
                }
                deadline = Instant::now() + idle.unwrap_or(far);
            }
            cmd = rx.recv() => {
                let mut frames = Vec::new();
                let mut next = cmd;
                loop {
                    match next {
                        Some(Command::Send(f)) => frames.push(f),
                        // Abrupt: whatever is still queued is not sent.
                        Some(Command::Close) | None => return Ok("closed by the server"),
                    }
                    match rx.try_recv() {
                        Ok(c) => next = Some(c),
                        Err(_) => break,
                    }
                }
                send(stream, version, &frames).await?;
            }
            _ = tokio::time::sleep_until(deadline) => return Ok("keep-alive timeout"),
            _ = stop.cancelled() => return Ok("shutdown"),
        }
    }
}
