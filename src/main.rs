//! leasehold: a Kubernetes sidecar that keeps per-pod, short-lived Vault
//! credentials alive, writes them as files, and revokes them at shutdown.

#![forbid(unsafe_code)]

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use agent::teardown::Outcome;
use clap::{Parser, Subcommand};
use config::ConfigError;

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

// Every exit code of the process (docs/cli.md). A second SIGTERM or
// SIGINT during the teardown exits 130 from the signal task itself
// (`agent::signals::EXIT_SECOND_SIGNAL`).

/// Done: every lease revoked (or kept as configured), or `--once` rendered.
const EXIT_OK: u8 = 0;
/// The agent failed: it could not start, `--once` did not render every
/// secret, or a lease may be left alive.
const EXIT_FAILURE: u8 = 1;
/// An invalid configuration (sysexits EX_CONFIG).
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
        /// Also check this machine (as the agent's container would): every
        /// file's directory exists and is writable, auth's token_path and
        /// vault.ca_cert (and proxy ca_certs) are readable.
        #[arg(long)]
        local: bool,
    },
    /// Print a running agent's status (/v1/status) as a table; exit 1 while a
    /// secret is not ready.
    Status {
        /// The agent's telemetry address: http://HOST:PORT, HOST:PORT or :PORT.
        #[arg(value_name = "ADDRESS", conflicts_with = "addr")]
        address: Option<String>,
        /// The same, as a flag.
        #[arg(long, default_value = "127.0.0.1:9102")]
        addr: String,
    },
    /// Serve the mutating admission webhook that adds the agent to annotated
    /// pods; `injector lint` says what it would do with existing manifests.
    #[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
    Injector {
        #[command(subcommand)]
        lint: Option<InjectorCommand>,
        #[command(flatten)]
        args: Box<InjectorArgs>,
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

#[derive(Subcommand)]
pub enum InjectorCommand {
    /// For each workload in the manifests (YAML files, `-` for stdin;
    /// `kubectl get -o yaml` output too) annotated for injection: what is
    /// translated, what is ignored and why, or why it would be denied.
    /// Exit 0, or 1 when any would be denied.
    Lint {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// As the webhook runs with --legacy-sidecar.
        #[arg(long)]
        legacy_sidecar: bool,
    },
}

#[derive(clap::Args)]
pub struct InjectorArgs {
    /// The webhook's certificate (PEM); re-read when the file changes.
    #[arg(long, value_name = "FILE", required = true)]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", required = true)]
    pub tls_key: Option<PathBuf>,
    #[arg(long, default_value = ":8443", value_name = "[HOST]:PORT")]
    pub listen: String,
    /// Vault's address, for the injected agents (default: env VAULT_ADDR).
    #[arg(long, value_name = "URL")]
    pub vault_address: Option<String>,
    /// A CA (PEM) that signs Vault's certificate; given to the agents inline
    /// (default: env VAULT_CACERT).
    #[arg(long, value_name = "FILE")]
    pub vault_ca_cert: Option<PathBuf>,
    /// Vault namespace (X-Vault-Namespace) for the agents (default: env VAULT_NAMESPACE).
    #[arg(long)]
    pub vault_namespace: Option<String>,
    /// Default auth mount (auth/<mount>/login).
    #[arg(long, default_value = "kubernetes")]
    pub auth_path: String,
    /// The agent's image.
    #[arg(long, default_value = concat!("ghcr.io/leasehold/leasehold:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The cluster is older than 1.29 (no native sidecars): an `--once`
    /// init container plus a regular sidecar.
    #[arg(long)]
    pub legacy_sidecar: bool,
    /// Also translate vault-k8s (`vault.hashicorp.com/*`) annotations.
    #[arg(long)]
    vault_k8s_compat: bool,
    /// Audience of the agents' projected ServiceAccount token (the Vault role's `audience`).
    #[arg(long)]
    pub token_audience: Option<String>,
    /// The agents' telemetry port (probes, metrics).
    #[arg(long, default_value_t = 9102)]
    pub agent_telemetry_port: u16,
    /// The injector's own log level or filter, as the agent's `log.level`
    /// (`debug` also logs refused connections and failed TLS handshakes).
    #[arg(long, default_value = "info", value_name = "LEVEL", value_parser = log_level)]
    pub log_level: config::LogLevel,
    /// The injector's log format.
    #[arg(long, default_value = "json", value_name = "json|text", value_parser = log_format)]
    pub log_format: config::LogFormat,
}

fn log_level(s: &str) -> Result<config::LogLevel, String> {
    config::LogLevel::try_from(s.to_string())
}

fn log_format(s: &str) -> Result<config::LogFormat, String> {
    match s {
        "json" => Ok(config::LogFormat::Json),
        "text" => Ok(config::LogFormat::Text),
        _ => Err(format!("{s:?} is not json or text")),
    }
}

fn main() -> ExitCode {
    agent::telemetry::harden();
    // Listeners budget descriptors against the soft limit (listen::RESERVE).
    listen::raise_nofile();
    // Before any HTTP client: `status` and hooks build their own.
    vault::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, once } => cmd::agent::main(&config, once),
        Command::Check { config, local } => cmd::check::main(&config, local),
        Command::Status { address, addr } => cmd::status::main(address.as_deref().unwrap_or(&addr)),
        Command::Injector { lint: Some(InjectorCommand::Lint { files, legacy_sidecar }), .. } => {
            cmd::lint::main(&files, legacy_sidecar)
        }
        Command::Injector { lint: None, args } => cmd::injector::main(*args),
        #[cfg(feature = "demo")]
        Command::Demo { database_url, dir } => cmd::demo::main(database_url, dir),
    }
}

/// The exit code of how the agent ended.
fn exit_code(outcome: Outcome) -> ExitCode {
    ExitCode::from(if outcome.is_success() { EXIT_OK } else { EXIT_FAILURE })
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("leasehold: invalid configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // One thread is plenty for a sidecar and keeps its footprint small.
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    // The clock's anchor just before tokio's timer epoch (`clock::start`).
    agent::clock::start();
    builder.build()
}
