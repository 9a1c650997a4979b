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
use tokio::sync::{mpsc, oneshot};

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
/// has committed (`true`) or failed (`false`).
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;
type Reply = Box<dyn FnOnce(bool) + Send>;

/// Most jobs in one transaction.
const MAX_BATCH: usize = 512;

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::UnboundedSender<Job>,
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
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => batch.push(j),
                            Err(_) => break,
                        }
                    }
                    let began = conn.execute_batch("BEGIN IMMEDIATE").is_ok();
                    let replies: Vec<Reply> = batch.into_iter().map(|job| job(&conn)).collect();
                    let committed = began && conn.execute_batch("COMMIT").is_ok();
                    if !committed {
                        tracing::error!(
                            "store transaction failed; {} writes rolled back",
                            replies.len()
                        );
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                    for reply in replies {
                        reply(committed);
                    }
                }
            })
            .map_err(|_| StoreError::Closed)?;
        Ok(Store { jobs })
    }

    /// Queues `f` for the store thread now (so jobs run in the order they were submitted) and
    /// returns a receiver for its result, which arrives once the batch is committed.
    pub fn submit<R, F>(&self, f: F) -> oneshot::Receiver<Result<R, StoreError>>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |c: &Connection| {
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
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
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

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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
