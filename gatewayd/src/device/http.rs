//! HTTP device driver: renders an action's templates into a request under the device's base
//! URL, sends it with the caller's timeout, and maps the answer to a result or a `CallError`.

use super::{Answer, CallError};
use crate::config::{ActionConfig, AuthConfig, DeviceConfig, HttpVerb, ResultMode};
use crate::template::{render_json, Escape, Template};
use gatewayd_protocol::limits::MAX_RPC_PAYLOAD;
use gatewayd_protocol::DeviceId;
use reqwest::{Client, Method, Url};
use serde_json::{Map, Value};
use std::time::Duration;

/// The shared HTTP client: keep-alive pools per device, no proxy (devices are local), Nagle off.
pub fn client() -> Result<Client, String> {
    Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(16)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// The client for health probes: no idle connections kept, so a thousand probed devices do
/// not hold a thousand sockets and their buffers between probe rounds.
pub fn probe_client() -> Result<Client, String> {
    Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
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
        })
    }

    /// The URL an action resolves to with `vars`; only the path and query come from templates,
    /// so the scheme, host and port are always the configured ones.
    pub fn url(&self, action: &ActionConfig, vars: &Map<String, Value>) -> Result<Url, CallError> {
        let path = action
            .path
            .as_deref()
            .ok_or_else(|| CallError::BadAnswer("the action has no path".into()))?;
        let path = Template::parse(path)
            .map_err(|e| CallError::BadAnswer(format!("path template: {e}")))?
            .render(vars, Escape::Url);
        // Escaping keeps a value inside its segment, but a whole segment `.` or `..` would be
        // resolved by URL normalisation and move the call to another path of the device.
        if path.split('/').any(|s| s == "." || s == "..") {
            return Err(CallError::Refused(format!(
                "the path '{path}' has a '.' or '..' segment"
            )));
        }
        let mut url = self.under_base(&path);
        let mut pairs = Vec::new();
        for (k, v) in &action.query {
            let t = Template::parse(v)
                .map_err(|e| CallError::BadAnswer(format!("query template: {e}")))?;
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
        let url = self.url(action, vars)?;
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
        for (k, v) in &action.headers {
            if let Ok(t) = Template::parse(v) {
                req = req.header(k, t.render(vars, Escape::Header));
            }
        }
        req = self.with_auth(req);
        if let Some(body) = &action.body {
            req = req.json(&render_json(body, vars).unwrap_or(Value::Null));
        }
        let ms = timeout.as_millis() as u64;
        let resp = req.send().await.map_err(|e| classify(e, ms))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| classify(e, ms))?;
        if bytes.len() > MAX_RPC_PAYLOAD {
            return Err(CallError::TooLarge(bytes.len()));
        }
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

/// The device's error body as JSON when it is JSON, else as (truncated) text.
fn detail(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        Value::String(text.chars().take(1024).collect())
    })
}

fn classify(e: reqwest::Error, timeout_ms: u64) -> CallError {
    if e.is_timeout() {
        return CallError::Timeout(timeout_ms);
    }
    // The innermost cause names the real problem ("Connection refused (os error 111)").
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    CallError::Unreachable(cause.to_string())
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
}
