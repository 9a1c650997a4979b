//! An HTTP fleet run in-process, and raw TCP exchanges with its devices.

use std::net::SocketAddr;

use device_fixtures::{run_http_fleet, HttpDeviceSpec};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use super::GUARD;

pub struct Fleet {
    pub control: String,
    pub apis: Vec<(String, SocketAddr)>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Fleet {
    /// Devices with these names and default specs.
    pub async fn start(names: &[&str]) -> Fleet {
        Self::start_specs(names.iter().map(|n| HttpDeviceSpec::new(*n)).collect()).await
    }

    pub async fn start_specs(specs: Vec<HttpDeviceSpec>) -> Fleet {
        let mut devices = Vec::new();
        let mut apis = Vec::new();
        for spec in specs {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            apis.push((format!("http://{addr}"), addr));
            devices.push((spec, listener));
        }
        let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let control_url = format!("http://{}", control.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_http_fleet(devices, control, shutdown.clone()));
        Fleet {
            control: control_url,
            apis,
            http: reqwest::Client::builder().timeout(GUARD).build().unwrap(),
            shutdown,
            task,
        }
    }

    /// URL of `path` on the first device.
    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.apis[0].0)
    }

    /// POSTs to the control API at `path` (below `/_control/devices/`).
    pub async fn control_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/_control/devices/{path}", self.control))
            .json(body)
            .send()
            .await
            .unwrap();
        json_of(resp).await
    }

    /// Sets faults and returns them; the update must be accepted.
    pub async fn faults(&self, device: &str, patch: Value) -> Value {
        let (status, body) = self.control_post(&format!("{device}/faults"), &patch).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn inspect(&self, device: &str) -> Value {
        let url = format!("{}/_control/devices/{device}", self.control);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(GUARD, self.task)
            .await
            .expect("fleet stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

pub async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

/// A request as bytes on the wire, closing the connection after the answer.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nhost: device\r\nconnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        text.push_str("content-type: application/json\r\n");
    }
    text.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    text.into_bytes()
}

/// Sends `request` on a new connection to `addr` and returns every byte received until the
/// device closes it. A reset after nothing was received counts as nothing received.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(GUARD, stream.read(&mut buf))
            .await
            .expect("the device closes the connection");
        match read {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
}
