//! leasehold: a Kubernetes sidecar that keeps per-pod, short-lived Vault
//! credentials alive, writes them as files, and revokes them at shutdown.

#![forbid(unsafe_code)]

#[cfg(feature = "demo")]
use leasehold::demo;
use leasehold::{agent, check, config, injector, render, shutdown, status, telemetry};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::{Config, ConfigError};

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

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
    /// Serve the mutating admission webhook that adds the agent to annotated pods.
    Injector(Box<InjectorArgs>),
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

#[derive(clap::Args)]
struct InjectorArgs {
    /// The webhook's certificate (PEM); re-read when the file changes.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    #[arg(long, default_value = ":8443", value_name = "[HOST]:PORT")]
    listen: String,
    /// Vault's address, for the injected agents (default: env VAULT_ADDR).
    #[arg(long, value_name = "URL")]
    vault_address: Option<String>,
    /// A CA (PEM) that signs Vault's certificate; given to the agents inline
    /// (default: env VAULT_CACERT).
    #[arg(long, value_name = "FILE")]
    vault_ca_cert: Option<PathBuf>,
    /// Vault namespace (X-Vault-Namespace) for the agents (default: env VAULT_NAMESPACE).
    #[arg(long)]
    vault_namespace: Option<String>,
    /// Default auth mount (auth/<mount>/login).
    #[arg(long, default_value = "kubernetes")]
    auth_path: String,
    /// The agent's image.
    #[arg(long, default_value = concat!("leasehold/leasehold:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The cluster is older than 1.29 (no native sidecars): an `--once`
    /// init container plus a regular sidecar.
    #[arg(long)]
    legacy_sidecar: bool,
    /// Also translate vault-k8s (`vault.hashicorp.com/*`) annotations.
    #[arg(long)]
    vault_k8s_compat: bool,
    /// Audience of the agents' projected ServiceAccount token (the Vault role's `audience`).
    #[arg(long)]
    token_audience: Option<String>,
    /// The agents' telemetry port (probes, metrics).
    #[arg(long, default_value_t = 9102)]
    agent_telemetry_port: u16,
}

fn main() -> ExitCode {
    telemetry::harden();
    // Before any HTTP client: `status` and hooks build their own.
    leasehold::vault::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, once } => run_agent(&config, once),
        Command::Check { config } => run_check(&config),
        Command::Status { addr } => status::main(&addr),
        Command::Injector(args) => run_injector(*args),
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
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    // The clock's anchor just before tokio's timer epoch (`clock::start`).
    leasehold::clock::start();
    builder.build()
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

fn run_injector(a: InjectorArgs) -> ExitCode {
    telemetry::init_logging(&config::LogConfig::default());
    let usage = |m: String| {
        eprintln!("leasehold injector: {m}");
        ExitCode::from(EXIT_CONFIG)
    };
    let addr = match injector::listen_addr(&a.listen) {
        Ok(a) => a,
        Err(m) => return usage(m),
    };
    let env = config::process_env;
    let Some(vault_address) = a.vault_address.or_else(|| env("VAULT_ADDR")) else {
        return usage("--vault-address (or VAULT_ADDR) is required".into());
    };
    if injector::plan::http_url("--vault-address", &vault_address).is_err() {
        return usage(format!("--vault-address {vault_address:?} is not an http:// or https:// URL"));
    }
    let vault_ca_cert = a.vault_ca_cert.or_else(|| env("VAULT_CACERT").map(PathBuf::from));
    let vault_ca_pem = match &vault_ca_cert {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => return usage(format!("--vault-ca-cert {}: not a PEM certificate", p.display())),
            Err(e) => return usage(format!("--vault-ca-cert {}: {e}", p.display())),
        },
        None => None,
    };
    let auth_mount = match injector::plan::auth_mount("--auth-path", &a.auth_path) {
        Ok(m) => m,
        Err(e) => return usage(e.to_string()),
    };
    let tls = match injector::tls::server_config(&a.tls_cert, &a.tls_key) {
        Ok(t) => t,
        Err(e) => return usage(format!("TLS: {e}")),
    };
    let settings = injector::admit::Settings {
        defaults: injector::plan::Defaults {
            vault_address,
            vault_ca_pem,
            vault_namespace: a.vault_namespace.or_else(|| env("VAULT_NAMESPACE")).unwrap_or_default(),
            auth_mount,
            image: a.image,
            legacy: a.legacy_sidecar,
            token_audience: a.token_audience,
            telemetry_port: a.agent_telemetry_port,
        },
        vault_k8s_compat: a.vault_k8s_compat,
    };
    let result: anyhow::Result<()> = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let signals = shutdown::install()?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
            tracing::info!(event = "injector_listening", addr = %listener.local_addr()?, compat = settings.vault_k8s_compat, "serving /mutate, /healthz, /readyz and /metrics over HTTPS");
            injector::serve(listener, tls, injector::router(settings), signals.shutdown.clone()).await;
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leasehold injector: {e:#}");
            ExitCode::from(agent::EXIT_FAILURE as u8)
        }
    }
}
