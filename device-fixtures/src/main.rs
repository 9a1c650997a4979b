//! `device-fixtures`: runs simulated legacy devices for manual testing and benchmarks.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use device_fixtures::http::faults::Faults as HttpFaults;
use device_fixtures::http::DEFAULT_MAX_SPEED_LIMIT;
use device_fixtures::serial::faults::Faults as SerialFaults;
use device_fixtures::{run_http_fleet, HttpDeviceSpec, ModbusSim, SerialSim, SerialSimSpec};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Exit status for a bad command line (sysexits `EX_USAGE`).
const EX_USAGE: i32 = 64;

#[derive(Debug, Parser)]
#[command(version, about = "Simulated legacy devices with faults on demand")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run HTTP AGVs and their shared control API; prints one JSON line with the URLs.
    Http(HttpArgs),
    /// Run a serial temperature controller on a new pseudo-terminal; prints one JSON line with
    /// its path and the control URL.
    Serial(SerialArgs),
    /// Run Modbus slaves from a register map, over Modbus TCP, RTU over TCP and RTU on a new
    /// pseudo-terminal; prints one JSON line with the TCP addresses, the pty path and the
    /// control URL.
    Modbus(ModbusArgs),
}

#[derive(Debug, Args)]
struct ModbusArgs {
    /// The register map (JSON; see `device_fixtures::modbus::map`).
    #[arg(long)]
    map: PathBuf,
    /// Keep a symlink at this path pointing at the current pty (it survives `gone`).
    #[arg(long)]
    link: PathBuf,
    /// Address of the Modbus TCP listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    tcp: SocketAddr,
    /// Address of the listener taking RTU frames over TCP.
    #[arg(long, default_value = "127.0.0.1:0")]
    rtu_tcp: SocketAddr,
    /// Address of the control API.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
}

#[derive(Debug, Args)]
struct SerialArgs {
    /// Unit address on the line (RS-485); repeat for several units. Without, one unit answers
    /// unprefixed requests.
    #[arg(long)]
    address: Vec<String>,
    /// Keep a symlink at this path pointing at the current pty (it survives `disappear`).
    #[arg(long)]
    link: Option<PathBuf>,
    /// Address of the control API.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Faults and habits to start with, as the control API's JSON faults object, e.g.
    /// '{"echo": true, "unsolicited_ms": 500}'.
    #[arg(long, value_name = "JSON")]
    faults: Option<String>,
}

#[derive(Debug, Args)]
struct HttpArgs {
    /// Device name; repeat for several devices, or give one as a prefix for --count.
    #[arg(long)]
    name: Vec<String>,
    /// Number of devices, named PREFIX-1..PREFIX-N (agv-1..agv-N without --name).
    #[arg(long)]
    count: Option<usize>,
    /// Address each device API binds (port 0: a fresh port per device).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address of the shared control API.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Hard ceiling for every device's maxSpeed setting.
    #[arg(long, default_value_t = DEFAULT_MAX_SPEED_LIMIT)]
    max_speed_limit: f64,
    /// Faults and habits every device starts with, as the control API's JSON faults object,
    /// e.g. '{"busy_every": 3}'.
    #[arg(long, value_name = "JSON")]
    faults: Option<String>,
    /// Devices have no health endpoint: /health answers 404 (same as "no_health": true).
    #[arg(long)]
    no_health: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Http(args) => http(args).await,
        Command::Serial(args) => serial(args).await,
        Command::Modbus(args) => modbus(args).await,
    }
}

async fn modbus(args: ModbusArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.map)
        .with_context(|| format!("reading {}", args.map.display()))?;
    let map: device_fixtures::modbus::map::MapFile = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {}: {e}", args.map.display());
            std::process::exit(EX_USAGE);
        }
    };
    let signals = Signals::install()?;
    let tcp = TcpListener::bind(args.tcp)
        .await
        .with_context(|| format!("binding modbus tcp on {}", args.tcp))?;
    let rtu_tcp = TcpListener::bind(args.rtu_tcp)
        .await
        .with_context(|| format!("binding rtu-over-tcp on {}", args.rtu_tcp))?;
    let sim = match ModbusSim::open(&map, tcp, rtu_tcp, args.link.clone()) {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(EX_USAGE);
        }
    };
    let control = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding control api on {}", args.control))?;
    let line = json!({
        "tcp": sim.tcp_addr().to_string(),
        "rtu_tcp": sim.rtu_tcp_addr().to_string(),
        "link": args.link.display().to_string(),
        "control": format!("http://{}", control.local_addr()?),
    });
    serve(line, signals, "modbus simulator", |stop| {
        sim.run(control, stop)
    })
    .await
}

async fn serial(args: SerialArgs) -> anyhow::Result<()> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = args.address.iter().find(|a| !seen.insert(a.as_str())) {
        eprintln!("error: address '{dup}' given twice");
        std::process::exit(EX_USAGE);
    }
    if args.address.iter().any(|a| a.is_empty()) {
        eprintln!("error: an address must not be empty");
        std::process::exit(EX_USAGE);
    }
    let mut faults = SerialFaults::default();
    if let Some(text) = &args.faults {
        if let Err(err) = patch(text, |v| faults.apply_patch(v).map(drop)) {
            eprintln!("error: --faults: {err}");
            std::process::exit(EX_USAGE);
        }
    }
    let signals = Signals::install()?;
    let sim = SerialSim::open(SerialSimSpec {
        addresses: args.address,
        link: args.link.clone(),
        faults,
    })
    .context("creating the pseudo-terminal")?;
    let control = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding control api on {}", args.control))?;
    let line = json!({
        "path": sim.path(),
        "link": args.link.as_ref().map(|l| l.display().to_string()),
        "control": format!("http://{}", control.local_addr()?),
    });
    serve(line, signals, "serial simulator", |stop| {
        sim.run(control, stop)
    })
    .await
}

async fn http(args: HttpArgs) -> anyhow::Result<()> {
    let names = match device_names(&args.name, args.count) {
        Ok(names) => names,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(EX_USAGE);
        }
    };
    let mut faults = HttpFaults {
        no_health: args.no_health,
        ..HttpFaults::default()
    };
    if let Some(text) = &args.faults {
        if let Err(err) = patch(text, |v| faults.apply_patch(v).map(drop)) {
            eprintln!("error: --faults: {err}");
            std::process::exit(EX_USAGE);
        }
    }
    // Installed before the ports are announced, so a caller may signal as soon as it reads them.
    let signals = Signals::install()?;
    let mut devices = Vec::with_capacity(names.len());
    let mut announced = Vec::with_capacity(names.len());
    for name in names {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding device '{name}' api on {}", args.listen))?;
        let addr = listener.local_addr()?;
        announced.push(json!({ "name": name, "api": format!("http://{addr}") }));
        let spec = HttpDeviceSpec {
            name,
            max_speed_limit: args.max_speed_limit,
            faults: faults.clone(),
        };
        devices.push((spec, listener));
    }
    let control = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding control api on {}", args.control))?;
    let line = json!({
        "control": format!("http://{}", control.local_addr()?),
        "devices": announced,
    });
    serve(line, signals, "fleet", |stop| {
        run_http_fleet(devices, control, stop)
    })
    .await
}

/// SIGTERM and SIGINT, installed before the ready line, so a caller may signal as soon as it
/// reads it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Prints the ready `line`, runs the simulator `run` makes until SIGTERM or SIGINT, then stops
/// it and waits for it.
async fn serve<F, E>(
    line: serde_json::Value,
    mut signals: Signals,
    what: &str,
    run: impl FnOnce(CancellationToken) -> F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
    anyhow::Error: From<E>,
{
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(run(shutdown.clone()));
    tokio::select! {
        _ = signals.term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = signals.int.recv() => tracing::info!("SIGINT, stopping"),
    }
    shutdown.cancel();
    served
        .await
        .with_context(|| format!("{what} task panicked"))??;
    Ok(())
}

/// Applies a `--faults` JSON object with `apply` (one-off actions such as `reset` do nothing
/// at start).
fn patch<E: std::fmt::Display>(
    text: &str,
    apply: impl FnOnce(&serde_json::Value) -> Result<(), E>,
) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    apply(&value).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Device names from repeated `--name` and an optional `--count`.
fn device_names(names: &[String], count: Option<usize>) -> anyhow::Result<Vec<String>> {
    let list = match (count, names) {
        (None, []) => vec!["agv-1".to_owned()],
        (None, names) => names.to_vec(),
        (Some(0), _) => bail!("--count must be at least 1"),
        (Some(n), []) => (1..=n).map(|i| format!("agv-{i}")).collect(),
        (Some(n), [prefix]) => (1..=n).map(|i| format!("{prefix}-{i}")).collect(),
        (Some(_), _) => bail!("--count takes at most one --name, used as the prefix"),
    };
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = list.iter().find(|n| !seen.insert(n.as_str())) {
        bail!("device name '{dup}' given twice");
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str], count: Option<usize>) -> anyhow::Result<Vec<String>> {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        device_names(&list, count)
    }

    #[test]
    fn names_from_flags() {
        assert_eq!(names(&[], None).unwrap(), ["agv-1"]);
        assert_eq!(names(&["a", "b"], None).unwrap(), ["a", "b"]);
        assert_eq!(names(&[], Some(2)).unwrap(), ["agv-1", "agv-2"]);
        assert_eq!(
            names(&["bot"], Some(3)).unwrap(),
            ["bot-1", "bot-2", "bot-3"]
        );
        assert!(names(&["a", "b"], Some(2)).is_err());
        assert!(names(&["a", "a"], None).is_err());
        assert!(names(&[], Some(0)).is_err());
    }
}
