//! ferrata-tc: Ferrata's transaction coordinator. It begins global transactions, records
//! their branches durably, holds the global row locks, decides commit or rollback and drives
//! phase 2 on the resource managers (proxies). ARCHITECTURE.md has the map; in short:
//!
//! - `coordinator` the requests and the in-memory sessions; `phase2` the background work
//! - `locks` the lock manager, `lock_key` the canonical row key, `guards` the guarded tables
//! - `store` durability (`journal` group commit, `redb` the embedded store)
//! - `grpc`, `http`, `rm` the two APIs and phase-2 routing; `server` start and stop

pub mod auth;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod guards;
pub mod http;
pub mod lock_key;
pub mod locks;
pub mod metrics;
pub mod model;
mod phase2;
pub mod rm;
pub mod server;
pub mod store;
pub mod xid;

pub use config::Config;
pub use server::Server;
