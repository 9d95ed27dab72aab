//! The `ferrata-tc` binary. A skeleton for now: it reads its configuration and reports that
//! the coordinator is not built yet, rather than pretending to coordinate.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "ferrata-tc", version, about = "Ferrata's transaction coordinator (skeleton)")]
struct Flags {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config = match flags.config {
        Some(path) => ferrata_tc::Config::from_toml(&std::fs::read_to_string(&path)?)?,
        None => ferrata_tc::Config::default(),
    };
    anyhow::bail!(
        "ferrata-tc is not implemented yet (configured for RPC on {} and HTTP on {}); \
         global transactions are not available in this build",
        config.listen,
        config.http
    )
}
