//! The `ferrata-tc` binary; everything is in `cli.rs`.

fn main() -> anyhow::Result<()> {
    ferrata_tc::cli::main()
}
