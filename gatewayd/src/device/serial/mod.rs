//! Serial devices: ASCII request/response lines on RS-232/RS-485 ports. A device's driver
//! renders the request, hands it to its port's task (one per port, shared by every device on
//! that bus) and turns the answer into a result or a `CallError`. The pure core: `frame`
//! (framing, patterns, rendering), `exchange` (echo, ignored lines, blocks, busy and error
//! lines), `answer` (codes, typed captures) and `rules` (configuration compiled at load);
//! `port` is the I/O.

pub mod answer;
pub mod exchange;
pub mod frame;
pub mod port;
pub mod rules;

use super::{Answer, CallError};
use crate::config::serial::{compile_lines, device_lines};
use crate::config::{ActionConfig, Config, DeviceConfig, ResultMode, SerialPortConfig};
use crate::device::health::Presence;
use crate::device::modbus::Transaction;
use answer::{DeviceCode, Said};
use exchange::{Heard, ReadError};
use gatewayd_protocol::DeviceId;
use port::{ExchangeError, Job, PortTask, Ticket};
use rules::LineRules;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Requests that may wait for one port; callers beyond it wait to enqueue (within their
/// deadline). Each device's `max_in_flight` bounds it further.
const QUEUE: usize = 64;

/// Device status of a successful serial call (the protocol's "200 for serial").
const OK_STATUS: i64 = 200;

/// One serial device: its address, how its lines are read, and a handle on its port's task.
#[derive(Debug)]
pub struct SerialDriver {
    id: DeviceId,
    address: Option<String>,
    lines: Arc<LineRules>,
    port: Arc<PortHandle>,
}

/// The sending side of a port task, shared by the devices on the port.
#[derive(Debug)]
struct PortHandle {
    name: String,
    config: SerialPortConfig,
    jobs: mpsc::Sender<Job>,
    modbus: mpsc::Sender<Transaction>,
}

/// A Modbus RTU device's way to its bus: the port task that every device on the port shares.
#[derive(Debug, Clone)]
pub struct PortSender(Arc<PortHandle>);

impl PortSender {
    /// `serial port <name>`, for messages.
    pub fn name(&self) -> String {
        format!("serial port {}", self.0.name)
    }

    /// Where the port task takes Modbus transactions.
    pub fn modbus_jobs(&self) -> mpsc::Sender<Transaction> {
        self.0.modbus.clone()
    }
}

impl SerialDriver {
    /// Runs `action` (a request template and answer patterns, compiled at load) with `vars`,
    /// within `timeout`, which includes the wait for the bus.
    pub async fn call(
        &self,
        action: &ActionConfig,
        vars: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let compiled = action
            .compiled_serial
            .get(action)
            .map_err(|e| CallError::Refused(format!("invalid serial action: {e}")))?;
        let config = &self.port.config;
        let request = frame::render_request(
            &compiled.request,
            vars,
            self.address.as_deref(),
            &config.request_terminator,
        );
        let ticket = Arc::new(Ticket::default());
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            lines: self.lines.clone(),
            action: compiled.clone(),
            response_timeout: Duration::from_millis(action.timeout_ms.unwrap_or(config.timeout_ms)),
            deadline,
            ticket: ticket.clone(),
            reply,
        };
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        let port = &self.port.name;
        match tokio::time::timeout_at(deadline, self.port.jobs.send(job)).await {
            Err(_) => return Err(self.not_sent()),
            Ok(Err(_)) => {
                return Err(CallError::Unreachable(format!(
                    "serial port {port} is closed"
                )))
            }
            Ok(Ok(())) => {}
        }
        // The port task answers by the deadline once it takes the job; until then the job
        // waits behind others, so the caller's own deadline applies here too. Whether the
        // request was written is settled by the ticket: a job given up on is never written.
        let heard = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(heard))) => heard,
            Ok(Ok(Err(e))) => return Err(self.failed(e, elapsed_ms())),
            Err(_) if ticket.abandon() => return Err(self.not_sent()),
            Err(_) => return Err(CallError::Timeout(elapsed_ms())),
            Ok(Err(_)) if ticket.abandon() => {
                return Err(CallError::Unreachable(format!(
                    "serial port {port} stopped"
                )))
            }
            Ok(Err(_)) => {
                return Err(CallError::BadAnswer(format!(
                    "serial port {port} stopped during the exchange"
                )))
            }
        };
        match heard {
            Heard::Answer(text) => match compiled.response.interpret(&text) {
                Ok(result) => Ok(Answer {
                    status: OK_STATUS,
                    result: if action.result == ResultMode::None {
                        Value::Null
                    } else {
                        result
                    },
                }),
                Err(e) => {
                    tracing::debug!(device = %self.id, answer = %answer::quote(&text), "unreadable serial answer");
                    Err(CallError::BadAnswer(e.to_string()))
                }
            },
            Heard::Busy(Said { code, text }) => Err(CallError::Busy {
                status: match code {
                    Some(DeviceCode::Number(n)) => Some(n),
                    _ => None,
                },
                reason: text,
                retry_after: None,
            }),
            Heard::Error(Said { code, text }) => Err(refusal(code, text)),
        }
    }

    /// The request waited for the bus until its deadline and was never written: the bus
    /// was busy, the device did not act.
    fn not_sent(&self) -> CallError {
        CallError::Busy {
            status: None,
            reason: format!(
                "serial port {} was busy with other requests until the deadline; not sent",
                self.port.name
            ),
            retry_after: None,
        }
    }

    /// A failed exchange as a call error: not sent, or sent and the device may have acted.
    fn failed(&self, e: ExchangeError, elapsed_ms: u64) -> CallError {
        match e {
            ExchangeError::Expired => self.not_sent(),
            ExchangeError::PortDown(why) | ExchangeError::NotWritten(why) => {
                CallError::Unreachable(why)
            }
            ExchangeError::Timeout { .. } => CallError::Timeout(elapsed_ms),
            ExchangeError::Read(ReadError::TooLarge(limit)) => CallError::TooLarge { limit },
            ExchangeError::Read(e) => CallError::BadAnswer(e.to_string()),
            ExchangeError::Lost(why) => CallError::BadAnswer(why),
        }
    }
}

/// An error line as a call error: an integer code is the device status (0 without a code),
/// any other code is kept as text.
fn refusal(code: Option<DeviceCode>, text: String) -> CallError {
    let detail = Value::String(text);
    match code {
        Some(DeviceCode::Text(code)) => CallError::Coded { code, detail },
        Some(DeviceCode::Number(status)) => CallError::Status { status, detail },
        None => CallError::Status { status: 0, detail },
    }
}

/// The serial ports in use, built alongside the drivers; `start` spawns their tasks.
pub struct Ports {
    configs: BTreeMap<String, SerialPortConfig>,
    open: BTreeMap<String, UsedPort>,
}

/// A port some device uses, until its task starts.
struct UsedPort {
    handle: Arc<PortHandle>,
    jobs: mpsc::Receiver<Job>,
    modbus: mpsc::Receiver<Transaction>,
    devices: Vec<DeviceId>,
}

impl Ports {
    /// Ports as configured; none is used yet.
    pub fn new(config: &Config) -> Self {
        Self {
            configs: config.serial_ports.clone(),
            open: BTreeMap::new(),
        }
    }

    /// The name and configuration of the port device `id`'s configuration names.
    fn port_of(
        &self,
        id: &DeviceId,
        config: &DeviceConfig,
    ) -> Result<(String, SerialPortConfig), String> {
        let name = config
            .port
            .clone()
            .ok_or_else(|| format!("device {id}: port missing"))?;
        let port_config = self
            .configs
            .get(&name)
            .ok_or_else(|| format!("device {id}: no serial port '{name}'"))?
            .clone();
        Ok((name, port_config))
    }

    /// The driver of serial device `id`, on the port its configuration names.
    pub fn driver(&mut self, id: DeviceId, config: &DeviceConfig) -> Result<SerialDriver, String> {
        let (name, port_config) = self.port_of(&id, config)?;
        let used = self.used(&name, &port_config);
        let lines = compile_lines(
            &port_config,
            device_lines(config),
            &format!("serial_ports.{name}"),
            &format!("devices.{id}"),
        )
        .map_err(|p| p.join("; "))?;
        used.devices.push(id.clone());
        Ok(SerialDriver {
            id,
            address: config.address.clone(),
            lines: Arc::new(lines),
            port: used.handle.clone(),
        })
    }

    /// The port of Modbus RTU device `id`, shared with every device on it.
    pub fn modbus(&mut self, id: DeviceId, config: &DeviceConfig) -> Result<PortSender, String> {
        let (name, port_config) = self.port_of(&id, config)?;
        let used = self.used(&name, &port_config);
        used.devices.push(id);
        Ok(PortSender(used.handle.clone()))
    }

    fn used(&mut self, name: &str, config: &SerialPortConfig) -> &mut UsedPort {
        self.open.entry(name.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (modbus_tx, modbus_rx) = mpsc::channel(QUEUE);
            let handle = PortHandle {
                name: name.to_string(),
                config: config.clone(),
                jobs: tx,
                modbus: modbus_tx,
            };
            UsedPort {
                handle: Arc::new(handle),
                jobs: rx,
                modbus: modbus_rx,
                devices: Vec::new(),
            }
        })
    }

    /// Spawns one task per port in use. Each ends when its drivers are all dropped.
    pub fn start(self, presence: &Arc<Presence>) -> Result<(), String> {
        if self.open.is_empty() {
            return Ok(());
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "serial ports need a tokio runtime".to_string())?;
        for (name, used) in self.open {
            let config = used.handle.config.clone();
            let task = PortTask::new(name, config, used.jobs, presence.clone(), used.devices)
                .with_modbus(used.modbus);
            runtime.spawn(task.run());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio_serial::{SerialPort, SerialStream};

    /// A driver on a fresh pty, configured like an integrator would.
    struct Rig {
        driver: SerialDriver,
        config: Config,
        presence: Arc<Presence>,
    }

    /// The device side of the pty.
    struct Device {
        line: BufReader<SerialStream>,
        _slave: SerialStream,
    }

    fn rig(port: &str, methods: &str) -> (Rig, Device) {
        let (master, slave) = SerialStream::pair().unwrap();
        let text = format!(
            r#"
            [gateway]
            id = "site-1"
            [cloud]
            broker = "mqtt://127.0.0.1:1883"
            [serial_ports.bus1]
            path = "{}"
            {port}
            [devices.tc-1]
            kind = "serial"
            port = "bus1"
            {methods}
            "#,
            slave.name().unwrap()
        );
        let config = Config::from_text(&text).unwrap();
        let id = DeviceId::new("tc-1").unwrap();
        let mut ports = Ports::new(&config);
        let driver = ports.driver(id.clone(), &config.devices["tc-1"]).unwrap();
        let presence = Arc::new(Presence::new([id].into_iter(), 0));
        ports.start(&presence).unwrap();
        let rig = Rig {
            driver,
            config,
            presence,
        };
        let device = Device {
            line: BufReader::new(master),
            _slave: slave,
        };
        (rig, device)
    }

    impl Rig {
        async fn call(&self, method: &str, within: Duration) -> Result<Answer, CallError> {
            let action = &self.config.devices["tc-1"].methods[method];
            self.driver.call(action, &Map::new(), within).await
        }
    }

    impl Device {
        /// Reads a request ending with `\n`.
        async fn heard(&mut self) -> String {
            let mut line = String::new();
            self.line.read_line(&mut line).await.unwrap();
            line
        }

        async fn heard_bytes(&mut self, n: usize) -> String {
            let mut buf = vec![0; n];
            self.line.read_exact(&mut buf).await.unwrap();
            String::from_utf8(buf).unwrap()
        }

        async fn say(&mut self, bytes: &[u8]) {
            self.line.get_mut().write_all(bytes).await.unwrap();
        }
    }

    const TEMP: &str = r#"
        [devices.tc-1.methods.temp]
        request = "TEMP?"
        response = 'TEMP (?P<temp>\S+)'
        fields = { temp = "number" }
        errors = ['ERR (?P<code>\S+) (?P<text>.*)', 'ERR:(?P<code>\w+)', 'NAK']
        busy = ['BUSY']
    "#;

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn answers_become_results_and_device_errors_keep_their_codes() {
        let (rig, mut dev) = rig("", TEMP);
        let cases: Vec<(&[u8], Result<Answer, CallError>)> = vec![
            (
                b"TEMP 21.5\r\n",
                Ok(Answer {
                    status: 200,
                    result: json!({"temp": 21.5}),
                }),
            ),
            (
                b"ERR 3 OUT OF RANGE\r\n",
                Err(CallError::Status {
                    status: 3,
                    detail: json!("OUT OF RANGE"),
                }),
            ),
            (
                b"ERR:RANGE\r\n",
                Err(CallError::Coded {
                    code: "RANGE".into(),
                    detail: json!("ERR:RANGE"),
                }),
            ),
            (
                b"NAK\r\n",
                Err(CallError::Status {
                    status: 0,
                    detail: json!("NAK"),
                }),
            ),
            (
                b"BUSY\r\n",
                Err(CallError::Busy {
                    status: None,
                    reason: "BUSY".into(),
                    retry_after: None,
                }),
            ),
        ];
        for (said, want) in cases {
            let (got, ()) = tokio::join!(rig.call("temp", LONG), async {
                assert_eq!(dev.heard().await, "TEMP?\r\n");
                dev.say(said).await;
            });
            assert_eq!(got, want, "{said:?}");
        }
        let (got, ()) = tokio::join!(rig.call("temp", LONG), async {
            dev.heard().await;
            dev.say(b"TEMP warm\r\n").await;
        });
        let e = got.unwrap_err();
        assert!(e.may_have_run(), "{e:?}");
        assert_eq!(
            e,
            CallError::BadAnswer("capture 'temp' is \"warm\", which is not a number".into())
        );
    }

    #[tokio::test]
    async fn echo_unsolicited_lines_and_blocks() {
        let port = r#"
            request_terminator = "\r"
            echo = true
            ignore = ['#STAT .*']
        "#;
        let methods = r#"
            [devices.tc-1.methods.stat]
            request = "STAT?"
            lines = 3
            response = '(?m)^T=(?P<t>\S+)$\n^SETP=(?P<setp>\S+)$\n^ALARM=(?P<alarm>\S+)$'
            fields = { t = "number", setp = "number" }
        "#;
        let (rig, mut dev) = rig(port, methods);
        for _ in 0..3 {
            let (got, ()) = tokio::join!(rig.call("stat", LONG), async {
                assert_eq!(dev.heard_bytes(6).await, "STAT?\r");
                dev.say(b"#STAT T=21.5 OK\r\nSTAT?\rT=21.5\r\n#STAT T=21.5 OK\r\n")
                    .await;
                dev.say(b"SETP=20.0\r\nALARM=NONE\r\n#STAT T=21.5 OK\r\n")
                    .await;
            });
            assert_eq!(
                got,
                Ok(Answer {
                    status: 200,
                    result: json!({"t": 21.5, "setp": 20.0, "alarm": "NONE"}),
                })
            );
        }
        let (got, ()) = tokio::join!(rig.call("stat", LONG), async {
            assert_eq!(dev.heard_bytes(6).await, "STAT?\r");
            dev.say(b"STAT!\rT=1\r\n").await;
        });
        let e = got.unwrap_err();
        assert!(e.may_have_run(), "{e:?}");
        assert_eq!(
            e.to_string(),
            r"device sent an answer that could not be read: echo mismatch: sent 'STAT?\r', got 'STAT!\rT=1'"
        );
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_limit_stops_there() {
        let port = "max_frame_len = 1024";
        let methods = r#"
            [devices.tc-1.methods.dump]
            request = "DUMP?"
            until = "END"
        "#;
        let (rig, mut dev) = rig(port, methods);
        let line = format!("{}\r\n", "x".repeat(1000));
        let (got, ()) = tokio::join!(rig.call("dump", LONG), async {
            dev.heard().await;
            for _ in 0..70 {
                dev.say(line.as_bytes()).await;
            }
        });
        assert_eq!(got, Err(CallError::TooLarge { limit: 65_536 }));
        // The rest of the block answers nothing; the next call reads its own answer.
        let (got, ()) = tokio::join!(rig.call("dump", LONG), async {
            dev.heard().await;
            dev.say(b"a\r\nEND\r\n").await;
        });
        assert_eq!(got.unwrap().result, json!("a\nEND"));
    }

    #[tokio::test]
    async fn a_call_that_waited_for_the_bus_until_its_deadline_was_not_sent() {
        let (rig, mut dev) = rig("", TEMP);
        let (first, second, ()) = tokio::join!(
            rig.call("temp", LONG),
            async {
                // Queued behind the first one, which the device takes its time over.
                tokio::time::sleep(Duration::from_millis(20)).await;
                rig.call("temp", Duration::from_millis(100)).await
            },
            async {
                assert_eq!(dev.heard().await, "TEMP?\r\n");
                tokio::time::sleep(Duration::from_millis(300)).await;
                dev.say(b"TEMP 1\r\n").await;
            }
        );
        assert!(first.is_ok(), "{first:?}");
        let e = second.unwrap_err();
        assert!(
            matches!(e, CallError::Busy { ref reason, .. } if reason.contains("not sent")),
            "{e:?}"
        );
        assert!(e.retryable() && !e.may_have_run());
        let (third, ()) = tokio::join!(rig.call("temp", LONG), async {
            assert_eq!(
                dev.heard().await,
                "TEMP?\r\n",
                "the second request was never written"
            );
            dev.say(b"TEMP 3\r\n").await;
        });
        assert_eq!(third.unwrap().result, json!({"temp": 3.0}));
    }

    #[tokio::test]
    async fn a_port_that_vanishes_mid_request_may_have_run() {
        let (rig, dev) = rig("", TEMP);
        // The test's own slave handle stays open: it keeps the pty's number from being reused
        // by a parallel test while this port task tries to reopen the path.
        let Device { mut line, _slave } = dev;
        let (got, ()) = tokio::join!(rig.call("temp", LONG), async {
            let mut request = String::new();
            line.read_line(&mut request).await.unwrap();
            assert_eq!(request, "TEMP?\r\n");
            drop(line);
        });
        let e = got.unwrap_err();
        assert!(e.may_have_run(), "{e:?}");
        assert!(
            e.to_string()
                .contains("failed after the request was written"),
            "{e}"
        );
        assert!(!rig.presence.is_online(&DeviceId::new("tc-1").unwrap()));
        // Now closed: the next call writes nothing and says so.
        let e = rig.call("temp", LONG).await.unwrap_err();
        assert!(matches!(e, CallError::Unreachable(_)), "{e:?}");
        assert!(e.retryable());
    }
}
