//! Operator-API load for the twin and message phases: many requests with a fixed number in
//! flight, and polling a set of items until each one reached its final state.

use super::stats::Summary;
use anyhow::Result;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;

/// Pause between two polls of items that were not done yet.
const POLL_PAUSE: Duration = Duration::from_millis(10);

/// How a burst of operator requests went.
#[derive(Debug, Clone, Serialize)]
pub struct Burst {
    pub requests: usize,
    pub in_flight: usize,
    /// From the first request until the last answer, seconds.
    pub elapsed_s: f64,
    /// Answers per second over `elapsed_s`.
    pub per_s: f64,
    /// Answers with the expected status.
    pub ok: usize,
    /// Other answers by HTTP status ("io" when no answer came).
    pub errors: BTreeMap<String, usize>,
    /// Latency of each request, answered with the expected status or not.
    pub latency: Summary,
}

/// A burst's figures, each request's answer body (`None` unless it had the expected status),
/// and the wall clock (unix ms) and instant when the first request was sent.
pub struct Sent<T> {
    pub burst: Burst,
    pub answers: Vec<Option<T>>,
    pub started_ms: u64,
    pub started: Instant,
}

/// Sends `n` requests, `request(i)` for `i` in `0..n` in that order, with `in_flight` waiting
/// at once. `request` answers (HTTP status, value); `expected` is the status that counts as ok.
pub async fn burst<T, F, Fut>(n: usize, in_flight: usize, expected: u16, request: F) -> Sent<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(u16, T)>> + Send,
{
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let started_ms = now_ms();
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..in_flight.min(n).max(1) {
        let (request, next, answers) = (request.clone(), next.clone(), answers.clone());
        workers.spawn(async move {
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let answer = request(i).await;
                latencies.push(t.elapsed());
                match answer {
                    Ok((status, body)) if status == expected => {
                        answers.lock().expect("answers lock")[i] = Some(body);
                    }
                    Ok((status, _)) => *errors.entry(status.to_string()).or_default() += 1,
                    Err(_) => *errors.entry("io".into()).or_default() += 1,
                }
            }
            (errors, latencies)
        });
    }
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(n);
    while let Some(done) = workers.join_next().await {
        if let Ok((e, l)) = done {
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
            latencies.extend(l);
        }
    }
    let elapsed = started.elapsed();
    let answers = std::mem::take(&mut *answers.lock().expect("answers lock"));
    let ok = answers.iter().filter(|a| a.is_some()).count();
    Sent {
        burst: Burst {
            requests: n,
            in_flight,
            elapsed_s: elapsed.as_secs_f64(),
            per_s: n as f64 / elapsed.as_secs_f64(),
            ok,
            errors,
            latency: Summary::of(&mut latencies),
        },
        answers,
        started_ms,
        started,
    }
}

/// What polling found: the final value of every item that got done, by item, and when the
/// last one was seen done (`None` when some were not done by the deadline).
pub struct Polled<T> {
    pub done: BTreeMap<usize, T>,
    pub all_done_at: Option<Instant>,
}

/// Polls `items` with `in_flight` checks at once until `check(item)` answers `Some` for every
/// one of them, or `deadline`. Items are checked in the given order, a chunk at a time; the
/// chunk's items that are not done yet stay at the front and are checked again after a short
/// pause, so while the system is busy the poll costs a few requests, not a sweep of everything.
pub async fn poll_until_done<T, F, Fut>(
    items: Vec<usize>,
    in_flight: usize,
    deadline: Instant,
    check: F,
) -> Polled<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<T>>> + Send,
{
    let check = Arc::new(check);
    let mut remaining: VecDeque<usize> = items.into();
    let mut done = BTreeMap::new();
    loop {
        if remaining.is_empty() {
            return Polled {
                done,
                all_done_at: Some(Instant::now()),
            };
        }
        if Instant::now() >= deadline {
            return Polled {
                done,
                all_done_at: None,
            };
        }
        let chunk: Vec<usize> = (0..in_flight.max(1))
            .map_while(|_| remaining.pop_front())
            .collect();
        let mut checks = JoinSet::new();
        for (pos, item) in chunk.iter().copied().enumerate() {
            let check = check.clone();
            checks.spawn(async move { (pos, item, check(item).await) });
        }
        let mut pending = Vec::new();
        while let Some(result) = checks.join_next().await {
            let Ok((pos, item, answer)) = result else {
                continue;
            };
            match answer {
                Ok(Some(v)) => {
                    done.insert(item, v);
                }
                _ => pending.push((pos, item)),
            }
        }
        if !pending.is_empty() {
            pending.sort_unstable();
            for (_, item) in pending.into_iter().rev() {
                remaining.push_front(item);
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
    }
}

/// Wall clock, unix milliseconds (the stub stamps twins and messages with it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds from `t0_ms` to the latest of `stamps` (unix ms), or `None` when there is none.
pub fn last_after(t0_ms: u64, stamps: impl IntoIterator<Item = u64>) -> Option<f64> {
    stamps
        .into_iter()
        .max()
        .map(|last| last.saturating_sub(t0_ms) as f64 / 1000.0)
}

/// The file system holding `path` (longest mount point of `/proc/mounts` that is a prefix),
/// e.g. "ext4"; "unknown" when it cannot be told.
pub fn fs_type(path: &std::path::Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), fs.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

/// Median time of `rounds` appends of 4 KiB each followed by `fdatasync`, in a scratch file
/// under `dir`: what one commit of gatewayd's store (WAL, `synchronous=FULL`) costs at least.
pub fn fsync_p50_ms(dir: &std::path::Path, rounds: usize) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe.tmp");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(Summary::of(&mut samples).p50_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_counts_answers_and_errors() {
        let sent = burst(10, 3, 200, |i| async move {
            Ok(if i % 5 == 0 { (429, i) } else { (200, i) })
        })
        .await;
        assert_eq!(sent.burst.ok, 8);
        assert_eq!(sent.burst.errors.get("429"), Some(&2));
        assert_eq!(sent.answers[3], Some(3));
        assert_eq!(sent.answers[5], None);
        assert_eq!(sent.burst.latency.samples, 10);
    }

    #[tokio::test]
    async fn polling_waits_for_every_item() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let polled = poll_until_done(
            (0..5).collect(),
            2,
            Instant::now() + Duration::from_secs(5),
            move |i| {
                let n = c.fetch_add(1, Ordering::Relaxed);
                async move { Ok((n >= 3).then_some(i * 10)) }
            },
        )
        .await;
        assert!(polled.all_done_at.is_some());
        assert_eq!(polled.done.len(), 5);
        assert_eq!(polled.done[&4], 40);
        assert!(calls.load(Ordering::Relaxed) >= 5);
    }

    #[tokio::test]
    async fn polling_stops_at_the_deadline() {
        let polled: Polled<()> = poll_until_done(
            vec![1, 2],
            4,
            Instant::now() + Duration::from_millis(30),
            |_| async { Ok(None) },
        )
        .await;
        assert!(polled.all_done_at.is_none());
        assert!(polled.done.is_empty());
    }

    #[test]
    fn last_stamp_is_relative_to_the_start() {
        assert_eq!(last_after(1_000, [1_500, 3_000, 2_000]), Some(2.0));
        assert_eq!(last_after(1_000, []), None);
    }
}
