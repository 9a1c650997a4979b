//! The serial simulator run in-process, with its pty opened the way a gateway opens it.

use device_fixtures::{SerialSim, SerialSimSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;

pub use super::GUARD;

pub struct Sim {
    pub control: String,
    pub http: reqwest::Client,
    port: SerialStream,
    /// Bytes read from the port and not consumed yet.
    pending: Vec<u8>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sim {
    pub async fn start(spec: SerialSimSpec) -> Sim {
        let sim = SerialSim::open(spec).unwrap();
        let port = tokio_serial::new(sim.path(), 115_200)
            .open_native_async()
            .unwrap();
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control_url = format!("http://{}", control.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sim.run(control, shutdown.clone()));
        Sim {
            control: control_url,
            http: reqwest::Client::builder().timeout(GUARD).build().unwrap(),
            port,
            pending: Vec::new(),
            shutdown,
            task,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(GUARD, self.port.read(&mut buf))
            .await
            .expect("the device writes")
            .unwrap();
        assert!(n > 0, "the pty closed");
        self.pending.extend_from_slice(&buf[..n]);
    }

    /// The next `n` bytes.
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            self.fill().await;
        }
        self.pending.drain(..n).collect()
    }

    /// Everything up to and including the next `end`.
    pub async fn read_through(&mut self, end: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.pending.windows(end.len()).position(|w| w == end) {
                return self.pending.drain(..at + end.len()).collect();
            }
            self.fill().await;
        }
    }

    /// The next line ended by CR LF, without it.
    pub async fn line(&mut self) -> String {
        let raw = self.read_through(b"\r\n").await;
        String::from_utf8(raw[..raw.len() - 2].to_vec()).unwrap()
    }

    /// Sends `request` with CR LF and returns the answer line.
    pub async fn ask(&mut self, request: &str) -> String {
        self.send(format!("{request}\r\n").as_bytes()).await;
        self.line().await
    }

    /// POSTs to the control API at `/_control/{path}`.
    pub async fn control_post(&self, path: &str, body: &Value) -> (reqwest::StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/_control/{path}", self.control))
            .json(body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    /// Sets faults; the update must be accepted. Answers the state.
    pub async fn faults(&self, patch: Value) -> Value {
        let (status, body) = self.control_post("faults", &patch).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        body
    }

    pub async fn state(&self) -> Value {
        self.http
            .get(format!("{}/_control/state", self.control))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the device has received `n` request lines in all.
    pub async fn await_requests(&self, n: u64) {
        tokio::time::timeout(GUARD, async {
            while self.state().await["requests"].as_u64() < Some(n) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the requests arrive");
    }

    pub async fn stop(self) {
        drop(self.port);
        self.shutdown.cancel();
        tokio::time::timeout(GUARD, self.task)
            .await
            .expect("the simulator stops on shutdown")
            .unwrap()
            .unwrap();
    }
}
