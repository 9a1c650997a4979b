//! A simulated serial temperature controller on a pseudo-terminal, with faults switchable
//! over a control API.
//!
//! The simulator creates the pty itself; a gateway opens the slave path (or the stable link
//! given with `link`, which survives the `disappear` fault: the pty is closed and the link
//! removed, and clearing the fault creates a new pty and points the link at it). `controller`,
//! `frame` and `faults` are plain data with no I/O; `line` serves the pty; `control` is the
//! HTTP API.

mod control;
pub mod controller;
pub mod faults;
pub mod frame;
mod line;
pub(crate) mod pty;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use controller::Controller;
use faults::Faults;
use pty::Pty;

/// What the simulated line looks like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SerialSimSpec {
    /// Unit addresses on the line (RS-485); empty for one unaddressed unit.
    pub addresses: Vec<String>,
    /// A stable path kept pointing at the current pty (a symlink).
    pub link: Option<PathBuf>,
    /// Faults and habits the line starts with; resetting the faults returns to these.
    pub faults: Faults,
}

/// State shared by the line task and the control API.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub faults: watch::Sender<Faults>,
    /// Faults the line started with.
    pub initial_faults: Faults,
    /// The current pty path; `None` while the port has disappeared.
    pub path: watch::Sender<Option<String>>,
    pub link: Option<PathBuf>,
}

pub(crate) struct State {
    pub controller: Controller,
    /// Request lines received, whatever became of them.
    pub requests: u64,
    /// Commands acted on, per unit address and command name (`SETP`, `TEMP?`, ...).
    pub executed: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Addressed requests counted towards `busy_every` since it was set.
    pub busy_seen: u64,
}

impl State {
    /// Records that the unit at `address` acted on the command `name`.
    pub fn acted(&mut self, address: &str, name: &'static str) {
        *self
            .executed
            .entry(address.to_owned())
            .or_default()
            .entry(name)
            .or_default() += 1;
    }

    /// Commands acted on per command name, all units together, and their total.
    pub fn executed_totals(&self) -> (BTreeMap<&'static str, u64>, u64) {
        let mut totals = BTreeMap::new();
        for (name, n) in self.executed.values().flatten() {
            *totals.entry(*name).or_default() += n;
        }
        let sum = totals.values().sum();
        (totals, sum)
    }
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A simulator whose first pty is open; `run` serves it.
pub struct SerialSim {
    shared: Arc<Shared>,
    pty: Pty,
}

impl SerialSim {
    /// Creates the pty (and the link); needs a tokio runtime.
    pub fn open(spec: SerialSimSpec) -> io::Result<SerialSim> {
        let pty = Pty::open()?;
        if let Some(link) = &spec.link {
            pty::link(link, &pty.path)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                controller: Controller::new(&spec.addresses),
                requests: 0,
                executed: BTreeMap::new(),
                busy_seen: 0,
            }),
            faults: watch::Sender::new(spec.faults.clone()),
            initial_faults: spec.faults,
            path: watch::Sender::new(Some(pty.path.clone())),
            link: spec.link,
        });
        Ok(SerialSim { shared, pty })
    }

    /// The slave path a gateway opens, `/dev/pts/N`.
    pub fn path(&self) -> &str {
        &self.pty.path
    }

    /// Serves the line and the control API on `control` until `shutdown`; removes the link
    /// on the way out.
    pub async fn run(self, control: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let stop = shutdown.child_token();
        let line = tokio::spawn(line::supervise(self.shared.clone(), self.pty, stop.clone()));
        tracing::info!(path = %self.shared.path.borrow().clone().unwrap_or_default(), control = %control.local_addr()?, "serial simulator running");
        let served = axum::serve(control, control::router(self.shared.clone(), stop.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .await;
        stop.cancel();
        let _ = line.await;
        if let Some(link) = &self.shared.link {
            pty::unlink(link);
        }
        tracing::info!("serial simulator stopped");
        served
    }
}
