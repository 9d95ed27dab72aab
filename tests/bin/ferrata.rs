//! The `ferrata` command line, built in this package so tests can run it.

fn main() -> std::process::ExitCode {
    ferrata_cli::main()
}
