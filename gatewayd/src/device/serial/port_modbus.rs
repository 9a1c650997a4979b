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
        if self.port.is_none() {
            match self.open() {
                Ok(()) => self.port_up(),
                Err(why) => {
                    self.mark_offline(&why);
                    return Err(Failure::NotSent(why));
                }
            }
        }
        let quiet = self.silent_interval();
        if let Some(last) = self.last_exchange {
            let gap = Duration::from_millis(self.config.inter_request_gap_ms).max(quiet);
            sleep_until((last + gap).min(t.deadline)).await;
        }
        if let Err(e) = self.discard_input() {
            let why = format!("serial port {} failed: {e}", self.config.path);
            self.port_down(why.clone());
            return Err(Failure::NotSent(why));
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
                let why = format!("serial port {} failed: {e}", self.config.path);
                self.port_down(why.clone());
                return Err(Failure::NotSent(why));
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
