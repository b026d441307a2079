//! leasehold: the agent (being built; see README.md).

#![forbid(unsafe_code)]

fn main() {}
