//! The agent core: logging in, keeping leases alive, rendering files,
//! recording state, adopting it at start, reloading and tearing down.
//! Tests drive the real auth and lease loops in-process (against a scripted
//! Vault, under tokio's paused clock). The `leasehold` binary is the CLI
//! around it.

pub mod adopt;
pub mod auth;
pub mod backoff;
pub mod clock;
pub mod files;
pub mod hooks;
pub mod lease;
pub mod reload;
pub mod render;
pub mod revoke;
pub mod run;
pub mod signals;
pub mod state;
pub mod teardown;
pub mod telemetry;
pub mod timing;
