//! State of one simulated AGV: settings, motion, counters and faults, behind one lock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::config::DeviceConfig;
use super::faults::Faults;

/// Battery charge every simulated device reports.
const BATTERY_PERCENT: f64 = 87.5;

/// One device as shared by its API server, its link supervisor and the control API.
#[derive(Debug)]
pub(crate) struct Device {
    /// Name given in the spec; unique in a fleet.
    pub name: String,
    /// Hard ceiling for `maxSpeed`.
    pub limit: f64,
    /// Address of the API listener, rebound at the same port after an offline fault.
    pub addr: SocketAddr,
    /// Current faults; the API and the link supervisor watch it.
    pub faults: watch::Sender<Faults>,
    /// Faults the device started with; a faults reset returns to them.
    pub initial_faults: Faults,
    /// Whether the API listener is open; the link supervisor is its only writer.
    pub listening: watch::Sender<bool>,
    state: Mutex<DeviceState>,
}

impl Device {
    pub fn new(name: String, limit: f64, addr: SocketAddr, faults: Faults, now: Instant) -> Self {
        Self {
            name,
            limit,
            addr,
            // Devices are created with a listener already bound, closed at once if offline.
            listening: watch::Sender::new(!faults.offline),
            faults: watch::Sender::new(faults.clone()),
            initial_faults: faults,
            state: Mutex::new(DeviceState::new(limit, now)),
        }
    }

    /// `http://ip:port` of the device API.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Locks the mutable state; never held across an await.
    pub fn state(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Mutable part of a device.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub config: DeviceConfig,
    position: (f64, f64),
    /// Speed and end time of the current move, if any.
    motion: Option<(f64, Instant)>,
    booted: Instant,
    pub restarts: u64,
    /// Requests arrived per path, whatever became of them.
    pub requests: BTreeMap<String, u64>,
    /// Requests acted on per path (not those refused busy or by a fault before the device
    /// saw them).
    pub executed: BTreeMap<String, u64>,
    /// Requests acted on per `X-Message-Id`.
    pub executions: BTreeMap<String, u64>,
    /// Requests (other than `/health`) counted towards `busy_every` since it was set.
    pub busy_seen: u64,
}

/// Why a move was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum MoveError {
    #[error("move must be a JSON object")]
    NotAnObject,
    #[error("'{0}' must be a number")]
    NotANumber(&'static str),
    #[error("speed {speed} above maxSpeed {max}")]
    TooFast { speed: f64, max: f64 },
    #[error("speed {0} too low to move")]
    TooSlow(f64),
}

impl DeviceState {
    fn new(limit: f64, now: Instant) -> Self {
        Self {
            config: DeviceConfig::initial(limit),
            position: (0.0, 0.0),
            motion: None,
            booted: now,
            restarts: 0,
            requests: BTreeMap::new(),
            executed: BTreeMap::new(),
            executions: BTreeMap::new(),
            busy_seen: 0,
        }
    }

    /// Records the arrival of one request to `path`.
    pub fn arrived(&mut self, path: &str) {
        *self.requests.entry(path.to_owned()).or_default() += 1;
    }

    /// Records that the device acted on a request to `path`, carrying `message_id` if given.
    pub fn acted(&mut self, path: &str, message_id: Option<&str>) {
        *self.executed.entry(path.to_owned()).or_default() += 1;
        if let Some(id) = message_id {
            *self.executions.entry(id.to_owned()).or_default() += 1;
        }
    }

    /// Counts one more request towards `busy_every` and returns its number.
    pub fn next_busy_count(&mut self) -> u64 {
        self.busy_seen += 1;
        self.busy_seen
    }

    /// The `/api/status` document at `now`.
    pub fn status(&self, name: &str, now: Instant) -> Value {
        let speed = match self.motion {
            Some((speed, until)) if now < until => speed,
            _ => 0.0,
        };
        json!({
            "name": name,
            "state": if speed > 0.0 { "moving" } else { "idle" },
            "battery": BATTERY_PERCENT,
            "speed": speed,
            "position": {"x": self.position.0, "y": self.position.1},
            "uptime_s": now.saturating_duration_since(self.booted).as_secs(),
        })
    }

    /// Starts a move described by `{"x", "y", "speed"?}` and returns its ETA in seconds.
    pub fn start_move(&mut self, body: &Value, now: Instant) -> Result<f64, MoveError> {
        let body = body.as_object().ok_or(MoveError::NotAnObject)?;
        let coord = |key| {
            body.get(key)
                .and_then(Value::as_f64)
                .ok_or(MoveError::NotANumber(key))
        };
        let (x, y) = (coord("x")?, coord("y")?);
        let max = self.config.max_speed;
        let speed = match body.get("speed") {
            None | Some(Value::Null) => max,
            Some(v) => v.as_f64().ok_or(MoveError::NotANumber("speed"))?,
        };
        if speed > max {
            return Err(MoveError::TooFast { speed, max });
        }
        let distance = (x - self.position.0).hypot(y - self.position.1);
        if speed <= 0.0 && distance > 0.0 {
            return Err(MoveError::TooSlow(speed));
        }
        let eta_s = if distance > 0.0 {
            distance / speed
        } else {
            0.0
        };
        self.position = (x, y);
        self.motion = Some((speed, now + Duration::from_secs_f64(eta_s.min(1e9))));
        Ok(eta_s)
    }

    /// Simulates a reboot: counts it, stops motion and restarts the uptime clock.
    pub fn restart(&mut self, now: Instant) {
        self.restarts += 1;
        self.motion = None;
        self.booted = now;
    }

    /// Power-cycles the device: settings back to the factory ones, at the origin, at rest,
    /// uptime from `now`. The counters (an observer's, not the device's) are kept.
    pub fn power_cycle(&mut self, limit: f64, now: Instant) {
        self.config = DeviceConfig::initial(limit);
        self.position = (0.0, 0.0);
        self.motion = None;
        self.booted = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (DeviceState, Instant) {
        let now = Instant::now();
        (DeviceState::new(20.0, now), now)
    }

    #[test]
    fn move_defaults_to_max_speed_and_reports_eta() {
        let (mut s, now) = state();
        assert_eq!(s.start_move(&json!({"x": 30, "y": 40}), now), Ok(5.0));
        let status = s.status("agv-1", now + Duration::from_secs(1));
        assert_eq!(status["state"], "moving");
        assert_eq!(status["speed"], 10.0);
        assert_eq!(status["position"], json!({"x": 30.0, "y": 40.0}));
        assert_eq!(status["uptime_s"], 1);
        let later = s.status("agv-1", now + Duration::from_secs(6));
        assert_eq!(later["state"], "idle");
        assert_eq!(later["speed"], 0.0);
    }

    #[test]
    fn move_checks_speed_and_coordinates() {
        let (mut s, now) = state();
        s.config.max_speed = 20.0;
        let err = s
            .start_move(&json!({"x": 1, "y": 1, "speed": 30}), now)
            .unwrap_err();
        assert_eq!(err.to_string(), "speed 30 above maxSpeed 20");
        assert_eq!(
            s.start_move(&json!({"x": 1}), now),
            Err(MoveError::NotANumber("y"))
        );
        assert_eq!(
            s.start_move(&json!({"x": "1", "y": 2}), now),
            Err(MoveError::NotANumber("x"))
        );
        assert_eq!(
            s.start_move(&json!({"x": 1, "y": 2, "speed": 0}), now),
            Err(MoveError::TooSlow(0.0))
        );
        assert_eq!(
            s.status("agv-1", now)["position"],
            json!({"x": 0.0, "y": 0.0})
        );
    }

    #[test]
    fn counts_paths_and_message_ids() {
        let (mut s, now) = state();
        s.arrived("/api/move");
        s.arrived("/api/move");
        s.arrived("/health");
        s.acted("/api/move", Some("m-1"));
        s.acted("/health", None);
        assert_eq!(s.requests["/api/move"], 2);
        assert_eq!(s.requests["/health"], 1);
        assert_eq!(s.executed["/api/move"], 1);
        assert_eq!(s.executions["m-1"], 1);
        s.restart(now);
        assert_eq!(s.restarts, 1);
    }

    #[test]
    fn power_cycle_restores_factory_state_and_keeps_counters() {
        let (mut s, now) = state();
        s.config
            .merge(&json!({"maxSpeed": 15, "led": true}), 20.0)
            .unwrap();
        s.start_move(&json!({"x": 3, "y": 4}), now).unwrap();
        s.acted("/api/move", Some("m-1"));
        let later = now + Duration::from_secs(100);
        s.power_cycle(20.0, later);
        assert_eq!(s.config, DeviceConfig::initial(20.0));
        let status = s.status("agv-1", later);
        assert_eq!(status["position"], json!({"x": 0.0, "y": 0.0}));
        assert_eq!(
            (status["state"].clone(), status["uptime_s"].clone()),
            (json!("idle"), json!(0))
        );
        assert_eq!(s.executions["m-1"], 1);
    }
}
