//! `ferrata-proxy` built into this package, so tests can run it as a process of its own.

fn main() -> anyhow::Result<()> {
    ferrata_proxy::cli::main()
}
