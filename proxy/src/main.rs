//! The `ferrata-proxy` binary; everything is in `cli.rs`.

fn main() -> anyhow::Result<()> {
    ferrata_proxy::cli::main()
}
