//! One module per command: each reads its input, calls the crates, and
//! maps what they return to an exit code.

pub mod agent;
pub mod check;
#[cfg(feature = "demo")]
pub mod demo;
pub mod injector;
pub mod lint;
pub mod status;
