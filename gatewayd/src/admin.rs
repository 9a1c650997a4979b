//! The local admin HTTP API (`[admin]`): liveness, readiness, Prometheus metrics and read-only
//! JSON views of devices, the inbox and twins. It has no authentication and changes nothing;
//! the default listener is on loopback.
//!
//! - `GET /healthz`: `200 {"ok":true}` while the process serves requests.
//! - `GET /readyz`: `200 {"ready":true}` when the store answers and the cloud session is
//!   connected, else `503 {"ready":false,"reasons":[...]}`.
//! - `GET /metrics`: the text format of [`crate::metrics`]; queue depths are read from SQLite
//!   here, at scrape time, never on the hot paths.
//! - `GET /api/devices`, `/api/inbox`, `/api/twins`: what the gateway holds, as JSON.
//!
//! The caller binds the listener (the binary, from `admin.listen`); this module serves it.

use crate::device::Devices;
use crate::metrics::{Gauges, Metrics};
use crate::store::Store;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Rows returned at most by the list views.
const MAX_ROWS: i64 = 1000;
/// How long readiness waits for the store to answer.
const STORE_PROBE: Duration = Duration::from_secs(2);

/// What the handlers read.
pub struct AdminState {
    pub devices: Arc<Devices>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Whether the cloud session is connected.
    pub connected: watch::Receiver<bool>,
    /// Cancelled when the daemon starts shutting down (readiness turns false).
    pub shutdown: CancellationToken,
    /// The critical tasks; readiness names any that stopped.
    pub tasks: crate::supervise::Supervisor,
    /// The running configuration's fingerprint and the last reload.
    pub reload: Arc<crate::reload::Status>,
}

/// The routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/inbox", get(inbox))
        .route("/api/twins", get(twins))
        .route("/api/config", get(config_status))
        .with_state(state)
}

/// Takes over `listener` (bound by the caller), logs its address and writes it to
/// `address_file`; the returned future serves requests until `stop`.
pub fn serve(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    address_file: Option<&Path>,
    stop: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    info!(addr = %addr, "admin listening");
    if let Some(path) = address_file {
        write_address(path, addr)?;
    }
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .into_future();
    Ok(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "admin listener stopped");
        }
    })
}

/// Writes `addr` and a newline to `path` through a temporary file and a rename, so a reader
/// never sees a partial address.
fn write_address(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

async fn healthz() -> Json<Value> {
    Json(json!({"ok": true}))
}

/// Why the gateway is not ready, empty when it is.
pub async fn not_ready_reasons(state: &AdminState) -> Vec<String> {
    let mut reasons = Vec::new();
    if state.shutdown.is_cancelled() {
        reasons.push("shutting down".to_string());
    }
    // A read answers even on a full disk: the store's write health says whether it commits.
    if let crate::store::Health::Failing(why) = &*state.store.health().borrow() {
        reasons.push(format!("store failing: {why}"));
    }
    match tokio::time::timeout(STORE_PROBE, state.store.call(|_| Ok(()))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => reasons.push("store failing".to_string()),
        Err(_) => reasons.push("store not answering".to_string()),
    }
    if !*state.connected.borrow() {
        reasons.push("cloud not connected".to_string());
    }
    for task in state.tasks.dead() {
        reasons.push(format!("task {task} has stopped"));
    }
    reasons
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let reasons = not_ready_reasons(&state).await;
    if reasons.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let depths = state
        .store
        .call(|c| {
            let inbox: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'running')")?
                .query_row([], |r| r.get(0))?;
            let outbox: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM outbox")?
                .query_row([], |r| r.get(0))?;
            Ok((inbox as u64, outbox as u64))
        })
        .await;
    let (inbox_depth, outbox_depth) = match depths {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "metrics: cannot read queue depths");
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
        }
    };
    let snapshot = state.devices.presence.snapshot();
    let stats = state.store.stats();
    let reload = state.reload.get();
    let gauges = Gauges {
        inbox_depth,
        outbox_depth,
        cloud_connected: *state.connected.borrow(),
        store_queued: stats.queued.load(Relaxed) as u64,
        store_last_batch: stats.last_batch.load(Relaxed) as u64,
        store_commits: stats.commits.load(Relaxed),
        store_commit_seconds: stats.commit_us.load(Relaxed) as f64 / 1e6,
        store_failures: stats.failures.load(Relaxed),
        store_failing: *state.store.health().borrow() != crate::store::Health::Ok,
        devices: snapshot
            .devices
            .iter()
            .map(|(id, s)| (id.to_string(), s.online))
            .collect(),
        config_fingerprint: reload.fingerprint.clone(),
        last_reload: reload.last.as_ref().map(|(at, o)| (*at, o.kind())),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&gauges),
    )
        .into_response()
}

async fn devices(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let snapshot = state.devices.presence.snapshot();
    let list: Vec<Value> = state
        .devices
        .all()
        .into_iter()
        .map(|d| {
            let status = snapshot.devices.get(&d.id);
            json!({
                "id": d.id,
                "kind": d.config.kind.to_string(),
                "online": status.is_some_and(|s| s.online),
                "since_ms": status.map(|s| s.since_ms),
                "reason": status.and_then(|s| s.reason.clone()),
                "methods": d.actions.methods.keys().collect::<Vec<_>>(),
                "twin": d.actions.twin.keys().collect::<Vec<_>>(),
                "commands": d.actions.commands.keys().collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// `?device=ID` narrows a list view to one device.
#[derive(Deserialize)]
struct DeviceFilter {
    device: Option<String>,
}

async fn inbox(
    State(state): State<Arc<AdminState>>,
    Query(filter): Query<DeviceFilter>,
) -> Response {
    let rows = state
        .store
        .call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, device, state, expires_at_ms, received_at_ms, attempts, reason FROM inbox
                 WHERE state IN ('pending', 'running') AND (?1 IS NULL OR device = ?1)
                 ORDER BY seq LIMIT ?2",
            )?;
            let rows = st
                .query_map(rusqlite::params![filter.device, MAX_ROWS], |r| {
                    Ok(json!({
                        "id": r.get::<_, String>(0)?,
                        "device": r.get::<_, String>(1)?,
                        "state": r.get::<_, String>(2)?,
                        "expires_at_ms": r.get::<_, i64>(3)?,
                        "received_at_ms": r.get::<_, i64>(4)?,
                        "attempts": r.get::<_, i64>(5)?,
                        "reason": r.get::<_, Option<String>>(6)?,
                    }))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await;
    list(rows)
}

/// The running configuration's fingerprint and the last reload's time and outcome.
async fn config_status(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let s = state.reload.get();
    Json(json!({
        "fingerprint": s.fingerprint,
        "last_reload": s.last_json(),
    }))
}

async fn twins(
    State(state): State<Arc<AdminState>>,
    Query(filter): Query<DeviceFilter>,
) -> Response {
    let rows = state
        .store
        .call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT device, desired_version, applied_version, desired, reported FROM twin
                 WHERE (?1 IS NULL OR device = ?1) ORDER BY device LIMIT ?2",
            )?;
            let parse = |s: String| serde_json::from_str::<Value>(&s).unwrap_or(Value::Null);
            let rows = st
                .query_map(rusqlite::params![filter.device, MAX_ROWS], |r| {
                    Ok(json!({
                        "device": r.get::<_, String>(0)?,
                        "desired_version": r.get::<_, i64>(1)?,
                        "applied_version": r.get::<_, i64>(2)?,
                        "desired": parse(r.get(3)?),
                        "reported": parse(r.get(4)?),
                    }))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await;
    list(rows)
}

fn list(rows: Result<Vec<Value>, crate::store::StoreError>) -> Response {
    match rows {
        Ok(rows) => Json(Value::Array(rows)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(json!({"code": "internal", "message": message})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use figment::providers::{Format, Toml};

    const CONFIG: &str = r#"
        [gateway]
        id = "site-1"
        [cloud]
        broker = "mqtt://127.0.0.1:1"
        [devices.agv-1]
        kind = "http"
        base_url = "http://127.0.0.1:1"
        [devices.agv-1.methods.status]
        path = "/api/status"
        [devices.agv-1.commands.RESTART]
        verb = "POST"
        path = "/api/restart"
    "#;

    async fn get(url: &str) -> (u16, String) {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let r = client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn health_readiness_metrics_and_views() {
        let dir = tempfile::tempdir().unwrap();
        let mut config: Config = figment::Figment::from(Toml::string(CONFIG))
            .extract()
            .unwrap();
        let devices = Arc::new(Devices::from_config(&mut config, 1).unwrap());
        let store = Store::open(&dir.path().join("g.db")).unwrap();
        store
            .call(|c| {
                c.execute(
                    "INSERT INTO inbox (id, device, payload, expires_at_ms, received_at_ms, state, seq)
                     VALUES ('m1', 'agv-1', '{}', 99, 1, 'pending', 1), ('m0', 'agv-1', '{}', 9, 1, 'completed', 0)",
                    [],
                )
            })
            .await
            .unwrap();
        let (connected_tx, connected) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        metrics.rpc(Ok(()), Duration::from_millis(3));
        let state = Arc::new(AdminState {
            devices,
            store,
            metrics,
            connected,
            shutdown: CancellationToken::new(),
            tasks: crate::supervise::Supervisor::new(CancellationToken::new()),
            reload: Arc::new(crate::reload::Status::default()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let file = dir.path().join("admin.addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, state.clone(), Some(&file), stop.clone()).unwrap());
        let addr = std::fs::read_to_string(&file).unwrap();
        let base = format!("http://{}", addr.trim());

        assert_eq!(
            get(&format!("{base}/healthz")).await,
            (200, r#"{"ok":true}"#.into())
        );
        assert_eq!(
            get(&format!("{base}/readyz")).await,
            (
                503,
                r#"{"ready":false,"reasons":["cloud not connected"]}"#.into()
            )
        );
        connected_tx.send_replace(true);
        assert_eq!(
            get(&format!("{base}/readyz")).await,
            (200, r#"{"ready":true}"#.into())
        );

        let (s, text) = get(&format!("{base}/metrics")).await;
        assert_eq!(s, 200);
        for want in [
            "gatewayd_rpc_total{outcome=\"ok\"} 1\n",
            "gatewayd_inbox_depth 1\n",
            "gatewayd_outbox_depth 0\n",
            "gatewayd_cloud_connected 1\n",
            "gatewayd_device_up{device=\"agv-1\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }

        let (s, body) = get(&format!("{base}/api/devices")).await;
        assert_eq!(s, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["id"], "agv-1");
        assert_eq!(v[0]["online"], true);
        assert_eq!(v[0]["methods"], json!(["status"]));
        assert_eq!(v[0]["commands"], json!(["RESTART"]));

        let (_, body) = get(&format!("{base}/api/inbox")).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v.as_array().unwrap().len(),
            1,
            "final messages are not listed: {v}"
        );
        assert_eq!(v[0]["id"], "m1");
        assert_eq!(v[0]["expires_at_ms"], 99);
        let (_, body) = get(&format!("{base}/api/inbox?device=other")).await;
        assert_eq!(body, "[]");
        let (_, body) = get(&format!("{base}/api/twins")).await;
        assert_eq!(body, "[]");

        state.shutdown.cancel();
        let (s, body) = get(&format!("{base}/readyz")).await;
        assert_eq!((s, body.contains("shutting down")), (503, true));
        stop.cancel();
        task.await.unwrap();
    }
}
