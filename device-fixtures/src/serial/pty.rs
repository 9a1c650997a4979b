//! One life of the simulated port: a pseudo-terminal pair in raw mode, whose master is the
//! device's end and whose slave is what a gateway opens, plus the optional stable link that
//! points at the slave.

use std::io;
use std::path::Path;
use tokio_serial::{SerialPort, SerialStream};

/// A pseudo-terminal pair.
pub(crate) struct Pty {
    /// The device's end.
    pub master: SerialStream,
    /// Held open so the master never reads EIO while no gateway has the slave open.
    pub slave: SerialStream,
    /// The slave's path, `/dev/pts/N`.
    pub path: String,
}

impl Pty {
    /// Opens a new pair (`posix_openpt`, raw mode on the slave); needs a tokio runtime.
    pub fn open() -> io::Result<Pty> {
        let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
        let path = slave
            .name()
            .ok_or_else(|| io::Error::other("the new pseudo-terminal has no name"))?;
        Ok(Pty {
            master,
            slave,
            path,
        })
    }
}

/// Points `link` at `target`, replacing what was there in one step.
pub(crate) fn link(link: &Path, target: &str) -> io::Result<()> {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Removes `link` if it exists.
pub(crate) fn unlink(link: &Path) {
    if let Err(e) = std::fs::remove_file(link) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(link = %link.display(), %e, "cannot remove the port link");
        }
    }
}
