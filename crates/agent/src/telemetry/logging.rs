//! Logging setup (tracing). The HTTP endpoints come with the telemetry issue.

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use config::{LogConfig, LogFormat, LogLevel};

/// `RUST_LOG` if set and valid, else `level`: a level (`debug`) or
/// per-target directives (`leasehold=debug,info`). `Targets`, not
/// `EnvFilter`: the same directives without a regex engine in the binary.
fn filter(level: &LogLevel) -> Targets {
    std::env::var("RUST_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| level.targets().clone())
}

/// JSON (one object per line) or text logs on stderr, at `log.level` unless
/// `RUST_LOG` is set.
pub fn init_logging(cfg: &LogConfig) {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter(&cfg.level));
    let _ = match cfg.format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
}

/// The demo's timeline: short text lines with the time since start.
#[cfg(feature = "demo")]
pub fn init_demo_logging() {
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_level(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .compact();
    let _ = tracing_subscriber::registry().with(filter(&LogLevel::info())).with(fmt).try_init();
}
