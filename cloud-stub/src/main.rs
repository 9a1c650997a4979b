//! The `cloud-stub` binary: parses the command line, installs logging and signal handling,
//! starts the embedded broker unless told to use an external one, prints one JSON ready line,
//! and calls [`cloud_stub::run`].

use anyhow::Context;
use clap::Parser;
use cloud_stub::security::{BrokerSecurity, Credentials, Secret};
use cloud_stub::{DbLocation, EmbeddedBroker, MqttTarget, StubConfig, TlsListener};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Exit code for invalid arguments (EX_USAGE).
const EXIT_USAGE: i32 = 64;
/// How long the embedded broker may take to accept connections.
const BROKER_START: Duration = Duration::from_secs(5);

/// The cloud side of gatewayd for development and tests: MQTT broker, operator API, store.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Where the embedded broker listens (port 0 picks a free port). Ignored with --broker.
    #[arg(long, default_value = "127.0.0.1:1883", value_name = "ADDR")]
    mqtt_listen: SocketAddr,
    /// Use this external broker instead of the embedded one, e.g. mqtt://localhost:1883.
    #[arg(long, value_name = "URL", conflicts_with = "mqtt_listen")]
    broker: Option<MqttTarget>,
    /// Where the operator HTTP API listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    api_listen: SocketAddr,
    /// SQLite database file, or `:memory:`.
    #[arg(long, default_value = "cloud-stub.db", value_name = "PATH")]
    db: String,
    /// Messages per device that may be open (queued or delivered) at once; more are refused
    /// with 429 queue_full.
    #[arg(long, default_value_t = cloud_stub::DEFAULT_MAX_QUEUE as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_queue: u32,
    /// Messages published to one gateway and not yet acknowledged, at most.
    #[arg(long, default_value_t = cloud_stub::DEFAULT_SEND_WINDOW as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    send_window: u32,
    /// Seconds after its TTL that a delivered message waits for its final feedback: at a third
    /// of it the message is sent again (the gateway repeats its feedback), at the end it is
    /// `may_have_run`.
    #[arg(long, default_value_t = cloud_stub::DEFAULT_VERDICT_GRACE.as_secs() as u32,
          value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=86_400))]
    verdict_grace_seconds: u32,
    /// Embedded broker: also listen with TLS here (e.g. 0.0.0.0:8883), requiring client
    /// certificates; a certificate's common name must equal its client id (the gateway id).
    /// Secures the broker (logins on the plain listener, topic ACL).
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key", "tls_client_ca"],
          conflicts_with = "broker")]
    mqtts_listen: Option<SocketAddr>,
    /// PEM certificate (chain) of the TLS listener.
    #[arg(long, value_name = "FILE", requires = "mqtts_listen")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    #[arg(long, value_name = "FILE", requires = "mqtts_listen")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate that client certificates must chain to.
    #[arg(long, value_name = "FILE", requires = "mqtts_listen")]
    tls_client_ca: Option<PathBuf>,
    /// Embedded broker: per-gateway passwords (TOML, `[gateways.<id>] password = "..."`);
    /// a gateway logs in with user name = client id = its gateway id. Secures the broker.
    #[arg(long, value_name = "FILE", conflicts_with = "broker")]
    credentials: Option<PathBuf>,
    /// The stub's own MQTT client id and user name.
    #[arg(long, default_value = cloud_stub::DEFAULT_CLIENT_ID, value_name = "NAME")]
    cloud_user: String,
    /// The stub's MQTT password (prefer --cloud-password-file). With an external broker it is
    /// sent as the login; a secured embedded broker requires it of the stub's client, and
    /// makes up a random one when none is given.
    #[arg(long, value_name = "SECRET", conflicts_with = "cloud_password_file")]
    cloud_password: Option<String>,
    /// A file holding the stub's MQTT password (one trailing newline ignored).
    #[arg(long, value_name = "FILE")]
    cloud_password_file: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on the operator API (prefer --api-token-file).
    #[arg(long, value_name = "TOKEN", conflicts_with = "api_token_file")]
    api_token: Option<String>,
    /// A file holding the operator API token (one trailing newline ignored).
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
}

/// Secrets and security files, read before anything is bound.
struct Secrets {
    cloud_password: Option<Secret>,
    api_token: Option<Secret>,
    credentials: Option<Credentials>,
}

impl Secrets {
    /// Reads every secret the command line names; all problems at once.
    fn read(cli: &Cli) -> Result<Secrets, String> {
        let mut problems = Vec::new();
        let mut secret =
            |flag: &str, inline: &Option<String>, file: &Option<PathBuf>| match (inline, file) {
                (_, Some(path)) => match Secret::read_file(path) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        problems.push(format!("{flag}-file: {e}"));
                        None
                    }
                },
                (Some(s), None) if s.is_empty() => {
                    problems.push(format!("{flag}: must not be empty"));
                    None
                }
                (Some(s), None) => Some(Secret::new(s.as_str())),
                (None, None) => None,
            };
        let cloud_password = secret(
            "--cloud-password",
            &cli.cloud_password,
            &cli.cloud_password_file,
        );
        let api_token = secret("--api-token", &cli.api_token, &cli.api_token_file);
        let credentials = match &cli.credentials {
            Some(path) => match Credentials::load(path) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(format!("--credentials: {e}"));
                    None
                }
            },
            None => None,
        };
        if let (Some(listen), Some(cert), Some(key), Some(ca)) = (
            cli.mqtts_listen,
            &cli.tls_cert,
            &cli.tls_key,
            &cli.tls_client_ca,
        ) {
            if let Err(e) = cloud_stub::check_tls_files(&TlsListener {
                listen,
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            }) {
                problems.push(e);
            }
        }
        if problems.is_empty() {
            Ok(Secrets {
                cloud_password,
                api_token,
                credentials,
            })
        } else {
            Err(problems.join("\n"))
        }
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(EXIT_USAGE);
        }
    };
    if cli.db.is_empty() {
        eprintln!("error: --db must name a file or be :memory:");
        std::process::exit(EXIT_USAGE);
    }
    let secrets = match Secrets::read(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(cli, secrets)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(cli: Cli, secrets: Secrets) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let api = tokio::net::TcpListener::bind(cli.api_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.api_listen))?;
    let api_addr = api.local_addr()?;

    let mut cloud_password = secrets.cloud_password;
    let mut mqtts = None;
    let mqtt = match cli.broker {
        Some(target) => {
            wait_for_external(&target, &shutdown).await;
            target
        }
        None => {
            let listen = cloud_stub::resolve_listen(cli.mqtt_listen)?;
            let tls = match (
                cli.mqtts_listen,
                cli.tls_cert,
                cli.tls_key,
                cli.tls_client_ca,
            ) {
                (Some(addr), Some(cert), Some(key), Some(client_ca)) => Some(TlsListener {
                    listen: cloud_stub::resolve_listen(addr)?,
                    cert,
                    key,
                    client_ca,
                }),
                _ => None,
            };
            // Secured when gateways must log in or use certificates; the stub's own client
            // then needs a password too (a random one unless given).
            let security = (secrets.credentials.is_some() || tls.is_some()).then(|| {
                let password = cloud_password.get_or_insert_with(Secret::random).clone();
                BrokerSecurity {
                    cloud_user: cli.cloud_user.clone(),
                    cloud_password: password,
                    gateways: secrets.credentials,
                }
            });
            let broker = EmbeddedBroker {
                listen,
                tls,
                security,
            };
            cloud_stub::start_broker(&broker)?;
            cloud_stub::wait_until_accepting(listen, BROKER_START).await?;
            if let Some(tls) = &broker.tls {
                cloud_stub::wait_until_accepting(tls.listen, BROKER_START).await?;
                mqtts = Some(format!("mqtts://{}", loopback_if_unspecified(tls.listen)));
            }
            tracing::info!(
                secured = broker.security.is_some(),
                tls = broker.tls.is_some(),
                "embedded broker started"
            );
            let addr = loopback_if_unspecified(listen);
            MqttTarget {
                host: addr.ip().to_string(),
                port: addr.port(),
            }
        }
    };
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let mut ready =
        serde_json::json!({"api": format!("http://{api_addr}"), "mqtt": mqtt.to_string()});
    if let Some(url) = mqtts {
        ready["mqtts"] = url.into();
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;
    drop(stdout);

    let db = match cli.db.as_str() {
        ":memory:" => DbLocation::Memory,
        path => DbLocation::Path(PathBuf::from(path)),
    };
    let mut config = StubConfig::new(mqtt, db);
    config.client_id = cli.cloud_user;
    config.password = cloud_password;
    config.api_token = secrets.api_token;
    config.max_queue = cli.max_queue as usize;
    config.send_window = cli.send_window as usize;
    config.verdict_grace = Duration::from_secs(cli.verdict_grace_seconds.into());
    cloud_stub::run(config, api, shutdown).await?;
    Ok(())
}

/// `addr`, with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback: where to connect.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Waits until the external broker accepts TCP connections (or shutdown), warning now and then.
async fn wait_for_external(target: &MqttTarget, shutdown: &CancellationToken) {
    let addr = format!("{}:{}", target.host, target.port);
    let mut warned_at = tokio::time::Instant::now();
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() || shutdown.is_cancelled() {
            return;
        }
        if warned_at.elapsed() >= Duration::from_secs(5) {
            tracing::warn!(broker = %target, "waiting for the external broker to accept connections");
            warned_at = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Installs SIGTERM and SIGINT handlers now; the first signal cancels `shutdown`.
fn cancel_on_signal(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}
