//! A ThingsBoard server emulator for end-to-end tests of the `thingsboard` cloud profile: a
//! small MQTT 3.1.1/5 server speaking ThingsBoard's gateway MQTT API (`server`, `topics`,
//! `wire`), ThingsBoard's RPC semantics (`rpc`), the state both share (`state`) and an
//! operator HTTP API (`api`). [`run`] is the library entry of the `tb-emulator` binary;
//! [`TbEmulator`] starts that binary from a test and wraps the operator API.

pub mod api;
pub mod rpc;
pub mod server;
pub mod state;
pub mod topics;
pub mod wire;

use crate::{delete, eventually, get, post, Proc};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The state and the delivery loop's wake-up, shared by every task.
#[derive(Debug, Default)]
pub struct Shared {
    state: Mutex<state::State>,
    /// Wakes the persistent RPC delivery loop.
    pub wake: Notify,
}

impl Shared {
    /// Locks the state; never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, state::State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Server time, epoch milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Serves MQTT on `mqtt` and the operator API on `api` until `shutdown`, with `gateways`
/// (name, access token) registered.
pub async fn run(
    gateways: &[(String, String)],
    mqtt: TcpListener,
    api: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let shared = Arc::new(Shared::default());
    for (name, token) in gateways {
        ensure!(
            shared.lock().register_gateway(name, token),
            "gateway {name}: its token is already taken"
        );
    }
    let mqtt = tokio::spawn(server::serve(shared.clone(), mqtt, shutdown.clone()));
    let delivery = tokio::spawn(server::deliver(shared.clone(), shutdown.clone()));
    let stop = shutdown.clone();
    axum::serve(api, api::router(shared))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .context("operator api")?;
    mqtt.await?;
    delivery.await?;
    Ok(())
}

/// A running `tb-emulator` process and its operator API.
pub struct TbEmulator {
    pub proc: Proc,
    /// MQTT listener, `127.0.0.1:PORT`.
    pub mqtt_addr: String,
    /// Operator API base, `http://127.0.0.1:PORT`.
    pub api: String,
}

impl TbEmulator {
    /// Starts the emulator with these (gateway name, access token) pairs registered; its log
    /// is `dir/tb-emulator.log`.
    pub async fn start(dir: &Path, gateways: &[(&str, &str)]) -> Result<TbEmulator> {
        let mut args = Vec::new();
        for (name, token) in gateways {
            args.push("--gateway".to_string());
            args.push(format!("{name}:{token}"));
        }
        let (proc, ready) = Proc::start("tb-emulator", &args, dir, "tb-emulator").await?;
        let field = |k: &str| {
            ready[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("ready line lacks {k}: {ready}"))
        };
        Ok(TbEmulator {
            mqtt_addr: field("mqtt")?,
            api: field("api")?,
            proc,
        })
    }

    /// The MQTT port.
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }

    /// `POST /api/devices/{device}/attributes/SHARED_SCOPE`; returns whether it was pushed.
    pub async fn set_shared(&self, device: &str, values: Value) -> Result<bool> {
        let url = format!("{}/api/devices/{device}/attributes/SHARED_SCOPE", self.api);
        let (s, b) = post(&url, &values).await?;
        ensure!(s == 200, "set shared attributes of {device}: {s} {b}");
        Ok(b["pushed"] == true)
    }

    /// `DELETE /api/devices/{device}/attributes/SHARED_SCOPE?keys=a,b`; returns whether the
    /// deletion was pushed.
    pub async fn delete_shared(&self, device: &str, keys: &[&str]) -> Result<bool> {
        let url = format!(
            "{}/api/devices/{device}/attributes/SHARED_SCOPE?keys={}",
            self.api,
            keys.join(",")
        );
        let (s, b) = delete(&url).await?;
        ensure!(s == 200, "delete shared attributes of {device}: {s} {b}");
        Ok(b["pushed"] == true)
    }

    /// `GET /api/devices/{device}/attributes`: `{"client": {..}, "shared": {..}}`.
    pub async fn attributes(&self, device: &str) -> Result<Value> {
        self.get_ok(&format!("/api/devices/{device}/attributes"))
            .await
    }

    /// `GET /api/devices/{device}/telemetry`: `[{"ts", "values"}, ..]`.
    pub async fn telemetry(&self, device: &str) -> Result<Value> {
        self.get_ok(&format!("/api/devices/{device}/telemetry"))
            .await
    }

    /// `GET /api/devices/{name}`, None when unknown.
    pub async fn device(&self, name: &str) -> Result<Option<Value>> {
        let (s, b) = get(&format!("{}/api/devices/{name}", self.api)).await?;
        match s {
            200 => Ok(Some(b)),
            404 => Ok(None),
            _ => bail!("device {name}: {s} {b}"),
        }
    }

    /// Waits until `device` exists with `active == active`.
    pub async fn await_active(&self, device: &str, active: bool) -> Result<Value> {
        eventually(
            &format!("{device} active={active}"),
            Duration::from_secs(20),
            || async move { Ok(self.device(device).await?.filter(|d| d["active"] == active)) },
        )
        .await
    }

    /// `POST /api/rpc/twoway/{device}` -> (status, body).
    pub async fn rpc_twoway(&self, device: &str, body: Value) -> Result<(u16, Value)> {
        post(&format!("{}/api/rpc/twoway/{device}", self.api), &body).await
    }

    /// `POST /api/rpc/oneway/{device}` -> (status, body).
    pub async fn rpc_oneway(&self, device: &str, body: Value) -> Result<(u16, Value)> {
        post(&format!("{}/api/rpc/oneway/{device}", self.api), &body).await
    }

    /// A persistent RPC (`"persistent": true` is set on `body`); returns its `rpcId`.
    pub async fn rpc_persistent(&self, device: &str, oneway: bool, body: Value) -> Result<String> {
        let mut body = body;
        body["persistent"] = json!(true);
        let kind = if oneway { "oneway" } else { "twoway" };
        let (s, b) = post(&format!("{}/api/rpc/{kind}/{device}", self.api), &body).await?;
        ensure!(s == 200, "persistent rpc to {device}: {s} {b}");
        b["rpcId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no rpcId in {b}"))
    }

    /// `GET /api/rpc/persistent/{rpc_id}`.
    pub async fn persistent(&self, rpc_id: &str) -> Result<Value> {
        self.get_ok(&format!("/api/rpc/persistent/{rpc_id}")).await
    }

    /// Waits until persistent RPC `rpc_id` has `status`.
    pub async fn await_persistent(&self, rpc_id: &str, status: &str) -> Result<Value> {
        eventually(
            &format!("persistent rpc {rpc_id} {status}"),
            Duration::from_secs(30),
            || async move {
                let v = self.persistent(rpc_id).await?;
                Ok((v["status"] == status).then_some(v))
            },
        )
        .await
    }

    /// `GET /api/events?since=N`: events with `seq > since`, in order.
    pub async fn events(&self, since: u64) -> Result<Vec<Value>> {
        let v = self.get_ok(&format!("/api/events?since={since}")).await?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("events: not a list: {v}"))
    }

    /// Waits for the first event after `since` that satisfies `check`.
    pub async fn await_event<F>(&self, since: u64, what: &str, check: F) -> Result<Value>
    where
        F: Fn(&Value) -> bool,
    {
        let check = &check;
        eventually(what, Duration::from_secs(20), || async move {
            Ok(self.events(since).await?.into_iter().find(|e| check(e)))
        })
        .await
    }

    /// `POST /api/sessions/{gateway}/drop`: closes the gateway's session without a
    /// DISCONNECT; returns whether there was one.
    pub async fn drop_session(&self, gateway: &str) -> Result<bool> {
        let url = format!("{}/api/sessions/{gateway}/drop", self.api);
        let (s, b) = post(&url, &json!({})).await?;
        ensure!(s == 200, "drop session of {gateway}: {s} {b}");
        Ok(b["dropped"] == true)
    }

    /// `GET /api/gateways`.
    pub async fn gateways(&self) -> Result<Value> {
        self.get_ok("/api/gateways").await
    }

    async fn get_ok(&self, path: &str) -> Result<Value> {
        let (s, b) = get(&format!("{}{path}", self.api)).await?;
        ensure!(s == 200, "GET {path}: {s} {b}");
        Ok(b)
    }
}
