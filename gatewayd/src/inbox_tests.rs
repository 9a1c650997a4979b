//! The inbox worker in-process against a scripted device on a real socket and a real SQLite
//! store: each way a call can go (acted then dropped, busy, refused, answered) and store
//! writes failing before or after the device call (a real `SQLITE_FULL`, from
//! `max_page_count`), checking the at-most-once rule at every point.

use super::*;
use crate::config::Config;
use crate::device::Devices;
use gatewayd_protocol::{C2dMessage, MessageId};
use serde_json::json;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the scripted device does with one request.
#[derive(Clone, Debug)]
enum Step {
    /// Acts, says so on `arrived`, and answers 200 once `gate` is notified.
    Gated {
        arrived: Arc<tokio::sync::Notify>,
        gate: Arc<tokio::sync::Notify>,
    },
    /// Acts and answers 200.
    Ok,
    /// Acts, then closes the connection without a byte of answer.
    ActThenDrop,
    /// Answers 503 with `Retry-After: 0` without acting.
    Busy,
}

/// A device on `127.0.0.1:0` following `script` (then `Ok` forever); counts what it acted on.
async fn device(script: Vec<Step>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let acted = Arc::new(AtomicUsize::new(0));
    let count = acted.clone();
    tokio::spawn(async move {
        let mut script = script.into_iter();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let answer: &[u8] = match script.next().unwrap_or(Step::Ok) {
                Step::Gated { arrived, gate } => {
                    count.fetch_add(1, Ordering::SeqCst);
                    arrived.notify_one();
                    gate.notified().await;
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                }
                Step::Ok => {
                    count.fetch_add(1, Ordering::SeqCst);
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                }
                Step::ActThenDrop => {
                    count.fetch_add(1, Ordering::SeqCst);
                    b""
                }
                Step::Busy => b"HTTP/1.1 503 Busy\r\nretry-after: 0\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            };
            let _ = conn.write_all(answer).await;
            drop(conn);
        }
    });
    (base, acted)
}

struct Rig {
    inbox: Arc<Inbox>,
    store: Store,
    stop: CancellationToken,
    acted: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(script: Vec<Step>) -> Rig {
        let (base, acted) = device(script).await;
        Self::on(&base, acted).await
    }

    async fn on(base: &str, acted: Arc<AtomicUsize>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[gateway]
id = "g1"
[cloud]
broker = "mqtt://127.0.0.1:1"
[store]
path = "{}"
[messages]
retry_min_ms = 10
retry_max_ms = 50
[devices.d1]
kind = "http"
base_url = "{base}"
timeout_ms = 2000
[devices.d1.commands.GO]
verb = "POST"
path = "/go"
result = "none"
"#,
            dir.path().join("g.db").display()
        );
        let mut config = Config::from_text(&text).expect("config");
        let store = Store::open(&config.store.path).unwrap();
        let devices = Arc::new(Devices::from_config(&mut config, now_ms()).unwrap());
        let inbox = Arc::new(Inbox::new(
            store.clone(),
            config.messages.clone(),
            devices.clone(),
            Wake::default(),
            Arc::new(Metrics::default()),
        ));
        inbox.recover().await.unwrap();
        let stop = CancellationToken::new();
        let device = devices.get(&DeviceId::new("d1").unwrap()).unwrap().clone();
        tokio::spawn(worker(device, inbox.clone(), false, stop.clone()));
        Rig {
            inbox,
            store,
            stop,
            acted,
            _dir: dir,
        }
    }

    async fn send(&self, id: &str) {
        let msg = C2dMessage {
            v: PROTOCOL_VERSION,
            id: MessageId::new(id).unwrap(),
            device: DeviceId::new("d1").unwrap(),
            payload: json!({"command": "GO"}),
            expires_at_ms: now_ms() + 60_000,
        };
        let receipt = self.inbox.receive(msg, now_ms()).await.unwrap().unwrap();
        assert_eq!(receipt, Receipt::Queued);
        self.inbox.wake(&DeviceId::new("d1").unwrap());
    }

    /// The state of message `id`. A read that shares a transaction with a write that fails
    /// fails too (the whole batch is rolled back), so it is read again.
    async fn state(&self, id: &str) -> String {
        loop {
            let id = id.to_string();
            let r = self
                .store
                .call(move |c| {
                    c.query_row("SELECT state FROM inbox WHERE id = ?1", [id], |r| r.get(0))
                })
                .await;
            if let Ok(state) = r {
                return state;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Waits until message `id` is final and returns its state.
    async fn final_state(&self, id: &str) -> String {
        for _ in 0..500 {
            let s = self.state(id).await;
            if s != "pending" && s != "running" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("message {id} not final: {}", self.state(id).await);
    }

    /// Makes writes fail with `SQLITE_FULL` (`full = true`: the database may not grow, and
    /// filler rows take the room left in the outbox's pages, which every receipt and every
    /// outcome writes to) or work again.
    async fn disk_full(&self, full: bool) {
        if !full {
            // Batched with a write that still fails, this fails too: again until it commits.
            while self
                .store
                .call(|c| {
                    c.query_row("PRAGMA max_page_count = 1073741823", [], |_| Ok(()))?;
                    c.execute("DELETE FROM outbox WHERE kind = 'filler'", [])
                        .map(|_| ())
                })
                .await
                .is_err()
            {}
            return;
        }
        self.store
            .call(|c| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            })
            .await
            .unwrap();
        for size in [4096usize, 512, 64, 8, 1] {
            while self
                .store
                .call(move |c| {
                    c.execute(
                        "INSERT INTO outbox (kind, key, body) VALUES ('filler', '', ?1)",
                        ["x".repeat(size)],
                    )
                })
                .await
                .is_ok()
            {}
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn a_device_that_acts_then_drops_the_connection_runs_it_once() {
    let rig = Rig::start(vec![Step::ActThenDrop]).await;
    rig.send("m1").await;
    assert_eq!(rig.final_state("m1").await, "may_have_run");
    rig.send("m2").await;
    assert_eq!(rig.final_state("m2").await, "completed");
    assert_eq!(rig.acted.load(Ordering::SeqCst), 2, "one execution each");
}

#[tokio::test]
async fn a_busy_device_is_asked_again_until_it_acts() {
    let rig = Rig::start(vec![Step::Busy, Step::Busy, Step::Ok]).await;
    rig.send("m1").await;
    assert_eq!(rig.final_state("m1").await, "completed");
    assert_eq!(rig.acted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_device_that_refuses_connections_is_retried_until_it_listens() {
    // Take a free port, and only listen on it later.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let acted = Arc::new(AtomicUsize::new(0));
    let rig = Rig::on(&format!("http://{addr}"), acted.clone()).await;
    rig.send("m1").await;
    // Refused: back to pending with its reason, never final.
    for _ in 0..100 {
        let reason: Option<String> = rig
            .store
            .call(|c| c.query_row("SELECT reason FROM inbox WHERE id = 'm1'", [], |r| r.get(0)))
            .await
            .unwrap();
        if reason.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rig.state("m1").await, "pending");
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf).await;
        acted.fetch_add(1, Ordering::SeqCst);
        let _ = conn
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
    });
    // The refused call took the device offline; the connect probe (not running here) would
    // bring it back: do what it does.
    rig.inbox
        .devices
        .presence
        .set(&DeviceId::new("d1").unwrap(), true, None, now_ms());
    assert_eq!(rig.final_state("m1").await, "completed");
    assert_eq!(rig.acted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_full_disk_before_the_call_never_calls_the_device() {
    let rig = Rig::start(vec![]).await;
    rig.disk_full(true).await;
    // The message itself cannot be stored either: the receipt fails, nothing is queued.
    let msg = C2dMessage {
        v: PROTOCOL_VERSION,
        id: MessageId::new("m0").unwrap(),
        device: DeviceId::new("d1").unwrap(),
        payload: json!({"command": "GO"}),
        expires_at_ms: now_ms() + 60_000,
    };
    assert!(rig.inbox.receive(msg, now_ms()).await.unwrap().is_err());
    rig.disk_full(false).await;
    rig.send("m1").await;
    assert_eq!(rig.final_state("m1").await, "completed");
    assert_eq!(rig.acted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_full_disk_after_the_call_records_the_outcome_once_space_returns() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let rig = Rig::start(vec![Step::Gated {
        arrived: arrived.clone(),
        gate: gate.clone(),
    }])
    .await;
    rig.send("m1").await;
    // The device has the request (the message is committed `running`); the disk fills up
    // before its answer comes back.
    arrived.notified().await;
    rig.disk_full(true).await;
    gate.notify_one();
    let mut health = rig.store.health();
    health
        .wait_for(|h| matches!(h, crate::store::Health::Failing(_)))
        .await
        .unwrap();
    assert_eq!(
        rig.state("m1").await,
        "running",
        "the outcome could not be written"
    );
    rig.disk_full(false).await;
    assert_eq!(rig.final_state("m1").await, "completed");
    assert_eq!(rig.acted.load(Ordering::SeqCst), 1, "never run again");
}
