//! `devvault --listen 127.0.0.1:8200 --root-token root [--dev-tls]`

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

/// A Vault-compatible development server (in memory, for tests and demos).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8200")]
    listen: SocketAddr,
    /// The root token.
    #[arg(long, default_value = "root")]
    root_token: String,
    /// Serve HTTPS with a throwaway CA, as `vault server -dev-tls` does.
    #[arg(long)]
    dev_tls: bool,
    /// Where `--dev-tls` writes vault-ca.pem, vault-cert.pem and
    /// vault-key.pem (default: a new temporary directory).
    #[arg(long, requires = "dev_tls")]
    dev_tls_cert_dir: Option<PathBuf>,
    /// Proxy mode: forward every request outside `sys/devvault/` to this
    /// real Vault/OpenBao (`http://host:port`), with faults and the request
    /// log applied. `--root-token` should be the upstream's root token.
    #[arg(long, conflicts_with = "dev_tls")]
    upstream: Option<String>,
}

/// Generates the certificates, writes them as Vault does, and returns them
/// with the CA file's path.
fn dev_tls(dir: Option<&Path>) -> Result<(devvault::DevTls, PathBuf), String> {
    let tls = devvault::DevTls::generate().map_err(|e| e.to_string())?;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            d.to_path_buf()
        }
        None => tempfile::Builder::new()
            .prefix("devvault-tls")
            .tempdir()
            .map_err(|e| format!("creating a directory for the certificates: {e}"))?
            .keep(),
    };
    for (name, pem) in [
        ("vault-ca.pem", &tls.ca_pem),
        ("vault-cert.pem", &tls.cert_pem),
        ("vault-key.pem", &tls.key_pem().to_string()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).map_err(|e| format!("writing {}: {e}", path.display()))?;
        if name == "vault-key.pem" {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        }
    }
    Ok((tls, dir.join("vault-ca.pem")))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let tls = match args.dev_tls.then(|| dev_tls(args.dev_tls_cert_dir.as_deref())).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("devvault: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Err(e)) = args.upstream.as_deref().map(devvault::proxy::Upstream::parse) {
        eprintln!("devvault: --upstream: {e}");
        return ExitCode::from(2);
    }
    let started = match (&tls, &args.upstream) {
        (Some((tls, _)), _) => devvault::DevVault::start_tls(args.listen, &args.root_token, tls).await,
        (None, Some(up)) => devvault::DevVault::start_proxy(args.listen, &args.root_token, up).await,
        (None, None) => devvault::DevVault::start(args.listen, &args.root_token).await,
    };
    let vault = match started {
        Ok(v) => v,
        Err(e) => {
            eprintln!("devvault: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Some((_, ca)) = &tls {
        // Before the "listening" line: readers take that one as "ready".
        println!("devvault CA certificate: {}", ca.display());
    }
    println!("devvault listening on {}", vault.url());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devvault: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(vault);
    ExitCode::SUCCESS
}
