//! SQLite persistence of the registry, so `GET /api/v1/gateways` and `/devices` survive a stub
//! restart. Write-behind: the in-memory registry is the truth while running; the store is
//! written after it changes and read once at start.
//!
//! Schema (version in `PRAGMA user_version`, upgraded by [`MIGRATIONS`] in order, each in its
//! own transaction):
//!
//! ```text
//! gateways(id TEXT PK, online INTEGER, boot_id TEXT, software TEXT, last_seen_ms INTEGER)
//! devices(id TEXT PK, gateway_id TEXT, kind TEXT, info_json TEXT, online INTEGER,
//!         since_ms INTEGER, reason TEXT NULL, last_seen_ms INTEGER)   -- index on gateway_id
//! ```
//!
//! `info_json` is the device's catalog entry (`gatewayd_protocol::DeviceInfo`) as sent. Times
//! are unix milliseconds. A gateway and its device rows are replaced together in one
//! transaction, so a crash leaves either the old or the new catalog, never a mix. On load every
//! gateway starts offline until its retained birth arrives again. The database runs in WAL mode
//! with `synchronous=NORMAL`: a power cut may lose the last writes, which the gateways' retained
//! messages restore on the next connect.
//!
//! One owner: the connection lives on the writer thread ([`Store::spawn_writer`]); opening and
//! loading happen before that, off the async workers.

use gatewayd_protocol::{DeviceId, DeviceInfo, GatewayId};
use rusqlite::{params, Connection};
use std::path::PathBuf;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A file, created if missing.
    Path(PathBuf),
    /// A private in-memory database, gone at exit.
    Memory,
}

/// Ordered schema migrations; entry `i` takes the schema from version `i` to `i + 1`. Append
/// only. Twins and messages will add their tables here.
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
    /// A catalog entry could not be encoded.
    #[error("cannot encode device {id}: {source}")]
    Encode {
        /// The device.
        id: DeviceId,
        /// The serde error.
        source: serde_json::Error,
    },
}

/// One persisted gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRecord {
    pub id: GatewayId,
    pub online: bool,
    pub boot_id: String,
    pub software: String,
    pub last_seen_ms: u64,
}

/// One persisted device; its id is `info.id`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub gateway: GatewayId,
    pub info: DeviceInfo,
    pub online: bool,
    pub since_ms: u64,
    pub reason: Option<String>,
    pub last_seen_ms: u64,
}

/// The open database.
pub struct Store {
    conn: Connection,
}

/// A handle to the writer thread; cheap to clone. Saves are queued (unbounded: they come from
/// retained gateway messages, a handful per gateway connect) and applied in order.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::UnboundedSender<(GatewayRecord, Vec<DeviceRecord>)>,
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
        migrate(&mut conn)?;
        Ok(Store { conn })
    }

    /// Every persisted gateway and device. Rows that no longer parse are skipped with a warning.
    pub fn load(&self) -> Result<(Vec<GatewayRecord>, Vec<DeviceRecord>), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, online, boot_id, software, last_seen_ms FROM gateways ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut gateways = Vec::new();
        for row in rows {
            let (id, online, boot_id, software, last_seen_ms) = row?;
            match GatewayId::new(&id) {
                Ok(id) => gateways.push(GatewayRecord {
                    id,
                    online,
                    boot_id,
                    software,
                    last_seen_ms: last_seen_ms.max(0) as u64,
                }),
                Err(e) => tracing::warn!(gateway = %id, error = %e, "skipping stored gateway"),
            }
        }
        let mut stmt = self.conn.prepare(
            "SELECT id, gateway_id, info_json, online, since_ms, reason, last_seen_ms
             FROM devices ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut devices = Vec::new();
        for row in rows {
            let (id, gw, info, online, since_ms, reason, last_seen_ms) = row?;
            let parsed = GatewayId::new(&gw)
                .map_err(|e| e.to_string())
                .and_then(|gw| {
                    serde_json::from_str::<DeviceInfo>(&info)
                        .map(|info| (gw, info))
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok((gateway, info)) => devices.push(DeviceRecord {
                    gateway,
                    info,
                    online,
                    since_ms: since_ms.max(0) as u64,
                    reason,
                    last_seen_ms: last_seen_ms.max(0) as u64,
                }),
                Err(e) => tracing::warn!(device = %id, error = %e, "skipping stored device"),
            }
        }
        Ok((gateways, devices))
    }

    /// Replaces one gateway and its whole device set in one transaction. A device row another
    /// gateway held moves to this one.
    pub fn save_gateway(
        &mut self,
        gateway: &GatewayRecord,
        devices: &[DeviceRecord],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO gateways (id, online, boot_id, software, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                gateway.id.as_str(),
                gateway.online,
                gateway.boot_id,
                gateway.software,
                gateway.last_seen_ms as i64
            ],
        )?;
        tx.execute(
            "DELETE FROM devices WHERE gateway_id = ?1",
            [gateway.id.as_str()],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT OR REPLACE INTO devices
                 (id, gateway_id, kind, info_json, online, since_ms, reason, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for d in devices {
                let info = serde_json::to_string(&d.info).map_err(|source| StoreError::Encode {
                    id: d.info.id.clone(),
                    source,
                })?;
                insert.execute(params![
                    d.info.id.as_str(),
                    d.gateway.as_str(),
                    d.info.kind,
                    info,
                    d.online,
                    d.since_ms as i64,
                    d.reason,
                    d.last_seen_ms as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves the connection onto its own thread, which applies saves in order until every
    /// [`StoreWriter`] is dropped, then exits. Join the handle to know the last save is done.
    pub fn spawn_writer(mut self) -> std::io::Result<(StoreWriter, JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(GatewayRecord, Vec<DeviceRecord>)>();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                while let Some((gateway, devices)) = rx.blocking_recv() {
                    if let Err(e) = self.save_gateway(&gateway, &devices) {
                        tracing::error!(gateway = %gateway.id, error = %e, "cannot persist gateway");
                    }
                }
            })?;
        Ok((StoreWriter { tx }, thread))
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))?;
        Ok(v as usize)
    }
}

impl StoreWriter {
    /// Queues a save of one gateway and its devices. Never blocks.
    pub fn save(&self, gateway: GatewayRecord, devices: Vec<DeviceRecord>) {
        if self.tx.send((gateway, devices)).is_err() {
            tracing::error!("store writer is gone; change not persisted");
        }
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

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
