//! Modbus devices, RTU on a serial bus and TCP: a device's driver runs its compiled action
//! (`plan`) as one or more transactions to its unit, through its link, and turns replies and
//! exceptions into a result or a `CallError`. The pure core: `codec` (typed values in
//! registers), `pdu` (requests, replies, RTU frames) and `plan` (reads coalesced, writes);
//! `tcp` owns one connection per endpoint (`rtu_tcp` for RTU frames over it); RTU exchanges
//! on a serial bus run on the port's task (`device::serial::port_modbus`), which owns the bus.

pub mod codec;
pub mod pdu;
pub mod plan;
pub mod rtu_tcp;
pub mod tcp;

use super::{Answer, CallError};
use crate::config::{ActionConfig, ResultMode};
use crate::device::serial::port::Ticket;
use gatewayd_protocol::DeviceId;
use pdu::{Exception, Reply, Request};
use plan::ModbusAction;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Device status of a successful Modbus call.
const OK_STATUS: i64 = 200;

/// One transaction handed to the task that owns a link (a TCP endpoint or a serial bus).
#[derive(Debug)]
pub struct Transaction {
    pub unit: u8,
    pub request: Request,
    pub deadline: Instant,
    /// Settles whether the request was written, between the caller and the link's task.
    pub ticket: Arc<Ticket>,
    pub reply: oneshot::Sender<Result<Result<Reply, Exception>, Failure>>,
}

/// Why a transaction gave no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The deadline passed (or the caller gave up) while it waited for the link; not sent.
    #[error("deadline passed while waiting for the link; not sent")]
    Expired,
    /// The link is down (no connection, port closed); not sent.
    #[error("{0}")]
    NotSent(String),
    /// Sent, no reply within the time.
    #[error("no reply in time")]
    Timeout,
    /// Sent, and the reply was unreadable (bad CRC, wrong unit, wrong length) or the link
    /// failed: the device may have acted.
    #[error("{0}")]
    BadReply(String),
}

/// The way to a device's link task.
#[derive(Debug, Clone)]
pub struct Link {
    /// `modbus endpoint host:port`, for messages.
    pub name: String,
    pub jobs: mpsc::Sender<Transaction>,
}

/// One Modbus device: its unit id and the link to it.
#[derive(Debug)]
pub struct ModbusDriver {
    id: DeviceId,
    unit: u8,
    link: LinkKind,
    /// The read that probes presence, if configured.
    probe: Option<Request>,
}

#[derive(Debug)]
enum LinkKind {
    Tcp(Link),
    Rtu(crate::device::serial::PortSender),
}

impl ModbusDriver {
    /// A device behind a TCP endpoint's task.
    pub fn tcp(id: DeviceId, unit: u8, link: Link) -> Self {
        Self {
            id,
            unit,
            link: LinkKind::Tcp(link),
            probe: None,
        }
    }

    /// A device on a serial bus.
    pub fn rtu(id: DeviceId, unit: u8, port: crate::device::serial::PortSender) -> Self {
        Self {
            id,
            unit,
            link: LinkKind::Rtu(port),
            probe: None,
        }
    }

    /// Probes presence by reading `register` (one register or bit).
    pub fn with_probe(mut self, register: Option<&crate::config::ProbeRegister>) -> Self {
        self.probe = register.map(|r| {
            plan::Span {
                table: r.table,
                address: r.address,
                count: 1,
            }
            .request()
        });
        self
    }

    /// Whether a probe register is configured.
    pub fn has_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// Reads the probe register: any reply (an exception too) means the device is there.
    pub async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let Some(request) = self.probe.clone() else {
            return Ok(());
        };
        let started = Instant::now();
        match self.transact(request, started + timeout, started).await {
            Ok(_)
            | Err(CallError::Status { .. })
            | Err(CallError::Busy {
                status: Some(_), ..
            }) => Ok(()),
            Err(e) => Err(format!("probe register: {e}")),
        }
    }

    /// Runs `action` with `vars` within `timeout` (which includes waiting for the link).
    pub async fn call(
        &self,
        action: &ActionConfig,
        vars: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let compiled = action
            .compiled_modbus
            .get(action)
            .map_err(|e| CallError::Refused(format!("invalid modbus action: {e}")))?;
        let result = match &*compiled {
            ModbusAction::Read(plan) => {
                let mut replies = Vec::with_capacity(plan.spans.len());
                for span in &plan.spans {
                    replies.push(self.transact(span.request(), deadline, started).await?);
                }
                plan.assemble(&replies).map_err(CallError::BadAnswer)?
            }
            ModbusAction::Write(plan) => {
                let request = plan.request(vars).map_err(CallError::Refused)?;
                self.transact(request, deadline, started).await?;
                Value::Null
            }
        };
        Ok(Answer {
            status: OK_STATUS,
            result: if action.result == ResultMode::None {
                Value::Null
            } else {
                result
            },
        })
    }

    async fn transact(
        &self,
        request: Request,
        deadline: Instant,
        started: Instant,
    ) -> Result<Reply, CallError> {
        let (jobs, name) = match &self.link {
            LinkKind::Tcp(l) => (l.jobs.clone(), l.name.clone()),
            LinkKind::Rtu(p) => (p.modbus_jobs(), p.name()),
        };
        let name = name.as_str();
        let ticket = Arc::new(Ticket::default());
        let (reply, answer) = oneshot::channel();
        let job = Transaction {
            unit: self.unit,
            request,
            deadline,
            ticket: ticket.clone(),
            reply,
        };
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        let busy_link = || CallError::Busy {
            status: None,
            reason: format!("{name} was busy with other requests until the deadline; not sent"),
            retry_after: None,
        };
        match tokio::time::timeout_at(deadline, jobs.send(job)).await {
            Err(_) => return Err(busy_link()),
            Ok(Err(_)) => return Err(CallError::Unreachable(format!("{name} is closed"))),
            Ok(Ok(())) => {}
        }
        let outcome = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Err(_) if ticket.abandon() => return Err(busy_link()),
            Err(_) => return Err(CallError::Timeout(elapsed_ms())),
            Ok(Err(_)) if ticket.abandon() => {
                return Err(CallError::Unreachable(format!("{name} stopped")))
            }
            Ok(Err(_)) => {
                return Err(CallError::BadAnswer(format!(
                    "{name} stopped during the exchange"
                )))
            }
        };
        match outcome {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(exception)) => Err(exception_error(exception, elapsed_ms())),
            Err(Failure::Expired) => Err(busy_link()),
            Err(Failure::NotSent(why)) => Err(CallError::Unreachable(why)),
            Err(Failure::Timeout) => Err(CallError::Timeout(elapsed_ms())),
            Err(Failure::BadReply(why)) => {
                tracing::debug!(device = %self.id, %why, "unreadable modbus reply");
                Err(CallError::BadAnswer(why))
            }
        }
    }
}

/// A Modbus exception as a call error: busy (6) is transient (the device did not act), a
/// gateway's "path unavailable" (10) means nothing reached the device, "target failed to
/// respond" (11) is a timeout behind the gateway; every other is a device error whose
/// status is the exception number and whose detail is its name.
pub fn exception_error(e: Exception, elapsed_ms: u64) -> CallError {
    match e.0 {
        6 => CallError::Busy {
            status: Some(6),
            reason: format!("modbus exception 6 ({})", e.name()),
            retry_after: None,
        },
        10 => CallError::Unreachable(format!("modbus exception 10 ({})", e.name())),
        11 => CallError::Timeout(elapsed_ms),
        n => CallError::Status {
            status: n as i64,
            detail: json!(format!("modbus exception {n} ({})", e.name())),
        },
    }
}
