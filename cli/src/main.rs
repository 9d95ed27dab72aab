//! The `ferrata` binary: see `lib.rs`.

fn main() -> std::process::ExitCode {
    ferrata_cli::main()
}
