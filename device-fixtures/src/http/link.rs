//! Life of a device API listener: serve, close on an offline fault, rebind the same address.
//!
//! One supervisor task per device owns the listening socket. Each time the device comes
//! online it starts a new generation: a fresh `conns` token shared by every connection
//! accepted in it. Going offline drops the socket (new connections are refused) and
//! cancels `conns`, which makes the reads and writes of every open connection fail, so
//! keep-alive connections and requests still in flight are cut too. `Device::listening`
//! is flipped only after the socket is really closed or bound again, which lets the
//! control API answer once the change is observable from outside.

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::api;
use super::device::Device;
use super::faults::Faults;

/// Pause between attempts to bind the device address again.
const REBIND_RETRY: Duration = Duration::from_millis(50);

/// Serves `device` on `listener` until `shutdown`, following its `offline` fault.
pub(crate) async fn supervise(
    device: Arc<Device>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let mut faults = device.faults.subscribe();
    let mut listener = Some(listener);
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
        let mut serve =
            axum::serve(listener, api::router(device.clone(), conns.clone())).into_future();
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

/// A listener whose connections all fail once its generation token is cancelled.
struct CutoffListener {
    socket: TcpListener,
    conns: CancellationToken,
}

impl axum::serve::Listener for CutoffListener {
    type Io = CutoffIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CutoffIo, SocketAddr) {
        loop {
            match self.socket.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (CutoffIo::new(stream, self.conns.clone()), peer);
                }
                Err(err) if is_connection_error(&err) => {}
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A TCP stream that errors on every read and write once `cut` resolves.
struct CutoffIo {
    stream: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl CutoffIo {
    fn new(stream: TcpStream, conns: CancellationToken) -> Self {
        Self {
            stream,
            cut: Box::pin(conns.cancelled_owned()),
        }
    }

    /// Fails once the generation is over; otherwise registers for its end.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "device went offline",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for CutoffIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutoffIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
