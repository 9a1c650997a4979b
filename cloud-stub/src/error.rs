//! The library's error type: what can stop the stub from starting or running.

use std::net::SocketAddr;

/// Why the stub could not start or keep running. Per-request failures are not here: they are
/// coded `gatewayd_protocol::RpcError`s answered over HTTP.
#[derive(Debug, thiserror::Error)]
pub enum StubError {
    /// The SQLite store could not be opened, migrated or written.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The embedded broker could not be started.
    #[error("embedded broker on {addr}: {reason}")]
    Broker {
        /// Where it was meant to listen.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The embedded broker did not accept connections in time.
    #[error("embedded broker on {addr} did not accept connections within {waited_ms} ms")]
    BrokerNotReady {
        /// Where it was meant to listen.
        addr: SocketAddr,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The operator API server failed.
    #[error("operator api: {0}")]
    Api(#[source] std::io::Error),
    /// A background task panicked or was aborted.
    #[error("task {name} failed: {reason}")]
    Task {
        /// Which task.
        name: &'static str,
        /// The join error.
        reason: String,
    },
    /// An I/O error outside the above (listener addresses, threads).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
