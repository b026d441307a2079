//! `devvault --listen 127.0.0.1:8200 --root-token root`

#![forbid(unsafe_code)]

use std::net::SocketAddr;
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let vault = match devvault::DevVault::start(args.listen, &args.root_token).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("devvault: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
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
