//! Devices behind the gateway: the registry built from configuration, each device's driver,
//! call limit and presence. The cloud can only reach what this registry names.

pub mod health;
pub mod http;
pub mod modbus;
pub mod serial;

use crate::config::{ActionConfig, Config, DeviceConfig, DeviceKind};
use gatewayd_protocol::{DeviceId, DeviceInfo, MethodInfo};
use health::Presence;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Semaphore;

/// What a device said to a successful call.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Device status (HTTP status).
    pub status: i64,
    /// The mapped result.
    pub result: Value,
}

/// Why a device call failed. Each variant says whether the request could have reached the
/// device, which decides what may be retried (at most once, `docs/devices.md`):
/// - nothing was written: [`CallError::Unreachable`], [`CallError::Refused`];
/// - the device said it did not act: [`CallError::Busy`];
/// - the device answered a failure: [`CallError::Status`], [`CallError::Coded`];
/// - written, but the answer was lost, late, garbled or too large, so the device may have
///   acted: [`CallError::Timeout`], [`CallError::BadAnswer`], [`CallError::TooLarge`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The request was written but no full answer came within the time.
    #[error("device did not answer within {0} ms")]
    Timeout(u64),
    /// No byte of the request reached the device: connection refused, DNS failure, connect
    /// timeout, serial port not open. Safe to try again.
    #[error("device is unreachable: {0}")]
    Unreachable(String),
    /// The device said it is busy (HTTP 408/429/503 or a configured transient status, a serial
    /// busy line) and did not act; `retry_after` is its own hint.
    #[error("device is busy: {reason}")]
    Busy {
        status: Option<i64>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The device answered a failure with a numeric status (HTTP status, serial error code).
    #[error("device answered status {status}")]
    Status { status: i64, detail: Value },
    /// The device answered a failure with a text code (`ERR:RANGE`).
    #[error("device answered error {code}")]
    Coded { code: String, detail: Value },
    /// The request was written, but the answer could not be read: the connection dropped, the
    /// status line or framing was malformed, the echo or the answer did not match.
    #[error("device sent an answer that could not be read: {0}")]
    BadAnswer(String),
    /// The answer (or its headers) exceeded the limit; reading stopped there.
    #[error("device answer exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// The values would make the call leave what the configuration names (e.g. a path value
    /// `..` that URL normalisation would resolve); nothing was sent.
    #[error("call refused before reaching the device: {0}")]
    Refused(String),
}

impl CallError {
    /// Whether the request may have reached the device and been acted on: the outcome is
    /// unknown, so it must never be retried and is reported as "may have run".
    pub fn may_have_run(&self) -> bool {
        matches!(
            self,
            CallError::Timeout(_) | CallError::BadAnswer(_) | CallError::TooLarge { .. }
        )
    }

    /// Whether the device certainly did not act and the call may be made again later.
    pub fn retryable(&self) -> bool {
        matches!(self, CallError::Unreachable(_) | CallError::Busy { .. })
    }
}

/// What a device said when it refused, as a reason for an apply status or a message feedback:
/// its text, the `error` field of its JSON answer, or the answer itself.
pub fn answer_text(detail: &Value) -> String {
    match detail {
        Value::String(s) => s.clone(),
        Value::Object(m) => m
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| detail.to_string()),
        other => other.to_string(),
    }
}

/// How a device is reached.
#[derive(Debug)]
pub enum Driver {
    Http(http::HttpDriver),
    Serial(serial::SerialDriver),
    Modbus(modbus::ModbusDriver),
}

/// What the cloud may ask of a device: methods, twin properties, commands. Devices that name
/// the same profile (and add nothing) share one copy.
#[derive(Debug, Default)]
pub struct Actions {
    pub methods: BTreeMap<String, ActionConfig>,
    pub twin: BTreeMap<String, ActionConfig>,
    pub commands: BTreeMap<String, ActionConfig>,
}

/// One configured device.
#[derive(Debug)]
pub struct Device {
    pub id: DeviceId,
    /// Link settings; its `methods`, `twin` and `commands` are moved into `actions`.
    pub config: DeviceConfig,
    /// Everything the cloud may ask of this device.
    pub actions: Arc<Actions>,
    pub driver: Driver,
    /// Calls in flight at most.
    pub slots: Semaphore,
    /// Told when this device is dropped: every task and call holding it has ended. A live
    /// reload sets it on a device it retires, to start the replacement's tasks only then.
    pub gone: std::sync::OnceLock<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(tx) = self.gone.take() {
            let _ = tx.send(());
        }
    }
}

impl Device {
    /// Runs one action against the device with `vars` filled into its templates.
    pub async fn call(
        &self,
        action: &ActionConfig,
        vars: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        match &self.driver {
            Driver::Http(d) => d.call(action, vars, timeout).await,
            Driver::Serial(d) => d.call(action, vars, timeout).await,
            Driver::Modbus(d) => d.call(action, vars, timeout).await,
        }
    }

    /// Catalog entry announced to the cloud.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            kind: self.config.kind.to_string(),
            methods: self
                .actions
                .methods
                .iter()
                .map(|(name, m)| MethodInfo {
                    name: name.clone(),
                    params: m.params.clone(),
                })
                .collect(),
            twin_properties: self.actions.twin.keys().cloned().collect(),
            commands: self.actions.commands.keys().cloned().collect(),
        }
    }
}

/// All devices, by id, with their shared presence table. The set can change while the daemon
/// runs (a live reload); callers hold an `Arc<Device>` for as long as they work with one, so a
/// replaced or removed device finishes what it started on its old settings.
#[derive(Debug)]
pub struct Devices {
    by_id: RwLock<HashMap<DeviceId, Arc<Device>>>,
    pub presence: Arc<Presence>,
    clients: Clients,
}

/// The HTTP clients every HTTP device shares.
#[derive(Debug, Clone)]
struct Clients {
    call: reqwest::Client,
    probe: reqwest::Client,
}

/// Devices built from configuration, with the serial port and Modbus TCP tasks they need,
/// started by [`Built::start`].
pub struct Built {
    pub devices: Vec<Arc<Device>>,
    ports: serial::Ports,
    endpoints: modbus::tcp::Endpoints,
}

impl Built {
    /// Starts the port and endpoint tasks of these devices (each ends when its devices are
    /// gone).
    pub fn start(self, presence: &Arc<Presence>) -> Result<Vec<Arc<Device>>, String> {
        self.ports.start(presence)?;
        self.endpoints.start(presence)?;
        Ok(self.devices)
    }
}

impl Devices {
    /// Builds the registry from validated configuration, taking the device entries out of it
    /// (one copy of each device's configuration lives on, in its `Device`). Serial ports in use
    /// get their task here (a tokio runtime is needed then); each ends when its devices are
    /// dropped.
    pub fn from_config(config: &mut Config, now_ms: u64) -> Result<Devices, String> {
        let clients = Clients {
            call: http::client()?,
            probe: http::probe_client()?,
        };
        let built = build(config, None, &clients)?;
        let presence = Arc::new(Presence::with_limit(
            built.devices.iter().map(|d| d.id.clone()),
            now_ms,
            config.cloud.max_packet_bytes,
        ));
        let devices = built.start(&presence)?;
        let by_id = devices.into_iter().map(|d| (d.id.clone(), d)).collect();
        let devices = Devices {
            by_id: RwLock::new(by_id),
            presence,
            clients,
        };
        devices
            .catalog_plan(config.cloud.max_packet_bytes)
            .map_err(|e| format!("{e}; raise cloud.max_packet_bytes or shorten its methods"))?;
        Ok(devices)
    }

    /// Builds the devices `ids` of `config` (validated), not yet part of the registry; their
    /// port tasks start with [`Built::start`].
    pub fn build(&self, config: &mut Config, ids: &[String]) -> Result<Built, String> {
        build(config, Some(ids), &self.clients)
    }

    /// Changes the device set in one step: `remove` leave, `add` join or replace the device
    /// of the same id, and the presence table follows (the tasks of every device taken out see
    /// their presence channel close and end). Returns the devices taken out.
    pub fn swap(
        &self,
        remove: &[DeviceId],
        add: Vec<Arc<Device>>,
        now_ms: u64,
    ) -> Vec<Arc<Device>> {
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Device>> = remove.iter().filter_map(|id| by_id.remove(id)).collect();
        let mut renew = Vec::new();
        for d in add {
            if let Some(old) = by_id.insert(d.id.clone(), d) {
                renew.push(old.id.clone());
                out.push(old);
            }
        }
        let ids: Vec<DeviceId> = by_id.keys().cloned().collect();
        drop(by_id);
        self.presence.set_devices(ids.into_iter(), &renew, now_ms);
        out
    }

    /// Looks a device up.
    pub fn get(&self, id: &DeviceId) -> Option<Arc<Device>> {
        self.read().get(id).cloned()
    }

    /// Whether `id` is configured.
    pub fn contains(&self, id: &DeviceId) -> bool {
        self.read().contains_key(id)
    }

    /// Every device, in id order.
    pub fn all(&self) -> Vec<Arc<Device>> {
        let mut v: Vec<_> = self.read().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<DeviceId, Arc<Device>>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How many devices (in id order) each part of the catalog announced at connect carries,
    /// so that each part fits a publish of `max_publish` bytes (checked at start: an entry too
    /// large for one publish stops gatewayd).
    pub fn catalog_plan(
        &self,
        max_publish: usize,
    ) -> Result<Vec<usize>, gatewayd_protocol::chunk::EntryTooLarge> {
        gatewayd_protocol::chunk::plan_catalog(
            self.all().into_iter().map(|d| d.info()),
            max_publish,
        )
    }

    /// The catalog's parts after `plan`, each built only when the iterator reaches it: a
    /// gateway of 10,000 devices never holds every entry at once.
    pub fn catalog_parts<'a>(
        &'a self,
        generation: u64,
        plan: &'a [usize],
    ) -> impl Iterator<Item = gatewayd_protocol::Catalog> + 'a {
        let parts = plan.len() as u32;
        let mut devices = self.all().into_iter();
        plan.iter()
            .enumerate()
            .map(move |(i, &n)| gatewayd_protocol::Catalog {
                v: gatewayd_protocol::PROTOCOL_VERSION,
                generation,
                part: i as u32,
                parts,
                devices: devices.by_ref().take(n).map(|d| d.info()).collect(),
            })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no device is configured.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// Builds the devices `ids` of `config` (all when `None`), taking their entries (and the
/// profiles) out of it.
fn build(config: &mut Config, ids: Option<&[String]>, clients: &Clients) -> Result<Built, String> {
    let mut ports = serial::Ports::new(config);
    let mut endpoints = modbus::tcp::Endpoints::default();
    let profiles: BTreeMap<String, Arc<Actions>> = std::mem::take(&mut config.profiles)
        .into_iter()
        .map(|(name, p)| {
            let actions = Actions {
                methods: p.methods,
                twin: p.twin,
                commands: p.commands,
            };
            (name, Arc::new(actions))
        })
        .collect();
    // All at start: the entries are consumed in place, with no list of ids beside them (a
    // short-lived allocation per device between long-lived ones fragments the heap).
    let entries: Vec<(String, crate::config::DeviceConfig)> = match ids {
        None => Vec::new(),
        Some(ids) => {
            let mut v = Vec::with_capacity(ids.len());
            for id in ids {
                let dc = config
                    .devices
                    .remove(id)
                    .ok_or_else(|| format!("devices.{id}: not in the configuration"))?;
                v.push((id.clone(), dc));
            }
            v
        }
    };
    let all = match ids {
        None => std::mem::take(&mut config.devices),
        Some(_) => BTreeMap::new(),
    };
    let mut devices = Vec::with_capacity(all.len() + entries.len());
    for (id, mut dc) in all.into_iter().chain(entries) {
        let own = Actions {
            methods: std::mem::take(&mut dc.methods),
            twin: std::mem::take(&mut dc.twin),
            commands: std::mem::take(&mut dc.commands),
        };
        let profile = dc.profile.as_ref().and_then(|name| profiles.get(name));
        let actions = match profile {
            Some(shared)
                if own.methods.is_empty() && own.twin.is_empty() && own.commands.is_empty() =>
            {
                shared.clone()
            }
            Some(shared) => {
                let mut merged = Actions {
                    methods: shared.methods.clone(),
                    twin: shared.twin.clone(),
                    commands: shared.commands.clone(),
                };
                merged.methods.extend(own.methods);
                merged.twin.extend(own.twin);
                merged.commands.extend(own.commands);
                Arc::new(merged)
            }
            None => Arc::new(own),
        };
        let id = DeviceId::new(id.clone()).map_err(|e| format!("devices.{id}: {e}"))?;
        let driver = match dc.kind {
            DeviceKind::Http => Driver::Http(http::HttpDriver::new(
                clients.call.clone(),
                clients.probe.clone(),
                id.clone(),
                &dc,
            )?),
            DeviceKind::Serial => Driver::Serial(ports.driver(id.clone(), &dc)?),
            DeviceKind::ModbusRtu => Driver::Modbus(
                modbus::ModbusDriver::rtu(
                    id.clone(),
                    dc.unit_id.unwrap_or(1),
                    ports.modbus(id.clone(), &dc)?,
                )
                .with_probe(dc.health.register.as_ref()),
            ),
            DeviceKind::ModbusTcp => {
                let host = dc.host.clone().unwrap_or_default();
                let port = crate::config::modbus::tcp_port(&dc)
                    .map_err(|e| format!("devices.{id}.port: {e}"))?;
                let framing = dc.framing.unwrap_or_default();
                let link = endpoints.link(id.clone(), &host, port, framing);
                Driver::Modbus(
                    modbus::ModbusDriver::tcp(id.clone(), dc.unit_id.unwrap_or(1), link)
                        .with_probe(dc.health.register.as_ref()),
                )
            }
        };
        let limit = dc
            .max_in_flight
            .unwrap_or(config.rpc.max_in_flight_per_device);
        devices.push(Arc::new(Device {
            id,
            config: dc,
            actions,
            driver,
            slots: Semaphore::new(limit),
            gone: std::sync::OnceLock::new(),
        }));
    }
    Ok(Built {
        devices,
        ports,
        endpoints,
    })
}

/// Methods by name, for error messages that list what exists.
pub fn method_names(methods: &BTreeMap<String, ActionConfig>) -> String {
    methods.keys().cloned().collect::<Vec<_>>().join(", ")
}
