//! The acker, driven by hand: acknowledgements leave in arrival order whatever order the
//! commits finish in, a failed commit drops the connection instead of being acknowledged, and
//! acks of an earlier connection never leave.
//!
//! The acker's client is a real `AsyncClient` whose request channel the test holds
//! (`AsyncClient::from_senders`), so what it reads is exactly what rumqttc would write to the
//! broker. Time is paused: a sleep returns only once every other task is idle, so what the
//! acker has sent by then is all it will send until the test acts again.

use super::{acker, AckSlot};
use proptest::prelude::*;
use rumqttc::{Publish, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Acker {
    slots: mpsc::UnboundedSender<AckSlot>,
    generation: Arc<AtomicU64>,
    resets: mpsc::UnboundedReceiver<String>,
    sent: mpsc::UnboundedReceiver<(u64, Publish)>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Acker {
    fn start() -> Self {
        let (requests, sent) = mpsc::unbounded_channel();
        let (slots, queue) = mpsc::unbounded_channel();
        let (reset, resets) = mpsc::unbounded_channel();
        let generation = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(acker(
            requests,
            queue,
            generation.clone(),
            reset,
            stop.clone(),
        ));
        Acker {
            slots,
            generation,
            resets,
            sent,
            stop,
            task,
        }
    }

    /// A publish with packet id `pkid` arrived on the current connection; its ack needs no
    /// commit.
    fn now(&self, pkid: u16) {
        self.queue(pkid, None);
    }

    /// A publish with packet id `pkid` arrived on the current connection; its ack waits for
    /// the commit the returned sender reports.
    fn after(&self, pkid: u16) -> oneshot::Sender<bool> {
        let (tx, rx) = oneshot::channel();
        self.queue(pkid, Some(rx));
        tx
    }

    fn queue(&self, pkid: u16, ready: Option<oneshot::Receiver<bool>>) {
        let mut publish = Publish::new("gw/g/down/msg", QoS::AtLeastOnce, Vec::new());
        publish.pkid = pkid;
        self.slots
            .send(AckSlot {
                publish,
                generation: self.generation.load(Ordering::SeqCst),
                ready,
            })
            .unwrap();
    }

    /// A new connection, as the dispatcher counts one at its ConnAck.
    fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Packet ids acknowledged since the last look, once everything is idle.
    async fn acked(&mut self) -> Vec<u16> {
        settle().await;
        std::iter::from_fn(|| self.sent.try_recv().ok())
            .map(|(_, p)| p.pkid)
            .collect()
    }

    /// Connection resets asked for since the last look.
    async fn resets(&mut self) -> Vec<String> {
        settle().await;
        std::iter::from_fn(|| self.resets.try_recv().ok()).collect()
    }
}

/// Returns once every other task waits (the paused clock moves only then).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn acks_leave_in_arrival_order_whatever_order_commits_finish_in() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    a.now(2);
    let c3 = a.after(3);
    let c4 = a.after(4);
    a.now(5);
    assert_eq!(a.acked().await, [] as [u16; 0], "1 is not committed yet");
    c4.send(true).unwrap();
    assert_eq!(a.acked().await, [] as [u16; 0], "4 waits for 1 and 3");
    c1.send(true).unwrap();
    assert_eq!(a.acked().await, [1, 2], "3 is not committed yet");
    c3.send(true).unwrap();
    assert_eq!(a.acked().await, [3, 4, 5]);
    assert!(a.resets().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_commit_drops_the_connection_and_nothing_after_it_is_acknowledged() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    let c2 = a.after(2);
    a.now(3);
    let c4 = a.after(4);
    c1.send(true).unwrap();
    assert_eq!(a.acked().await, [1]);
    c4.send(true).unwrap();
    c2.send(false).unwrap();
    assert_eq!(
        a.acked().await,
        [] as [u16; 0],
        "neither 2 nor anything after it"
    );
    let resets = a.resets().await;
    assert_eq!(resets.len(), 1, "{resets:?}");
    // The next connection is acknowledged again, packet ids starting over.
    a.reconnect();
    let c1 = a.after(1);
    a.now(2);
    c1.send(true).unwrap();
    assert_eq!(a.acked().await, [1, 2]);
    assert!(a.resets().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_publish_arriving_after_a_failed_commit_on_that_connection_is_not_acknowledged() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    c1.send(false).unwrap();
    assert_eq!(a.resets().await.len(), 1);
    // The link has not dropped the connection yet: another publish arrives on it.
    a.now(2);
    assert_eq!(a.acked().await, [] as [u16; 0]);
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_never_reports_counts_as_failed() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    a.now(2);
    drop(c1); // the store stopped before answering
    assert_eq!(a.acked().await, [] as [u16; 0]);
    assert_eq!(a.resets().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn one_reset_per_connection_however_many_commits_fail() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    let c2 = a.after(2);
    c2.send(false).unwrap();
    c1.send(false).unwrap();
    assert_eq!(a.acked().await, [] as [u16; 0]);
    assert_eq!(a.resets().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn acks_of_an_earlier_connection_are_dropped() {
    let mut a = Acker::start();
    let c1 = a.after(1);
    a.now(2);
    let _c3 = a.after(3);
    assert_eq!(a.acked().await, [] as [u16; 0]);
    // The connection drops and comes back while 1 is being committed.
    a.reconnect();
    a.now(1);
    c1.send(true).unwrap();
    assert_eq!(a.acked().await, [1], "only the new connection's 1");
    // A commit of an earlier connection that fails resets nothing: that connection is gone.
    let c2 = a.after(2);
    assert_eq!(a.acked().await, [] as [u16; 0]);
    a.reconnect();
    a.now(1);
    c2.send(false).unwrap();
    assert_eq!(a.acked().await, [1]);
    assert!(a.resets().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_acker_stops_on_request() {
    let mut a = Acker::start();
    a.now(1);
    assert_eq!(a.acked().await, [1]);
    a.stop.cancel();
    settle().await;
    assert!(a.task.is_finished());
}

/// One publish of a generated run: acknowledged at once, or after a commit that finishes at
/// a generated place in the run.
#[derive(Debug, Clone)]
enum Arrival {
    Now,
    After,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever order commits finish in, what has been acknowledged at any moment is the
    /// longest run of publishes, in arrival order, whose commits all finished.
    #[test]
    fn acks_are_always_the_committed_prefix(
        (arrivals, order) in prop::collection::vec(
            prop_oneof![Just(Arrival::Now), Just(Arrival::After)],
            1..10,
        )
        .prop_flat_map(|arrivals| {
            let n = arrivals.len();
            (Just(arrivals), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut a = Acker::start();
            let mut commits: Vec<Option<oneshot::Sender<bool>>> = Vec::new();
            for (i, arrival) in arrivals.iter().enumerate() {
                let pkid = i as u16 + 1;
                commits.push(match arrival {
                    Arrival::Now => {
                        a.now(pkid);
                        None
                    }
                    Arrival::After => Some(a.after(pkid)),
                });
            }
            let mut done: Vec<bool> = arrivals.iter().map(|x| matches!(x, Arrival::Now)).collect();
            let mut acked = a.acked().await;
            for i in order {
                if let Some(commit) = commits[i].take() {
                    commit.send(true).unwrap();
                    done[i] = true;
                }
                acked.extend(a.acked().await);
                let prefix = done.iter().take_while(|d| **d).count();
                let want: Vec<u16> = (1..=prefix as u16).collect();
                prop_assert_eq!(&acked, &want);
            }
            prop_assert_eq!(acked.len(), arrivals.len());
            Ok(())
        })?;
    }
}
