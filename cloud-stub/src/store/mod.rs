//! SQLite persistence: the registry (write-behind), twins and messages (committed before the
//! operator gets an answer).
//!
//! One owner: after [`Store::open`] and the loads (off the async workers), the connection moves
//! onto one thread ([`Store::spawn`]). Async code sends it closures through a [`StoreHandle`].
//! The thread takes every job waiting in its channel (up to [`MAX_BATCH`]) and runs them in one
//! transaction, each inside its own savepoint so a failing job rolls back only its own writes;
//! after the commit it runs each job's completion, in submission order, with the outcome. So:
//!
//! - a job sees the writes of every job submitted before it (one thread, FIFO);
//! - a completion runs only after its writes are committed: the operator API answers from
//!   completions, so a `200`/`202` means committed;
//! - completions run in commit order, which is how twin publishes keep their version order;
//! - a job or completion that panics answers its own caller with [`StoreError::Panicked`] (its
//!   writes rolled back with its savepoint); the thread and every other job go on.
//!
//! Schema (version in `PRAGMA user_version`, upgraded by [`MIGRATIONS`] in order, each in its
//! own transaction):
//!
//! ```text
//! gateways(id TEXT PK, online INTEGER, boot_id TEXT, software TEXT, last_seen_ms INTEGER,
//!          store_id TEXT)   -- the gateway's last reported store identity ('' = unknown)
//! devices(id TEXT PK, gateway_id TEXT, kind TEXT, info_json TEXT, online INTEGER,
//!         since_ms INTEGER, reason TEXT NULL, last_seen_ms INTEGER)   -- index on gateway_id
//! twins(device TEXT PK, desired_json, desired_version, desired_updated_json,
//!       reported_json, reported_version, reported_updated_json,
//!       reported_seq, reported_seq_gateway NULL, apply_json)
//! messages(seq INTEGER PK AUTOINCREMENT, id TEXT UNIQUE, device, payload_json, status,
//!          reason NULL, device_status NULL, gateway NULL, enqueued_at_ms, expires_at_ms,
//!          sent_at_ms NULL, delivered_at_ms NULL, finished_at_ms NULL)
//!          -- index on (device, seq); partial index on status for the open ones
//! ```
//!
//! Times are unix milliseconds, cloud clock. `*_json` columns hold JSON text; the `*_updated`
//! ones map a top-level property to when it last changed. A `twins` row exists for every device
//! any catalog ever declared: that is what "known device" means, and it never expires.
//! `messages.seq` is the enqueue order; `gateway` is where the message was last published.
//! A message's status only moves forward: a status write never touches a final row.
//!
//! Registry rows are write-behind: a crash may lose the last ones, which the gateways' retained
//! messages restore on the next connect. The database runs in WAL mode with
//! `synchronous=NORMAL`: a commit survives a crash of the stub, a power cut may lose the last
//! transactions.

mod commit;
mod messages;
mod registry;
mod twins;

pub use commit::Commit;
pub use messages::{apply as apply_message_writes, MessageRecord, MessageWrite};
pub use registry::{DeviceRecord, GatewayRecord, PresenceRecord};
pub use twins::TwinRow;

use gatewayd_protocol::DeviceId;
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Most jobs run in one transaction.
pub const MAX_BATCH: usize = 2048;

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A file, created if missing.
    Path(PathBuf),
    /// A private in-memory database, gone at exit.
    Memory,
}

/// Ordered schema migrations; entry `i` takes the schema from version `i` to `i + 1`. Append
/// only.
pub const MIGRATIONS: &[&str] = &[
    // 1: registry
    "CREATE TABLE gateways (
        id TEXT PRIMARY KEY NOT NULL,
        online INTEGER NOT NULL,
        boot_id TEXT NOT NULL,
        software TEXT NOT NULL,
        last_seen_ms INTEGER NOT NULL
    );
    CREATE TABLE devices (
        id TEXT PRIMARY KEY NOT NULL,
        gateway_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        info_json TEXT NOT NULL,
        online INTEGER NOT NULL,
        since_ms INTEGER NOT NULL,
        reason TEXT,
        last_seen_ms INTEGER NOT NULL
    );
    CREATE INDEX devices_by_gateway ON devices(gateway_id);",
    // 2: twins and messages; every device the registry holds gets its (empty) twin
    "CREATE TABLE twins (
        device TEXT PRIMARY KEY NOT NULL,
        desired_json TEXT NOT NULL DEFAULT '{}',
        desired_version INTEGER NOT NULL DEFAULT 0,
        desired_updated_json TEXT NOT NULL DEFAULT '{}',
        reported_json TEXT NOT NULL DEFAULT '{}',
        reported_version INTEGER NOT NULL DEFAULT 0,
        reported_updated_json TEXT NOT NULL DEFAULT '{}',
        reported_seq INTEGER NOT NULL DEFAULT 0,
        reported_seq_gateway TEXT,
        apply_json TEXT NOT NULL DEFAULT '{}'
    );
    INSERT OR IGNORE INTO twins (device) SELECT id FROM devices;
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        device TEXT NOT NULL,
        payload_json TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        device_status INTEGER,
        gateway TEXT,
        enqueued_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        sent_at_ms INTEGER,
        delivered_at_ms INTEGER,
        finished_at_ms INTEGER
    );
    CREATE INDEX messages_by_device ON messages(device, seq);
    CREATE INDEX messages_open ON messages(status) WHERE status IN ('queued', 'delivered');",
    // 3: the identity of each gateway's store, to notice when a gateway lost it
    "ALTER TABLE gateways ADD COLUMN store_id TEXT NOT NULL DEFAULT '';",
];

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer cloud-stub.
    #[error("database schema version {found} is newer than this cloud-stub knows ({known})")]
    TooNew {
        /// Version found in the file.
        found: usize,
        /// Newest version this build knows.
        known: usize,
    },
    /// A document could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded (e.g. "device agv-1").
        what: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The batch this job ran in could not be committed.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The job (or its completion) panicked; its writes were rolled back.
    #[error("store job panicked: {0}")]
    Panicked(String),
    /// The store thread has stopped.
    #[error("the store has stopped")]
    Gone,
}

/// The open database, before it moves onto its thread.
pub struct Store {
    conn: Connection,
}

/// What a job hands back: whether its writes stand, and what to run after the commit.
type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Done) + Send>;

enum Cmd {
    Job(Job),
    Stop,
}

/// A handle to the store thread; cheap to clone. Submitting never blocks (the channel is
/// unbounded; every producer is itself bounded: API requests by their connections, messages by
/// the queue limit, registry saves by gateway connects).
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database. Blocking.
    pub fn open(location: &DbLocation) -> Result<Store, StoreError> {
        let mut conn = match location {
            DbLocation::Path(p) => Connection::open(p)?,
            DbLocation::Memory => Connection::open_in_memory()?,
        };
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn)?;
        Ok(Store { conn })
    }

    /// Every persisted gateway and device. Rows that no longer parse are skipped with a warning.
    pub fn load(&self) -> Result<(Vec<GatewayRecord>, Vec<DeviceRecord>), StoreError> {
        registry::load(&self.conn)
    }

    /// Every device any catalog ever declared (those with a twin row).
    pub fn load_known_devices(&self) -> Result<Vec<DeviceId>, StoreError> {
        twins::known_devices(&self.conn)
    }

    /// Every message that is not final, in enqueue order.
    pub fn load_open_messages(&self) -> Result<Vec<MessageRecord>, StoreError> {
        messages::load_open(&self.conn)
    }

    /// Replaces one gateway and its whole device set in one transaction (see
    /// [`StoreHandle::save_gateway`] for the running form).
    pub fn save_gateway(
        &mut self,
        gateway: &GatewayRecord,
        devices: &[DeviceRecord],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        registry::save_gateway(&tx, gateway, devices)?;
        tx.commit()?;
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?;
        Ok(v as usize)
    }

    /// Moves the connection onto its own thread, which runs jobs in batches until
    /// [`StoreHandle::stop`] (or until every handle is dropped). Join the thread to know the last
    /// write is committed.
    pub fn spawn(self) -> std::io::Result<(StoreHandle, JoinHandle<()>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || run_thread(self.conn, rx))?;
        Ok((StoreHandle { tx }, thread))
    }
}

impl StoreHandle {
    /// Runs `job` in the next batch, then `then` with its result once the batch is committed
    /// (or with the error: the job's own, or the commit's). A job that fails has its writes
    /// rolled back. If the store has stopped, neither runs.
    pub fn submit<T, F, C>(&self, job: F, then: C)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        C: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        let job: Job = Box::new(move |conn| {
            let result = catch_unwind(AssertUnwindSafe(|| job(conn)))
                .unwrap_or_else(|panic| Err(StoreError::Panicked(panic_message(&*panic))));
            let ok = result.is_ok();
            let done: Done = Box::new(move |commit| {
                then(match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(StoreError::Commit(e)),
                })
            });
            (ok, done)
        });
        if self.tx.send(Cmd::Job(job)).is_err() {
            tracing::error!("store has stopped; job dropped");
        }
    }

    /// Runs `job` and waits until its writes are committed.
    pub async fn call<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(job, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or(Err(StoreError::Gone))
    }

    /// Runs `job` without waiting; a failure is logged with `what`.
    pub fn write<F>(&self, what: &'static str, job: F)
    where
        F: FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    {
        self.submit(job, move |r| {
            if let Err(e) = r {
                tracing::error!(what, error = %e, "store write failed");
            }
        });
    }

    /// Queues a save of one gateway and its devices (write-behind). Never blocks.
    pub fn save_gateway(&self, gateway: GatewayRecord, devices: Vec<DeviceRecord>) {
        self.write("gateway", move |conn| {
            registry::save_gateway(conn, &gateway, &devices)
        });
    }

    /// Queues the gateway's row and the presence of some of its devices.
    pub fn save_presence(&self, gateway: GatewayRecord, devices: Vec<PresenceRecord>) {
        self.write("presence", move |conn| {
            registry::save_presence(conn, &gateway, &devices)
        });
    }

    /// Makes sure every listed device has a twin row, so it stays known for good.
    pub fn remember_devices(&self, devices: Vec<DeviceId>) {
        self.write("known devices", move |conn| twins::ensure(conn, &devices));
    }

    /// Queues message writes, applied in order.
    pub fn write_messages(&self, writes: Vec<MessageWrite>) {
        if writes.is_empty() {
            return;
        }
        self.write("messages", move |conn| messages::apply(conn, &writes));
    }

    /// Asks the thread to finish the jobs already queued and exit. Jobs submitted later are
    /// dropped.
    pub fn stop(&self) {
        let _ = self.tx.send(Cmd::Stop);
    }
}

fn run_thread(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut stop = false;
        match rx.blocking_recv() {
            Some(Cmd::Job(job)) => batch.push(job),
            Some(Cmd::Stop) | None => return,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Cmd::Job(job)) => batch.push(job),
                Ok(Cmd::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        run_batch(&mut conn, &mut batch);
        if stop {
            return;
        }
    }
}

/// Runs `jobs` in one transaction, each in a savepoint, then their completions in order.
fn run_batch(conn: &mut Connection, jobs: &mut Vec<Job>) {
    let count = jobs.len();
    let mut dones: Vec<Done> = Vec::with_capacity(count);
    let commit = (|| -> Result<(), rusqlite::Error> {
        let mut tx = conn.transaction()?;
        for job in jobs.drain(..) {
            let sp = tx.savepoint()?;
            // `submit` catches a panic of the job itself; this catches one of its wrapper.
            let Ok((ok, done)) = catch_unwind(AssertUnwindSafe(|| job(&sp))) else {
                tracing::error!("store job panicked outside its guard; rolled back");
                continue;
            };
            dones.push(done);
            if ok {
                sp.commit()?;
            }
        }
        tx.commit()
    })();
    let commit = commit.map_err(|e| {
        tracing::error!(jobs = count, error = %e, "store batch failed");
        e.to_string()
    });
    // Jobs that never ran (the transaction could not start) are dropped with `jobs`; their
    // callers see the store as gone.
    jobs.clear();
    for done in dones {
        let commit = commit.clone();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| done(commit))) {
            tracing::error!(panic = %panic_message(&*panic), "store job completion panicked");
        }
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic".to_string()
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if found > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    Ok(())
}

/// Reads a non-negative integer column stored as SQLite's signed 64-bit.
fn u64_of(v: i64) -> u64 {
    v.max(0) as u64
}

/// A non-negative number as SQLite's signed 64-bit, saturating (no wire value wraps negative).
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Encodes a value as JSON text for a column.
fn to_json<T: serde::Serialize>(what: impl Fn() -> String, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|source| StoreError::Encode {
        what: what(),
        source,
    })
}

#[cfg(test)]
mod tests;
