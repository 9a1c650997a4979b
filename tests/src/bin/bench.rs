//! `bench`: how much gatewayd adds to a device call and how little of a small box it takes.
//! Builds the workspace binaries (release when this is a release build), starts the cloud
//! stub, simulated devices and gatewayd on loopback, and prints one table; see `e2e::bench`.

use anyhow::{Context, Result};
use clap::Parser;
use e2e::bench::{self, Options};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Benchmark gatewayd against direct HTTP and MQTT baselines measured in the same run"
)]
struct Cli {
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Devices behind the gateway in the RPC phases.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// RPCs kept in flight in the throughput phase.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Recorded sequential rounds (each: direct HTTP, MQTT round trip, RPC).
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Devices of the twin fan-out phase (one desired change each).
    #[arg(long, default_value_t = 10_000)]
    twin_devices: usize,
    /// Skip the twin fan-out phase.
    #[arg(long)]
    skip_twins: bool,
    /// Devices of the message phase.
    #[arg(long, default_value_t = 100)]
    message_devices: usize,
    /// Messages sent to each device in the message phase.
    #[arg(long, default_value_t = 100)]
    messages_per_device: usize,
    /// Skip the message phase.
    #[arg(long)]
    skip_messages: bool,
    /// Operator API requests (twin PATCHes, message POSTs) kept in flight.
    #[arg(long, default_value_t = 32)]
    api_in_flight: usize,
    /// Seconds gatewayd is watched idle in the footprint phase.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Devices configured in the footprint phase.
    #[arg(long, default_value_t = 10_000)]
    footprint_devices: usize,
    /// Skip the footprint phase.
    #[arg(long)]
    skip_footprint: bool,
    /// Simulated gateways of the swarm phase (the cloud stub under many gateways).
    #[arg(long, default_value_t = 1000)]
    swarm_gateways: usize,
    /// Devices behind each simulated gateway.
    #[arg(long, default_value_t = 10)]
    swarm_devices: usize,
    /// Skip the swarm phase.
    #[arg(long)]
    skip_swarm: bool,
    /// Skip the Modbus phase.
    #[arg(long)]
    skip_modbus: bool,
    /// Sequential rounds of the Modbus phase, per transport.
    #[arg(long, default_value_t = 1000)]
    modbus_rounds: usize,
    /// Skip the ThingsBoard profile phase.
    #[arg(long)]
    skip_thingsboard: bool,
    /// Sequential rounds of the ThingsBoard profile phase (each: one RPC through the native
    /// profile and one through the thingsboard profile).
    #[arg(long, default_value_t = 1000)]
    tb_rounds: usize,
    /// Use this external MQTT broker (e.g. a Mosquitto at mqtt://127.0.0.1:1883) instead of the
    /// stub's embedded one.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Do not run `cargo build` first (the binaries next to this one must be current).
    #[arg(long)]
    no_build: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.devices > 0 && cli.in_flight > 0 && cli.samples > 0,
        "--devices, --in-flight and --samples must be at least 1"
    );
    anyhow::ensure!(
        cli.swarm_gateways > 0 && cli.swarm_devices > 0,
        "--swarm-gateways and --swarm-devices must be at least 1"
    );
    anyhow::ensure!(
        cli.twin_devices > 0
            && cli.message_devices > 0
            && cli.messages_per_device > 0
            && cli.api_in_flight > 0,
        "--twin-devices, --message-devices, --messages-per-device and --api-in-flight must be at least 1"
    );
    if !cli.no_build {
        build_binaries()?;
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: this is a debug build; use `cargo run --release --bin bench` for real figures"
        );
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("executable has no target dir")?;
    let opts = Options {
        devices: cli.devices,
        samples: cli.samples,
        warmup: (cli.samples / 10).max(100),
        in_flight: cli.in_flight,
        duration: Duration::from_secs(cli.duration),
        twin_devices: (!cli.skip_twins).then_some(cli.twin_devices),
        messages: (!cli.skip_messages).then_some((cli.message_devices, cli.messages_per_device)),
        api_in_flight: cli.api_in_flight,
        footprint_devices: (!cli.skip_footprint).then_some(cli.footprint_devices),
        idle: Duration::from_secs(cli.idle_seconds),
        broker: cli.broker,
        swarm: (!cli.skip_swarm).then_some((cli.swarm_gateways, cli.swarm_devices)),
        modbus: (!cli.skip_modbus).then(|| bench::modbus::ModbusOptions {
            rounds: cli.modbus_rounds.max(1),
            in_flight: cli.in_flight,
            duration: Duration::from_secs(cli.duration),
        }),
        thingsboard: (!cli.skip_thingsboard).then(|| bench::thingsboard::TbOptions {
            rounds: cli.tb_rounds.max(1),
            warmup: (cli.tb_rounds / 10).max(50),
        }),
        dir: target.join("bench"),
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(bench::run(&opts))?;
    println!("{}", report.table());
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    Ok(())
}

/// Makes the daemon, stub and fixture binaries current, in the profile of this build.
fn build_binaries() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--workspace", "--bins"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo")?;
    anyhow::ensure!(status.success(), "building the workspace failed");
    Ok(())
}
