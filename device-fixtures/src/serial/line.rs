//! The device's end of the pty: reads requests, answers them through the faults, talks out of
//! turn when told to, and closes or recreates the pty as the `disappear` fault says.
//!
//! One task owns the pty and handles its inputs in one `select!`: bytes read, the answer of
//! the request in service falling due (`slow_ms`), the unsolicited status timer, a faults
//! change. Requests are served one at a time in arrival order; the device acts on a request
//! when its service starts, and an unsolicited line may go out between that and the answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

use super::frame::Framer;
use super::pty::{self, Pty};
use super::{Faults, Shared};

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
        serve(&shared, current, &stop).await;
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

/// What woke the line task.
enum Event {
    Read(std::io::Result<usize>),
    Due,
    Unsolicited,
}

/// Serves one pty until the `disappear` fault or `stop`; dropping it closes the pty.
async fn serve(shared: &Shared, pty: Pty, stop: &CancellationToken) {
    // The slave stays bound (open) as long as the master.
    let Pty {
        mut master,
        slave: _slave,
        ..
    } = pty;
    let mut faults = shared.faults.subscribe();
    let mut framer = Framer::new(MAX_LINE);
    let mut queue: VecDeque<String> = VecDeque::new();
    // The request in service: when its answer is due and the bytes of it.
    let mut in_service: Option<(Instant, Option<Vec<u8>>)> = None;
    let mut unsolicited: Option<(u64, Interval)> = None;
    let mut buf = [0u8; 512];
    loop {
        let current = faults.borrow_and_update().clone();
        if current.disappear {
            return;
        }
        retime(&mut unsolicited, current.unsolicited_ms);
        while in_service.is_none() {
            let Some(line) = queue.pop_front() else { break };
            let bytes = respond(shared, &line, &current);
            if current.slow_ms == 0 {
                if !send(shared, &mut master, bytes.as_deref(), stop).await {
                    return;
                }
            } else {
                let due = Instant::now() + Duration::from_millis(current.slow_ms);
                in_service = Some((due, bytes));
            }
        }
        let due = in_service.as_ref().map(|(due, _)| *due);
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            read = master.read(&mut buf) => Event::Read(read),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => Event::Due,
            _ = tick(&mut unsolicited) => Event::Unsolicited,
        };
        match event {
            Event::Read(Ok(n)) if n > 0 => {
                let received = &buf[..n];
                if current.echo && !send(shared, &mut master, Some(received), stop).await {
                    return;
                }
                queue.extend(framer.push(received, current.request_terminator));
            }
            Event::Read(_) => {
                // Cannot happen while the slave is held; do not spin if it does.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Event::Due => {
                let (_, bytes) = in_service.take().expect("a request is in service");
                if !send(shared, &mut master, bytes.as_deref(), stop).await {
                    return;
                }
            }
            Event::Unsolicited => {
                let line = current.terminated(&current.unsolicited_text);
                if !send_if_room(shared, &mut master, &line, stop).await {
                    return;
                }
            }
        }
    }
}

/// Keeps the unsolicited timer at `ms` (0: none), restarting it when the period changes.
fn retime(timer: &mut Option<(u64, Interval)>, ms: u64) {
    if timer.as_ref().map_or(0, |(period, _)| *period) == ms {
        return;
    }
    *timer = (ms > 0).then(|| {
        let period = Duration::from_millis(ms);
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        (ms, interval)
    });
}

async fn tick(timer: &mut Option<(u64, Interval)>) {
    match timer {
        Some((_, interval)) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes `bytes` (nothing for `None`); false when the port goes away or `stop` comes first.
async fn send(
    shared: &Shared,
    master: &mut SerialStream,
    bytes: Option<&[u8]>,
    stop: &CancellationToken,
) -> bool {
    let Some(bytes) = bytes else { return true };
    let mut faults = shared.faults.subscribe();
    tokio::select! {
        written = master.write_all(bytes) => {
            if let Err(e) = written {
                tracing::warn!(%e, "cannot write on the pty");
            }
            true
        }
        _ = faults.wait_for(|f| f.disappear) => false,
        _ = stop.cancelled() => false,
    }
}

/// Writes an unsolicited line if the pty takes at least part of it at once; with nobody
/// reading, the line is lost (as on a real wire) rather than blocking the device.
async fn send_if_room(
    shared: &Shared,
    master: &mut SerialStream,
    line: &[u8],
    stop: &CancellationToken,
) -> bool {
    let attempt = Pin::new(&mut *master).poll_write(&mut Context::from_waker(Waker::noop()), line);
    match attempt {
        Poll::Ready(Ok(n)) if n < line.len() => send(shared, master, Some(&line[n..]), stop).await,
        Poll::Ready(Ok(_)) => true,
        Poll::Ready(Err(e)) => {
            tracing::warn!(%e, "cannot write on the pty");
            true
        }
        Poll::Pending => {
            tracing::debug!("pty full, unsolicited line dropped");
            true
        }
    }
}

/// Acts on one request line under `faults` and returns the bytes to answer (`None`: no
/// answer); counts the request, and the command if the device acted on it.
fn respond(shared: &Shared, line: &str, faults: &Faults) -> Option<Vec<u8>> {
    let lines = {
        let mut state = shared.state();
        state.requests += 1;
        let Some((address, command)) = state.controller.route(line) else {
            tracing::debug!(request = %line, "not for any unit");
            return None;
        };
        state.busy_seen += 1;
        let busy = faults.is_busy(state.busy_seen);
        if let Some(reply) = &faults.error_reply {
            vec![reply.clone()]
        } else if busy {
            vec![faults.busy_text.clone()]
        } else {
            let outcome = state
                .controller
                .execute(&address, command, faults.error_style());
            if let Some(name) = outcome.executed {
                state.acted(&address, name);
            }
            outcome.lines
        }
    };
    tracing::debug!(request = %line, answer = ?lines, "request");
    faults.shape(&lines)
}
