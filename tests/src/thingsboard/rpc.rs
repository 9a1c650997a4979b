//! Server-side RPC as ThingsBoard's REST API offers it (`/api/rpc/{oneway,twoway}/{device}`):
//! non-persistent calls that need the device online now, and persistent ones that are queued,
//! sent whenever the device is connected through a live session, retried with the same request
//! id, and end SUCCESSFUL, FAILED, TIMEOUT or EXPIRED.

use super::state::{Ack, SessionId, State, RPC_TOPIC};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// Default `timeout` of a call, ms (ThingsBoard's).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default lifetime of a persistent RPC, ms.
pub const DEFAULT_EXPIRATION_MS: u64 = 24 * 3600 * 1000;
/// Default number of re-sends of a persistent RPC.
pub const DEFAULT_RETRIES: u32 = 3;

/// The body of `POST /api/rpc/{oneway,twoway}/{device}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RpcRequest {
    pub method: String,
    #[serde(default)]
    pub params: Value,
    pub timeout: Option<u64>,
    #[serde(default)]
    pub persistent: bool,
    pub expiration_time: Option<u64>,
    pub retries: Option<u32>,
    #[serde(default)]
    pub forward_timeout: bool,
}

impl RpcRequest {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT_MS)
    }

    /// `{"device", "data": {"id", "method", "params"}}`, with `timeout` and `expirationTime`
    /// inside `data` only when the operator asked to forward them.
    fn payload(&self, device: &str, request_id: u64) -> Value {
        let mut data = json!({"id": request_id, "method": self.method, "params": self.params});
        if self.forward_timeout {
            data["timeout"] = json!(self.timeout_ms());
            if let Some(e) = self.expiration_time {
                data["expirationTime"] = json!(e);
            }
        }
        json!({"device": device, "data": data})
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RpcStatus {
    Queued,
    Sent,
    Delivered,
    Successful,
    Timeout,
    Expired,
    Failed,
}

impl RpcStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Successful | Self::Timeout | Self::Expired | Self::Failed
        )
    }
}

#[derive(Debug)]
pub struct PersistentRpc {
    pub id: String,
    pub device: String,
    pub oneway: bool,
    pub request: RpcRequest,
    pub expiration: u64,
    pub retries: u32,
    pub status: RpcStatus,
    pub response: Value,
    pub request_id: u64,
    pub sends: u32,
    pub history: Vec<RpcStatus>,
    sent_at: u64,
    /// Session and packet id of the last send while it waits for its PUBACK.
    sent_on: Option<(SessionId, u16)>,
}

impl PersistentRpc {
    fn set(&mut self, status: RpcStatus) {
        self.status = status;
        self.history.push(status);
    }

    pub fn view(&self) -> Value {
        json!({
            "id": self.id, "device": self.device, "method": self.request.method,
            "params": self.request.params, "oneway": self.oneway, "status": self.status,
            "response": self.response, "requestId": self.request_id, "sends": self.sends,
            "history": self.history, "expirationTime": self.expiration,
        })
    }
}

/// Why a non-persistent call was not sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Offline,
}

impl State {
    fn next_request_id(&mut self, device: &str) -> u64 {
        let d = self.device_entry(device);
        d.last_request_id += 1;
        d.last_request_id
    }

    /// A non-persistent two-way call: pushed now, the receiver gets the reply's `data`.
    pub fn start_twoway(
        &mut self,
        device: &str,
        req: &RpcRequest,
        now: u64,
    ) -> Result<(u64, oneshot::Receiver<Value>), Refused> {
        let session = self.device_session(device).ok_or(Refused::Offline)?;
        let id = self.next_request_id(device);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert((device.to_string(), id), tx);
        let pushed = self.push(session, RPC_TOPIC, &req.payload(device, id), Ack::Nothing);
        self.rpc_sent_event(device, id, req, None, pushed.is_some(), now);
        Ok((id, rx))
    }

    /// Forgets a two-way call nobody waits for any more.
    pub fn cancel_twoway(&mut self, device: &str, id: u64) {
        self.waiters.remove(&(device.to_string(), id));
    }

    /// A non-persistent one-way call: pushed now, the receiver fires on its PUBACK.
    pub fn start_oneway(
        &mut self,
        device: &str,
        req: &RpcRequest,
        now: u64,
    ) -> Result<oneshot::Receiver<()>, Refused> {
        let session = self.device_session(device).ok_or(Refused::Offline)?;
        let id = self.next_request_id(device);
        let (tx, rx) = oneshot::channel();
        let pushed = self.push(
            session,
            RPC_TOPIC,
            &req.payload(device, id),
            Ack::Waiter(tx),
        );
        self.rpc_sent_event(device, id, req, None, pushed.is_some(), now);
        Ok(rx)
    }

    fn rpc_sent_event(
        &mut self,
        device: &str,
        id: u64,
        req: &RpcRequest,
        persistent: Option<&str>,
        pushed: bool,
        now: u64,
    ) {
        self.event(
            now,
            "rpc_sent",
            Some(device),
            json!({"id": id, "method": req.method, "persistent": persistent, "pushed": pushed}),
        );
    }

    /// Stores a persistent RPC as QUEUED; returns its id.
    pub fn create_persistent(
        &mut self,
        device: &str,
        oneway: bool,
        request: RpcRequest,
        rpc_id: String,
        now: u64,
    ) -> String {
        let request_id = self.next_request_id(device);
        let mut rpc = PersistentRpc {
            id: rpc_id.clone(),
            device: device.to_string(),
            oneway,
            expiration: request
                .expiration_time
                .unwrap_or(now + DEFAULT_EXPIRATION_MS),
            retries: request.retries.unwrap_or(DEFAULT_RETRIES),
            request,
            status: RpcStatus::Queued,
            response: Value::Null,
            request_id,
            sends: 0,
            history: Vec::new(),
            sent_at: 0,
            sent_on: None,
        };
        rpc.set(RpcStatus::Queued);
        self.rpcs.push(rpc);
        rpc_id
    }

    pub fn persistent(&self, rpc_id: &str) -> Option<Value> {
        self.rpcs.iter().find(|r| r.id == rpc_id).map(|r| r.view())
    }

    /// One pass of the delivery loop: expiry, reply timeouts and retries, then sends.
    pub fn deliver_due(&mut self, now: u64) {
        for i in 0..self.rpcs.len() {
            let r = &mut self.rpcs[i];
            if r.status.is_final() {
                continue;
            }
            if now > r.expiration {
                r.sent_on = None;
                r.set(RpcStatus::Expired);
                continue;
            }
            let waiting = matches!(r.status, RpcStatus::Sent | RpcStatus::Delivered);
            if waiting && now >= r.sent_at + r.request.timeout_ms() {
                r.sent_on = None;
                if r.sends <= r.retries {
                    r.set(RpcStatus::Queued);
                } else {
                    r.set(RpcStatus::Timeout);
                    continue;
                }
            }
            if r.status != RpcStatus::Queued {
                continue;
            }
            let device = r.device.clone();
            let Some(session) = self.device_session(&device) else {
                continue;
            };
            let r = &self.rpcs[i];
            let (payload, rpc_id) = (r.request.payload(&device, r.request_id), r.id.clone());
            let Some(pkid) = self.push(session, RPC_TOPIC, &payload, Ack::Persistent(rpc_id))
            else {
                continue;
            };
            let r = &mut self.rpcs[i];
            r.sends += 1;
            r.sent_at = now;
            r.sent_on = Some((session, pkid));
            r.set(RpcStatus::Sent);
            let (id, req, rpc_id) = (r.request_id, r.request.clone(), r.id.clone());
            self.rpc_sent_event(&device, id, &req, Some(&rpc_id), true, now);
        }
    }

    /// The PUBACK of a persistent RPC's latest send.
    pub(super) fn rpc_delivered(&mut self, rpc_id: &str, session: SessionId, pkid: u16, _now: u64) {
        let Some(r) = self.rpcs.iter_mut().find(|r| r.id == rpc_id) else {
            return;
        };
        if r.status != RpcStatus::Sent || r.sent_on != Some((session, pkid)) {
            return;
        }
        r.sent_on = None;
        r.set(RpcStatus::Delivered);
        if r.oneway {
            r.set(RpcStatus::Successful);
        }
    }

    /// Persistent RPCs sent on `session` and not acknowledged go back to QUEUED (or TIMEOUT
    /// once their re-sends are used up).
    pub(super) fn requeue_unacked(&mut self, session: SessionId, _now: u64) {
        for r in &mut self.rpcs {
            if r.status == RpcStatus::Sent && r.sent_on.is_some_and(|(s, _)| s == session) {
                r.sent_on = None;
                if r.sends <= r.retries {
                    r.set(RpcStatus::Queued);
                } else {
                    r.set(RpcStatus::Timeout);
                }
            }
        }
    }

    /// `v1/gateway/rpc` from a gateway: the reply to call `id` of `device`. Returns whether
    /// anything waited for it.
    pub fn rpc_reply(&mut self, device: &str, id: u64, data: Value, now: u64) -> bool {
        let mut matched = false;
        if let Some(tx) = self.waiters.remove(&(device.to_string(), id)) {
            matched = tx.send(data.clone()).is_ok();
        } else if let Some(r) = self.rpcs.iter_mut().find(|r| {
            r.device == device
                && r.request_id == id
                && !r.oneway
                && !r.status.is_final()
                && r.sends > 0
        }) {
            // A reply may overtake the PUBACK of the request it answers.
            if r.status != RpcStatus::Delivered {
                r.history.push(RpcStatus::Delivered);
            }
            r.sent_on = None;
            let failed = data.get("error").is_some();
            r.response = data.clone();
            r.set(if failed {
                RpcStatus::Failed
            } else {
                RpcStatus::Successful
            });
            matched = true;
        }
        self.event(
            now,
            "rpc_reply",
            Some(device),
            json!({"id": id, "data": data, "matched": matched}),
        );
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thingsboard::state::Command;
    use crate::thingsboard::wire::Outbound;
    use tokio::sync::mpsc;

    fn request(body: Value) -> RpcRequest {
        serde_json::from_value(body).unwrap()
    }

    fn online(st: &mut State) -> (SessionId, mpsc::UnboundedReceiver<Command>) {
        st.register_gateway("gw", "tok");
        let (tx, rx) = mpsc::unbounded_channel();
        let s = st.open_session("gw", tx, json!({}), 0);
        st.subscribe(s, &["v1/gateway/rpc".to_string()]);
        st.connect_device("gw", "Dev", None, 0);
        (s, rx)
    }

    fn sent_pkid(rx: &mut mpsc::UnboundedReceiver<Command>) -> (u16, Value) {
        match rx.try_recv() {
            Ok(Command::Send(Outbound::Publish { pkid, payload, .. })) => {
                (pkid, serde_json::from_slice(&payload).unwrap())
            }
            other => panic!("expected a publish, got {other:?}"),
        }
    }

    #[test]
    fn persistent_twoway_is_resent_with_its_id_after_a_drop_and_succeeds_on_reply() {
        let mut st = State::default();
        let id = st.create_persistent(
            "Dev",
            false,
            request(json!({"method": "m", "params": {"x": 1}, "timeout": 1000})),
            "r1".into(),
            0,
        );
        st.deliver_due(1);
        assert_eq!(st.persistent(&id).unwrap()["status"], "QUEUED");
        let (s, mut rx) = online(&mut st);
        st.deliver_due(2);
        let (_, payload) = sent_pkid(&mut rx);
        assert_eq!(
            payload,
            json!({"device": "Dev", "data": {"id": 1, "method": "m", "params": {"x": 1}}})
        );
        st.end_session(s, "test", 3);
        assert_eq!(st.persistent(&id).unwrap()["status"], "QUEUED");
        let (s, mut rx) = {
            let (tx, rx) = mpsc::unbounded_channel();
            let s = st.open_session("gw", tx, json!({}), 4);
            st.subscribe(s, &["v1/gateway/rpc".to_string()]);
            st.connect_device("gw", "Dev", None, 4);
            (s, rx)
        };
        st.deliver_due(5);
        let (pkid, payload) = sent_pkid(&mut rx);
        assert_eq!(payload["data"]["id"], 1);
        st.puback(s, pkid, 6);
        assert_eq!(st.persistent(&id).unwrap()["status"], "DELIVERED");
        assert!(st.rpc_reply("Dev", 1, json!({"ok": true}), 7));
        let v = st.persistent(&id).unwrap();
        assert_eq!(v["status"], "SUCCESSFUL");
        assert_eq!(v["sends"], 2);
        assert_eq!(
            v["history"],
            json!([
                "QUEUED",
                "SENT",
                "QUEUED",
                "SENT",
                "DELIVERED",
                "SUCCESSFUL"
            ])
        );
    }

    #[test]
    fn persistent_rpcs_time_out_expire_and_fail() {
        let mut st = State::default();
        let (s, mut rx) = online(&mut st);
        let t = st.create_persistent(
            "Dev",
            false,
            request(json!({"method": "t", "timeout": 100, "retries": 1})),
            "t".into(),
            0,
        );
        st.deliver_due(0);
        let (p1, _) = sent_pkid(&mut rx);
        st.puback(s, p1, 1);
        st.deliver_due(100);
        let (p2, again) = sent_pkid(&mut rx);
        assert_eq!(again["data"]["id"], 1);
        st.puback(s, p2, 101);
        st.deliver_due(250);
        assert_eq!(st.persistent(&t).unwrap()["status"], "TIMEOUT");

        let e = st.create_persistent(
            "Nobody",
            true,
            request(json!({"method": "e", "expirationTime": 300})),
            "e".into(),
            250,
        );
        st.deliver_due(301);
        let v = st.persistent(&e).unwrap();
        assert_eq!(
            (v["status"].clone(), v["sends"].clone()),
            (json!("EXPIRED"), json!(0))
        );

        let f = st.create_persistent(
            "Dev",
            false,
            request(json!({"method": "f"})),
            "f".into(),
            400,
        );
        st.deliver_due(400);
        let (_, sent) = sent_pkid(&mut rx);
        let rid = sent["data"]["id"].as_u64().unwrap();
        assert!(st.rpc_reply("Dev", rid, json!({"error": "no such method"}), 401));
        let v = st.persistent(&f).unwrap();
        assert_eq!(v["status"], "FAILED");
        assert_eq!(v["response"], json!({"error": "no such method"}));
        assert!(!st.rpc_reply("Dev", 99, json!({}), 402));
    }
}
