//! ferrata-proxy: a wire-level MySQL/MariaDB proxy.
//!
//! Each client session gets its own backend connection; the backend's handshake and
//! authentication are relayed, and bytes the proxy does not need to change pass through
//! unmodified. See ARCHITECTURE.md for the map of modules and the invariants they keep.

pub mod admin;
pub mod classify;
pub mod cli;
pub mod config;
pub mod global;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod stream;

pub use config::Config;
pub use server::Server;
