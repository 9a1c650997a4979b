//! The task that owns one serial port. A half-duplex bus serves one exchange at a time, so
//! every request of every device on the port arrives here through one channel and is served
//! in arrival order: discard stale input, write the request, read one answer line. The task
//! also watches the idle port (unsolicited input is discarded; a hang-up closes it) and, while
//! the port is closed, reopens it every second and brings its devices back online.

use super::frame::{FrameError, Framer};
use crate::clock::now_ms;
use crate::config::serial::{FlowControl, Parity};
use crate::config::SerialPortConfig;
use crate::device::health::Presence;
use gatewayd_protocol::DeviceId;
use std::io;
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
    /// How long the device may take to answer once the request is written.
    pub response_timeout: Duration,
    /// The caller's deadline: a job still waiting for the bus then is never sent.
    pub deadline: Instant,
    /// Where the answer line (without terminator) goes.
    pub reply: oneshot::Sender<Result<Vec<u8>, ExchangeError>>,
}

/// Why an exchange gave no answer line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The deadline passed while the job waited for the bus; nothing was sent.
    #[error("deadline passed while waiting for the bus; not sent")]
    Expired,
    /// No complete line before the deadline.
    #[error("no complete answer within {waited_ms} ms")]
    Timeout {
        waited_ms: u64,
        /// Bytes of an unterminated line, if any arrived.
        partial: Vec<u8>,
    },
    /// The answer line exceeded `max_frame_len`.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The port could not be opened, or failed: the devices on it are offline.
    #[error("{0}")]
    PortDown(String),
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
    framer: Framer,
    last_exchange: Option<Instant>,
    next_reopen: Instant,
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
        }
    }

    /// Serves jobs until every sender is gone (the device registry was dropped).
    ///
    /// Inputs, one `select!`: a job (`recv` is cancel safe), input on the idle port (`read`
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
                read = read_idle(&mut self.port, &mut scratch) => match read {
                    Ok(0) => self.port_down(format!("serial port {} hung up", self.config.path)),
                    Ok(n) => debug!(port = %self.name, bytes = n, "discarded unsolicited input"),
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

    async fn exchange(&mut self, job: &Job) -> Result<Vec<u8>, ExchangeError> {
        if Instant::now() >= job.deadline {
            return Err(ExchangeError::Expired);
        }
        if self.port.is_none() {
            match self.open() {
                Ok(()) => self.port_up(),
                Err(why) => {
                    self.mark_offline(&why);
                    return Err(ExchangeError::PortDown(why));
                }
            }
        }
        if let Some(last) = self.last_exchange {
            let free = last + Duration::from_millis(self.config.inter_request_gap_ms);
            sleep_until(free.min(job.deadline)).await;
        }
        if let Err(e) = self.discard_stale() {
            return Err(self.fail(e));
        }
        // Checked again right before writing: the gap or the discard may have used it up.
        if Instant::now() >= job.deadline {
            return Err(ExchangeError::Expired);
        }
        let port = self.port.as_mut().expect("opened above");
        match timeout_at(job.deadline, write_all(port, &job.request)).await {
            Err(_) => {
                return Err(ExchangeError::Timeout {
                    waited_ms: 0,
                    partial: Vec::new(),
                })
            }
            Ok(Err(e)) => return Err(self.fail(e)),
            Ok(Ok(())) => {}
        }
        let sent = Instant::now();
        let until = (sent + job.response_timeout).min(job.deadline);
        let mut buf = [0u8; 512];
        loop {
            if let Some(frame) = self.framer.next_frame() {
                return frame.map_err(ExchangeError::from);
            }
            let port = self.port.as_mut().expect("open during an exchange");
            match timeout_at(until, port.read(&mut buf)).await {
                Err(_) => {
                    return Err(ExchangeError::Timeout {
                        waited_ms: until.saturating_duration_since(sent).as_millis() as u64,
                        partial: self.framer.pending().to_vec(),
                    })
                }
                Ok(Ok(0)) => {
                    return Err(self.fail(io::Error::new(io::ErrorKind::UnexpectedEof, "hung up")))
                }
                Ok(Ok(n)) => self.framer.push(&buf[..n]),
                Ok(Err(e)) => return Err(self.fail(e)),
            }
        }
    }

    /// Drops input that arrived before this request: the kernel buffer and what is readable.
    fn discard_stale(&mut self) -> io::Result<()> {
        self.framer.clear();
        let Some(port) = self.port.as_mut() else {
            return Ok(());
        };
        port.clear(tokio_serial::ClearBuffer::Input)
            .map_err(io::Error::from)?;
        let mut buf = [0u8; 512];
        // Bounded: a device streaming without pause cannot hold the task here.
        for _ in 0..128 {
            match port.try_read(&mut buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hung up")),
                Ok(n) => debug!(port = %self.name, bytes = n, "discarded stale input"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Closes the port after an I/O error and says why as the exchange's error.
    fn fail(&mut self, e: io::Error) -> ExchangeError {
        let why = format!("serial port {} failed: {e}", self.config.path);
        self.port_down(why.clone());
        ExchangeError::PortDown(why)
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

/// Reads from the port when it is open; never resolves when it is closed.
async fn read_idle(port: &mut Option<SerialStream>, buf: &mut [u8]) -> io::Result<usize> {
    match port {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_all(port: &mut SerialStream, bytes: &[u8]) -> io::Result<()> {
    port.write_all(bytes).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// A port task on a fresh pty; the returned master plays the device.
    struct Bench {
        jobs: mpsc::Sender<Job>,
        device: tokio::io::BufReader<SerialStream>,
        presence: Arc<Presence>,
        _slave: SerialStream,
    }

    fn bench() -> Bench {
        let (master, slave) = SerialStream::pair().unwrap();
        let config: SerialPortConfig = serde_json::from_value(serde_json::json!({
            "path": slave.name().unwrap(),
            "max_frame_len": 16,
        }))
        .unwrap();
        let id = DeviceId::new("tc").unwrap();
        let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(PortTask::new("bus".into(), config, rx, presence.clone(), vec![id]).run());
        Bench {
            jobs: tx,
            device: tokio::io::BufReader::new(master),
            presence,
            _slave: slave,
        }
    }

    impl Bench {
        async fn send(
            &self,
            request: &str,
            within: Duration,
        ) -> oneshot::Receiver<Result<Vec<u8>, ExchangeError>> {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                request: request.as_bytes().to_vec(),
                response_timeout: within,
                deadline: Instant::now() + within,
                reply,
            };
            self.jobs.send(job).await.unwrap();
            rx
        }

        async fn call(&self, request: &str, within: Duration) -> Result<Vec<u8>, ExchangeError> {
            self.send(request, within).await.await.unwrap()
        }

        /// The device reads one request line.
        async fn heard(&mut self) -> String {
            let mut line = String::new();
            self.device.read_line(&mut line).await.unwrap();
            line
        }

        async fn say(&mut self, bytes: &[u8]) {
            self.device.get_mut().write_all(bytes).await.unwrap();
        }
    }

    const SOON: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn one_answer_line_per_request_and_stale_input_is_dropped() {
        let mut b = bench();
        let call = b.send("TEMP?\r\n", Duration::from_secs(5)).await;
        assert_eq!(b.heard().await, "TEMP?\r\n");
        b.say(b"TEMP 21.5\r\nextra\r\n").await;
        assert_eq!(call.await.unwrap(), Ok(b"TEMP 21.5".to_vec()));
        // "extra" and this unterminated junk are stale by the next request.
        b.say(b"#~").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let call = b.send("SETP?\r\n", Duration::from_secs(5)).await;
        assert_eq!(b.heard().await, "SETP?\r\n");
        b.say(b"SETP 20\r\n").await;
        assert_eq!(call.await.unwrap(), Ok(b"SETP 20".to_vec()));
    }

    #[tokio::test]
    async fn silence_partial_lines_and_long_frames_fail_only_their_request() {
        let mut b = bench();
        let started = Instant::now();
        let out = b.call("A\r\n", SOON).await;
        assert!(
            matches!(out, Err(ExchangeError::Timeout { ref partial, .. }) if partial.is_empty()),
            "{out:?}"
        );
        assert!(started.elapsed() >= SOON);
        assert_eq!(b.heard().await, "A\r\n");

        let call = b.send("B\r\n", SOON).await;
        assert_eq!(b.heard().await, "B\r\n");
        b.say(b"TEMP 2").await;
        assert!(
            matches!(call.await.unwrap(), Err(ExchangeError::Timeout { partial, .. }) if partial == b"TEMP 2"),
        );

        let call = b.send("C\r\n", SOON).await;
        assert_eq!(b.heard().await, "C\r\n");
        b.say(&[b'X'; 40]).await;
        assert_eq!(
            call.await.unwrap(),
            Err(ExchangeError::Frame(FrameError::TooLong(16)))
        );

        let call = b.send("D\r\n", SOON).await;
        assert_eq!(b.heard().await, "D\r\n");
        b.say(b"OK\r\n").await;
        assert_eq!(call.await.unwrap(), Ok(b"OK".to_vec()));
        assert!(b.presence.is_online(&DeviceId::new("tc").unwrap()));
    }

    #[tokio::test]
    async fn a_request_whose_deadline_passed_on_the_queue_is_never_sent() {
        let mut b = bench();
        let slow = b.send("SLOW\r\n", Duration::from_secs(5)).await;
        let late = b.send("LATE\r\n", Duration::from_millis(100)).await;
        assert_eq!(b.heard().await, "SLOW\r\n");
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.say(b"DONE\r\n").await;
        assert_eq!(slow.await.unwrap(), Ok(b"DONE".to_vec()));
        assert_eq!(late.await.unwrap(), Err(ExchangeError::Expired));
        let next = b.send("NEXT\r\n", Duration::from_secs(5)).await;
        assert_eq!(b.heard().await, "NEXT\r\n", "LATE never reached the device");
        b.say(b"OK\r\n").await;
        assert_eq!(next.await.unwrap(), Ok(b"OK".to_vec()));
    }

    #[tokio::test]
    async fn a_port_that_cannot_open_takes_its_devices_offline() {
        let config: SerialPortConfig =
            serde_json::from_value(serde_json::json!({"path": "/nonexistent/ttyUSB9"})).unwrap();
        let id = DeviceId::new("tc").unwrap();
        let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(
            PortTask::new("bus".into(), config, rx, presence.clone(), vec![id.clone()]).run(),
        );
        let (reply, answer) = oneshot::channel();
        tx.send(Job {
            request: b"X\r\n".to_vec(),
            response_timeout: SOON,
            deadline: Instant::now() + SOON,
            reply,
        })
        .await
        .unwrap();
        assert_eq!(
            answer.await.unwrap(),
            Err(ExchangeError::PortDown(
                "no serial port at /nonexistent/ttyUSB9 (unplugged?)".into()
            ))
        );
        assert!(!presence.is_online(&id));
        assert_eq!(
            presence.reason(&id).as_deref(),
            Some("no serial port at /nonexistent/ttyUSB9 (unplugged?)")
        );
    }

    fn err(kind: tokio_serial::ErrorKind, desc: &str) -> tokio_serial::Error {
        tokio_serial::Error::new(kind, desc)
    }

    #[test]
    fn open_errors_say_what_to_do() {
        use tokio_serial::ErrorKind;
        assert_eq!(
            open_error(
                "/dev/ttyUSB0",
                &err(ErrorKind::Io(io::ErrorKind::PermissionDenied), "Permission denied")
            ),
            "permission denied opening /dev/ttyUSB0: the service user needs the port's group (usually dialout), and under the systemd unit the device must be allowed (DeviceAllow=char-<driver> rw, see the README)"
        );
        assert_eq!(
            open_error(
                "/dev/ttyUSB0",
                &err(
                    ErrorKind::Io(io::ErrorKind::NotFound),
                    "No such file or directory"
                )
            ),
            "no serial port at /dev/ttyUSB0 (unplugged?)"
        );
        assert_eq!(
            open_error(
                "/dev/ttyS1",
                &err(ErrorKind::NoDevice, "Device or resource busy")
            ),
            "serial port /dev/ttyS1 is busy: another process holds it"
        );
        assert_eq!(
            open_error("/dev/ttyS1", &err(ErrorKind::Unknown, "Input/output error")),
            "cannot open serial port /dev/ttyS1: Input/output error"
        );
    }
}
