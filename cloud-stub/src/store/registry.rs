//! Registry rows: gateways and the devices their newest catalog declares.

use super::{i64_of, to_json, u64_of, StoreError};
use gatewayd_protocol::{DeviceId, DeviceInfo, GatewayId};
use rusqlite::{params, Connection};

/// One persisted gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRecord {
    pub id: GatewayId,
    pub online: bool,
    pub boot_id: String,
    pub software: String,
    pub last_seen_ms: u64,
    /// The identity of its store as it last reported it; empty: unknown.
    pub store_id: String,
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

/// One device's presence, written without its catalog entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceRecord {
    pub id: DeviceId,
    pub online: bool,
    pub since_ms: u64,
    pub reason: Option<String>,
    pub last_seen_ms: u64,
}

/// Every persisted gateway and device. Rows that no longer parse are skipped with a warning.
pub(super) fn load(
    conn: &Connection,
) -> Result<(Vec<GatewayRecord>, Vec<DeviceRecord>), StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, online, boot_id, software, last_seen_ms, store_id FROM gateways ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, bool>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut gateways = Vec::new();
    for row in rows {
        let (id, online, boot_id, software, last_seen_ms, store_id) = row?;
        match GatewayId::new(&id) {
            Ok(id) => gateways.push(GatewayRecord {
                id,
                online,
                boot_id,
                software,
                last_seen_ms: u64_of(last_seen_ms),
                store_id,
            }),
            Err(e) => tracing::warn!(gateway = %id, error = %e, "skipping stored gateway"),
        }
    }
    let mut stmt = conn.prepare(
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
                since_ms: u64_of(since_ms),
                reason,
                last_seen_ms: u64_of(last_seen_ms),
            }),
            Err(e) => tracing::warn!(device = %id, error = %e, "skipping stored device"),
        }
    }
    Ok((gateways, devices))
}

/// Replaces one gateway and its whole device set. A device row another gateway held moves to
/// this one. The caller provides the transaction, so a crash leaves either the old or the new
/// catalog, never a mix.
pub(super) fn save_gateway(
    conn: &Connection,
    gateway: &GatewayRecord,
    devices: &[DeviceRecord],
) -> Result<(), StoreError> {
    save_gateway_row(conn, gateway)?;
    conn.prepare_cached("DELETE FROM devices WHERE gateway_id = ?1")?
        .execute([gateway.id.as_str()])?;
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO devices
         (id, gateway_id, kind, info_json, online, since_ms, reason, last_seen_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for d in devices {
        let info = to_json(|| format!("device {}", d.info.id), &d.info)?;
        insert.execute(params![
            d.info.id.as_str(),
            d.gateway.as_str(),
            d.info.kind,
            info,
            d.online,
            i64_of(d.since_ms),
            d.reason,
            i64_of(d.last_seen_ms)
        ])?;
    }
    Ok(())
}

/// The gateway's row and the presence of some of its devices (one presence part's), leaving
/// its other devices' rows as they are: a gateway of 10,000 devices sends dozens of parts.
pub(super) fn save_presence(
    conn: &Connection,
    gateway: &GatewayRecord,
    devices: &[PresenceRecord],
) -> Result<(), StoreError> {
    save_gateway_row(conn, gateway)?;
    let mut update = conn.prepare_cached(
        "UPDATE devices SET online = ?3, since_ms = ?4, reason = ?5, last_seen_ms = ?6
         WHERE id = ?1 AND gateway_id = ?2",
    )?;
    for d in devices {
        update.execute(params![
            d.id.as_str(),
            gateway.id.as_str(),
            d.online,
            i64_of(d.since_ms),
            d.reason,
            i64_of(d.last_seen_ms)
        ])?;
    }
    Ok(())
}

fn save_gateway_row(conn: &Connection, gateway: &GatewayRecord) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO gateways (id, online, boot_id, software, last_seen_ms, store_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        gateway.id.as_str(),
        gateway.online,
        gateway.boot_id,
        gateway.software,
        i64_of(gateway.last_seen_ms),
        gateway.store_id,
    ])?;
    Ok(())
}
