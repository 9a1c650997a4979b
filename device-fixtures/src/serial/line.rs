//! The device's end of the pty: reads request lines, answers them through the faults, and
//! closes or recreates the pty as the `disappear` fault says.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::pty::{self, Pty};
use super::Shared;

/// Longest request line kept; longer input is dropped.
const MAX_LINE: usize = 1024;

/// Runs pty lives one after the other until `stop`.
pub(crate) async fn supervise(shared: Arc<Shared>, first: Pty, stop: CancellationToken) {
    let mut faults = shared.faults.subscribe();
    let mut next = Some(first);
    loop {
        let current = match next.take() {
            Some(p) => p,
            None => {
                tokio::select! {
                    gone = faults.wait_for(|f| !f.disappear) => if gone.is_err() { break },
                    _ = stop.cancelled() => break,
                }
                match Pty::open() {
                    Ok(p) => {
                        if let Some(link) = &shared.link {
                            if let Err(e) = pty::link(link, &p.path) {
                                tracing::error!(%e, "cannot link the new pty");
                            }
                        }
                        tracing::info!(path = %p.path, "port back");
                        p
                    }
                    Err(e) => {
                        tracing::error!(%e, "cannot open a new pty; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        shared.path.send_replace(Some(current.path.clone()));
        serve(&shared, current, &mut faults, &stop).await;
        // Gone: the link first, so nobody opens a dying pty through it, then the pty.
        if let Some(link) = &shared.link {
            pty::unlink(link);
        }
        shared.path.send_replace(None);
        if stop.is_cancelled() {
            break;
        }
        tracing::info!("port gone");
    }
}

/// Serves one pty until the `disappear` fault or `stop`; dropping it closes the pty.
async fn serve(
    shared: &Shared,
    pty: Pty,
    faults: &mut tokio::sync::watch::Receiver<super::Faults>,
    stop: &CancellationToken,
) {
    // The slave stays bound (open) as long as the master.
    let Pty {
        mut master,
        slave: _slave,
        ..
    } = pty;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            _ = faults.wait_for(|f| f.disappear) => return,
            read = master.read(&mut buf) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                // Cannot happen while the slave is held; do not spin if it does.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(bytes) = respond(shared, line) {
                let slow = shared.faults.borrow().slow_ms;
                if slow > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(slow)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                if let Err(e) = master.write_all(&bytes).await {
                    tracing::warn!(%e, "cannot answer on the pty");
                }
            }
        }
        if pending.len() > MAX_LINE {
            pending.clear();
        }
    }
}

/// The bytes to send for one request line, after the faults; counts the request.
fn respond(shared: &Shared, line: &str) -> Option<Vec<u8>> {
    let answer = {
        let mut state = shared.state();
        state.requests += 1;
        state.controller.answer(line)
    };
    tracing::debug!(request = %line, answer = ?answer, "request");
    shared.faults.borrow().shape(&answer?)
}
