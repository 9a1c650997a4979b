//! Life of a device API listener: serve, close on an offline fault, rebind the same address.
//!
//! One supervisor task per device owns the listening socket. Each time the device comes
//! online it starts a new generation: a fresh `conns` token shared by every connection
//! accepted in it. Going offline drops the socket (new connections are refused) and
//! cancels `conns`, which makes the reads and writes of every open connection fail, so
//! keep-alive connections and requests still in flight are cut too. `Device::listening`
//! is flipped only after the socket is really closed or bound again, which lets the
//! control API answer once the change is observable from outside.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api;
use super::conn::{Conn, CutoffListener};
use super::device::Device;
use super::faults::Faults;

/// Pause between attempts to bind the device address again.
const REBIND_RETRY: Duration = Duration::from_millis(50);

/// Serves `device` on `listener` until `shutdown`, following its `offline` fault; a device
/// that starts offline has no listener yet.
pub(crate) async fn supervise(
    device: Arc<Device>,
    mut listener: Option<TcpListener>,
    shutdown: CancellationToken,
) {
    let mut faults = device.faults.subscribe();
    loop {
        if !wait_offline(&mut faults, false, &shutdown).await {
            break;
        }
        let socket = match listener.take() {
            Some(socket) => socket,
            None => match rebind(&device, &shutdown).await {
                Some(socket) => socket,
                None => break,
            },
        };
        device.listening.send_replace(true);
        tracing::debug!(device = %device.name, addr = %device.addr, "device api listening");

        let conns = shutdown.child_token();
        let listener = CutoffListener {
            socket,
            conns: conns.clone(),
        };
        let app = api::router(device.clone(), conns.clone())
            .into_make_service_with_connect_info::<Conn>();
        let mut serve = axum::serve(listener, app).into_future();
        tokio::select! {
            result = &mut serve => {
                if let Err(err) = result {
                    tracing::error!(device = %device.name, %err, "device api server stopped");
                }
            }
            _ = wait_offline(&mut faults, true, &shutdown) => {}
        }
        // Dropping the server future drops the listening socket: connections are refused.
        drop(serve);
        conns.cancel();
        device.listening.send_replace(false);
        tracing::debug!(device = %device.name, "device api closed");
        if shutdown.is_cancelled() {
            break;
        }
    }
}

/// Waits until the `offline` fault equals `offline`; false on shutdown.
async fn wait_offline(
    faults: &mut watch::Receiver<Faults>,
    offline: bool,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        reached = offline_is(faults, offline) => reached && !shutdown.is_cancelled(),
        _ = shutdown.cancelled() => false,
    }
}

async fn offline_is(faults: &mut watch::Receiver<Faults>, offline: bool) -> bool {
    faults.wait_for(|f| f.offline == offline).await.is_ok()
}

/// Binds the device address again, retrying while the port is still held; None on shutdown.
async fn rebind(device: &Device, shutdown: &CancellationToken) -> Option<TcpListener> {
    let mut warned = false;
    loop {
        match TcpListener::bind(device.addr).await {
            Ok(socket) => return Some(socket),
            Err(err) if !warned => {
                tracing::warn!(device = %device.name, addr = %device.addr, %err, "cannot bind device api again, retrying");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(REBIND_RETRY) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}
