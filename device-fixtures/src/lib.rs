//! Simulated legacy devices for gatewayd's tests and benchmarks, with faults on demand.
//!
//! [`http`] hosts a fleet of HTTP AGVs behind one control API; [`serial`] simulates a
//! serial temperature controller (one or several units on one line) on a pseudo-terminal;
//! [`modbus`] simulates Modbus slaves from a register map, over TCP and RTU on a
//! pseudo-terminal.
//! The caller binds every listener and passes a shutdown token, so tests run the real thing
//! in-process.

pub mod http;
pub mod modbus;
pub mod serial;

pub use http::{run_http_fleet, HttpDeviceSpec};
pub use modbus::ModbusSim;
pub use serial::{SerialSim, SerialSimSpec};
