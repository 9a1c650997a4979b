//! Modbus RTU exchanges on the port task: the same owner serves line-protocol requests and
//! Modbus transactions, so a bus is never used by two at once. Before each request the line
//! stays silent for at least 3.5 characters (the RTU frame gap) and `inter_request_gap_ms`
//! since the previous exchange, and whatever arrived meanwhile is discarded; the reply's
//! length follows from the request, so it is judged the moment its last byte arrives.

use super::PortTask;
use crate::config::serial::Parity;
use crate::device::modbus::pdu::{self, Exception, Reply};
use crate::device::modbus::{Failure, Transaction};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::debug;

/// Longest RTU frame (256 bytes by the specification).
const MAX_RTU_FRAME: usize = 256;

impl PortTask {
    /// One Modbus transaction. Never sends one whose caller gave up or whose deadline passed.
    pub(super) async fn serve_modbus(&mut self, t: Transaction) {
        if t.reply.is_closed() {
            return;
        }
        let outcome = self.modbus_exchange(&t).await;
        self.last_exchange = Some(Instant::now());
        if let Err(e) = &outcome {
            debug!(port = %self.name, unit = t.unit, error = %e, "modbus exchange failed");
        }
        let _ = t.reply.send(outcome);
    }

    /// The RTU frame gap: 3.5 character times, 1.75 ms above 19,200 baud.
    fn silent_interval(&self) -> Duration {
        let c = &self.config;
        if c.baud > 19_200 {
            return Duration::from_micros(1750);
        }
        let bits = 1 + c.data_bits as u64 + (c.parity != Parity::None) as u64 + c.stop_bits as u64;
        Duration::from_micros(3_500_000 * bits / c.baud.max(1) as u64)
    }

    async fn modbus_exchange(
        &mut self,
        t: &Transaction,
    ) -> Result<Result<Reply, Exception>, Failure> {
        if Instant::now() >= t.deadline {
            return Err(Failure::Expired);
        }
        self.ensure_open().map_err(Failure::NotSent)?;
        let quiet = self.silent_interval();
        if let Some(last) = self.last_exchange {
            let gap = Duration::from_millis(self.config.inter_request_gap_ms).max(quiet);
            quiet_until((last + gap).min(t.deadline)).await;
        }
        if let Err(e) = self.discard_input() {
            return Err(Failure::NotSent(self.failed(e)));
        }
        if Instant::now() >= t.deadline || !t.ticket.take() {
            return Err(Failure::Expired);
        }
        let frame = pdu::rtu_frame(t.unit, &t.request);
        let port = self.port.as_mut().expect("opened above");
        let mut written = 0;
        let wrote = timeout_at(t.deadline, async {
            while written < frame.len() {
                match port.write(&frame[written..]).await? {
                    0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                    n => written += n,
                }
            }
            port.flush().await
        })
        .await;
        match wrote {
            Err(_) if written == 0 => {
                return Err(Failure::NotSent(format!(
                    "serial port {} took no byte of the request before the deadline",
                    self.config.path
                )))
            }
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) if written == 0 => {
                return Err(Failure::NotSent(self.failed(e)));
            }
            Ok(Err(e)) => return Err(Failure::BadReply(self.lost(e).to_string())),
            Ok(Ok(())) => {}
        }
        let sent = Instant::now();
        let until = (sent + Duration::from_millis(self.config.timeout_ms)).min(t.deadline);
        let mut got: Vec<u8> = Vec::with_capacity(64);
        let mut buf = [0u8; MAX_RTU_FRAME];
        loop {
            let need = pdu::rtu_reply_len(&t.request, &got);
            if let Some(n) = need.filter(|n| got.len() >= *n) {
                if got.len() > n {
                    debug!(port = %self.name, extra = got.len() - n, "bytes after a modbus reply dropped");
                }
                return match pdu::parse_rtu_reply(t.unit, &t.request, &got[..n]) {
                    Ok(reply) => Ok(reply),
                    Err(why) => Err(Failure::BadReply(why)),
                };
            }
            // A frame that answers no request of this kind ends when the line goes quiet.
            let unknown = need == Some(usize::MAX);
            let wait_until = if unknown {
                (Instant::now() + quiet.max(Duration::from_millis(5))).min(until)
            } else {
                until
            };
            let port = self.port.as_mut().expect("open during an exchange");
            match timeout_at(wait_until, port.read(&mut buf)).await {
                Err(_) if unknown => {
                    return Err(Failure::BadReply(
                        pdu::parse_rtu_reply(t.unit, &t.request, &got)
                            .err()
                            .unwrap_or_else(|| "reply does not answer the request".into()),
                    ))
                }
                Err(_) => return Err(Failure::Timeout),
                Ok(Ok(0)) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "hung up");
                    return Err(Failure::BadReply(self.lost(e).to_string()));
                }
                Ok(Ok(n)) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() > MAX_RTU_FRAME {
                        return Err(Failure::BadReply(format!(
                            "reply longer than {MAX_RTU_FRAME} bytes"
                        )));
                    }
                }
                Ok(Err(e)) => return Err(Failure::BadReply(self.lost(e).to_string())),
            }
        }
    }

    /// Drops whatever arrived since the last exchange (a late reply, line noise).
    fn discard_input(&mut self) -> io::Result<()> {
        self.framer.clear();
        let mut buf = [0u8; 512];
        for _ in 0..128 {
            let Some(port) = self.port.as_mut() else {
                return Ok(());
            };
            match port.try_read(&mut buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hung up")),
                Ok(n) => {
                    debug!(port = %self.name, bytes = n, "stale input before a modbus request dropped")
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Waits until `t`. The runtime's timer ticks in whole milliseconds, which would stretch a
/// 1.75 ms frame gap to up to 3 ms and cost a fast bus a third of its transactions; the last
/// few milliseconds are slept on a blocking thread instead, to the microsecond.
async fn quiet_until(t: Instant) {
    const FINE: Duration = Duration::from_millis(3);
    if t.saturating_duration_since(Instant::now()) > FINE {
        sleep_until(t - FINE).await;
    }
    let rest = t.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

#[cfg(test)]
mod tests {
    //! RTU exchanges over a real pseudo-terminal: the test plays the units on the master side.

    use super::super::PortTask;
    use crate::config::SerialPortConfig;
    use crate::device::health::Presence;
    use crate::device::modbus::pdu::{crc16, Reply, Request};
    use crate::device::modbus::{Failure, Transaction};
    use crate::device::serial::port::Ticket;
    use gatewayd_protocol::DeviceId;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;
    use tokio_serial::{SerialPort, SerialStream};

    type Outcome = Result<Result<Reply, crate::device::modbus::pdu::Exception>, Failure>;

    struct Bus {
        modbus: mpsc::Sender<Transaction>,
        _lines: mpsc::Sender<super::super::Job>,
        device: SerialStream,
        _slave: SerialStream,
    }

    fn bus(gap_ms: u64) -> Bus {
        let (master, slave) = SerialStream::pair().unwrap();
        let config: SerialPortConfig = serde_json::from_value(serde_json::json!({
            "path": slave.name().unwrap(),
            "baud": 9600,
            "inter_request_gap_ms": gap_ms,
        }))
        .unwrap();
        let id = DeviceId::new("drive").unwrap();
        let presence = Arc::new(Presence::new([id.clone()].into_iter(), 0));
        let (lines, lines_rx) = mpsc::channel(8);
        let (modbus, modbus_rx) = mpsc::channel(8);
        let task = PortTask::new("bus".into(), config, lines_rx, presence, vec![id])
            .with_modbus(modbus_rx);
        tokio::spawn(task.run());
        Bus {
            modbus,
            _lines: lines,
            device: master,
            _slave: slave,
        }
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        let crc = crc16(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    }

    impl Bus {
        async fn send(&self, unit: u8, within: Duration) -> oneshot::Receiver<Outcome> {
            let (reply, rx) = oneshot::channel();
            let t = Transaction {
                unit,
                request: Request::ReadHoldingRegisters(0, 1),
                deadline: Instant::now() + within,
                ticket: Arc::new(Ticket::default()),
                reply,
            };
            self.modbus.send(t).await.unwrap();
            rx
        }

        /// Reads one 8-byte read request.
        async fn heard(&mut self) -> Vec<u8> {
            let mut buf = [0u8; 8];
            self.device.read_exact(&mut buf).await.unwrap();
            buf.to_vec()
        }

        async fn say(&mut self, bytes: &[u8]) {
            self.device.write_all(bytes).await.unwrap();
        }
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn bad_frames_fail_their_own_request_only() {
        let mut b = bus(0);
        let good = framed(&[7, 3, 2, 0, 42]);
        // A bad CRC, then junk after it: the next request is answered correctly.
        let rx = b.send(7, LONG).await;
        assert_eq!(b.heard().await, framed(&[7, 3, 0, 0, 0, 1]));
        let mut bad = good.clone();
        bad[4] ^= 0xFF;
        b.say(&bad).await;
        assert_eq!(
            rx.await.unwrap(),
            Err(Failure::BadReply("reply has a bad CRC".into()))
        );
        b.say(&[0xAA, 0xBB, 0xCC]).await;
        // A reply from another unit.
        let rx = b.send(7, LONG).await;
        b.heard().await;
        b.say(&framed(&[8, 3, 2, 0, 42])).await;
        assert_eq!(
            rx.await.unwrap(),
            Err(Failure::BadReply(
                "reply from unit 8, the request was to unit 7".into()
            ))
        );
        let rx = b.send(7, LONG).await;
        b.heard().await;
        b.say(&good).await;
        assert_eq!(rx.await.unwrap(), Ok(Ok(Reply::Words(vec![42]))));
        // An exception.
        let rx = b.send(7, LONG).await;
        b.heard().await;
        b.say(&framed(&[7, 0x83, 2])).await;
        assert_eq!(
            rx.await.unwrap(),
            Ok(Err(crate::device::modbus::pdu::Exception(2)))
        );
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_the_bus_keeps_its_gap() {
        let mut b = bus(30);
        let rx = b.send(7, Duration::from_millis(200)).await;
        b.heard().await;
        let started = Instant::now();
        assert_eq!(rx.await.unwrap(), Err(Failure::Timeout));
        assert!(started.elapsed() < Duration::from_millis(400));
        // Every request waits at least inter_request_gap_ms after the last exchange, a failed
        // one too (measured from when the test saw the outcome, a moment after the task
        // stamped the exchange's end: hence 29 ms).
        let timed_out = Instant::now();
        let rx = b.send(7, LONG).await;
        b.heard().await;
        assert!(
            timed_out.elapsed() >= Duration::from_millis(29),
            "request {:?} after a timeout (gap 30 ms)",
            timed_out.elapsed()
        );
        b.say(&framed(&[7, 3, 2, 0, 1])).await;
        assert_eq!(rx.await.unwrap(), Ok(Ok(Reply::Words(vec![1]))));
        let replied = Instant::now();
        let rx = b.send(7, LONG).await;
        b.heard().await;
        assert!(
            replied.elapsed() >= Duration::from_millis(29),
            "request {:?} after a reply (gap 30 ms)",
            replied.elapsed()
        );
        b.say(&framed(&[7, 3, 2, 0, 2])).await;
        assert_eq!(rx.await.unwrap(), Ok(Ok(Reply::Words(vec![2]))));
    }
}
