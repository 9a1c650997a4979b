//! HTTP device driver: renders an action's templates into a request under the device's base
//! URL, sends it with the caller's timeout, and maps the answer to a result or a `CallError`.
//!
//! What reached the device decides the error: a failure to connect (refused, DNS, connect
//! timeout) is `Unreachable` and nothing was sent; any failure after the connection was made
//! (dropped connection, malformed status line, oversize header, timeout) means the request may
//! have been acted on. The body is read in chunks and reading stops at `max_answer_bytes`, so
//! a device answering 200 MB costs at most the limit in memory.

use super::{Answer, CallError};
use crate::config::http::HttpAction;
use crate::config::{ActionConfig, AuthConfig, DeviceConfig, HttpVerb, ResultMode};
use crate::template::Escape;
use gatewayd_protocol::DeviceId;
use reqwest::{Client, Method, Url};
use serde_json::{Map, Value};
use std::time::Duration;

/// Longest wait for a device's TCP connection. A failure within it provably sent nothing, so
/// a message may be retried; a call whose whole timeout is shorter ends as a plain timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Most header bytes hyper reads of an answer (its default buffer limit), named in errors.
const MAX_HEADER_BYTES: usize = 8192 + 4096 * 100;

/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How long an idle keep-alive connection to a device is kept (the pool checks every as long,
/// so a connection goes 5 to 10 s after its last call). Short, because each costs gatewayd
/// about 19 KB (hyper's read and write buffers and its task): after one twin change to
/// 10,000 devices, 30 s held 250 MB for up to a minute. It also frees the few sockets an
/// embedded device's HTTP server has sooner, and leaves less time for a device to close an
/// idle connection under a request about to reuse it. Calls closer together keep theirs.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client builder for devices: no proxy (devices are local), Nagle off, and no TCP
/// keep-alive or user timeout. reqwest sets both by default (probes after 15 s idle, three
/// 15 s intervals; 30 s): five more system calls on every new connection, which bought
/// nothing here, since an idle connection is dropped after [`POOL_IDLE_TIMEOUT`], before
/// keep-alive could find it dead, and a call in flight is bounded by its own timeout.
fn builder() -> reqwest::ClientBuilder {
    Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .tcp_keepalive(None)
        .tcp_keepalive_interval(None)
        .tcp_keepalive_retries(None)
        .tcp_user_timeout(None)
        .connect_timeout(CONNECT_TIMEOUT)
}

/// The shared HTTP client: keep-alive pools per device.
pub fn client() -> Result<Client, String> {
    builder()
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(16)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The client for health probes: no idle connections kept, so a thousand probed devices do
/// not hold a thousand sockets and their buffers between probe rounds.
pub fn probe_client() -> Result<Client, String> {
    builder()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("cannot build the HTTP probe client: {e}"))
}

/// One HTTP device.
#[derive(Debug)]
pub struct HttpDriver {
    client: Client,
    probe_client: Client,
    id: DeviceId,
    base: Url,
    auth: Option<AuthConfig>,
    headers: Vec<(String, String)>,
    transient_status: Vec<u16>,
    max_answer_bytes: usize,
}

impl HttpDriver {
    /// A driver for `config`, which must be a validated http device.
    pub fn new(
        client: Client,
        probe_client: Client,
        id: DeviceId,
        config: &DeviceConfig,
    ) -> Result<Self, String> {
        let base = config
            .base_url
            .as_deref()
            .ok_or_else(|| format!("device {id}: base_url missing"))?;
        let base = Url::parse(base.trim_end_matches('/'))
            .map_err(|e| format!("device {id}: bad base_url: {e}"))?;
        Ok(Self {
            client,
            probe_client,
            id,
            base,
            auth: config.auth.clone(),
            headers: config
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            transient_status: config.transient_status.clone(),
            max_answer_bytes: config.max_answer_bytes,
        })
    }

    /// The URL an action resolves to with `vars`; only the path and query come from templates,
    /// so the scheme, host and port are always the configured ones.
    pub fn url(&self, action: &ActionConfig, vars: &Map<String, Value>) -> Result<Url, CallError> {
        let compiled = action
            .compiled_http
            .get(action)
            .map_err(CallError::Refused)?;
        self.url_of(&compiled, vars)
    }

    fn url_of(&self, action: &HttpAction, vars: &Map<String, Value>) -> Result<Url, CallError> {
        let path = action.path.render(vars, Escape::Url);
        // Escaping keeps a value inside its segment, but a whole segment `.` or `..` would be
        // resolved by URL normalisation and move the call to another path of the device.
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(CallError::Refused(format!(
                "the path '{path}' has a '.' or '..' segment"
            )));
        }
        let mut url = self.under_base(&path);
        let mut pairs = Vec::new();
        for (k, t) in &action.query {
            if let Some(name) = t.single_var() {
                if vars.get(name).is_none_or(Value::is_null) {
                    continue;
                }
            }
            pairs.push((k.clone(), t.render(vars, Escape::None)));
        }
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        Ok(url)
    }

    /// Runs `action` with `vars`, giving up after `timeout`.
    pub async fn call(
        &self,
        action: &ActionConfig,
        vars: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let compiled = action
            .compiled_http
            .get(action)
            .map_err(CallError::Refused)?;
        let url = self.url_of(&compiled, vars)?;
        let method = match action.verb {
            HttpVerb::Get => Method::GET,
            HttpVerb::Post => Method::POST,
            HttpVerb::Put => Method::PUT,
            HttpVerb::Patch => Method::PATCH,
            HttpVerb::Delete => Method::DELETE,
        };
        let mut req = self.client.request(method, url).timeout(timeout);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        for (k, t) in &compiled.headers {
            req = req.header(k, t.render(vars, Escape::Header));
        }
        req = self.with_auth(req);
        if let Some(body) = &compiled.body {
            req = req.json(&body.render(vars).unwrap_or(Value::Null));
        }
        let ms = timeout.as_millis() as u64;
        let mut resp = req.send().await.map_err(|e| classify(e, ms))?;
        let status = resp.status().as_u16();
        let transient = action
            .transient_status
            .as_ref()
            .unwrap_or(&self.transient_status);
        if transient.contains(&status) {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
            let bytes = read_limited(&mut resp, 1024, ms).await.unwrap_or_default();
            return Err(CallError::Busy {
                status: Some(status.into()),
                reason: format!("answered {status}: {}", super::answer_text(&detail(&bytes))),
                retry_after,
            });
        }
        let bytes = read_limited(&mut resp, self.max_answer_bytes, ms).await?;
        let ok = if action.ok_status.is_empty() {
            (200..300).contains(&status)
        } else {
            action.ok_status.contains(&status)
        };
        if !ok {
            return Err(CallError::Status {
                status: status.into(),
                detail: detail(&bytes),
            });
        }
        let result = match action.result {
            ResultMode::None => Value::Null,
            ResultMode::Text => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
            ResultMode::Json if bytes.is_empty() => Value::Null,
            ResultMode::Json => {
                let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    CallError::BadAnswer(format!("invalid JSON from {}: {e}", self.id))
                })?;
                match action.result_pointer.as_deref() {
                    None | Some("") => body,
                    Some(ptr) => body.pointer(ptr).cloned().ok_or_else(|| {
                        CallError::BadAnswer(format!("the answer has no value at {ptr}"))
                    })?,
                }
            }
        };
        Ok(Answer {
            status: status.into(),
            result,
        })
    }
}

impl HttpDriver {
    /// `path` under the configured base URL (whose own path is kept as a prefix).
    fn under_base(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}{}",
            self.base.path().trim_end_matches('/'),
            path
        ));
        url
    }

    /// The device's configured authentication on a request.
    fn with_auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some(AuthConfig::Basic { username, password }) => {
                req.basic_auth(username, Some(password))
            }
            Some(AuthConfig::Bearer { token }) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Health probe: `GET path`; any HTTP answer counts as alive (an erroring device is still
    /// reachable, and its calls then fail with `device_error` carrying its status).
    pub async fn probe(&self, path: &str, timeout: Duration) -> Result<(), String> {
        let req = self
            .probe_client
            .get(self.under_base(path))
            .timeout(timeout);
        match self.with_auth(req).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(e, timeout.as_millis() as u64).to_string()),
        }
    }
}

/// Reads the body chunk by chunk and stops once it passes `limit` bytes (a declared
/// `Content-Length` above it is refused before reading anything).
async fn read_limited(
    resp: &mut reqwest::Response,
    limit: usize,
    timeout_ms: u64,
) -> Result<Vec<u8>, CallError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(CallError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| classify(e, timeout_ms))? {
        if body.len() + chunk.len() > limit {
            return Err(CallError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl HttpDriver {
    /// A TCP connect to the base URL's host and port, closed at once: what a device without a
    /// health endpoint is probed with.
    pub async fn connect_probe(&self, timeout: Duration) -> Result<(), String> {
        let host = self
            .base
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let port = self.base.port_or_known_default().unwrap_or(80);
        match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connect to {host}:{port}: {e}")),
            Err(_) => Err(format!(
                "connect to {host}:{port}: no answer within {} ms",
                timeout.as_millis()
            )),
        }
    }
}

/// The device's error body as JSON when it is JSON, else as (truncated) text.
fn detail(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        Value::String(text.chars().take(1024).collect())
    })
}

/// Sorts a client error by what may have reached the device: only a failure to connect
/// proves that nothing was sent.
fn classify(e: reqwest::Error, timeout_ms: u64) -> CallError {
    // The innermost cause names the real problem ("Connection refused (os error 111)").
    let mut cause: &dyn std::error::Error = &e;
    let mut head_too_large = false;
    while let Some(next) = cause.source() {
        cause = next;
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            head_too_large |= h.is_parse_too_large();
        }
    }
    if e.is_builder() {
        return CallError::Refused(cause.to_string());
    }
    if e.is_connect() {
        return CallError::Unreachable(cause.to_string());
    }
    if e.is_timeout() {
        return CallError::Timeout(timeout_ms);
    }
    if head_too_large {
        return CallError::TooLarge {
            limit: MAX_HEADER_BYTES,
        };
    }
    CallError::BadAnswer(format!("after the request was sent: {cause}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn driver(base: &str) -> HttpDriver {
        let dc: DeviceConfig =
            serde_json::from_value(json!({"kind": "http", "base_url": base})).unwrap();
        HttpDriver::new(
            client().unwrap(),
            probe_client().unwrap(),
            DeviceId::new("d").unwrap(),
            &dc,
        )
        .unwrap()
    }

    fn action(v: Value) -> ActionConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn urls_stay_on_the_configured_host() {
        let d = driver("http://10.0.0.5:8080/base/");
        let a = action(json!({"path": "/api/{{key}}", "query": {"q": "{{q}}", "opt": "{{opt}}"}}));
        let vars = json!({"key": "@evil.com/x", "q": "a b&c"})
            .as_object()
            .unwrap()
            .clone();
        let url = d.url(&a, &vars).unwrap();
        assert_eq!(url.host_str(), Some("10.0.0.5"));
        assert_eq!(url.port(), Some(8080));
        assert_eq!(url.path(), "/base/api/%40evil.com%2Fx");
        for dots in [".", ".."] {
            let vars = json!({"key": dots}).as_object().unwrap().clone();
            let err = d.url(&a, &vars).unwrap_err();
            assert!(matches!(err, CallError::Refused(_)), "{dots}: {err:?}");
        }
        assert_eq!(url.query(), Some("q=a+b%26c"));
    }

    /// A device on `127.0.0.1:0` answering `{}` on every request of every connection; sends
    /// the instant of each accepted connection and of each connection the client closed.
    async fn counting_device() -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<(&'static str, tokio::time::Instant)>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let _ = tx.send(("accepted", tokio::time::Instant::now()));
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        // Requests here have no body: one read holds a whole request.
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                                if conn.write_all(answer).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = tx.send(("closed", tokio::time::Instant::now()));
                });
            }
        });
        (base, rx)
    }

    #[tokio::test]
    async fn a_connection_is_kept_for_the_next_call_and_closed_once_idle() {
        let (base, mut seen) = counting_device().await;
        let d = driver(&base);
        let a = action(json!({"verb": "GET", "path": "/status"}));
        let timeout = Duration::from_secs(2);
        d.call(&a, &Map::new(), timeout).await.unwrap();
        let (what, opened) = seen.recv().await.unwrap();
        assert_eq!(what, "accepted");
        // A second call soon after goes over the same connection.
        d.call(&a, &Map::new(), timeout).await.unwrap();
        let last_call = tokio::time::Instant::now();
        // The next thing the device sees is that connection closing, 5 to 10 s (the pool's
        // check interval) after the last call.
        let (what, closed) = tokio::time::timeout(Duration::from_secs(15), seen.recv())
            .await
            .expect("the idle connection was closed")
            .unwrap();
        assert_eq!(what, "closed", "a second connection was opened");
        let idle = closed - last_call;
        assert!(
            idle >= POOL_IDLE_TIMEOUT && idle <= 2 * POOL_IDLE_TIMEOUT + Duration::from_secs(1),
            "closed {idle:?} after the last call ({:?} after it opened)",
            closed - opened
        );
    }
}
