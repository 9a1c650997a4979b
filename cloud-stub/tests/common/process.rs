//! The real `cloud-stub` binary in its own process: started with arguments, its ready line
//! read, its log (stderr) collected line by line so a test can await a line, its RSS read from
//! `/proc`, and killed with SIGKILL (a crash) when the test says so or on drop.

use cloud_stub::MqttTarget;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::watch;

pub struct StubProcess {
    child: Child,
    pub api: String,
    pub mqtt: MqttTarget,
    pub http: reqwest::Client,
    log: Arc<Mutex<Vec<String>>>,
    lines: watch::Receiver<usize>,
    reader: Option<JoinHandle<()>>,
}

impl StubProcess {
    /// Starts the binary with `args` (and `RUST_LOG=rust_log`), and waits for its ready line.
    pub fn start(args: &[&str], rust_log: &str) -> StubProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloud-stub"))
            .args(["--api-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cloud-stub starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (count, lines) = watch::channel(0);
        let stderr = child.stderr.take().unwrap();
        let reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(line);
                        log.len()
                    };
                    count.send_replace(n);
                }
            })
        };
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .expect("a ready line");
        let ready: Value = serde_json::from_str(&ready)
            .unwrap_or_else(|e| panic!("the ready line is JSON ({e}): {ready:?}"));
        StubProcess {
            api: ready["api"].as_str().unwrap().to_string(),
            mqtt: ready["mqtt"].as_str().unwrap().parse().unwrap(),
            http: reqwest::Client::new(),
            child,
            log,
            lines,
            reader: Some(reader),
        }
    }

    /// `GET path` on the operator API: status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json().await.unwrap())
    }

    /// Polls `GET path` until `pred` holds on a 200 answer, for at most [`super::WAIT`].
    pub async fn wait_for(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + super::WAIT;
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never matched: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Waits (at most [`super::WAIT`]) for a log line containing every one of `parts`.
    pub async fn wait_log(&mut self, parts: &[&str]) -> String {
        let found = |log: &Vec<String>| {
            log.iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        };
        let log = Arc::clone(&self.log);
        let lines = &mut self.lines;
        let wait = async {
            loop {
                if let Some(line) = found(&log.lock().unwrap()) {
                    return line;
                }
                if lines.changed().await.is_err() {
                    panic!("cloud-stub exited before logging {parts:?}");
                }
            }
        };
        tokio::time::timeout(super::WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("no log line with {parts:?}: {:#?}", self.log()))
    }

    /// The log so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// VmRSS of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// SIGKILL, as a crash would: nothing is flushed, nothing acknowledged. Returns the
    /// whole log.
    pub fn kill(mut self) -> Vec<String> {
        self.stop_now();
        self.log()
    }

    fn stop_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for StubProcess {
    fn drop(&mut self) {
        self.stop_now();
    }
}
