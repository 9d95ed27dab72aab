//! ferrata-proxy: a wire-level MySQL/MariaDB proxy.
//!
//! Each client session gets its own backend connection; the backend's handshake and
//! authentication are relayed, and bytes the proxy does not need to change pass through
//! unmodified. See ARCHITECTURE.md for the map of modules and the invariants they keep.

// Layers, lowest first; each uses only those below it (see ARCHITECTURE.md and
// tests/layers.rs): the foundation (protocol, classify, config, metrics, stream), the
// session core, SQL the proxy writes, the coordinator layer, the modes (at, barrier, isolation, xa),
// and the assembly (modes, server, threads, admin, cli).
pub mod classify;
pub mod config;
pub mod metrics;
pub mod protocol;
pub mod stream;

pub mod session;

pub mod sql;

pub mod coordinator;

pub mod at;
pub mod barrier;
pub mod isolation;
pub mod outbox;
pub mod xa;

pub mod admin;
pub mod cli;
pub mod modes;
pub mod server;
mod threads;

pub use config::Config;
pub use server::Server;
