//! The task that owns one serial port. A half-duplex bus serves one exchange at a time, so
//! every request of every device on the port arrives here through one channel and is served
//! in arrival order: read what arrived since the last exchange, write the request, read its
//! answer (`exchange` decides what is echo, ignored, answer). The task also reads the idle
//! port (unsolicited lines are dropped; a hang-up closes it) and, while the port is closed,
//! reopens it every second and brings its devices back online.
//!
//! Once the first byte of a request was written, no failure is reported as "not sent": a port
//! that fails then gives [`ExchangeError::Lost`], whose device may have acted.

use super::exchange::{Exchange, Heard, ReadError};
use super::frame::Framer;
use super::rules::{LineRules, SerialAction, MAX_ANSWER};
use crate::clock::now_ms;
use crate::config::serial::{FlowControl, Parity};
use crate::config::SerialPortConfig;
use crate::device::health::Presence;
use crate::device::modbus::Transaction;
use gatewayd_protocol::DeviceId;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};
use tracing::{debug, info, warn};

/// Time between attempts to reopen a closed port.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// One request for the bus.
#[derive(Debug)]
pub struct Job {
    /// The request line, terminator included.
    pub request: Vec<u8>,
    /// How the device's lines are read.
    pub lines: Arc<LineRules>,
    /// The action: how its answer is read.
    pub action: Arc<SerialAction>,
    /// How long the device may take to answer once the request is written.
    pub response_timeout: Duration,
    /// The caller's deadline: a job still waiting for the bus then is never sent.
    pub deadline: Instant,
    /// Taken by the task right before writing, or abandoned by the caller: never both.
    pub ticket: Arc<Ticket>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Heard, ExchangeError>>,
}

/// Who settles a job first: the port task taking it to write, or its caller giving up on it.
/// Exactly one wins, so a request its caller reports as not sent is never written.
#[derive(Debug, Default)]
pub struct Ticket(AtomicU8);

const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

impl Ticket {
    /// The port task is about to write: `false` when the caller already gave up.
    pub fn take(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The caller gives up: `true` when the request was not, and will never be, written.
    pub fn abandon(&self) -> bool {
        match self
            .0
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == ABANDONED,
        }
    }
}

/// Why an exchange gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The deadline passed (or the caller gave up) while the job waited for the bus; nothing
    /// was sent.
    #[error("deadline passed while waiting for the bus; not sent")]
    Expired,
    /// The port could not be opened, or failed before the request was written: the devices
    /// on it are offline; nothing was sent.
    #[error("{0}")]
    PortDown(String),
    /// The port took no byte of the request before the deadline (held by flow control);
    /// nothing was sent.
    #[error("{0}")]
    NotWritten(String),
    /// Written, but no complete answer before the deadline.
    #[error("no complete answer within {waited_ms} ms")]
    Timeout {
        waited_ms: u64,
        /// Bytes of an unterminated line, if any arrived.
        partial: Vec<u8>,
    },
    /// Written, but the answer could not be read (an over-long line or answer, a wrong echo).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The port failed once (part of) the request was written: the device may have acted.
    #[error("{0}")]
    Lost(String),
}

/// Everything the port task owns.
pub struct PortTask {
    name: String,
    config: SerialPortConfig,
    jobs: mpsc::Receiver<Job>,
    presence: Arc<Presence>,
    /// Devices on this port: they go offline and online with it.
    devices: Vec<DeviceId>,
    port: Option<SerialStream>,
    /// Lines between exchanges; holds a line still arriving when a request is written.
    framer: Framer,
    last_exchange: Option<Instant>,
    next_reopen: Instant,
    /// Modbus RTU transactions for the units on this bus (`port_modbus.rs`).
    modbus: Option<mpsc::Receiver<Transaction>>,
}

impl PortTask {
    /// A task for port `name` serving `jobs`; it opens the port when run.
    pub fn new(
        name: String,
        config: SerialPortConfig,
        jobs: mpsc::Receiver<Job>,
        presence: Arc<Presence>,
        devices: Vec<DeviceId>,
    ) -> Self {
        let framer = Framer::new(config.response_terminator.as_bytes(), config.max_frame_len);
        Self {
            name,
            config,
            jobs,
            presence,
            devices,
            port: None,
            framer,
            last_exchange: None,
            next_reopen: Instant::now(),
            modbus: None,
        }
    }

    /// Also serves the Modbus RTU transactions sent on `modbus`.
    pub fn with_modbus(mut self, modbus: mpsc::Receiver<Transaction>) -> Self {
        self.modbus = Some(modbus);
        self
    }

    /// Serves jobs until every sender is gone (the device registry was dropped).
    ///
    /// Inputs, one `select!`: a job or a Modbus transaction (`recv` is cancel safe; both
    /// channels close together, when the last driver is dropped), input on the idle port (`read`
    /// into a scratch buffer is cancel safe: nothing is consumed unless it completes), and the
    /// reopen timer while the port is closed.
    pub async fn run(mut self) {
        match self.open() {
            Ok(()) => self.port_up(),
            Err(why) => self.port_down(why),
        }
        let mut scratch = [0u8; 256];
        loop {
            let closed = self.port.is_none();
            tokio::select! {
                job = self.jobs.recv() => match job {
                    Some(job) => self.serve(job).await,
                    None => break,
                },
                Some(t) = recv_modbus(&mut self.modbus) => self.serve_modbus(t).await,
                read = read_idle(&mut self.port, &mut scratch) => match read {
                    Ok(0) => self.port_down(format!("serial port {} hung up", self.config.path)),
                    Ok(n) => self.unsolicited(&scratch[..n]),
                    Err(e) => self.port_down(format!("serial port {} failed: {e}", self.config.path)),
                },
                _ = sleep_until(self.next_reopen), if closed => {
                    match self.open() {
                        Ok(()) => self.port_up(),
                        Err(why) => {
                            debug!(port = %self.name, %why, "serial port still unavailable");
                            self.mark_offline(&why);
                            self.next_reopen = Instant::now() + REOPEN_INTERVAL;
                        }
                    }
                }
            }
        }
        debug!(port = %self.name, "serial port task stopped");
    }

    /// One exchange. Never sends a job whose caller gave up or whose deadline passed.
    async fn serve(&mut self, job: Job) {
        if job.reply.is_closed() {
            return;
        }
        let outcome = self.exchange(&job).await;
        self.last_exchange = Some(Instant::now());
        if let Err(e) = &outcome {
            match e {
                ExchangeError::Timeout { partial, .. } if !partial.is_empty() => warn!(
                    port = %self.name,
                    partial = %String::from_utf8_lossy(partial),
                    "answer without terminator before the deadline"
                ),
                _ => debug!(port = %self.name, error = %e, "exchange failed"),
            }
        }
        let _ = job.reply.send(outcome);
    }

    async fn exchange(&mut self, job: &Job) -> Result<Heard, ExchangeError> {
        if Instant::now() >= job.deadline {
            return Err(ExchangeError::Expired);
        }
        self.ensure_open().map_err(ExchangeError::PortDown)?;
        if let Some(last) = self.last_exchange {
            let free = last + Duration::from_millis(self.config.inter_request_gap_ms);
            sleep_until(free.min(job.deadline)).await;
        }
        if let Err(e) = self.read_waiting() {
            return Err(ExchangeError::PortDown(self.failed(e)));
        }
        // Checked again right before writing: the gap may have used the time up, or the
        // caller given up.
        if Instant::now() >= job.deadline || !job.ticket.take() {
            return Err(ExchangeError::Expired);
        }
        let port = self.port.as_mut().expect("opened above");
        let mut written = 0;
        let wrote = timeout_at(job.deadline, write_all(port, &job.request, &mut written)).await;
        match wrote {
            Err(_) if written == 0 => {
                return Err(ExchangeError::NotWritten(format!(
                "serial port {} took no byte of the request before the deadline (flow control?)",
                self.config.path
            )))
            }
            Err(_) => {
                return Err(ExchangeError::Timeout {
                    waited_ms: 0,
                    partial: Vec::new(),
                })
            }
            Ok(Err(e)) if written == 0 => {
                return Err(ExchangeError::PortDown(self.failed(e)));
            }
            Ok(Err(e)) => return Err(self.lost(e)),
            Ok(Ok(())) => {}
        }
        let sent = Instant::now();
        let until = (sent + job.response_timeout).min(job.deadline);
        let framer = self.framer.clone();
        self.framer.clear();
        let mut x = Exchange::new(
            &job.request,
            framer,
            &job.lines,
            &job.action.reply,
            MAX_ANSWER,
        );
        let mut buf = [0u8; 512];
        let outcome = loop {
            let port = self.port.as_mut().expect("open during an exchange");
            match timeout_at(until, port.read(&mut buf)).await {
                Err(_) => {
                    break Err(ExchangeError::Timeout {
                        waited_ms: until.saturating_duration_since(sent).as_millis() as u64,
                        partial: x.pending().to_vec(),
                    })
                }
                Ok(Ok(0)) => {
                    break Ok(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hung up")))
                }
                Ok(Ok(n)) => {
                    if let Some(done) = x.push(&buf[..n]) {
                        break Ok(Ok(done));
                    }
                }
                Ok(Err(e)) => break Ok(Err(e)),
            }
        };
        if x.ignored() > 0 {
            debug!(port = %self.name, lines = x.ignored(), "ignored lines during an exchange");
        }
        self.framer = x.into_framer();
        match outcome {
            Ok(Ok(done)) => done.map_err(ExchangeError::Read),
            Ok(Err(e)) => Err(self.lost(e)),
            Err(e) => Err(e),
        }
    }

    /// Takes in what arrived since the last exchange (bounded: a device streaming without
    /// pause cannot hold the task here). Complete lines came before the request and are
    /// dropped by the exchange; a line still arriving stays in the framer.
    fn read_waiting(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 512];
        for _ in 0..128 {
            let Some(port) = self.port.as_mut() else {
                return Ok(());
            };
            match port.try_read(&mut buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hung up")),
                Ok(n) => self.unsolicited(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Still streaming: what is in the kernel buffer and here goes.
        self.framer.clear();
        match self.port.as_mut() {
            Some(port) => port
                .clear(tokio_serial::ClearBuffer::Input)
                .map_err(io::Error::from),
            None => Ok(()),
        }
    }

    /// Input on the idle port: its complete lines answer nothing.
    fn unsolicited(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
        self.drop_lines();
    }

    fn drop_lines(&mut self) {
        while let Some(line) = self.framer.next_frame() {
            match line {
                Ok(line) => debug!(
                    port = %self.name,
                    line = %String::from_utf8_lossy(&line),
                    "dropped a line that answers no request"
                ),
                Err(e) => debug!(port = %self.name, error = %e, "dropped unsolicited input"),
            }
        }
    }

    /// Opens the port if it is closed; when it cannot be, its devices go offline and the
    /// reason is returned (nothing was sent).
    fn ensure_open(&mut self) -> Result<(), String> {
        if self.port.is_none() {
            if let Err(why) = self.open() {
                self.mark_offline(&why);
                return Err(why);
            }
            self.port_up();
        }
        Ok(())
    }

    /// Closes the port after an I/O error before any byte of a request was written; the
    /// reason.
    fn failed(&mut self, e: io::Error) -> String {
        let why = format!("serial port {} failed: {e}", self.config.path);
        self.port_down(why.clone());
        why
    }

    /// Closes the port after an I/O error once the request was (partly) written.
    fn lost(&mut self, e: io::Error) -> ExchangeError {
        let why = format!(
            "serial port {} failed after the request was written: {e}",
            self.config.path
        );
        self.port_down(why.clone());
        ExchangeError::Lost(why)
    }

    fn open(&mut self) -> Result<(), String> {
        let c = &self.config;
        let builder = tokio_serial::new(&c.path, c.baud)
            .data_bits(match c.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match c.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(match c.stop_bits {
                2 => tokio_serial::StopBits::Two,
                _ => tokio_serial::StopBits::One,
            })
            .flow_control(match c.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            });
        let port = builder
            .open_native_async()
            .map_err(|e| open_error(&c.path, &e))?;
        self.port = Some(port);
        self.framer.clear();
        self.last_exchange = None;
        Ok(())
    }

    fn port_up(&mut self) {
        info!(port = %self.name, path = %self.config.path, "serial port open");
        let now = now_ms();
        for id in &self.devices {
            self.presence.set(id, true, None, now);
        }
    }

    fn port_down(&mut self, why: String) {
        if self.port.take().is_some() {
            warn!(port = %self.name, %why, "serial port closed; reopening every second");
        } else {
            warn!(port = %self.name, %why, "serial port unavailable; retrying every second");
        }
        self.mark_offline(&why);
        self.next_reopen = Instant::now() + REOPEN_INTERVAL;
    }

    fn mark_offline(&self, why: &str) {
        let now = now_ms();
        for id in &self.devices {
            self.presence.set(id, false, Some(why.to_string()), now);
        }
    }
}

/// The next Modbus transaction; never resolves on a port without Modbus units.
async fn recv_modbus(rx: &mut Option<mpsc::Receiver<Transaction>>) -> Option<Transaction> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads from the port when it is open; never resolves when it is closed.
async fn read_idle(port: &mut Option<SerialStream>, buf: &mut [u8]) -> io::Result<usize> {
    match port {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Writes all of `bytes`, counting in `written` what the port took (it stays true when the
/// future is dropped at a deadline).
async fn write_all(port: &mut SerialStream, bytes: &[u8], written: &mut usize) -> io::Result<()> {
    while *written < bytes.len() {
        match port.write(&bytes[*written..]).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => *written += n,
        }
    }
    port.flush().await
}

/// What an integrator should read when a port cannot be opened.
pub fn open_error(path: &str, e: &tokio_serial::Error) -> String {
    use tokio_serial::ErrorKind;
    match e.kind {
        ErrorKind::Io(io::ErrorKind::PermissionDenied) => format!(
            "permission denied opening {path}: the service user needs the port's group (usually dialout), and under the systemd unit the device must be allowed (DeviceAllow=char-<driver> rw, see the README)"
        ),
        ErrorKind::Io(io::ErrorKind::NotFound) => format!("no serial port at {path} (unplugged?)"),
        ErrorKind::NoDevice => format!("serial port {path} is busy: another process holds it"),
        _ => format!("cannot open serial port {path}: {}", e.description),
    }
}

#[path = "port_modbus.rs"]
mod modbus;

#[cfg(test)]
#[path = "port_tests.rs"]
mod tests;
