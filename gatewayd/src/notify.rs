//! systemd service notifications (`sd_notify(3)`), written by hand: datagrams of `KEY=value`
//! lines sent to the Unix socket named by `NOTIFY_SOCKET` (a path, or an abstract socket when it
//! starts with `@`). Without that variable every call is a no-op, so the daemon runs the same
//! under systemd (`Type=notify` or `Type=notify-reload`), another supervisor, or a terminal.
//!
//! What gatewayd sends: `READY=1` once the configuration is valid, the store is open and the
//! first cloud connection attempt has started; `STATUS=...` as the cloud connection and device
//! presence change; `RELOADING=1` and `READY=1` around a SIGHUP; `STOPPING=1` at shutdown; and
//! `WATCHDOG=1` at half of `WATCHDOG_USEC` when the unit sets `WatchdogSec=`.
//!
//! The watchdog ping comes from a tokio task on the daemon's runtime, and only after a no-op job
//! went through the store thread within the period. A wedged runtime (every worker blocked) or a
//! hung store thread (disk stalled) therefore stops the pings, and systemd restarts gatewayd. A
//! lost cloud connection does not: reconnecting is gatewayd's own job, and a restart would not
//! bring the uplink back. The binary reads the environment; this module gets the values.

use crate::device::Devices;
use crate::store::Store;
use std::ffi::OsStr;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Handle for notifications; cheap to clone. `Notifier::default()` sends nothing.
#[derive(Clone, Default)]
pub struct Notifier {
    socket: Option<Arc<(UnixDatagram, SocketAddr)>>,
    watchdog: Option<Duration>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("enabled", &self.socket.is_some())
            .field("watchdog", &self.watchdog)
            .finish()
    }
}

impl Notifier {
    /// Builds the notifier from the service manager's variables, as `var` returns them:
    /// `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog applies only when that
    /// names `pid`, or is unset). A socket that cannot be set up is an error; a malformed
    /// watchdog value is ignored with a warning.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, pid: u32) -> io::Result<Notifier> {
        let Some(path) = var("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
            return Ok(Notifier::default());
        };
        let mut n = Notifier::connect(OsStr::new(&path))?;
        let for_us = var("WATCHDOG_PID").is_none_or(|p| p.trim() == pid.to_string());
        if let (Some(usec), true) = (var("WATCHDOG_USEC"), for_us) {
            match usec.trim().parse::<u64>() {
                Ok(us) if us > 0 => n.watchdog = Some(Duration::from_micros(us / 2)),
                _ => {
                    warn!(value = %usec, "WATCHDOG_USEC is not a positive number; no watchdog pings")
                }
            }
        }
        Ok(n)
    }

    /// A notifier sending to the socket at `path` (`@name` for an abstract socket).
    pub fn connect(path: &OsStr) -> io::Result<Notifier> {
        let addr = socket_addr(path)?;
        let socket = UnixDatagram::unbound()?;
        // Never hold a tokio worker for long if the manager stopped reading.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Notifier {
            socket: Some(Arc::new((socket, addr))),
            watchdog: None,
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1` (half the manager's timeout), if it asked for pings.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification (newline-separated `KEY=value` lines); failures are logged, never
    /// fatal.
    pub fn send(&self, state: &str) {
        let Some(s) = &self.socket else { return };
        if let Err(e) = s.0.send_to_addr(state.as_bytes(), &s.1) {
            debug!(error = %e, "service manager notification not sent");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the monotonic time systemd's `notify-reload` expects; `READY=1`
    /// ([`Notifier::reloaded`]) ends the reload.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `READY=1` after a reload (the status line stays as it was).
    pub fn reloaded(&self) {
        self.send("READY=1");
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `@name` is an abstract socket (Linux); anything else a path.
fn socket_addr(path: &OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return SocketAddr::from_abstract_name(name);
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract sockets exist only on Linux",
            ));
        }
    }
    if !bytes.starts_with(b"/") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET '{}' is neither an absolute path nor @abstract",
                path.to_string_lossy()
            ),
        ));
    }
    SocketAddr::from_pathname(path)
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Sends `WATCHDOG=1` every `period` while a no-op store job answers within it, until `stop`.
pub async fn watchdog(
    notifier: Notifier,
    store: Store,
    tasks: crate::supervise::Supervisor,
    period: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dead = tasks.dead();
        if !dead.is_empty() {
            warn!(tasks = ?dead, "critical task stopped: watchdog ping withheld");
            continue;
        }
        match tokio::time::timeout(period, store.call(|_| Ok(()))).await {
            Ok(Ok(())) => notifier.watchdog(),
            Ok(Err(e)) => warn!(error = %e, "store failing: watchdog ping withheld"),
            Err(_) => warn!(
                period_ms = period.as_millis() as u64,
                "store not answering: watchdog ping withheld"
            ),
        }
    }
}

/// The one-line status: cloud connection and device presence.
pub fn status_line(connected: bool, devices: &Devices) -> String {
    let snapshot = devices.presence.snapshot();
    let online = snapshot.devices.values().filter(|s| s.online).count();
    let cloud = if connected {
        "connected to the cloud"
    } else {
        "cloud not connected (reconnecting)"
    };
    format!("{cloud}; {} devices, {online} online", devices.len())
}

/// Keeps `STATUS=` current as the connection and presence change, until `stop`.
pub async fn status_loop(
    notifier: Notifier,
    devices: Arc<Devices>,
    mut connected: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut presence = devices.presence.subscribe();
    let mut last = String::new();
    loop {
        let line = status_line(*connected.borrow_and_update(), &devices);
        if line != last {
            notifier.status(&line);
            last = line;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = connected.changed() => if r.is_err() { return },
            r = presence.changed() => if r.is_err() { return },
        }
        // Coalesce a burst of presence changes into one update.
        tokio::time::sleep(Duration::from_millis(200)).await;
        presence.mark_unchanged();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", path.to_str().unwrap()),
                ("WATCHDOG_USEC", "4000000"),
            ]),
            42,
        )
        .unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_period(), Some(Duration::from_secs(2)));
        n.ready("connected;\n3 devices");
        assert_eq!(recv(&server), "READY=1\nSTATUS=connected; 3 devices");
        n.watchdog();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.stopping("shutting down");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=shutting down");
        n.reloading();
        let r = recv(&server);
        assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
        let usec: u64 = r.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gatewayd-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        n.status("hello");
        assert_eq!(recv(&server), "STATUS=hello");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::from_vars(vars(&[("WATCHDOG_USEC", "1000")]), 1).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_period(), None);
        n.ready("x");
        n.watchdog();
    }

    #[test]
    fn the_watchdog_is_only_for_the_named_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let _server = UnixDatagram::bind(&path).unwrap();
        let p = path.to_str().unwrap();
        let other = Notifier::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", p),
                ("WATCHDOG_USEC", "1000000"),
                ("WATCHDOG_PID", "7"),
            ]),
            8,
        )
        .unwrap();
        assert_eq!(other.watchdog_period(), None);
        let ours = Notifier::from_vars(
            vars(&[
                ("NOTIFY_SOCKET", p),
                ("WATCHDOG_USEC", "1000000"),
                ("WATCHDOG_PID", "8"),
            ]),
            8,
        )
        .unwrap();
        assert_eq!(ours.watchdog_period(), Some(Duration::from_millis(500)));
        let bad =
            Notifier::from_vars(vars(&[("NOTIFY_SOCKET", p), ("WATCHDOG_USEC", "x")]), 8).unwrap();
        assert_eq!(bad.watchdog_period(), None);
    }

    #[test]
    fn a_relative_socket_path_is_refused() {
        assert!(Notifier::connect(OsStr::new("relative/sock")).is_err());
    }

    #[tokio::test]
    async fn the_watchdog_pings_while_the_store_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.as_os_str()).unwrap();
        let store = Store::open(&dir.path().join("g.db")).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(watchdog(
            n,
            store,
            crate::supervise::Supervisor::new(CancellationToken::new()),
            Duration::from_millis(20),
            stop.clone(),
        ));
        let got = tokio::task::spawn_blocking(move || (recv(&server), recv(&server)))
            .await
            .unwrap();
        assert_eq!(got, ("WATCHDOG=1".to_string(), "WATCHDOG=1".to_string()));
        stop.cancel();
        task.await.unwrap();
    }
}
