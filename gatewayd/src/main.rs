//! The `gatewayd` binary: parses the command line, loads configuration, installs logging and
//! signal handling, and calls `gatewayd::run`.

use clap::{Parser, Subcommand, ValueEnum};
use gatewayd::config::Config;
use gatewayd::notify::Notifier;
use gatewayd::reload::{self, Fingerprint};
use gatewayd::Operations;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// gatewayd allocates with mimalloc: glibc's malloc took about a sixth of the daemon's CPU
/// time in a twin fan-out (`malloc_consolidate`, bin unlinking), mimalloc's thread-local free
/// lists a fraction of that. Freed memory is purged after 1 s of allocator activity
/// (mimalloc's default), and at once by `gatewayd::release_freed_memory` after each peak.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Arenas are committed as they are used, not up front: memory an eagerly committed arena had
/// purged still counted in RSS (10,000 idle devices: 69 against 59 MB). Set at the start of
/// `main` it came too late (the first arena already existed), so it is set from an
/// initialiser that runs before mimalloc's own (a prioritised `.init_array` entry runs before
/// the unprioritised ones).
#[cfg(target_os = "linux")]
mod allocator {
    extern "C" fn configure() {
        // Option number of `mi_option_arena_eager_commit` in mimalloc 3 (`include/mimalloc.h`).
        const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
        // SAFETY: setting an option only stores it in mimalloc's static option table, usable
        // before mimalloc is initialised; nothing else runs yet.
        unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
    }

    #[used]
    #[link_section = ".init_array.00200"]
    static CONFIGURE: extern "C" fn() = configure;
}

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Edge RPC proxy gateway: cloud RPCs, messages and twins onto local HTTP and serial devices"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file (TOML); `GATEWAYD_...` environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file, report every problem, and exit 64 if there is any.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
    },
    /// The configuration the cloud added to the file (`[remote_config]`), kept in the store.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the stored remote configuration (version, when it came, the sections).
    Show {
        /// Configuration file (TOML); names the store.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// What the remote configuration adds, changes or removes compared with the file.
    Diff {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove the remote configuration; the next reload (or start) runs on the file alone.
    DropRemote {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config, Config::env()) {
            Ok(c) => {
                println!(
                    "{}: ok (gateway {}, {} devices)",
                    config.display(),
                    c.gateway.id,
                    c.devices.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Config { action } => remote_command(action),
        Command::Run { config: path } => {
            let (config, fingerprint) = match load_compact(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(cli.log_format, &config.log.level);
            gatewayd::release_freed_memory();
            let notifier = Notifier::from_vars(|k| std::env::var(k).ok(), std::process::id())
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET unusable; no service manager notifications");
                    Notifier::default()
                });
            let admin = match bind_admin(&config) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    return ExitCode::FAILURE;
                }
            };
            // One runtime thread: gatewayd's work is waiting on sockets, so a single worker
            // saves the cross-thread wake-ups of a work-stealing pool (measured: lower RPC
            // overhead, ~13 % more RPCs/s, less CPU and memory) and leaves the other cores to
            // the box. SQLite, serial opens and DNS run on their own threads.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(signals(
                    shutdown.clone(),
                    path.clone(),
                    reload_tx,
                    notifier.clone(),
                ));
                // Start-up (the first probe of every device, the catalog, the twin sync)
                // allocates far more than stays in use; give it back once it has settled.
                tokio::spawn(async {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    gatewayd::release_freed_memory();
                });
                let ops = Operations {
                    admin,
                    notifier,
                    reloads: Some((fingerprint, reload_rx)),
                    config_path: Some(path.clone()),
                };
                match gatewayd::run(config, ops, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "gatewayd stopped");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// Loads the configuration and takes its fingerprint (what SIGHUP compares a re-read file with)
/// on a thread of its own, and keeps copies made on this one.
///
/// Parsing a file of 10,000 devices and fingerprinting it allocate about 70 MB for what ends as
/// a few. On this thread the survivors would be spread over that peak and keep much of it
/// resident for the life of the process (measured: about 8 MB more idle RSS at 10,000
/// devices); the parsing thread's allocations go to a heap of their own, released with it.
fn load_compact(path: &Path) -> Result<(Config, Fingerprint), gatewayd::config::ConfigError> {
    let parsed = std::thread::scope(|s| {
        s.spawn(|| {
            let config = Config::load(path, Config::env())?;
            let fingerprint = Fingerprint::of(&config);
            Ok((config, fingerprint))
        })
        .join()
    });
    match parsed {
        Ok(Ok((config, fingerprint))) => Ok((config.clone(), fingerprint.clone())),
        Ok(Err(e)) => Err(e),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// `gatewayd config show|diff|drop-remote`: reads (or clears) the store's remote configuration
/// directly; safe while the daemon runs (SQLite in WAL mode).
fn remote_command(action: ConfigAction) -> ExitCode {
    let path = match &action {
        ConfigAction::Show { config }
        | ConfigAction::Diff { config }
        | ConfigAction::DropRemote { config } => config.clone(),
    };
    let file = match Config::load(&path, Config::env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let store = &file.store.path;
    let conn = match rusqlite::Connection::open(store) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot open the store {}: {e}", store.display());
            return ExitCode::FAILURE;
        }
    };
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
    let overlay = match gatewayd::remote::load(&conn) {
        Ok(o) => o,
        // A store from before remote configuration existed holds none.
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => None,
        Err(e) => {
            eprintln!("cannot read the store {}: {e}", store.display());
            return ExitCode::FAILURE;
        }
    };
    match action {
        ConfigAction::Show { .. } => match overlay {
            None => println!("no remote configuration"),
            Some(o) => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "version": o.version,
                    "at_ms": o.at_ms,
                    "config": o.config,
                    "applied_when_enabled": file.remote_config.enabled,
                    "on_probation": !o.confirmed,
                    "replaced_version": o.previous.as_ref().map(|p| p.version),
                }))
                .unwrap_or_default()
            ),
        },
        ConfigAction::Diff { .. } => {
            let Some(o) = overlay else {
                println!("no remote configuration");
                return ExitCode::SUCCESS;
            };
            let problems = gatewayd::remote::check_limits(&file.remote_config, &o.config);
            for p in &problems {
                println!("! {p}");
            }
            match gatewayd::remote::merge(&file, &o.config) {
                Ok(merged) => {
                    let before = Fingerprint::of(&file);
                    let after = Fingerprint::of(&merged);
                    for entry in before.changes(&after) {
                        let mark = match (before.has(&entry), after.has(&entry)) {
                            (false, true) => '+',
                            (true, false) => '-',
                            _ => '~',
                        };
                        println!("{mark} {entry}");
                    }
                }
                Err(problems) => {
                    for p in problems {
                        println!("! {p}");
                    }
                }
            }
        }
        ConfigAction::DropRemote { .. } => match gatewayd::remote::drop_overlay(&conn) {
            Ok(true) => println!(
                "remote configuration dropped; `systemctl reload gatewayd` (SIGHUP) runs on the file alone"
            ),
            Ok(false) => println!("no remote configuration"),
            Err(e) => {
                eprintln!("cannot change the store {}: {e}", store.display());
                return ExitCode::FAILURE;
            }
        },
    }
    ExitCode::SUCCESS
}

fn init_tracing(format: LogFormat, level: &str) {
    // RUST_LOG wins; otherwise the configured filter (validated at load).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Binds the admin listener from `admin.listen` (nothing when `admin.enabled = false`). Done
/// here, not in the library, so tests and embedders hand `run` their own listener.
fn bind_admin(config: &Config) -> Result<Option<std::net::TcpListener>, String> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let addr = config
        .admin
        .listen_addr()
        .map_err(|e| format!("admin.listen: {e}"))?;
    std::net::TcpListener::bind(addr).map(Some).map_err(|e| {
        format!("admin.listen: cannot listen on {addr}: {e}; choose another address or set admin.enabled = false")
    })
}

/// SIGTERM and SIGINT cancel `shutdown`; SIGHUP re-reads the configuration file and hands it
/// to the daemon, which applies what can change live (see `gatewayd::live`); it never stops
/// the daemon.
async fn signals(
    shutdown: CancellationToken,
    path: PathBuf,
    reloads: tokio::sync::mpsc::Sender<reload::Request>,
    notifier: Notifier,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = int.recv() => { tracing::info!("SIGINT received"); break }
            _ = hup.recv() => {
                tracing::info!(config = %path.display(), "SIGHUP received: re-reading the configuration");
                notifier.reloading();
                reread(&path, &reloads).await;
                notifier.reloaded();
            }
        }
    }
    shutdown.cancel();
}

/// Loads and validates the file off the runtime, hands it to the daemon and logs what the
/// daemon made of it.
async fn reread(path: &Path, reloads: &tokio::sync::mpsc::Sender<reload::Request>) {
    let file = path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = Config::load(&file, Config::env());
        gatewayd::release_freed_memory();
        loaded
    })
    .await;
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "configuration check failed");
            return;
        }
    };
    let (reply, outcome) = tokio::sync::oneshot::channel();
    if reloads
        .send(reload::Request { loaded, reply })
        .await
        .is_err()
    {
        tracing::warn!("the daemon is stopping; configuration not applied");
        return;
    }
    match outcome.await {
        Ok(o) => o.log(path),
        Err(_) => tracing::warn!("the daemon stopped before applying the configuration"),
    }
}
