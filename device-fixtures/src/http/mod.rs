//! A fleet of simulated legacy HTTP devices (AGVs) with faults switchable over a control API.
//!
//! Each device serves its API on a listener handed in by the caller; one shared control
//! listener exposes `/_control/...` to inspect devices and switch their faults.
//! `config`, `faults` and the motion rules in `device` are plain data with no I/O; `api`
//! and `control` are the HTTP surfaces; `link` owns each device's listening socket.

mod api;
pub mod config;
mod control;
mod device;
pub mod faults;
mod link;

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use control::Fleet;
use device::Device;

/// Hard ceiling for `maxSpeed` when a spec does not say otherwise.
pub const DEFAULT_MAX_SPEED_LIMIT: f64 = 20.0;

/// What distinguishes one simulated HTTP device from another.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpDeviceSpec {
    /// Device name, unique within a fleet; also reported by `/api/status`.
    pub name: String,
    /// Hard ceiling for the `maxSpeed` setting; larger requests are clamped to it.
    pub max_speed_limit: f64,
}

impl HttpDeviceSpec {
    /// A device called `name` with the default speed limit.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_speed_limit: DEFAULT_MAX_SPEED_LIMIT,
        }
    }
}

/// Runs simulated devices, each serving its API on its own listener, plus the shared
/// control API on `control`, until `shutdown` is cancelled.
///
/// Fails with `InvalidInput` if two devices share a name or a speed limit is negative
/// or not finite, and otherwise only if the control server fails.
pub async fn run_http_fleet(
    devices: Vec<(HttpDeviceSpec, TcpListener)>,
    control: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let now = Instant::now();
    let mut fleet = Fleet::default();
    let mut links = Vec::with_capacity(devices.len());
    for (spec, listener) in devices {
        if !(spec.max_speed_limit.is_finite() && spec.max_speed_limit >= 0.0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "device '{}' max_speed_limit must be a finite number >= 0",
                    spec.name
                ),
            ));
        }
        let addr = listener.local_addr()?;
        let device = Arc::new(Device::new(spec.name, spec.max_speed_limit, addr, now));
        fleet.insert(device.clone())?;
        links.push((device, listener));
    }

    let stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    let count = links.len();
    for (device, listener) in links {
        tracker.spawn(link::supervise(device, listener, stop.clone()));
    }
    tracker.close();
    tracing::info!(devices = count, control = %control.local_addr()?, "http fleet running");

    let served = axum::serve(control, control::router(Arc::new(fleet), stop.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    tracker.wait().await;
    tracing::info!("http fleet stopped");
    served
}
