//! A fleet of simulated legacy HTTP devices (AGVs) with faults switchable over a control API.
//!
//! Each device serves its API on a listener handed in by the caller; one shared control
//! listener exposes `/_control/...` to inspect devices and switch their faults.
//! `config`, `faults` and the motion rules in `device` are plain data with no I/O; `api`
//! and `control` are the HTTP surfaces, `inject` the fault layer in front of `api`; `link`
//! owns each device's listening socket and `conn` its accepted connections.

mod api;
pub mod config;
mod conn;
mod control;
mod device;
pub mod faults;
mod inject;
mod link;

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use control::Fleet;
use device::Device;
use faults::Faults;

/// Hard ceiling for `maxSpeed` when a spec does not say otherwise.
pub const DEFAULT_MAX_SPEED_LIMIT: f64 = 20.0;

/// What distinguishes one simulated HTTP device from another.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpDeviceSpec {
    /// Device name, unique within a fleet; also reported by `/api/status`.
    pub name: String,
    /// Hard ceiling for the `maxSpeed` setting; larger requests are clamped to it.
    pub max_speed_limit: f64,
    /// Faults and habits the device starts with (e.g. `no_health` for a device without a
    /// health endpoint); resetting its faults returns to these.
    pub faults: Faults,
}

impl HttpDeviceSpec {
    /// A device called `name` with the default speed limit and no faults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_speed_limit: DEFAULT_MAX_SPEED_LIMIT,
            faults: Faults::default(),
        }
    }

    /// The same device, starting with `faults`.
    pub fn with_faults(self, faults: Faults) -> Self {
        Self { faults, ..self }
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
        let device = Arc::new(Device::new(
            spec.name,
            spec.max_speed_limit,
            addr,
            spec.faults,
            now,
        ));
        fleet.insert(device.clone())?;
        // A device that starts offline refuses connections from the start.
        let listener = (!device.faults.borrow().offline).then_some(listener);
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
