//! The outbox: what must reach the cloud (reported twin patches, message feedback) is written to
//! SQLite in the same transaction as the state change it reports, then published from here and
//! deleted only once the broker acknowledged it (see `cloud::link`). Across outages rows wait;
//! after every reconnect the unacknowledged ones are sent again, reported patches of one device
//! coalesced into one. Receivers ignore duplicates (reported patches by `seq`, feedback by the
//! forward-only message status).

use crate::cloud::adapter::{Adapter, Out};
use crate::cloud::Publisher;
use crate::store::Store;
use gatewayd_protocol::{ApplyStatus, DeviceId};
use rusqlite::{params, Connection};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Rows in flight at most.
const MAX_IN_FLIGHT_ROWS: usize = 2048;
/// Rows read per turn.
const BATCH: i64 = 512;

/// Kind of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A reported twin patch; key = device, body = `{"patch", "apply"}`.
    Reported,
    /// Message feedback; key = message id, body = the `Feedback` payload.
    Feedback,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Reported => "reported",
            Kind::Feedback => "feedback",
        }
    }
}

/// Appends a row; call inside the store job that makes the change it reports.
pub fn push(c: &Connection, kind: Kind, key: &str, body: &Value) -> rusqlite::Result<i64> {
    c.prepare_cached("INSERT INTO outbox (kind, key, body) VALUES (?1, ?2, ?3)")?
        .execute(params![kind.as_str(), key, body.to_string()])?;
    Ok(c.last_insert_rowid())
}

/// Wakes the sender after rows were added.
#[derive(Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    /// Signals new rows.
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

struct Row {
    seq: i64,
    kind: String,
    key: String,
    body: Value,
}

/// What one or more rows become: the publishes the cloud adapter asks for (none when that
/// cloud does not hear this step; the rows are then done at once).
struct Group {
    seqs: Vec<i64>,
    publishes: Vec<Out>,
}

/// The sender task.
pub struct Sender {
    pub store: Store,
    pub adapter: Arc<Adapter>,
    pub publisher: Publisher,
    pub acks: mpsc::UnboundedReceiver<u64>,
    pub connected: watch::Receiver<bool>,
    pub wake: Wake,
    pub stop: CancellationToken,
}

impl Sender {
    /// Runs until `stop`.
    pub async fn run(mut self) {
        let mut in_flight: HashMap<u64, Vec<i64>> = HashMap::new();
        let mut rows_in_flight = 0usize;
        let mut cursor: i64 = 0;
        let mut next_tag: u64 = 1;
        loop {
            let mut more = false;
            if *self.connected.borrow() && rows_in_flight < MAX_IN_FLIGHT_ROWS {
                let after = cursor;
                match self
                    .store
                    .call(move |c| {
                        let mut st = c.prepare_cached(
                            "SELECT seq, kind, key, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                        )?;
                        let rows = st
                            .query_map(params![after, BATCH], |r| {
                                Ok(Row {
                                    seq: r.get(0)?,
                                    kind: r.get(1)?,
                                    key: r.get(2)?,
                                    body: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or(Value::Null),
                                })
                            })?
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(rows)
                    })
                    .await
                {
                    Ok(rows) => {
                        more = rows.len() as i64 == BATCH;
                        if let Some(last) = rows.last() {
                            cursor = last.seq;
                        }
                        let mut done = Vec::new();
                        for g in coalesce(&self.adapter, rows) {
                            let mut publishes = g.publishes;
                            let Some(last) = publishes.pop() else {
                                done.extend(g.seqs);
                                continue;
                            };
                            // Acknowledgements come in order: the rows are done once the
                            // last of their publishes is.
                            for out in publishes {
                                self.publisher.publish(out.topic, out.payload, out.retain, None).await;
                            }
                            let tag = next_tag;
                            next_tag += 1;
                            rows_in_flight += g.seqs.len();
                            in_flight.insert(tag, g.seqs);
                            self.publisher.publish(last.topic, last.payload, last.retain, Some(tag)).await;
                        }
                        if !done.is_empty() {
                            if let Err(e) = delete(&self.store, done).await {
                                warn!(error = %e, "cannot delete outbox rows the cloud does not hear");
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot read the outbox"),
                }
            }
            if more && rows_in_flight < MAX_IN_FLIGHT_ROWS {
                continue;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.0.notified() => {}
                tag = self.acks.recv() => {
                    let Some(tag) = tag else { return };
                    let mut done: Vec<i64> = in_flight.remove(&tag).unwrap_or_default();
                    while let Ok(tag) = self.acks.try_recv() {
                        done.extend(in_flight.remove(&tag).unwrap_or_default());
                    }
                    rows_in_flight = rows_in_flight.saturating_sub(done.len());
                    if !done.is_empty() {
                        let n = done.len();
                        match delete(&self.store, done).await {
                            Ok(()) => debug!(rows = n, "outbox rows acknowledged"),
                            Err(e) => warn!(error = %e, "cannot delete acknowledged outbox rows"),
                        }
                    }
                }
                r = self.connected.changed() => {
                    if r.is_err() { return }
                    if *self.connected.borrow() {
                        // The session is new: nothing of the last one will be acknowledged.
                        in_flight.clear();
                        rows_in_flight = 0;
                        cursor = 0;
                    }
                }
            }
        }
    }
}

async fn delete(store: &Store, seqs: Vec<i64>) -> Result<(), crate::store::StoreError> {
    store
        .call(move |c| {
            let mut st = c.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in seqs {
                st.execute([seq])?;
            }
            Ok(())
        })
        .await
}

/// Rows of one device's reported patches being merged: their seqs, the composed patch, and the
/// apply statuses.
type Pending = (Vec<i64>, Value, BTreeMap<String, ApplyStatus>);

/// Turns rows into publishes: reported patches of one device merged (in `seq` order) into one
/// update carrying the highest `seq`; feedback rows one each.
fn coalesce(adapter: &Adapter, rows: Vec<Row>) -> Vec<Group> {
    let mut out = Vec::new();
    let mut reported: BTreeMap<String, Pending> = BTreeMap::new();
    for row in rows {
        match row.kind.as_str() {
            "reported" => {
                let entry = reported.entry(row.key.clone()).or_insert_with(|| {
                    (
                        Vec::new(),
                        Value::Object(Default::default()),
                        BTreeMap::new(),
                    )
                });
                entry.0.push(row.seq);
                compose(&mut entry.1, &row.body["patch"]);
                if let Ok(apply) = serde_json::from_value::<BTreeMap<String, ApplyStatus>>(
                    row.body["apply"].clone(),
                ) {
                    entry.2.extend(apply);
                }
            }
            "feedback" => out.push(Group {
                seqs: vec![row.seq],
                publishes: adapter.feedback(&row.body),
            }),
            other => warn!(
                kind = other,
                seq = row.seq,
                "unknown outbox row kind skipped"
            ),
        }
    }
    for (device, (seqs, patch, apply)) in reported {
        let Ok(device) = DeviceId::new(device) else {
            continue;
        };
        let seq = seqs.iter().copied().max().unwrap_or(0) as u64;
        out.push(Group {
            publishes: adapter.reported(&device, seq, patch, apply),
            seqs,
        });
    }
    out
}

/// Composes merge patch `next` onto `acc` so that applying the result equals applying both in
/// order: unlike a merge, a `null` (delete) is kept, not applied.
pub(crate) fn compose(acc: &mut Value, next: &Value) {
    match (acc.as_object_mut(), next.as_object()) {
        (Some(a), Some(n)) => {
            for (k, v) in n {
                match (a.get_mut(k), v.is_object()) {
                    (Some(existing), true) if existing.is_object() => compose(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *acc = next.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(seq: i64, kind: &str, key: &str, body: Value) -> Row {
        Row {
            seq,
            kind: kind.into(),
            key: key.into(),
            body,
        }
    }

    #[test]
    fn composed_patches_apply_like_the_sequence() {
        use gatewayd_protocol::twin::merge_patch;
        let patches = [
            json!({"a": {"x": 1, "y": 2}, "b": 1}),
            json!({"a": {"y": null}, "b": null, "c": 3}),
        ];
        let mut acc = json!({});
        let mut seq = json!({"b": 0, "a": {"z": 9}});
        let mut once = seq.clone();
        for p in &patches {
            compose(&mut acc, p);
            merge_patch(&mut seq, p);
        }
        merge_patch(&mut once, &acc);
        assert_eq!(once, seq);
    }

    #[test]
    fn reported_rows_of_one_device_coalesce_into_one_update() {
        let gw = gatewayd_protocol::GatewayId::new("g").unwrap();
        let adapter = Adapter::Native(crate::cloud::adapter::Native::new(gw));
        let groups = coalesce(
            &adapter,
            vec![
                row(
                    3,
                    "reported",
                    "agv-1",
                    json!({"patch": {"a": 1, "b": 1}, "apply": {}}),
                ),
                row(
                    4,
                    "feedback",
                    "m1",
                    json!({"v":1,"id":"m1","device":"agv-1","outcome":"completed"}),
                ),
                row(
                    5,
                    "reported",
                    "agv-1",
                    json!({"patch": {"a": 2, "b": null}, "apply": {}}),
                ),
                row(6, "reported", "agv-2", json!({"patch": {"x": true}})),
            ],
        );
        assert_eq!(groups.len(), 3);
        let agv1 = groups
            .iter()
            .find(|g| g.seqs == vec![3, 5])
            .expect("agv-1 group");
        let u: gatewayd_protocol::ReportedUpdate =
            serde_json::from_slice(&agv1.publishes[0].payload).unwrap();
        assert_eq!(u.seq, 5);
        assert_eq!(
            u.patch,
            json!({"a": 2, "b": null}),
            "a delete survives coalescing"
        );
        assert_eq!(agv1.publishes[0].topic, "gw/g/up/twin/reported");
        assert!(groups
            .iter()
            .any(|g| g.seqs == vec![4] && g.publishes[0].topic == "gw/g/up/msg/feedback"));
    }
}
