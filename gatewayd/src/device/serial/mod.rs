//! Serial devices: ASCII request/response lines on RS-232/RS-485 ports. A device's driver
//! renders the request, hands it to its port's task (one per port, shared by every device on
//! that bus) and interprets the answer line. `frame` is the pure protocol core; `port` the I/O.

pub mod frame;
pub mod port;

use super::{Answer, CallError};
use crate::config::{ActionConfig, Config, DeviceConfig, ResultMode, SerialPortConfig};
use crate::device::health::Presence;
use crate::template::Template;
use frame::{AnswerSpec, Pattern, Reply};
use gatewayd_protocol::DeviceId;
use port::{ExchangeError, Job, PortTask};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Requests that may wait for one port; callers beyond it wait to enqueue (within their
/// deadline). Each device's `max_in_flight` bounds it further.
const QUEUE: usize = 64;

/// Device status of a successful serial call (the protocol's "200 for serial").
const OK_STATUS: i64 = 200;

/// One serial device: its address and a handle on its port's task.
#[derive(Debug)]
pub struct SerialDriver {
    id: DeviceId,
    address: Option<String>,
    port: Arc<PortHandle>,
}

/// The sending side of a port task, shared by the devices on the port.
#[derive(Debug)]
struct PortHandle {
    name: String,
    config: SerialPortConfig,
    jobs: mpsc::Sender<Job>,
    /// Compiled answer patterns by text. Patterns only come from configuration, so this stays
    /// as small as the configuration.
    patterns: Mutex<HashMap<String, Arc<Pattern>>>,
}

impl SerialDriver {
    /// Runs `action` (a request template and answer patterns) with `vars`, within `timeout`,
    /// which includes the wait for the bus.
    pub async fn call(
        &self,
        action: &ActionConfig,
        vars: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let template = action
            .request
            .as_deref()
            .ok_or_else(|| CallError::BadAnswer("the action has no request template".into()))
            .and_then(|t| {
                Template::parse(t).map_err(|e| CallError::BadAnswer(format!("request: {e}")))
            })?;
        let spec = self.answer_spec(action)?;
        let config = &self.port.config;
        let request = frame::render_request(
            &template,
            vars,
            self.address.as_deref(),
            &config.request_terminator,
        );
        let (reply, answer) = oneshot::channel();
        let job = Job {
            request,
            response_timeout: Duration::from_millis(action.timeout_ms.unwrap_or(config.timeout_ms)),
            deadline,
            reply,
        };
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        let stopped =
            || CallError::Unreachable(format!("serial port {} is closed", self.port.name));
        match tokio::time::timeout_at(deadline, self.port.jobs.send(job)).await {
            Err(_) => return Err(CallError::Timeout(elapsed_ms())),
            Ok(Err(_)) => return Err(stopped()),
            Ok(Ok(())) => {}
        }
        // The port task answers by the deadline once it takes the job; until then the job
        // waits behind others, so the caller's own deadline applies here too.
        let line = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => return Err(CallError::Timeout(elapsed_ms())),
            Ok(Err(_)) => return Err(stopped()),
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(e))) => {
                return Err(match e {
                    ExchangeError::Expired | ExchangeError::Timeout { .. } => {
                        CallError::Timeout(elapsed_ms())
                    }
                    ExchangeError::Frame(e) => CallError::BadAnswer(e.to_string()),
                    ExchangeError::PortDown(why) => CallError::Unreachable(why),
                })
            }
        };
        let line = String::from_utf8_lossy(&line);
        match spec.interpret(&line) {
            Ok(Reply::Ok(result)) => Ok(Answer {
                status: OK_STATUS,
                result: if action.result == ResultMode::None {
                    Value::Null
                } else {
                    result
                },
            }),
            Ok(Reply::Refused { code, text }) => Err(CallError::Status {
                status: code.unwrap_or(0),
                detail: Value::String(text),
            }),
            Err(e) => {
                tracing::debug!(device = %self.id, answer = %line, "unreadable serial answer");
                Err(CallError::BadAnswer(e.to_string()))
            }
        }
    }

    /// The action's patterns, compiled once per pattern text.
    fn answer_spec(&self, action: &ActionConfig) -> Result<AnswerSpec, CallError> {
        let compile = |text: &str| -> Result<Pattern, CallError> {
            let mut cache = self.port.patterns.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = cache.get(text) {
                return Ok((**p).clone());
            }
            let p = Pattern::parse(text).map_err(CallError::BadAnswer)?;
            cache.insert(text.to_string(), Arc::new(p.clone()));
            Ok(p)
        };
        Ok(AnswerSpec {
            response: action.response.as_deref().map(compile).transpose()?,
            fields: action.fields.clone(),
            errors: action
                .errors
                .iter()
                .map(|e| compile(e))
                .collect::<Result<_, _>>()?,
        })
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

    /// The driver of serial device `id`, on the port its configuration names.
    pub fn driver(&mut self, id: DeviceId, config: &DeviceConfig) -> Result<SerialDriver, String> {
        let name = config
            .port
            .clone()
            .ok_or_else(|| format!("device {id}: port missing"))?;
        let port_config = self
            .configs
            .get(&name)
            .ok_or_else(|| format!("device {id}: no serial port '{name}'"))?;
        let used = self.open.entry(name.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let handle = PortHandle {
                name: name.clone(),
                config: port_config.clone(),
                jobs: tx,
                patterns: Mutex::new(HashMap::new()),
            };
            UsedPort {
                handle: Arc::new(handle),
                jobs: rx,
                devices: Vec::new(),
            }
        });
        used.devices.push(id.clone());
        Ok(SerialDriver {
            id,
            address: config.address.clone(),
            port: used.handle.clone(),
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
            let task = PortTask::new(name, config, used.jobs, presence.clone(), used.devices);
            runtime.spawn(task.run());
        }
        Ok(())
    }
}
