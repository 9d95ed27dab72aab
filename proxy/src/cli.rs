//! The `ferrata-proxy` command line: flags and config file, logging, signals, and the runtime.
//! `main.rs` is only a call to [`main`], so test harnesses can build the same program.

use crate::Server;
use crate::config::Flags;
use clap::Parser;

/// Runs the proxy as the `ferrata-proxy` binary does.
pub fn main() -> anyhow::Result<()> {
    let config = Flags::parse().into_config()?;
    config.log.init()?;
    // Sessions run on threads of their own (`threads.rs`); the main runtime needs one.
    ferrata_rpc::process::run(1, |stop| async move { Server::bind(config).await?.run(stop).await })
}
