//! `ferrata`, the operator's and DBA's command line: a thin client of `ferrata-tc`'s HTTP API
//! (the console uses the same API), except `ferrata undo`, which reads `undo_log` straight
//! from a database with the DBA's own credentials.
//!
//! - `args.rs`: the commands and flags (clap); `context.rs`: which coordinator and token
//!   (flags, environment, the config file's contexts); `client.rs`: the HTTP client;
//!   `exit.rs`: failures and the documented exit codes; `table.rs`: table output;
//!   `commands/`: one file per command group.

pub mod args;
mod client;
mod commands;
mod context;
pub mod exit;
mod table;

use std::process::ExitCode;

use clap::Parser;

/// Runs the command line as the `ferrata` binary does.
pub fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrata: cannot start: {e}");
            return ExitCode::from(exit::Exit::Error as u8);
        }
    };
    let output = cli.output;
    match runtime.block_on(commands::run(cli)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(failure) => {
            failure.report(output);
            ExitCode::from(failure.exit as u8)
        }
    }
}
