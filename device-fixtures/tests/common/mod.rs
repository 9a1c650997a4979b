//! Harnesses shared by the integration tests: the real fleet and the real serial simulator,
//! in-process on `127.0.0.1:0` listeners and fresh ptys.
// Each test file uses its own part of the harness.
#![allow(dead_code)]

pub mod fleet;
pub mod serial;

use std::time::Duration;

/// Guard against a broken fixture hanging the test run; no test waits this long when it passes.
pub const GUARD: Duration = Duration::from_secs(10);
