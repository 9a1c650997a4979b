//! The SQLite store. One dedicated thread owns the connection; async code sends it jobs and
//! awaits the answer, so no async worker ever blocks on disk.
//!
//! Group commit: the thread takes every job waiting in its channel (up to 512), runs each in
//! its own savepoint inside one transaction, commits once, and only then answers the callers.
//! So an answer always means "on disk", and a burst of writes costs one fsync, not one each.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a committed transaction survives a power
//! cut. Schema versions live in `PRAGMA user_version`; `MIGRATIONS[i]` takes the schema from
//! version `i` to `i + 1` in one transaction. See `docs/storage.md`.

use rusqlite::Connection;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Ordered schema migrations.
const MIGRATIONS: &[&str] = &[
    // 1: bookkeeping, twin cache, message inbox, cloud outbox.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE twin (
        device TEXT PRIMARY KEY,
        desired TEXT NOT NULL DEFAULT '{}',
        desired_version INTEGER NOT NULL DEFAULT 0,
        applied_version INTEGER NOT NULL DEFAULT 0,
        reported TEXT NOT NULL DEFAULT '{}',
        reported_seq INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE inbox (
        id TEXT PRIMARY KEY,
        device TEXT NOT NULL,
        payload TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        received_at_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        seq INTEGER NOT NULL
     );
     CREATE INDEX inbox_pending ON inbox (device, seq) WHERE state IN ('pending', 'running');
     CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        body TEXT NOT NULL
     );",
    // 2: the desired document last applied in full, so only what changed since is applied.
    "ALTER TABLE twin ADD COLUMN applied TEXT NOT NULL DEFAULT '{}';",
    // 3: a message's final reason and device status, to repeat its feedback on redelivery.
    "ALTER TABLE inbox ADD COLUMN reason TEXT;
     ALTER TABLE inbox ADD COLUMN device_status INTEGER;",
    // 4: indexes for the hot queries: a device's next pending message, the next sequence
    // number. Without them both scan every message kept for de-duplication.
    "CREATE INDEX inbox_next ON inbox (device, seq) WHERE state = 'pending';
     CREATE INDEX inbox_seq ON inbox (seq);",
    // 5: the configuration the cloud added to the file (`remote.rs`), at most one.
    "CREATE TABLE remote_config (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        config TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     );",
    // 6: a remote configuration stays on probation until the cloud session has held for the
    // grace period after it; the overlay it replaced is kept to roll back to, even after a
    // restart during the probation. The last outcome is kept, so a version refused or rolled
    // back is not taken again when the cloud repeats it.
    "ALTER TABLE remote_config ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE remote_config ADD COLUMN previous TEXT;
     CREATE TABLE remote_config_state (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL);",
];

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store migration to version {version} failed: {source}")]
    Migrate {
        version: usize,
        source: rusqlite::Error,
    },
    #[error("store query failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the store thread has stopped")]
    Closed,
    #[error("the store transaction could not be committed")]
    Commit,
}

/// A job runs inside the batch transaction and returns how to answer its caller once the batch
/// has committed (`true`) or failed (`false`). Given no connection (the transaction could not
/// begin), it does nothing and answers with an error.
type Job = Box<dyn FnOnce(Option<&Connection>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(bool) + Send>;

/// Most jobs in one transaction.
const MAX_BATCH: usize = 512;

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::UnboundedSender<Job>,
    health: watch::Receiver<Health>,
    stats: Arc<Stats>,
    id: Arc<str>,
}

/// Whether the store can commit. It turns failing when a transaction cannot begin or commit
/// (full disk, I/O error) and healthy again at the next committed write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Health {
    #[default]
    Ok,
    /// The last write failed, with the reason.
    Failing(String),
}

/// Counters of the store thread, read at scrape time.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs submitted and not yet answered.
    pub queued: AtomicUsize,
    /// Jobs in the last batch.
    pub last_batch: AtomicUsize,
    /// Batches committed, and their total commit time in microseconds.
    pub commits: AtomicU64,
    pub commit_us: AtomicU64,
    /// Batches that failed (nothing of them was stored).
    pub failures: AtomicU64,
}

/// Hands the answers of a finished batch to the async side. Answering a job completes its
/// oneshot, and completing one from the store thread wakes the runtime from outside (a
/// system call each, and often a return from `epoll_wait`). So the whole batch goes in one
/// hand-over to a task on the runtime that opened the store, which answers the jobs there:
/// a batch of a hundred jobs wakes the runtime once. Without a runtime, or once it has gone,
/// the store thread answers them itself. The task ends with the store thread.
struct Answers(Option<mpsc::UnboundedSender<(Vec<Reply>, bool)>>);

impl Answers {
    fn start() -> Answers {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Answers(None);
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<Reply>, bool)>();
        runtime.spawn(async move {
            while let Some((replies, committed)) = rx.recv().await {
                for reply in replies {
                    reply(committed);
                }
            }
        });
        Answers(Some(tx))
    }

    fn deliver(&self, replies: Vec<Reply>, committed: bool) {
        let replies = match &self.0 {
            Some(tx) => match tx.send((replies, committed)) {
                Ok(()) => return,
                Err(mpsc::error::SendError((replies, _))) => replies,
            },
            None => replies,
        };
        for reply in replies {
            reply(committed);
        }
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`, then starts the owner
    /// thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&mut conn)?;
        let id = store_id(&conn, path)?;
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (health_tx, health) = watch::channel(Health::Ok);
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let answers = Answers::start();
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let stats = thread_stats;
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    let n = batch.len();
                    stats.last_batch.store(n, Ordering::Relaxed);
                    let started = Instant::now();
                    let changes_before = conn.total_changes();
                    // A batch that cannot begin runs none of its jobs: each caller hears that
                    // nothing was stored, and nothing was.
                    let outcome = match conn.execute_batch("BEGIN IMMEDIATE") {
                        Err(e) => {
                            let replies: Vec<Reply> = batch.into_iter().map(|job| job(None)).collect();
                            Err((e, replies))
                        }
                        Ok(()) => {
                            let replies: Vec<Reply> =
                                batch.into_iter().map(|job| job(Some(&conn))).collect();
                            match conn.execute_batch("COMMIT") {
                                Ok(()) => Ok(replies),
                                Err(e) => {
                                    let _ = conn.execute_batch("ROLLBACK");
                                    Err((e, replies))
                                }
                            }
                        }
                    };
                    let (committed, replies) = match outcome {
                        Ok(replies) => {
                            stats.commits.fetch_add(1, Ordering::Relaxed);
                            stats
                                .commit_us
                                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                            if conn.total_changes() != changes_before {
                                health_tx.send_if_modified(|h| {
                                    let was = std::mem::take(h);
                                    if was != Health::Ok {
                                        tracing::info!("store writes work again");
                                    }
                                    was != Health::Ok
                                });
                            }
                            (true, replies)
                        }
                        Err((e, replies)) => {
                            stats.failures.fetch_add(1, Ordering::Relaxed);
                            let why = e.to_string();
                            health_tx.send_if_modified(|h| {
                                let changed = *h != Health::Failing(why.clone());
                                if changed {
                                    tracing::error!(error = %why, jobs = n, "store transaction failed; nothing of it was stored");
                                }
                                *h = Health::Failing(why.clone());
                                changed
                            });
                            (false, replies)
                        }
                    };
                    stats.queued.fetch_sub(n, Ordering::Relaxed);
                    answers.deliver(replies, committed);
                }
            })
            .map_err(|_| StoreError::Closed)?;
        Ok(Store {
            jobs,
            health,
            stats,
            id: id.into(),
        })
    }

    /// The store's health, changing when writes start or stop failing.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// The store's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// This store's identity, made when it was created (see `docs/storage.md`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs the job `make()` builds until it commits, pausing with backoff after each failure
    /// (cut short when the store turns healthy again), so a write that must not be lost
    /// neither spins on a full disk nor gives up. `None` if `stop` came first.
    pub async fn call_until_stored<R, F>(
        &self,
        what: &str,
        stop: &tokio_util::sync::CancellationToken,
        mut make: impl FnMut() -> F,
    ) -> Option<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let mut backoff = crate::backoff::Backoff::new(100, 10_000);
        loop {
            match self.call(make()).await {
                Ok(r) => return Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot {what}; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = pause_after_failure(self, backoff.delay()) => {}
                    }
                }
            }
        }
    }

    /// A small write through the whole path (transaction, commit, fsync), to learn whether
    /// the store works again after a failure.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.call(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('probe', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = ?1",
                [crate::clock::now_ms().to_string()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Queues `f` for the store thread now (so jobs run in the order they were submitted) and
    /// returns a receiver for its result, which arrives once the batch is committed.
    pub fn submit<R, F>(&self, f: F) -> oneshot::Receiver<Result<R, StoreError>>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |c: Option<&Connection>| {
            let Some(c) = c else {
                return Box::new(move |_| {
                    let _ = tx.send(Err(StoreError::Commit));
                }) as Reply;
            };
            let sql = |text: &str| c.prepare_cached(text).and_then(|mut st| st.execute([]));
            let result = match sql("SAVEPOINT job") {
                Ok(_) => {
                    let r = f(c);
                    if r.is_ok() {
                        let _ = sql("RELEASE job");
                    } else {
                        let _ = sql("ROLLBACK TO job");
                        let _ = sql("RELEASE job");
                    }
                    r
                }
                Err(e) => Err(e),
            };
            Box::new(move |committed: bool| {
                let _ = tx.send(match result {
                    Ok(_) if !committed => Err(StoreError::Commit),
                    other => other.map_err(StoreError::Sql),
                });
            })
        });
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            // The thread is gone: answer with an error right away.
            drop(job);
        }
        rx
    }

    /// Runs `f` on the store thread and returns its result once committed.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        self.submit(f).await.map_err(|_| StoreError::Closed)?
    }
}

/// The store's id from `meta`, made at creation. A side file next to the database keeps a
/// copy: a database that comes back empty or with another id (a zero-length file after a
/// power cut, a restored backup) while the side file exists lost data, which is logged at
/// ERROR; the cloud learns it from the new id in the gateway's state and sends again what it
/// had delivered.
fn store_id(conn: &Connection, path: &Path) -> Result<String, StoreError> {
    let sql = StoreError::Sql;
    let held: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql)?;
    let side = path.with_extension("id");
    let remembered = std::fs::read_to_string(&side)
        .ok()
        .map(|s| s.trim().to_string());
    let id = match held {
        Some(id) => id,
        None => {
            use rand::Rng;
            let id = format!("{:016x}", rand::rng().random::<u64>());
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('store_id', ?1)",
                [&id],
            )
            .map_err(sql)?;
            id
        }
    };
    match remembered {
        Some(old) if old != id => {
            tracing::error!(
                store = %path.display(),
                old_id = %old,
                new_id = %id,
                "the store lost its data (it is empty or another one); queued messages and twin state it held are gone, the cloud will send again what it delivered"
            );
        }
        Some(_) => return Ok(id),
        None => {}
    }
    let write = || -> std::io::Result<()> {
        let tmp = side.with_extension("id.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, id.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &side)
    };
    if let Err(e) = write() {
        tracing::warn!(file = %side.display(), error = %e, "cannot write the store id file");
    }
    Ok(id)
}

/// While the store fails, tries a small write with backoff (0.5 s up to 10 s) until one
/// commits; that turns the health back to `Ok`, which wakes everything waiting on it. Runs
/// until `stop`.
pub async fn heal(store: Store, stop: tokio_util::sync::CancellationToken) {
    let mut health = store.health();
    let mut backoff = crate::backoff::Backoff::new(500, 10_000);
    loop {
        if *health.borrow_and_update() == Health::Ok {
            backoff.reset();
            tokio::select! {
                _ = stop.cancelled() => return,
                r = health.changed() => { if r.is_err() { return } }
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
        let _ = store.probe_write().await;
    }
}

/// The pause of a worker whose store write failed, so a failing disk never makes it spin:
/// `delay` (from the caller's backoff), cut short when the store turns healthy again.
pub async fn pause_after_failure(store: &Store, delay: std::time::Duration) {
    let mut health = store.health();
    health.borrow_and_update();
    let recovered = async {
        while health.changed().await.is_ok() {
            if *health.borrow() == Health::Ok {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let _ = tokio::time::timeout(delay, recovered).await;
}

pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize = conn
        .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
        .map_err(StoreError::Sql)? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.execute_batch(sql)
            .and_then(|_| tx.pragma_update(None, "user_version", version as i64))
            .and_then(|_| tx.commit())
            .map_err(|source| StoreError::Migrate { version, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrates_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let s = Store::open(&path).unwrap();
        s.call(|c| c.execute("INSERT INTO meta VALUES ('k', 'v')", []))
            .await
            .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let v: String = s
            .call(|c| c.query_row("SELECT value FROM meta WHERE key = 'k'", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(v, "v");
        let version: i64 = s
            .call(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
    }
}
