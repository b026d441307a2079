//! leasehold as a library: the agent's modules, so that tests drive the
//! real auth and lease loops in-process (against a scripted Vault, under
//! tokio's paused clock). The binary (`main.rs`) is the CLI around them.

#![forbid(unsafe_code)]

pub mod adopt;
pub mod agent;
pub mod auth;
pub mod backoff;
pub mod check;
pub mod clock;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod hooks;
pub mod injector;
pub mod lease;
pub mod proxy;
pub mod reload;
pub mod render;
pub mod secret;
pub mod shutdown;
pub mod state;
pub mod status;
pub mod teardown;
pub mod telemetry;
pub mod timing;
pub mod vault;
