//! Splitting the gateway's announcements (catalog, device presence) into parts that each fit
//! the broker's packet limit, and putting a catalog back together on the cloud side. Pure.

use crate::limits::PART_OVERHEAD;
use crate::payload::{Catalog, DeviceInfo, DevicePresence, DeviceStatus};
use crate::{DeviceId, PROTOCOL_VERSION};
use std::collections::BTreeMap;

/// A single entry does not fit a publish of `max` bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device}: its catalog entry is {size} bytes, more than a publish may carry ({max} bytes)")]
pub struct EntryTooLarge {
    pub device: DeviceId,
    pub size: usize,
    pub max: usize,
}

/// Splits `devices` (in the given order) into catalog parts whose serialized size stays at or
/// below `max_bytes`, greedily. Always at least one part (an empty catalog is one empty part).
pub fn split_catalog(
    devices: Vec<DeviceInfo>,
    generation: u64,
    max_bytes: usize,
) -> Result<Vec<Catalog>, EntryTooLarge> {
    let counts = plan_catalog(&devices, max_bytes)?;
    let parts = counts.len() as u32;
    let mut devices = devices.into_iter();
    Ok(counts
        .into_iter()
        .enumerate()
        .map(|(i, n)| Catalog {
            v: PROTOCOL_VERSION,
            generation,
            part: i as u32,
            parts,
            devices: devices.by_ref().take(n).collect(),
        })
        .collect())
}

/// How many of `devices` (in the given order) each catalog part takes so that each part's
/// serialized size stays at or below `max_bytes`, greedily; what [`split_catalog`] does, for a
/// caller that builds each part's entries only when it sends the part (a gateway of 10,000
/// devices need not hold every entry at once). Always at least one part.
pub fn plan_catalog<I>(devices: I, max_bytes: usize) -> Result<Vec<usize>, EntryTooLarge>
where
    I: IntoIterator,
    I::Item: std::borrow::Borrow<DeviceInfo>,
{
    let budget = max_bytes.saturating_sub(PART_OVERHEAD);
    let mut counts = vec![0];
    let mut used = 0;
    for d in devices {
        let d = std::borrow::Borrow::<DeviceInfo>::borrow(&d);
        let size = serde_json::to_vec(d).map_or(usize::MAX, |v| v.len()) + 1;
        if size > budget {
            return Err(EntryTooLarge {
                device: d.id.clone(),
                size,
                max: max_bytes,
            });
        }
        let last = counts.last_mut().expect("one part");
        if used + size > budget && *last > 0 {
            counts.push(0);
            used = 0;
        }
        used += size;
        *counts.last_mut().expect("one part") += 1;
    }
    Ok(counts)
}

/// Longest presence `reason` a gateway sends (longer ones are cut), so a presence part's size
/// is known in advance.
pub const MAX_REASON: usize = 200;

/// How many devices one presence part carries so that it always fits `max_bytes`, whatever
/// their state: ids are at most 64 bytes, a reason at most [`MAX_REASON`].
pub fn presence_part_size(max_bytes: usize) -> usize {
    // {"id":{"online":false,"since_ms":18446744073709551615,"reason":"..."}}, escaped reason
    // characters counted double.
    let entry = 64 + 2 * MAX_REASON + 80;
    (max_bytes.saturating_sub(PART_OVERHEAD) / entry).max(1)
}

/// Which part a device's presence travels in, given all device ids in order.
pub fn presence_parts(ids: &[DeviceId], per_part: usize) -> Vec<Vec<DeviceId>> {
    if ids.is_empty() {
        return vec![Vec::new()];
    }
    ids.chunks(per_part.max(1)).map(<[_]>::to_vec).collect()
}

/// One presence part.
pub fn presence_part(
    generation: u64,
    part: u32,
    parts: u32,
    devices: BTreeMap<DeviceId, DeviceStatus>,
) -> DevicePresence {
    DevicePresence {
        v: PROTOCOL_VERSION,
        generation,
        part,
        parts,
        devices,
    }
}

/// Collects catalog parts of one gateway until a generation is complete.
#[derive(Debug, Default)]
pub struct CatalogAssembly {
    generation: u64,
    parts: u32,
    got: BTreeMap<u32, Vec<DeviceInfo>>,
}

impl CatalogAssembly {
    /// Adds a part; returns the whole catalog when this part completes its generation. A part
    /// of another generation starts over (the newest announcement wins); a part whose index is
    /// out of range or whose count is zero or above `max_parts` is ignored.
    pub fn add(&mut self, c: Catalog, max_parts: u32) -> Option<Vec<DeviceInfo>> {
        if c.parts == 0 || c.parts > max_parts || c.part >= c.parts {
            return None;
        }
        if c.generation != self.generation || c.parts != self.parts {
            self.generation = c.generation;
            self.parts = c.parts;
            self.got.clear();
        }
        self.got.insert(c.part, c.devices);
        if self.got.len() as u32 == self.parts {
            let all = std::mem::take(&mut self.got)
                .into_values()
                .flatten()
                .collect();
            self.parts = 0;
            return Some(all);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(i: usize) -> DeviceInfo {
        serde_json::from_value(serde_json::json!({
            "id": format!("dev-{i:05}"),
            "kind": "http",
            "methods": [{"name": "status"}, {"name": "move", "params": {"x": {"type": "number"}}}],
            "twin_properties": ["maxSpeed", "mode"],
            "commands": ["RESTART"],
        }))
        .unwrap()
    }

    #[test]
    fn a_big_catalog_splits_into_parts_that_fit_and_reassemble() {
        let devices: Vec<_> = (0..10_000).map(device).collect();
        let max = 128 * 1024;
        let parts = split_catalog(devices.clone(), 7, max).unwrap();
        assert!(parts.len() > 10, "{}", parts.len());
        for p in &parts {
            assert!(serde_json::to_vec(p).unwrap().len() <= max);
            assert_eq!((p.generation, p.parts), (7, parts.len() as u32));
        }
        let mut a = CatalogAssembly::default();
        let n = parts.len();
        let mut whole = None;
        // Out of order, with a stale part of another generation in between.
        for (i, p) in parts.into_iter().enumerate().rev() {
            if i == n / 2 {
                let mut stale = p.clone();
                stale.generation = 6;
                assert_eq!(a.add(stale, 1000), None);
            }
            whole = a.add(p, 1000);
        }
        // The stale part reset the assembly, so only the parts after it were kept.
        assert!(whole.is_none());
        let parts = split_catalog(devices.clone(), 8, max).unwrap();
        let mut whole = None;
        for p in parts {
            whole = a.add(p, 1000);
        }
        assert_eq!(whole.unwrap(), devices);
    }

    #[test]
    fn an_entry_above_the_limit_is_named() {
        let e = split_catalog(vec![device(1)], 1, 600).unwrap_err();
        assert_eq!(e.device.as_str(), "dev-00001");
        let one = split_catalog(Vec::new(), 1, 600).unwrap();
        assert_eq!((one.len(), one[0].parts), (1, 1));
    }

    #[test]
    fn a_presence_part_always_fits() {
        let max = 128 * 1024;
        let per = presence_part_size(max);
        let ids: Vec<DeviceId> = (0..per)
            .map(|i| DeviceId::new(format!("{i:0>64}")).unwrap())
            .collect();
        let devices = ids
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    DeviceStatus {
                        online: false,
                        since_ms: u64::MAX,
                        reason: Some("\"\\".repeat(MAX_REASON / 2)),
                    },
                )
            })
            .collect();
        let p = presence_part(u64::MAX, 0, 1, devices);
        assert!(serde_json::to_vec(&p).unwrap().len() <= max);
        assert_eq!(presence_parts(&ids, per).len(), 1);
    }

    #[test]
    fn part_topics_parse() {
        let gw = crate::GatewayId::new("g1").unwrap();
        let t = crate::Topics::up_part(&gw, crate::Up::Catalog, 12);
        assert_eq!(t, "gw/g1/up/catalog/12");
        assert_eq!(
            crate::Topics::parse_up_part(&t),
            Some((gw.clone(), crate::Up::Catalog, 12))
        );
        assert_eq!(crate::Topics::parse_up_part("gw/g1/up/catalog/x"), None);
        assert_eq!(crate::Topics::parse_up_part("gw/g1/up/rpc/res/1"), None);
        assert_eq!(crate::Topics::parse_up("gw/g1/up/catalog/3"), None);
    }
}
