//! Accepted connections of a device API: cut when their listener generation ends, and open
//! to a takeover by the request they carry.
//!
//! hyper writes every answer through [`CutoffIo`]. A request handler reaches its own
//! connection through `ConnectInfo<Conn>` and may ask for a [`Takeover`]: from then on the
//! bytes hyper writes are thrown away and the connection carries the takeover's bytes (none
//! at all, or a malformed status line) and is closed. This is how a device that acted on a
//! request can still fail to answer it properly.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What a connection carries instead of the answer hyper writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// Nothing at all: the connection is closed.
    Close,
    /// These bytes, then the connection is closed.
    Raw(Bytes),
}

/// One accepted connection as its requests see it (`ConnectInfo<Conn>`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Conn(Arc<Mutex<Option<Takeover>>>);

impl Conn {
    /// Replaces whatever hyper writes from now on with `takeover`.
    pub fn take_over(&self, takeover: Takeover) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(takeover);
    }

    fn taken(&self) -> Option<Takeover> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl Connected<IncomingStream<'_, CutoffListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, CutoffListener>) -> Self {
        stream.io().conn.clone()
    }
}

/// A listener whose connections all fail once its generation token is cancelled.
pub(crate) struct CutoffListener {
    pub socket: TcpListener,
    pub conns: CancellationToken,
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

/// A TCP stream that errors on every read and write once `cut` resolves, and whose writes a
/// request can take over.
pub(crate) struct CutoffIo {
    stream: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    conn: Conn,
    /// Takeover bytes not written yet; `Some` once a takeover started.
    takeover: Option<Bytes>,
}

impl CutoffIo {
    fn new(stream: TcpStream, conns: CancellationToken) -> Self {
        Self {
            stream,
            cut: Box::pin(conns.cancelled_owned()),
            conn: Conn::default(),
            takeover: None,
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

    /// Ready(Ok) while hyper owns the writes. Once a takeover is asked for, writes its bytes,
    /// closes the write side and fails, so hyper drops the connection having written nothing
    /// of its own.
    fn poll_takeover(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.takeover.is_none() {
            match self.conn.taken() {
                None => return Poll::Ready(Ok(())),
                Some(Takeover::Close) => self.takeover = Some(Bytes::new()),
                Some(Takeover::Raw(bytes)) => self.takeover = Some(bytes),
            }
        }
        let pending = self.takeover.as_mut().expect("takeover started");
        while !pending.is_empty() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, pending))?;
            if n == 0 {
                break;
            }
            let _ = pending.split_to(n);
        }
        // The peer sees the end of the stream right after the takeover bytes.
        let _ = ready!(Pin::new(&mut self.stream).poll_shutdown(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "answer replaced by a fault",
        )))
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
        ready!(this.poll_takeover(cx))?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        ready!(this.poll_takeover(cx))?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        ready!(this.poll_takeover(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
