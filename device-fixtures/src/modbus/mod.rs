//! A simulated Modbus slave: the units of a register map (`map`), served over Modbus TCP on
//! a listener and over Modbus RTU on a pseudo-terminal (both at once, same units), with
//! faults switched over a control API (`faults`, `control`).
//!
//! The RTU side also counts collisions: bytes of a new request arriving while the previous
//! one is still being answered, which a master that serves its bus one request at a time
//! never causes.

mod control;
pub mod faults;
pub mod map;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::serial::pty::{self, Pty};
use faults::Faults;
use map::{MapFile, Unit};

/// Shared by the servers and the control API.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub faults: watch::Sender<Faults>,
    pub initial: BTreeMap<u8, Unit>,
    pub link: PathBuf,
    pub tcp: SocketAddr,
    /// RTU frames over TCP (as some converters forward them).
    pub rtu_tcp: SocketAddr,
    pub path: watch::Sender<Option<String>>,
}

pub(crate) struct State {
    pub units: BTreeMap<u8, Unit>,
    /// RTU: bytes of a request that arrived while the previous one was being answered.
    pub collisions: u64,
    /// RTU frames received (any unit, good CRC).
    pub rtu_frames: u64,
    /// TCP connections accepted.
    pub connections: u64,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one request PDU for `unit` through the faults: `None` means stay silent.
    /// Returns the reply PDU and the unit id to answer as.
    async fn answer(&self, unit: u8, pdu: &[u8]) -> Option<(u8, Vec<u8>, bool)> {
        let faults = self.faults.borrow().clone();
        let hit = faults.hits(unit);
        let reply = {
            let mut state = self.state();
            let u = state.units.get_mut(&unit)?;
            if hit && faults.no_reply {
                u.requests += 1;
                return None;
            }
            match faults.exception.filter(|_| hit) {
                Some(code) => {
                    u.requests += 1;
                    vec![pdu.first().copied().unwrap_or(0) | 0x80, code]
                }
                None => u.handle(pdu),
            }
        };
        if hit && faults.slow_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
        }
        let as_unit = if hit && faults.wrong_unit {
            unit.wrapping_add(1)
        } else {
            unit
        };
        Some((as_unit, reply, hit && faults.crc_error))
    }
}

/// A simulator ready to run.
pub struct ModbusSim {
    shared: Arc<Shared>,
    tcp: TcpListener,
    rtu_tcp: TcpListener,
    pty: Pty,
}

impl ModbusSim {
    /// The units of `map`, Modbus TCP on `tcp`, RTU frames over TCP on `rtu_tcp`, RTU on a new
    /// pty linked at `link`.
    pub fn open(
        map: &MapFile,
        tcp: TcpListener,
        rtu_tcp: TcpListener,
        link: PathBuf,
    ) -> Result<ModbusSim, String> {
        let mut units = BTreeMap::new();
        for (id, f) in &map.units {
            units.insert(
                *id,
                Unit::from_file(f).map_err(|e| format!("units.{id}: {e}"))?,
            );
        }
        let pty = Pty::open().map_err(|e| format!("creating the pseudo-terminal: {e}"))?;
        pty::link(&link, &pty.path).map_err(|e| format!("linking {}: {e}", link.display()))?;
        let addr = tcp.local_addr().map_err(|e| e.to_string())?;
        let rtu_addr = rtu_tcp.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                units: units.clone(),
                collisions: 0,
                rtu_frames: 0,
                connections: 0,
            }),
            faults: watch::Sender::new(Faults::default()),
            initial: units,
            link,
            tcp: addr,
            rtu_tcp: rtu_addr,
            path: watch::Sender::new(Some(pty.path.clone())),
        });
        Ok(ModbusSim {
            shared,
            tcp,
            rtu_tcp,
            pty,
        })
    }

    /// The Modbus TCP address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.shared.tcp
    }

    /// The RTU-over-TCP address.
    pub fn rtu_tcp_addr(&self) -> SocketAddr {
        self.shared.rtu_tcp
    }

    /// Serves TCP, RTU and the control API on `control` until `shutdown`.
    pub async fn run(self, control: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let stop = shutdown.child_token();
        let addr = self.shared.tcp;
        let tcp = tokio::spawn(serve_tcp(
            self.shared.clone(),
            self.tcp,
            addr,
            false,
            stop.clone(),
        ));
        let addr = self.shared.rtu_tcp;
        let rtu_tcp = tokio::spawn(serve_tcp(
            self.shared.clone(),
            self.rtu_tcp,
            addr,
            true,
            stop.clone(),
        ));
        let rtu = tokio::spawn(supervise_rtu(self.shared.clone(), self.pty, stop.clone()));
        let served = axum::serve(control, control::router(self.shared.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .await;
        stop.cancel();
        let _ = tcp.await;
        let _ = rtu_tcp.await;
        let _ = rtu.await;
        pty::unlink(&self.shared.link);
        served
    }
}

/// Accepts connections while the bus is there; `gone` closes the listener and every
/// connection, and clearing it binds the same address again. `rtu`: RTU frames instead of
/// MBAP.
async fn serve_tcp(
    shared: Arc<Shared>,
    first: TcpListener,
    addr: SocketAddr,
    rtu: bool,
    stop: CancellationToken,
) {
    let mut faults = shared.faults.subscribe();
    let mut listener = Some(first);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => {
                tokio::select! {
                    r = faults.wait_for(|f| !f.gone) => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                match TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(%e, "cannot bind the modbus tcp port again; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        let gone = CancellationToken::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => { gone.cancel(); return }
                r = faults.wait_for(|f| f.gone) => {
                    gone.cancel();
                    if r.is_err() { return }
                    break;
                }
                accepted = l.accept() => if let Ok((s, _)) = accepted {
                    let _ = s.set_nodelay(true);
                    shared.state().connections += 1;
                    if rtu {
                        let (shared, gone) = (shared.clone(), gone.clone());
                        tokio::spawn(async move {
                            let mut s = s;
                            tokio::select! {
                                _ = gone.cancelled() => {}
                                _ = serve_rtu(&shared, &mut s) => {}
                            }
                        });
                    } else {
                        tokio::spawn(serve_connection(shared.clone(), s, gone.clone()));
                    }
                },
            }
        }
        drop(l);
        tracing::info!("modbus tcp gone");
    }
}

/// One TCP connection: MBAP frames in, answers out, one at a time.
async fn serve_connection(shared: Arc<Shared>, mut s: TcpStream, gone: CancellationToken) {
    let mut head = [0u8; 7];
    loop {
        let read = tokio::select! {
            _ = gone.cancelled() => return,
            r = s.read_exact(&mut head) => r,
        };
        if read.is_err() {
            return;
        }
        let len = u16::from_be_bytes([head[4], head[5]]) as usize;
        if !(2..=254).contains(&len) {
            return;
        }
        let mut pdu = vec![0u8; len - 1];
        if s.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let unit = head[6];
        let answer = tokio::select! {
            _ = gone.cancelled() => return,
            a = shared.answer(unit, &pdu) => a,
        };
        let Some((as_unit, reply, _)) = answer else {
            continue;
        };
        let mut out = Vec::with_capacity(7 + reply.len());
        out.extend_from_slice(&head[..4]);
        out.extend_from_slice(&(reply.len() as u16 + 1).to_be_bytes());
        out.push(as_unit);
        out.extend_from_slice(&reply);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Runs pty lives one after the other: `gone` closes the pty and removes the link, clearing
/// it opens a new pty behind the same link.
async fn supervise_rtu(shared: Arc<Shared>, first: Pty, stop: CancellationToken) {
    let mut faults = shared.faults.subscribe();
    let mut next = Some(first);
    loop {
        let current = match next.take() {
            Some(p) => p,
            None => {
                tokio::select! {
                    r = faults.wait_for(|f| !f.gone) => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                match Pty::open() {
                    Ok(p) => {
                        if let Err(e) = pty::link(&shared.link, &p.path) {
                            tracing::error!(%e, "cannot link the new pty");
                        }
                        p
                    }
                    Err(e) => {
                        tracing::error!(%e, "cannot open a new pty; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        shared.path.send_replace(Some(current.path.clone()));
        let Pty {
            mut master, slave, ..
        } = current;
        tokio::select! {
            _ = stop.cancelled() => return,
            r = faults.wait_for(|f| f.gone) => if r.is_err() { return },
            _ = serve_rtu(&shared, &mut master) => {}
        }
        pty::unlink(&shared.link);
        shared.path.send_replace(None);
        drop(master);
        drop(slave);
        tracing::info!("modbus rtu pty gone");
    }
}

/// The bus: frames by their function code's length (or the line going quiet), answers the
/// addressed unit; requests for units not in the map are left unanswered, like on a real bus.
async fn serve_rtu<S: AsyncRead + AsyncWrite + Unpin>(shared: &Shared, port: &mut S) {
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let need = map::rtu_request_len(&got);
        if let Some(n) = need.filter(|n| *n > 0 && got.len() >= *n) {
            let frame: Vec<u8> = got.drain(..n).collect();
            serve_frame(shared, port, &frame, &mut got).await;
            continue;
        }
        let read = if need == Some(0) || !got.is_empty() {
            // Mid-frame: a frame that stops arriving for 50 ms is dropped (or, for a function
            // this side does not frame, taken whole).
            match timeout(Duration::from_millis(50), port.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    if need == Some(0) {
                        let frame = std::mem::take(&mut got);
                        serve_frame(shared, port, &frame, &mut got).await;
                    } else {
                        got.clear();
                    }
                    continue;
                }
            }
        } else {
            port.read(&mut buf).await
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.len() > 300 {
            got.clear();
        }
    }
}

async fn serve_frame<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    port: &mut S,
    frame: &[u8],
    pending: &mut Vec<u8>,
) {
    if frame.len() < 4 {
        return;
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    if map::crc16(body).to_le_bytes() != crc {
        tracing::debug!("rtu request with a bad CRC ignored");
        return;
    }
    shared.state().rtu_frames += 1;
    let unit = body[0];
    let started = Instant::now();
    // Answer while watching the line: a byte arriving now is a collision.
    let mut answer = Box::pin(shared.answer(unit, &body[1..]));
    let mut buf = [0u8; 256];
    let answer = loop {
        tokio::select! {
            a = &mut answer => break a,
            r = port.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    shared.state().collisions += 1;
                    pending.extend_from_slice(&buf[..n]);
                }
                _ => return,
            },
        }
    };
    let Some((as_unit, reply, bad_crc)) = answer else {
        return;
    };
    let mut out = vec![as_unit];
    out.extend_from_slice(&reply);
    let mut crc = map::crc16(&out);
    if bad_crc {
        crc ^= 0x5A5A;
    }
    out.extend_from_slice(&crc.to_le_bytes());
    let _ = port.write_all(&out).await;
    tracing::trace!(unit, took = ?started.elapsed(), "rtu request answered");
}
