//! `leasehold agent`: the sidecar. The config is read, parsed and its
//! templates compiled once here; the agent core runs with that.

use std::path::Path;
use std::process::ExitCode;

use agent::run::{Loaded, Options};

pub fn main(path: &Path, once: bool) -> ExitCode {
    let loaded = match Loaded::read(path, &config::process_env) {
        Ok(l) => l,
        Err(e) => return crate::config_failed(&e),
    };
    agent::telemetry::init_logging(&loaded.config.log);
    let result = crate::runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let signals = agent::signals::install()?;
            let opts = Options { once, env: &config::process_env };
            Ok(agent::run::run(loaded, path, signals, opts).await?)
        })
    });
    match result {
        Ok(outcome) => crate::exit_code(outcome),
        Err(e) => {
            tracing::error!(event = "fatal", error = format!("{e:#}"), "agent failed");
            eprintln!("leasehold: {e:#}");
            ExitCode::from(crate::EXIT_FAILURE)
        }
    }
}
