//! Modbus TCP endpoints: one task per `host:port` owns the one connection (a `tokio-modbus`
//! client, or RTU frames over TCP with `framing = "rtu"`, see `rtu_tcp`) that every unit
//! behind it shares, serves one transaction at a time, and reconnects with the shared
//! backoff. A connection that timed out or answered out of turn
//! is dropped, so a late reply can never be taken for the next request's.

use super::pdu::{Exception, Reply, Request};
use super::{Failure, Link, Transaction};
use crate::backoff::Backoff;
use crate::device::health::Presence;
use gatewayd_protocol::DeviceId;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tracing::{debug, info, warn};

/// Transactions that may wait for one endpoint.
const QUEUE: usize = 64;
/// Longest wait for a TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect delays after failed connects.
const BACKOFF_MIN_MS: u64 = 500;
const BACKOFF_MAX_MS: u64 = 10_000;

/// Endpoints in use, built alongside the drivers; `start` spawns their tasks.
#[derive(Default)]
pub struct Endpoints {
    open: BTreeMap<(String, u16), Used>,
}

struct Used {
    framing: Framing,
    link: Link,
    jobs: mpsc::Receiver<Transaction>,
    devices: Vec<DeviceId>,
}

impl Endpoints {
    /// The link to `host:port` for device `id` (one per endpoint, shared; validation makes
    /// every device of an endpoint use the same framing).
    pub fn link(&mut self, id: DeviceId, host: &str, port: u16, framing: Framing) -> Link {
        let used = self
            .open
            .entry((host.to_string(), port))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                Used {
                    framing,
                    link: Link {
                        name: format!("modbus endpoint {host}:{port}"),
                        jobs: tx,
                    },
                    jobs: rx,
                    devices: Vec::new(),
                }
            });
        used.devices.push(id);
        used.link.clone()
    }

    /// Spawns one task per endpoint; each ends when its drivers are all dropped.
    pub fn start(self, presence: &Arc<Presence>) -> Result<(), String> {
        if self.open.is_empty() {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "modbus endpoints need a tokio runtime".to_string())?;
        for ((host, port), used) in self.open {
            let task = EndpointTask {
                host,
                port,
                framing: used.framing,
                jobs: used.jobs,
                presence: presence.clone(),
                devices: used.devices,
                ctx: None,
                backoff: Backoff::new(BACKOFF_MIN_MS, BACKOFF_MAX_MS),
                next_connect: Instant::now(),
                last_error: None,
            };
            runtime.spawn(task.run());
        }
        Ok(())
    }
}

/// How requests travel on a TCP connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// Modbus TCP: the MBAP header (transaction id, unit id), no CRC.
    #[default]
    Mbap,
    /// RTU frames (unit id, CRC) over TCP, as some converters forward them.
    Rtu,
}

/// The open connection.
enum Conn {
    Mbap(Context),
    Rtu(TcpStream),
}

struct EndpointTask {
    host: String,
    port: u16,
    framing: Framing,
    jobs: mpsc::Receiver<Transaction>,
    presence: Arc<Presence>,
    devices: Vec<DeviceId>,
    ctx: Option<Conn>,
    backoff: Backoff,
    /// While disconnected: when the next connect may be tried.
    next_connect: Instant,
    /// Why the last connect failed, while it keeps failing.
    last_error: Option<String>,
}

impl EndpointTask {
    /// Serves transactions until every sender is gone. Inputs, one `select!`: a transaction
    /// (`recv` is cancel safe) and, while disconnected, the reconnect timer.
    async fn run(mut self) {
        loop {
            let down = self.ctx.is_none();
            tokio::select! {
                job = self.jobs.recv() => match job {
                    Some(job) => self.serve(job).await,
                    None => break,
                },
                _ = sleep_until(self.next_connect), if down => {
                    let _ = self.connect(None).await;
                }
            }
        }
        debug!(host = %self.host, port = self.port, "modbus endpoint task stopped");
    }

    async fn serve(&mut self, job: Transaction) {
        if job.reply.is_closed() {
            return;
        }
        let outcome = self.transact(&job).await;
        let _ = job.reply.send(outcome);
    }

    async fn transact(&mut self, job: &Transaction) -> Result<Result<Reply, Exception>, Failure> {
        if Instant::now() >= job.deadline {
            return Err(Failure::Expired);
        }
        if self.ctx.is_none() {
            if Instant::now() < self.next_connect {
                return Err(Failure::NotSent(self.down_reason()));
            }
            self.connect(Some(job.deadline))
                .await
                .map_err(Failure::NotSent)?;
        }
        if Instant::now() >= job.deadline || !job.ticket.take() {
            return Err(Failure::Expired);
        }
        let ctx = match self.ctx.as_mut().expect("connected above") {
            Conn::Mbap(ctx) => ctx,
            Conn::Rtu(stream) => {
                let out =
                    super::rtu_tcp::exchange(stream, job.unit, &job.request, job.deadline).await;
                if out.drop {
                    self.drop_connection("rtu exchange failed");
                }
                return out.result;
            }
        };
        ctx.set_slave(Slave(job.unit));
        let request = to_request(&job.request);
        match timeout_at(job.deadline, ctx.call(request)).await {
            Err(_) => {
                self.drop_connection("no reply in time");
                Err(Failure::Timeout)
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                let why = format!("connection to {}:{} failed: {e}", self.host, self.port);
                self.drop_connection(&why);
                Err(Failure::BadReply(why))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                let why = format!("reply does not answer the request: {e}");
                self.drop_connection(&why);
                Err(Failure::BadReply(why))
            }
            Ok(Ok(Err(code))) => Ok(Err(Exception(u8::from(code)))),
            Ok(Ok(Ok(response))) => from_response(&job.request, response).map(Ok),
        }
    }

    fn down_reason(&self) -> String {
        format!(
            "modbus endpoint {}:{} is unreachable: {}",
            self.host,
            self.port,
            self.last_error.as_deref().unwrap_or("not connected")
        )
    }

    /// Connects; on failure marks the devices offline and schedules the next attempt. A
    /// connect still under way at `deadline` (a call's) is given up without judging the
    /// endpoint: the call was not sent, and the timer tries again.
    async fn connect(&mut self, deadline: Option<Instant>) -> Result<(), String> {
        let target = format!("{}:{}", self.host, self.port);
        let limit = Instant::now() + CONNECT_TIMEOUT;
        let until = deadline.map_or(limit, |d| d.min(limit));
        let connected = timeout_at(until, TcpStream::connect(&target)).await;
        if connected.is_err() && until < limit {
            return Err(format!(
                "connecting to modbus endpoint {target} took longer than the call's deadline"
            ));
        }
        let err = match connected {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.ctx = Some(match self.framing {
                    Framing::Mbap => Conn::Mbap(tokio_modbus::client::tcp::attach(stream)),
                    Framing::Rtu => Conn::Rtu(stream),
                });
                self.backoff.reset();
                if self.last_error.take().is_some() {
                    info!(endpoint = %target, "modbus endpoint reachable again");
                }
                let now = crate::clock::now_ms();
                for id in &self.devices {
                    self.presence.set(id, true, None, now);
                }
                return Ok(());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("connect timed out after {} ms", CONNECT_TIMEOUT.as_millis()),
        };
        if self.last_error.is_none() {
            warn!(endpoint = %target, error = %err, "modbus endpoint unreachable; retrying with backoff");
        }
        self.last_error = Some(err);
        self.next_connect = Instant::now() + self.backoff.delay();
        let why = self.down_reason();
        let now = crate::clock::now_ms();
        for id in &self.devices {
            self.presence.set(id, false, Some(why.clone()), now);
        }
        Err(why)
    }

    /// Forgets the connection; the next transaction (or the timer) connects again at once.
    fn drop_connection(&mut self, why: &str) {
        debug!(host = %self.host, port = self.port, %why, "modbus connection dropped");
        self.ctx = None;
        self.next_connect = Instant::now();
    }
}

fn to_request(r: &Request) -> tokio_modbus::Request<'_> {
    use tokio_modbus::Request as T;
    match r {
        Request::ReadCoils(a, n) => T::ReadCoils(*a, *n),
        Request::ReadDiscreteInputs(a, n) => T::ReadDiscreteInputs(*a, *n),
        Request::ReadHoldingRegisters(a, n) => T::ReadHoldingRegisters(*a, *n),
        Request::ReadInputRegisters(a, n) => T::ReadInputRegisters(*a, *n),
        Request::WriteSingleCoil(a, v) => T::WriteSingleCoil(*a, *v),
        Request::WriteSingleRegister(a, v) => T::WriteSingleRegister(*a, *v),
        Request::WriteMultipleCoils(a, v) => T::WriteMultipleCoils(*a, Cow::Borrowed(v)),
        Request::WriteMultipleRegisters(a, v) => T::WriteMultipleRegisters(*a, Cow::Borrowed(v)),
    }
}

/// The reply in our terms, checked against the request (count, echoed address).
fn from_response(r: &Request, response: tokio_modbus::Response) -> Result<Reply, Failure> {
    use tokio_modbus::Response as T;
    let bad = |what: &str| {
        Err(Failure::BadReply(format!(
            "reply {what} does not match the request"
        )))
    };
    match (r, response) {
        (Request::ReadCoils(_, n), T::ReadCoils(mut bits))
        | (Request::ReadDiscreteInputs(_, n), T::ReadDiscreteInputs(mut bits)) => {
            if bits.len() < *n as usize {
                return bad("length");
            }
            bits.truncate(*n as usize);
            Ok(Reply::Bits(bits))
        }
        (Request::ReadHoldingRegisters(_, n), T::ReadHoldingRegisters(words))
        | (Request::ReadInputRegisters(_, n), T::ReadInputRegisters(words)) => {
            if words.len() != *n as usize {
                return bad("length");
            }
            Ok(Reply::Words(words))
        }
        (Request::WriteSingleCoil(a, _), T::WriteSingleCoil(b, _))
        | (Request::WriteSingleRegister(a, _), T::WriteSingleRegister(b, _))
        | (Request::WriteMultipleCoils(a, _), T::WriteMultipleCoils(b, _))
        | (Request::WriteMultipleRegisters(a, _), T::WriteMultipleRegisters(b, _)) => {
            if *a != b {
                return bad("address");
            }
            Ok(Reply::Written)
        }
        _ => bad("kind"),
    }
}
