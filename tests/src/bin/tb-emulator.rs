//! `tb-emulator`: a ThingsBoard server emulator for end-to-end tests. Binds its MQTT listener
//! and operator API on loopback ports it picks, prints one JSON ready line
//! `{"mqtt": "127.0.0.1:PORT", "api": "http://127.0.0.1:PORT"}`, and serves until SIGTERM or
//! SIGINT. The work is in [`e2e::thingsboard::run`].

use anyhow::Context;
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// ThingsBoard's gateway MQTT API and the REST calls tests need, in one small process.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// A gateway device and its access token, `NAME:TOKEN` (repeatable).
    #[arg(long = "gateway", value_name = "NAME:TOKEN", value_parser = parse_gateway)]
    gateways: Vec<(String, String)>,
    /// Where MQTT listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    mqtt_listen: SocketAddr,
    /// Where the operator HTTP API listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    api_listen: SocketAddr,
    /// Log filter (tracing `EnvFilter` syntax); default: `RUST_LOG`, else `info`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn parse_gateway(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((name, token)) if !name.is_empty() && !token.is_empty() => {
            Ok((name.to_string(), token.to_string()))
        }
        _ => Err(format!("expected NAME:TOKEN, got {s:?}")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level).context("--log-level")?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mqtt = TcpListener::bind(cli.mqtt_listen)
        .await
        .with_context(|| format!("mqtt listener {}", cli.mqtt_listen))?;
    let api = TcpListener::bind(cli.api_listen)
        .await
        .with_context(|| format!("api listener {}", cli.api_listen))?;
    // Installed before the ready line, so a caller may signal as soon as it reads it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let line = serde_json::json!({
        "mqtt": mqtt.local_addr()?.to_string(),
        "api": format!("http://{}", api.local_addr()?),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);
    let shutdown = CancellationToken::new();
    let served = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { e2e::thingsboard::run(&cli.gateways, mqtt, api, shutdown).await }
    });
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("SIGINT, stopping"),
    }
    shutdown.cancel();
    served.await.context("emulator task panicked")??;
    Ok(())
}
