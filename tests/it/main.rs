//! The integration tests: the real `leasehold` binary against the real
//! OpenBao and PostgreSQL, with real signals. One test binary (each links
//! the whole agent); one module per area, `support` the harness they share.

// Tests time what the agent does from outside: they read the wall clock.
#![allow(clippy::disallowed_methods)]

mod support;

mod clients;
mod config;
mod connection;
mod demo;
mod docs;
mod faults;
mod hooks;
mod hostile;
mod image;
mod injector;
mod jwt;
mod lifecycle;
mod matrix;
mod migration;
mod outage;
mod pgwire;
mod pki;
mod policy;
mod proxy;
mod reload;
mod rotation;
mod state;
mod telemetry;
mod token;
mod upstream_auth;
