//! Helpers the fuzz targets share (the targets are in `fuzz_targets/`, one per decoder; see
//! `fuzz/README.md` for how to run them and what each input means).

pub mod input;
pub mod scan;
pub mod tc;
