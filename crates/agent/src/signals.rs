//! Signals: SIGTERM/SIGINT start the ordered teardown (a second one exits
//! 130 at once); SIGHUP asks every supervisor to re-render its files from
//! the credentials in hand, after reloading the configuration.

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Exit code for a second signal during shutdown.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

pub struct Signals {
    /// Cancelled by the first SIGTERM or SIGINT.
    pub shutdown: CancellationToken,
    /// Bumped by every SIGHUP: reload the config and re-render.
    pub reload: watch::Receiver<u64>,
}

pub fn install() -> std::io::Result<Signals> {
    let mut stream = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let shutdown = CancellationToken::new();
    let (tx, reload) = watch::channel(0u64);
    let token = shutdown.clone();
    tokio::spawn(async move {
        while let Some(signal) = stream.next().await {
            if signal == SIGHUP {
                tracing::info!(event = "sighup", "SIGHUP: reloading the configuration and re-rendering");
                tx.send_modify(|n| *n += 1);
            } else if token.is_cancelled() {
                // The operator insists: skip the rest of the teardown.
                eprintln!("leasehold: second signal during shutdown, exiting now");
                std::process::exit(EXIT_SECOND_SIGNAL);
            } else {
                tracing::info!(event = "shutdown", signal, "shutting down: revoking leases");
                token.cancel();
            }
        }
    });
    Ok(Signals { shutdown, reload })
}
