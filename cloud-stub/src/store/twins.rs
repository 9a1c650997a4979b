//! Twin rows: one per device any catalog ever declared, read and rewritten whole.

use super::{i64_of, to_json, u64_of, StoreError};
use gatewayd_protocol::{ApplyStatus, DeviceId};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Both halves of one twin and their bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinRow {
    /// The desired half (a JSON object).
    pub desired: Value,
    /// Grows by one per accepted non-empty operator patch.
    pub desired_version: u64,
    /// When each top-level desired property last changed.
    pub desired_updated_ms: BTreeMap<String, u64>,
    /// The reported half (a JSON object).
    pub reported: Value,
    /// Grows by one per applied reported patch.
    pub reported_version: u64,
    /// When each top-level reported property last changed.
    pub reported_updated_ms: BTreeMap<String, u64>,
    /// `seq` of the last applied reported patch.
    pub reported_seq: u64,
    /// The gateway that sent it (a `seq` is only comparable within one gateway).
    pub reported_seq_gateway: Option<String>,
    /// How each desired property fared on the device, as last reported.
    pub apply: BTreeMap<String, ApplyStatus>,
}

impl Default for TwinRow {
    fn default() -> Self {
        TwinRow {
            desired: Value::Object(Map::new()),
            desired_version: 0,
            desired_updated_ms: BTreeMap::new(),
            reported: Value::Object(Map::new()),
            reported_version: 0,
            reported_updated_ms: BTreeMap::new(),
            reported_seq: 0,
            reported_seq_gateway: None,
            apply: BTreeMap::new(),
        }
    }
}

impl TwinRow {
    /// Reads one twin; `None` when the device has no row.
    pub fn load(conn: &Connection, device: &DeviceId) -> Result<Option<TwinRow>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT desired_json, desired_version, desired_updated_json, reported_json,
                    reported_version, reported_updated_json, reported_seq,
                    reported_seq_gateway, apply_json
             FROM twins WHERE device = ?1",
        )?;
        let raw = stmt
            .query_row([device.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, String>(8)?,
                ))
            })
            .optional()?;
        let Some((d, dv, du, r, rv, ru, seq, seq_gw, apply)) = raw else {
            return Ok(None);
        };
        Ok(Some(TwinRow {
            desired: object_or_empty(parse_or(device, "desired", &d)),
            desired_version: u64_of(dv),
            desired_updated_ms: parse_or(device, "desired times", &du),
            reported: object_or_empty(parse_or(device, "reported", &r)),
            reported_version: u64_of(rv),
            reported_updated_ms: parse_or(device, "reported times", &ru),
            reported_seq: u64_of(seq),
            reported_seq_gateway: seq_gw,
            apply: parse_or(device, "apply statuses", &apply),
        }))
    }

    /// Writes one twin whole.
    pub fn save(&self, conn: &Connection, device: &DeviceId) -> Result<(), StoreError> {
        let what = || format!("twin of {device}");
        conn.prepare_cached(
            "INSERT OR REPLACE INTO twins
             (device, desired_json, desired_version, desired_updated_json, reported_json,
              reported_version, reported_updated_json, reported_seq, reported_seq_gateway,
              apply_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            device.as_str(),
            to_json(what, &self.desired)?,
            i64_of(self.desired_version),
            to_json(what, &self.desired_updated_ms)?,
            to_json(what, &self.reported)?,
            i64_of(self.reported_version),
            to_json(what, &self.reported_updated_ms)?,
            i64_of(self.reported_seq),
            self.reported_seq_gateway,
            to_json(what, &self.apply)?,
        ])?;
        Ok(())
    }
}

/// A stored JSON column, or its empty default (with a warning) when it no longer parses.
fn parse_or<T: serde::de::DeserializeOwned + Default>(device: &DeviceId, what: &str, s: &str) -> T {
    serde_json::from_str(s).unwrap_or_else(|e| {
        tracing::warn!(device = %device, what, error = %e, "stored twin column unreadable; reset");
        T::default()
    })
}

fn object_or_empty(v: Value) -> Value {
    if v.is_object() {
        v
    } else {
        Value::Object(Map::new())
    }
}

/// Creates an empty twin for each listed device that has none.
pub(super) fn ensure(conn: &Connection, devices: &[DeviceId]) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached("INSERT OR IGNORE INTO twins (device) VALUES (?1)")?;
    for d in devices {
        insert.execute([d.as_str()])?;
    }
    Ok(())
}

/// Every device with a twin row.
pub(super) fn known_devices(conn: &Connection) -> Result<Vec<DeviceId>, StoreError> {
    let mut stmt = conn.prepare("SELECT device FROM twins ORDER BY device")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        let id = row?;
        match DeviceId::new(&id) {
            Ok(id) => out.push(id),
            Err(e) => tracing::warn!(device = %id, error = %e, "skipping stored twin"),
        }
    }
    Ok(out)
}
