//! The operator console in a real browser: headless Chromium driven through chromedriver's W3C
//! WebDriver HTTP API (a small client below, on reqwest), against the real cloud-stub, gatewayd
//! and simulated AGVs. Every wait polls the page's DOM with a deadline; nothing sleeps for a
//! fixed time. Screenshots of each page land in `target/console-screenshots/`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them).

use anyhow::{anyhow, bail, Context, Result};
use e2e::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use webdriver::Browser;

/// How long one page state may take to appear.
const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_fleet_and_drives_twins_messages_and_methods() -> Result<()> {
    let started = Instant::now();
    let site = Site::start(2).await?;
    let browser = Browser::start().await?;
    let shots = screenshot_dir()?;

    // Fleet: both devices online, live.
    browser.goto(&format!("{}/", site.stub.api)).await?;
    browser.wait_attr("live", "data-state", "live").await?;
    for d in ["agv-1", "agv-2"] {
        browser
            .wait_text(&format!("device-status-{d}"), "online")
            .await?;
    }
    browser
        .wait_text(&format!("gateway-status-{SITE_GATEWAY}"), "online")
        .await?;
    for d in ["agv-1", "agv-2"] {
        browser
            .wait_text(&format!("device-pending-{d}"), "0")
            .await?;
    }
    // A marker that a reload would lose: the page must change in place.
    browser
        .run("window.__noReload = true; return true;")
        .await?;

    // A device goes offline: the page shows it, with its reason, without a reload.
    site.fleet.fault("agv-2", json!({"offline": true})).await?;
    browser.wait_text("device-status-agv-2", "offline").await?;
    let reason = browser
        .wait_for("agv-2's offline reason", |b| async move {
            let r = b.text("device-reason-agv-2").await?;
            Ok(r.filter(|r| !r.is_empty()))
        })
        .await?;
    eprintln!("agv-2 offline on the page: {reason}");
    assert_eq!(
        browser.run("return window.__noReload === true;").await?,
        true
    );
    browser.text_is("device-status-agv-1", "online").await?;
    assert_no_horizontal_scroll(&browser).await?;
    browser.screenshot(&shots.join("fleet.png")).await?;

    // The filter: offline devices only.
    browser
        .run(
            "const s = document.querySelector('[data-testid=\"filter-state\"]');
             s.value = 'offline'; s.dispatchEvent(new Event('change')); return true;",
        )
        .await?;
    browser.wait_absent("device-row-agv-1").await?;
    browser.text_is("device-status-agv-2", "offline").await?;
    browser
        .run(
            "const s = document.querySelector('[data-testid=\"filter-state\"]');
             s.value = 'all'; s.dispatchEvent(new Event('change')); return true;",
        )
        .await?;
    browser.wait_present("device-row-agv-1").await?;

    // Twin: desired maxSpeed 30, the AGV clamps to 20; reported follows, marked different.
    browser.click("device-link-agv-1").await?;
    browser.wait_present("desired-version").await?;
    browser.text_is("desired-version", "0").await?;
    browser
        .type_into("desired-patch", r#"{"maxSpeed": 30, "mode": "manual"}"#)
        .await?;
    browser.click("desired-submit").await?;
    browser.wait_present("desired-ok").await?;
    browser.wait_text("twin-desired-maxSpeed", "30").await?;
    browser.wait_text("twin-reported-maxSpeed", "20").await?;
    browser
        .wait_attr("twin-row-maxSpeed", "data-state", "different")
        .await?;
    browser
        .wait_attr("twin-row-maxSpeed", "data-delta", "true")
        .await?;
    browser.text_is("desired-version", "1").await?;
    browser
        .wait_attr("twin-row-mode", "data-state", "applied")
        .await?;
    browser.text_is("twin-reported-mode", "\"manual\"").await?;
    browser
        .attr("twin-row-mode", "data-delta")
        .await?
        .filter(|d| d == "false")
        .context("mode is in sync")?;
    assert_no_horizontal_scroll(&browser).await?;
    browser.screenshot(&shots.join("twin.png")).await?;

    // Two operators: another one changes desired while this page, loaded without its event
    // stream, still shows version 1. Its change is refused (If-Match), it says so and
    // reloads; nothing was overwritten.
    browser.cdp("Network.enable", json!({})).await?;
    browser
        .cdp(
            "Network.setBlockedURLs",
            json!({"urls": ["*/api/v1/events*"]}),
        )
        .await?;
    browser.reload().await?;
    browser.wait_text("desired-version", "1").await?;
    browser.text_is("live", "connecting…").await?;
    let (s, b) = site
        .patch_desired("agv-1", json!({"maxSpeed": 10}), None)
        .await?;
    assert_eq!((s, b["desired_version"].as_u64()), (200, Some(2)), "{b}");
    browser.text_is("desired-version", "1").await?;
    browser
        .type_into("desired-patch", r#"{"maxSpeed": 25}"#)
        .await?;
    browser.click("desired-submit").await?;
    browser.wait_present("desired-conflict").await?;
    browser.wait_text("desired-version", "2").await?;
    browser.text_is("twin-desired-maxSpeed", "10").await?;
    assert_eq!(
        site.twin("agv-1").await?["desired"]["maxSpeed"],
        json!(10),
        "the other operator's change stands"
    );
    browser
        .cdp("Network.setBlockedURLs", json!({"urls": []}))
        .await?;
    browser.reload().await?;
    browser.wait_attr("live", "data-state", "live").await?;

    // Messages: RESTART with a TTL, its timeline to completed.
    browser.click("tab-messages").await?;
    browser.wait_present("message-payload").await?;
    browser.clear("message-ttl").await?;
    browser.type_into("message-ttl", "120").await?;
    browser.click("message-send").await?;
    browser.wait_present("message-queued").await?;
    let id = browser
        .attr("message-result", "data-id")
        .await?
        .context("the page names the queued message")?;
    browser
        .wait_text(&format!("message-status-{id}"), "completed")
        .await?;
    let steps = browser
        .run(&format!(
            "return [...document.querySelectorAll('[data-testid=\"message-timeline-{id}\"] li')]
                .map(li => li.dataset.step + ':' + li.dataset.done);"
        ))
        .await?;
    assert_eq!(
        steps,
        json!([
            "queued:true",
            "sent:true",
            "delivered:true",
            "finished:true"
        ])
    );
    let (_, m) = get(&format!(
        "{}/api/v1/devices/agv-1/messages/{id}",
        site.stub.api
    ))
    .await?;
    assert_eq!(m["payload"], json!({"command": "RESTART"}), "{m}");
    let ttl = m["expires_at_ms"].as_u64().unwrap_or(0) - m["enqueued_at_ms"].as_u64().unwrap_or(0);
    assert_eq!(ttl, 120_000, "{m}");
    browser.screenshot(&shots.join("messages.png")).await?;

    // Methods: a form built from the declared params; the coded error, then a result.
    browser.click("tab-methods").await?;
    browser
        .wait_for("set_max_speed among the methods", |b| async move {
            let v = b
                .run(
                    "return [...document.querySelectorAll('[data-testid=\"method-select\"] option')]
                        .some(o => o.value === 'set_max_speed');",
                )
                .await?;
            Ok((v == true).then_some(()))
        })
        .await?;
    browser
        .run(
            "const s = document.querySelector('[data-testid=\"method-select\"]');
             s.value = 'set_max_speed'; s.dispatchEvent(new Event('change')); return true;",
        )
        .await?;
    browser.wait_present("param-value").await?;
    assert_eq!(
        browser.attr("param-value", "min").await?.as_deref(),
        Some("0")
    );
    browser.type_into("param-value", "-1").await?;
    browser.click("method-call").await?;
    browser
        .wait_attr("method-result", "data-outcome", "invalid_params")
        .await?;
    browser
        .text_is("method-error-code", "invalid_params")
        .await?;
    browser.clear("param-value").await?;
    browser.type_into("param-value", "5").await?;
    browser.click("method-call").await?;
    browser
        .wait_attr("method-result", "data-outcome", "ok")
        .await?;
    let output = browser.text("method-output").await?.unwrap_or_default();
    assert!(output.contains('5'), "set_max_speed answered {output}");
    assert_eq!(
        site.fleet.view("agv-1").await?["config"]["maxSpeed"],
        json!(5.0)
    );
    // Both calls reached the page's call log through the event stream.
    browser
        .wait_for("two calls in the log", |b| async move {
            let n = b
                .run("return document.querySelectorAll('[data-testid=\"rpc-log\"] li').length;")
                .await?;
            Ok((n.as_u64() == Some(2)).then_some(()))
        })
        .await?;
    browser.screenshot(&shots.join("methods.png")).await?;

    // The same pages at tablet width.
    browser.resize(768, 1024).await?;
    assert_no_horizontal_scroll(&browser).await?;
    browser
        .screenshot(&shots.join("methods-tablet.png"))
        .await?;
    browser.click("tab-messages").await?;
    browser
        .wait_present(&format!("message-timeline-{id}"))
        .await?;
    assert_no_horizontal_scroll(&browser).await?;
    browser
        .screenshot(&shots.join("messages-tablet.png"))
        .await?;
    browser.click("tab-twin").await?;
    browser.wait_present("twin-row-maxSpeed").await?;
    assert_no_horizontal_scroll(&browser).await?;
    browser.screenshot(&shots.join("twin-tablet.png")).await?;
    browser.click("back-to-fleet").await?;
    browser.wait_present("device-row-agv-2").await?;
    assert_no_horizontal_scroll(&browser).await?;
    browser.screenshot(&shots.join("fleet-tablet.png")).await?;

    // A message to the offline agv-2 waits, delivered to gatewayd's inbox, for the device to
    // return (the fleet counts it as pending), until purged.
    browser
        .goto(&format!("{}/#/devices/agv-2/messages", site.stub.api))
        .await?;
    browser.wait_present("message-payload").await?;
    browser.click("message-send").await?;
    browser.wait_present("message-queued").await?;
    let waiting = browser
        .attr("message-result", "data-id")
        .await?
        .context("the page names the queued message")?;
    browser
        .wait_attr(&format!("message-{waiting}"), "data-status", "delivered")
        .await?;
    let steps = browser
        .run(&format!(
            "return [...document.querySelectorAll('[data-testid=\"message-timeline-{waiting}\"] li')]
                .map(li => li.dataset.done);"
        ))
        .await?;
    assert_eq!(steps, json!(["true", "true", "true", "false"]));
    browser.click("back-to-fleet").await?;
    browser.wait_text("device-pending-agv-2", "1").await?;
    browser.click("device-link-agv-2").await?;
    browser.click("tab-messages").await?;
    browser.click("message-purge").await?;
    browser.wait_present("message-purged").await?;
    browser
        .wait_text(&format!("message-status-{waiting}"), "purged")
        .await?;

    let errors = browser.page_errors().await?;
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
    browser.stop().await;
    eprintln!("console end to end took {:?}", started.elapsed());
    Ok(())
}

/// The gateway's own twin: a device outside the gateway's allow-list is sent from the page, the
/// gateway refuses it and the page shows that with the gateway's problem, live; a patch of the
/// wrong structure gets the stub's `400` message inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_gateways_configuration_and_what_it_made_of_a_change() -> Result<()> {
    let limits = "\n[remote_config]\nenabled = true\nallow_hosts = [\"127.0.0.1\"]\n";
    let site = Site::start_with(1, limits).await?;
    let browser = Browser::start().await?;
    let shots = screenshot_dir()?;

    // From the fleet page to the gateway's configuration, with its first report.
    browser.goto(&format!("{}/", site.stub.api)).await?;
    browser.wait_attr("live", "data-state", "live").await?;
    browser
        .click(&format!("gateway-link-{SITE_GATEWAY}"))
        .await?;
    browser.wait_present("gwconfig-fingerprint").await?;
    browser.text_is("gwconfig-desired-version", "0").await?;
    browser
        .wait_attr("gwconfig-state", "data-state", "none")
        .await?;
    browser
        .attr("gwconfig-sync", "data-in-sync")
        .await?
        .filter(|v| v == "true")
        .context("nothing desired yet: in sync")?;
    browser
        .run("window.__noReload = true; return true;")
        .await?;

    // A device on a host outside the allow-list: sent, then refused by the gateway, shown
    // without a reload when its report arrives.
    browser
        .type_into(
            "gwconfig-patch",
            r#"{"devices": {"rogue": {"kind": "http", "profile": "agv", "base_url": "http://10.9.9.9:80"}}}"#,
        )
        .await?;
    browser.click("gwconfig-submit").await?;
    browser.wait_present("gwconfig-ok").await?;
    browser.text_is("gwconfig-desired-version", "1").await?;
    browser.wait_text("gwconfig-reported-version", "1").await?;
    browser
        .wait_attr("gwconfig-state", "data-state", "refused")
        .await?;
    let problems = browser.text("gwconfig-problems").await?.unwrap_or_default();
    assert!(
        problems.contains("host 10.9.9.9 is not allowed"),
        "the page shows the gateway's problem: {problems}"
    );
    browser
        .attr("gwconfig-sync", "data-in-sync")
        .await?
        .filter(|v| v == "false")
        .context("a refused version is out of sync")?;
    assert_eq!(
        browser.run("return window.__noReload === true;").await?,
        true
    );
    let desired = browser.text("gwconfig-desired").await?.unwrap_or_default();
    assert!(desired.contains("10.9.9.9"), "{desired}");
    assert_no_horizontal_scroll(&browser).await?;
    browser
        .screenshot(&shots.join("gateway-config.png"))
        .await?;

    // A section the stub does not know: its 400 message on the page, nothing sent.
    browser
        .type_into(
            "gwconfig-patch",
            r#"{"store": {"path": "/tmp/elsewhere.db"}}"#,
        )
        .await?;
    browser.click("gwconfig-submit").await?;
    browser.wait_present("gwconfig-error").await?;
    let error = browser.text("gwconfig-error").await?.unwrap_or_default();
    assert!(
        error.starts_with("bad_request: ")
            && error.contains("store: not a section a remote configuration may hold"),
        "{error}"
    );
    browser.text_is("gwconfig-desired-version", "1").await?;

    browser.resize(768, 1024).await?;
    assert_no_horizontal_scroll(&browser).await?;
    let errors = browser.page_errors().await?;
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
    browser.stop().await;
    Ok(())
}

/// With `--api-token`, the page shell loads without it, asks for it, refuses a wrong one, and
/// with the right one shows live data; the data routes still refuse a request without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_asks_for_the_api_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("cloud-stub.db").display().to_string();
    let broker = Broker::Embedded("127.0.0.1:0".into());
    let args = ["--api-token".to_string(), "s3cret-token".to_string()];
    let (stub, _) = Stub::start_with_args(dir.path(), &broker, &db, &args).await?;
    let (status, _) = get(&format!("{}/api/v1/devices", stub.api)).await?;
    assert_eq!(status, 401);

    let browser = Browser::start().await?;
    browser.goto(&format!("{}/", stub.api)).await?;
    browser.wait_present("login-token").await?;
    browser.type_into("login-token", "wrong").await?;
    browser.click("login-submit").await?;
    browser
        .wait_text("login-error", "The token was refused.")
        .await?;
    browser.wait_attr("live", "data-state", "off").await?;

    browser.clear("login-token").await?;
    browser.type_into("login-token", "s3cret-token").await?;
    browser.click("login-submit").await?;
    browser.wait_attr("live", "data-state", "live").await?;
    browser.wait_present("gateways").await?;
    let kept = browser
        .run("return sessionStorage.getItem('cloud-stub.token');")
        .await?;
    assert_eq!(kept, "s3cret-token");
    // The token is in no URL the page requested.
    let urls = browser
        .run("return performance.getEntriesByType('resource').map(e => e.name).join(' ');")
        .await?;
    assert!(!urls.as_str().unwrap_or("").contains("s3cret"), "{urls}");

    // A reload keeps the token for this tab; signing out asks again.
    browser.goto(&format!("{}/", stub.api)).await?;
    browser.wait_attr("live", "data-state", "live").await?;
    browser.click("logout").await?;
    browser.wait_present("login-token").await?;
    let errors = browser.page_errors().await?;
    assert!(errors.is_empty(), "the page logged errors: {errors:#?}");
    browser.stop().await;
    Ok(())
}

/// Neither the document nor any element is wider than the window.
async fn assert_no_horizontal_scroll(browser: &Browser) -> Result<()> {
    let v = browser
        .run("return [document.documentElement.scrollWidth, window.innerWidth];")
        .await?;
    let (scroll, inner) = (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0));
    if scroll > inner {
        bail!("the page is {scroll} px wide in a {inner} px window");
    }
    Ok(())
}

fn screenshot_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("console-screenshots");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A minimal W3C WebDriver client: chromedriver on a port it picks, one headless Chromium
/// session, the commands the tests use, and waits that poll the DOM with a deadline.
mod webdriver {
    use super::*;
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::process::{Child, Command};

    /// The W3C element key.
    const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

    pub struct Browser {
        http: reqwest::Client,
        session: String,
        driver: Child,
    }

    fn chromium() -> Option<&'static str> {
        ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
    }

    impl Browser {
        /// Starts chromedriver and a headless Chromium with a 1280x800 window.
        pub async fn start() -> Result<Browser> {
            let binary = chromium().context(
                "chromium is not installed (apt-get install chromium chromium-driver; .ci/run \
                 does it)",
            )?;
            // Its own process group, so the browser it starts goes with it (`Drop`), even when
            // a test fails before `stop`.
            let mut driver = Command::new("chromedriver")
                .arg("--port=0")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .process_group(0)
                .spawn()
                .context("cannot start chromedriver (apt-get install chromium-driver)")?;
            let stdout = driver.stdout.take().context("chromedriver stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let port = tokio::time::timeout(WAIT, async {
                while let Some(line) = lines.next_line().await? {
                    if let Some(p) = line.split("started successfully on port ").nth(1) {
                        return p
                            .trim_end_matches('.')
                            .trim()
                            .parse::<u16>()
                            .map_err(|e| anyhow!("chromedriver port in '{line}': {e}"));
                    }
                }
                bail!("chromedriver exited before it was ready")
            })
            .await
            .context("chromedriver not ready within 15 s")??;
            // Keep reading its output so it never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let base = format!("http://127.0.0.1:{port}");
            let http = reqwest::Client::new();
            let caps = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,800",
                        "--hide-scrollbars", "--force-device-scale-factor=1",
                        "--no-first-run", "--disable-extensions"]
                }
            }}});
            let res: Value = http
                .post(format!("{base}/session"))
                .json(&caps)
                .send()
                .await?
                .json()
                .await?;
            let session = res["value"]["sessionId"]
                .as_str()
                .ok_or_else(|| anyhow!("no WebDriver session: {res}"))?
                .to_string();
            let browser = Browser {
                http,
                session: format!("{base}/session/{session}"),
                driver,
            };
            browser.resize(1280, 800).await?;
            Ok(browser)
        }

        async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value> {
            let url = format!("{}{path}", self.session);
            let mut req = self.http.request(method, &url);
            if !body.is_null() {
                req = req.json(&body);
            }
            let res: Value = req.send().await?.json().await?;
            if let Some(err) = res["value"]["error"].as_str() {
                bail!(
                    "WebDriver {path}: {err}: {}",
                    res["value"]["message"].as_str().unwrap_or("")
                );
            }
            Ok(res["value"].clone())
        }

        pub async fn goto(&self, url: &str) -> Result<()> {
            self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
                .await
                .map(drop)
        }

        /// Runs a script (its `return` value comes back as JSON).
        pub async fn run(&self, script: &str) -> Result<Value> {
            self.cmd(
                reqwest::Method::POST,
                "/execute/sync",
                json!({"script": script, "args": []}),
            )
            .await
        }

        async fn element(&self, testid: &str) -> Result<String> {
            let v = self
                .cmd(
                    reqwest::Method::POST,
                    "/element",
                    json!({"using": "css selector", "value": selector(testid)}),
                )
                .await?;
            v[ELEMENT]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no element {testid}: {v}"))
        }

        pub async fn click(&self, testid: &str) -> Result<()> {
            let id = self.wait_element(testid).await?;
            self.cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/click"),
                json!({}),
            )
            .await
            .map(drop)
        }

        /// Types into a field as a user would (key events).
        pub async fn type_into(&self, testid: &str, text: &str) -> Result<()> {
            let id = self.wait_element(testid).await?;
            self.cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/value"),
                json!({"text": text}),
            )
            .await
            .map(drop)
        }

        pub async fn clear(&self, testid: &str) -> Result<()> {
            let id = self.wait_element(testid).await?;
            self.cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/clear"),
                json!({}),
            )
            .await
            .map(drop)
        }

        /// The element's text, or `None` while it is not on the page.
        pub async fn text(&self, testid: &str) -> Result<Option<String>> {
            let v = self
                .run(&format!(
                    "const e = document.querySelector('{}'); return e ? e.textContent.trim() : null;",
                    selector(testid)
                ))
                .await?;
            Ok(v.as_str().map(str::to_string))
        }

        pub async fn attr(&self, testid: &str, name: &str) -> Result<Option<String>> {
            let v = self
                .run(&format!(
                    "const e = document.querySelector('{}'); return e ? e.getAttribute('{name}') : null;",
                    selector(testid)
                ))
                .await?;
            Ok(v.as_str().map(str::to_string))
        }

        /// Polls `check` until it yields a value, for at most [`WAIT`].
        pub async fn wait_for<'a, T, F, Fut>(&'a self, what: &str, check: F) -> Result<T>
        where
            F: Fn(&'a Browser) -> Fut,
            Fut: std::future::Future<Output = Result<Option<T>>>,
        {
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(v) = check(self).await? {
                    return Ok(v);
                }
                if Instant::now() >= deadline {
                    let body = self
                        .run("return document.querySelector('main').innerText;")
                        .await
                        .unwrap_or_default();
                    bail!(
                        "timed out after {WAIT:?} waiting for {what}; the page shows:\n{}",
                        body.as_str().unwrap_or("")
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }

        async fn wait_element(&self, testid: &str) -> Result<String> {
            self.wait_present(testid).await?;
            self.element(testid).await
        }

        pub async fn wait_present(&self, testid: &str) -> Result<()> {
            self.wait_for(&format!("{testid} on the page"), |b| async move {
                Ok(b.text(testid).await?.map(drop))
            })
            .await
        }

        pub async fn wait_absent(&self, testid: &str) -> Result<()> {
            self.wait_for(&format!("{testid} gone"), |b| async move {
                Ok(b.text(testid).await?.is_none().then_some(()))
            })
            .await
        }

        pub async fn wait_text(&self, testid: &str, want: &str) -> Result<()> {
            self.wait_for(&format!("{testid} = '{want}'"), |b| async move {
                Ok((b.text(testid).await?.as_deref() == Some(want)).then_some(()))
            })
            .await
        }

        pub async fn wait_attr(&self, testid: &str, name: &str, want: &str) -> Result<()> {
            self.wait_for(&format!("{testid} {name}='{want}'"), |b| async move {
                Ok((b.attr(testid, name).await?.as_deref() == Some(want)).then_some(()))
            })
            .await
        }

        /// The element's text now is `want`.
        pub async fn text_is(&self, testid: &str, want: &str) -> Result<()> {
            let got = self.text(testid).await?;
            if got.as_deref() != Some(want) {
                bail!("{testid} shows {got:?}, expected '{want}'");
            }
            Ok(())
        }

        /// Reloads the page and waits until the new one is loaded.
        pub async fn reload(&self) -> Result<()> {
            self.run("window.__beforeReload = true; location.reload(); return true;")
                .await?;
            self.wait_for("the page reloaded", |b| async move {
                // A script sent while the old page unloads may fail: not loaded yet.
                let v = b
                    .run("return !window.__beforeReload && document.readyState === 'complete';")
                    .await
                    .ok();
                Ok((v == Some(Value::Bool(true))).then_some(()))
            })
            .await
        }

        /// A Chrome DevTools command through chromedriver.
        pub async fn cdp(&self, cmd: &str, params: Value) -> Result<Value> {
            self.cmd(
                reqwest::Method::POST,
                "/goog/cdp/execute",
                json!({"cmd": cmd, "params": params}),
            )
            .await
        }

        /// Sizes the window so that the page's viewport is `width` x `height`.
        pub async fn resize(&self, width: u64, height: u64) -> Result<()> {
            let frame = self
                .run("return [outerWidth - innerWidth, outerHeight - innerHeight];")
                .await?;
            let (dw, dh) = (
                frame[0].as_u64().unwrap_or(0),
                frame[1].as_u64().unwrap_or(0),
            );
            self.cmd(
                reqwest::Method::POST,
                "/window/rect",
                json!({"width": width + dw, "height": height + dh}),
            )
            .await
            .map(drop)
        }

        /// Saves a PNG of the viewport.
        pub async fn screenshot(&self, path: &std::path::Path) -> Result<()> {
            let v = self
                .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
                .await?;
            let png = base64_decode(v.as_str().context("screenshot data")?)?;
            std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("screenshot {}", path.display());
            Ok(())
        }

        /// Errors the page logged (script errors, console.error), not counting the failed
        /// requests the tests cause on purpose (401, 412, blocked URLs).
        pub async fn page_errors(&self) -> Result<Vec<String>> {
            let logs = self
                .cmd(reqwest::Method::POST, "/se/log", json!({"type": "browser"}))
                .await?;
            Ok(logs
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["level"] == "SEVERE")
                .filter_map(|e| e["message"].as_str())
                .filter(|m| !m.contains("Failed to load resource"))
                .map(str::to_string)
                .collect())
        }

        pub async fn stop(self) {
            let _ = self.cmd(reqwest::Method::DELETE, "", Value::Null).await;
            // `Drop` ends chromedriver and what is left of the browser.
        }
    }

    impl Drop for Browser {
        /// chromedriver and every browser process it started (one process group).
        fn drop(&mut self) {
            if let Some(pid) = self.driver.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    fn selector(testid: &str) -> String {
        format!("[data-testid=\"{testid}\"]")
    }

    /// Standard base64 (the screenshot's PNG).
    fn base64_decode(s: &str) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' | b'\n' | b'\r' => continue,
                _ => bail!("not base64: {c:#x}"),
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}
