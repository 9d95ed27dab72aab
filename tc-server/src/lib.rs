//! ferrata-tc: Ferrata's transaction coordinator. It begins global transactions, records
//! their branches durably, holds the global row locks, decides commit or rollback and drives
//! phase 2 on the resource managers (proxies). ARCHITECTURE.md has the map; in short:
//!
//! - the base: `model` the records and the status machine, `lock_key` the canonical row key
//!   branches store, `store` durability (`journal` group commit, `redb` the embedded store, `etcd` the shared one),
//!   `xid` ids, `calls` the HTTP calls to services (TCC and saga branches), `history` finished transactions, `timeline` each transaction's events, `rm` attached resource managers and
//!   phase-2 routing, `config`, `error`, `auth` callers, roles and tokens, `audit` the operator actions' trail, `metrics`
//! - the modes' parts: `at` (the lock manager and the guarded tables), `tcc` (branches the
//!   coordinator confirms or cancels over HTTP), `saga` (steps whose actions and
//!   compensations it calls), `msg` (messages it delivers on their policy's schedule)
//! - the coordinator core: `coordinator` the requests and the in-memory sessions, `phase2`
//!   the background work, `sagas` the sagas' forward runs, `messages` prepared messages and their settling, `operator` the audited operator actions, `repair` the dirty-rollback workbench, `grpc` and `http` the
//!   two APIs, `dtm` DTM's API on the same model, `console` the web console's assets,
//!   `lock_leader` the lock authority's service for the other nodes of a cluster
//! - `server` start and stop, `standby` what a node sharing an etcd store answers while
//!   another owns it, `serving` a serving node's campaign to lead the cluster's locks,
//!   `cli` the binary

// Layers, lowest first (tests/layers.rs checks them).
pub mod adoption;
pub mod audit;
pub mod auth;
pub mod calls;
pub mod config;
pub mod error;
pub mod history;
pub mod lock_key;
pub mod metrics;
pub mod model;
pub mod rm;
pub mod store;
pub mod timeline;
pub mod xid;

pub mod at;
pub mod msg;
pub mod saga;
pub mod tcc;

pub mod console;
pub mod coordinator;
pub mod dtm;
pub mod grpc;
pub mod grpc_calls;
pub mod http;
pub mod lock_leader;
pub mod messages;
pub mod namespaces;
pub mod operator;
mod phase2;
pub mod repair;
pub mod sagas;

pub mod cli;
pub mod server;
pub mod serving;
pub mod standby;

pub use config::Config;
pub use server::Server;
