//! leasehold: a Kubernetes sidecar that keeps per-pod, short-lived Vault
//! credentials alive, writes them as files, and revokes them at shutdown.

#![forbid(unsafe_code)]

#[cfg(feature = "demo")]
use leasehold::demo;
use leasehold::{agent, check, config, render, shutdown, status, telemetry};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::{Config, ConfigError};

/// Exit code for an invalid configuration (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(version, about = "Per-pod, short-lived Vault credentials for Kubernetes workloads")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar until SIGTERM/SIGINT (or, with --once, until every secret is rendered).
    Agent {
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Obtain and render every secret, then exit 0 leaving the leases alive.
        #[arg(long)]
        once: bool,
    },
    /// Validate the config and render every template against sample data.
    Check {
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a running agent's status (/v1/status) as a table.
    Status {
        /// The agent's telemetry address.
        #[arg(long, default_value = "127.0.0.1:9102")]
        addr: String,
    },
    /// Run a local devvault and the agent against it with short TTLs.
    #[cfg(feature = "demo")]
    Demo {
        /// Use this PostgreSQL (postgres://user:password@host:port/db) instead of the in-memory plugin.
        #[arg(long)]
        database_url: Option<String>,
        /// Where the demo writes its config, token and credential files.
        #[arg(long, default_value = "leasehold-demo")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    telemetry::harden();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, once } => run_agent(&config, once),
        Command::Check { config } => run_check(&config),
        Command::Status { addr } => status::main(&addr),
        #[cfg(feature = "demo")]
        Command::Demo { database_url, dir } => demo::main(database_url, dir),
    }
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("leasehold: invalid configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, &config::process_env).map_err(|e| config_failed(&e))
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // One thread is plenty for a sidecar and keeps its footprint small.
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn run_agent(path: &Path, once: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = render::Renderer::compile(&config, path) {
        return config_failed(&e);
    }
    telemetry::init_logging(&config.log);
    let result = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let signals = shutdown::install()?;
            agent::run(config, path, signals, agent::Options { once, env: &config::process_env }).await
        })
    });
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!(event = "fatal", error = format!("{e:#}"), "agent failed");
            eprintln!("leasehold: {e:#}");
            ExitCode::from(agent::EXIT_FAILURE as u8)
        }
    }
}

fn run_check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in check::chown_warnings(&config) {
        eprintln!("leasehold: warning: {}: {w}", path.display());
    }
    match check::check(&config, path) {
        Ok(problems) if problems.is_empty() => {
            let files: usize = config.secrets.iter().map(|s| s.files.len()).sum();
            println!("{}: ok ({} secrets, {files} files)", path.display(), config.secrets.len());
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for p in problems {
                eprintln!("leasehold: {p}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => config_failed(&e),
    }
}
