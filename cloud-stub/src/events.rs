//! Live changes for `GET /api/v1/events` (the console's only source of updates): gateway and
//! device presence, gateway configuration reports, twin versions, message statuses and
//! finished RPCs, each one small JSON object naming what changed so a page reloads only that.
//!
//! One `tokio::sync::broadcast` channel: emitting never waits and costs nothing without a
//! subscriber; a subscriber that falls more than [`CAPACITY`] events behind loses the oldest
//! and is told so (the stream's `lagged` event), so a slow browser never slows the stub.
//! Events are emitted where the change is decided, after the store write is queued, so a read
//! the page starts on receipt already sees it (the store thread runs jobs in order).

use crate::store::MessageWrite;
use gatewayd_protocol::message::MessageStatus;
use gatewayd_protocol::{DeviceId, GatewayId, MessageId};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events a subscriber may fall behind before it misses some.
pub const CAPACITY: usize = 1024;

/// What changed: the SSE event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A gateway's state or catalog: `{"gateway", "online", "devices"?}`.
    Gateway,
    /// A device's presence: `{"device", "gateway", "online", "reason"}`.
    Device,
    /// A twin half changed: `{"device", "half", "desired_version", "reported_version"}`.
    Twin,
    /// A message's status: `{"device", "id", "status"}` (`status` `sent` when published).
    Message,
    /// An RPC finished: `{"device", "method", "outcome", "ms"}` (`outcome` `ok` or a code).
    Rpc,
    /// A gateway reported its configuration (`up/config`): `{"gateway", "version", "state"}`.
    GatewayConfig,
}

impl Kind {
    /// The kinds the stream's `ready` event lists.
    pub const ALL: [Kind; 6] = [
        Kind::Gateway,
        Kind::Device,
        Kind::Twin,
        Kind::Message,
        Kind::Rpc,
        Kind::GatewayConfig,
    ];

    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Device => "device",
            Kind::Twin => "twin",
            Kind::Message => "message",
            Kind::Rpc => "rpc",
            Kind::GatewayConfig => "gateway_config",
        }
    }
}

/// One change, its JSON encoded once for every subscriber.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    pub data: Arc<str>,
}

/// The sending side; cheap to clone, shared by every place that decides a change.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(CAPACITY)
    }
}

impl Events {
    /// A channel keeping up to `capacity` events for its slowest subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Events { tx }
    }

    /// A new subscriber, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn emit(&self, kind: Kind, data: Value) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Event {
            kind,
            data: data.to_string().into(),
        });
    }

    /// A gateway went online or offline, restarted, or announced its devices.
    pub fn gateway(&self, gateway: &GatewayId, online: bool, devices: Option<usize>) {
        let mut data = json!({"gateway": gateway, "online": online});
        if let Some(n) = devices {
            data["devices"] = json!(n);
        }
        self.emit(Kind::Gateway, data);
    }

    /// A device's presence, as its gateway reports it, changed.
    pub fn device(
        &self,
        device: &DeviceId,
        gateway: &GatewayId,
        online: bool,
        reason: Option<&str>,
    ) {
        self.emit(
            Kind::Device,
            json!({"device": device, "gateway": gateway, "online": online, "reason": reason}),
        );
    }

    /// A twin's desired or reported half changed.
    pub fn twin(&self, device: &DeviceId, half: &str, desired_version: u64, reported_version: u64) {
        self.emit(
            Kind::Twin,
            json!({"device": device, "half": half, "desired_version": desired_version,
                "reported_version": reported_version}),
        );
    }

    /// A message was queued or changed status.
    pub fn message(&self, device: &DeviceId, id: &MessageId, status: MessageStatus) {
        self.message_step(device, id, status.as_str());
    }

    fn message_step(&self, device: &DeviceId, id: &MessageId, status: &str) {
        self.emit(
            Kind::Message,
            json!({"device": device, "id": id, "status": status}),
        );
    }

    /// One event per message write: its new status, or `sent` when it was published.
    pub fn message_writes(&self, writes: &[MessageWrite]) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        for w in writes {
            match w {
                MessageWrite::Sent { id, device, .. } => self.message_step(device, id, "sent"),
                MessageWrite::Status {
                    id,
                    device: Some(device),
                    status,
                    ..
                } => self.message(device, id, *status),
                MessageWrite::Status { device: None, .. } => {}
            }
        }
    }

    /// A gateway's configuration report arrived: the desired version it is about and what
    /// became of it (`none`, `applied`, `refused`, `rolled_back`).
    pub fn gateway_config(&self, gateway: &GatewayId, version: u64, state: &str) {
        self.emit(
            Kind::GatewayConfig,
            json!({"gateway": gateway, "version": version, "state": state}),
        );
    }

    /// An RPC finished: `outcome` is `ok` or the error code, `ms` how long the caller waited.
    pub fn rpc(&self, device: &str, method: &str, outcome: &str, ms: u64) {
        self.emit(
            Kind::Rpc,
            json!({"device": device, "method": method, "outcome": outcome, "ms": ms}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_subscribers_nothing_is_kept() {
        let events = Events::new(4);
        events.rpc("d1", "m", "ok", 3);
        let mut rx = events.subscribe();
        assert!(rx.try_recv().is_err());
        events.rpc("d1", "m", "timeout", 5);
        let e = rx.try_recv().unwrap();
        assert_eq!(e.kind, Kind::Rpc);
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(
            data,
            json!({"device": "d1", "method": "m", "outcome": "timeout", "ms": 5})
        );
    }

    #[test]
    fn a_configuration_report_names_its_gateway() {
        let events = Events::new(4);
        let mut rx = events.subscribe();
        events.gateway_config(&GatewayId::new("g1").unwrap(), 3, "refused");
        let e = rx.try_recv().unwrap();
        assert_eq!(e.kind.as_str(), "gateway_config");
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(
            data,
            json!({"gateway": "g1", "version": 3, "state": "refused"})
        );
    }

    #[test]
    fn a_slow_subscriber_loses_the_oldest_and_learns_how_many() {
        let events = Events::new(2);
        let mut rx = events.subscribe();
        let gw = GatewayId::new("g1").unwrap();
        for _ in 0..5 {
            events.gateway(&gw, true, None);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(3))
        ));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn message_writes_name_their_device_and_step() {
        let events = Events::new(8);
        let mut rx = events.subscribe();
        let device = DeviceId::new("d1").unwrap();
        let id = MessageId::new("m1").unwrap();
        events.message_writes(&[
            MessageWrite::Sent {
                id: id.clone(),
                device: device.clone(),
                gateway: GatewayId::new("g1").unwrap(),
                at_ms: 1,
            },
            MessageWrite::Status {
                id: id.clone(),
                device: Some(device),
                status: MessageStatus::Completed,
                reason: None,
                device_status: None,
                delivered_at_ms: None,
                finished_at_ms: Some(2),
            },
        ]);
        let steps: Vec<Value> = (0..2)
            .map(|_| serde_json::from_str(&rx.try_recv().unwrap().data).unwrap())
            .collect();
        assert_eq!(steps[0]["status"], "sent");
        assert_eq!(
            steps[1],
            json!({"device": "d1", "id": "m1", "status": "completed"})
        );
    }
}
