//! The `cloud-stub` binary: parses the command line, installs logging and signal handling,
//! starts the embedded broker unless told to use an external one, prints one JSON ready line,
//! and calls [`cloud_stub::run`].

use anyhow::Context;
use clap::Parser;
use cloud_stub::{DbLocation, MqttTarget, StubConfig};
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
    if let Err(e) = runtime.block_on(serve(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone())?;
    let api = tokio::net::TcpListener::bind(cli.api_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.api_listen))?;
    let api_addr = api.local_addr()?;

    let mqtt = match cli.broker {
        Some(target) => {
            wait_for_external(&target, &shutdown).await;
            target
        }
        None => {
            let listen = cloud_stub::resolve_listen(cli.mqtt_listen)?;
            cloud_stub::start_embedded_broker(listen)?;
            cloud_stub::wait_until_accepting(listen, BROKER_START).await?;
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            MqttTarget {
                host,
                port: listen.port(),
            }
        }
    };
    if shutdown.is_cancelled() {
        return Ok(());
    }
    let ready = serde_json::json!({"api": format!("http://{api_addr}"), "mqtt": mqtt.to_string()});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ready}")?;
    stdout.flush()?;
    drop(stdout);

    let db = match cli.db.as_str() {
        ":memory:" => DbLocation::Memory,
        path => DbLocation::Path(PathBuf::from(path)),
    };
    let mut config = StubConfig::new(mqtt, db);
    config.max_queue = cli.max_queue as usize;
    config.send_window = cli.send_window as usize;
    cloud_stub::run(config, api, shutdown).await?;
    Ok(())
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
