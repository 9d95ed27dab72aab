//! A node that shares an etcd store with others and does not own it: what it answers while it
//! stands by, and who it says is active.
//!
//! * gRPC: the port is closed (`server.rs` binds it again once the node is active), so a
//!   proxy's connection is refused and it moves on to its next endpoint at once.
//! * HTTP: `/healthz` answers 503 with `"status": "standby"` and the active node, `/metrics`
//!   as usual, and every other request is redirected (307, method and body kept) to the
//!   active node's HTTP address, or refused with `standby` while no node is known to be
//!   active.
//!
//! The active node writes its [`NodeDescription`] into the store's owner key; a standby reads
//! it from there (`store::etcd`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferrata_rpc::ErrorCode;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::TcError;

/// What the active node says about itself in the owner key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    pub node_id: u16,
    /// Where its gRPC is reached (`host:port`).
    pub rpc: String,
    /// The base URL of its HTTP API.
    pub http: String,
}

/// The active node as this standby last saw it: its description (if it parses) and epoch.
#[derive(Clone, Debug, Default)]
pub struct Active {
    pub node: Option<NodeDescription>,
    pub epoch: i64,
}

/// Shared between the wait for ownership, which updates it, and the HTTP answers.
#[derive(Clone, Default)]
pub struct Standby {
    active: Arc<RwLock<Option<Active>>>,
}

impl Standby {
    /// Records the owner met while waiting (its description as the owner key holds it).
    pub fn saw(&self, description: &str, epoch: i64) {
        let node = serde_json::from_str(description).ok();
        if node.is_none() {
            tracing::warn!(%description, "the store's owner key does not describe a ferrata-tc node");
        }
        *self.active.write() = Some(Active { node, epoch });
    }

    /// Forgets the active node: this node is taking over (until it serves, HTTP requests
    /// are refused with `standby` instead of redirected to the node it replaces).
    pub fn taking_over(&self) {
        *self.active.write() = None;
    }

    pub fn active(&self) -> Option<Active> {
        self.active.read().clone()
    }

    /// The HTTP answers of a standby.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(crate::http::metrics))
            .fallback(redirect)
            .with_state(self.clone())
    }
}

async fn healthz(State(standby): State<Standby>) -> Response {
    let active = standby.active();
    let body = json!({
        "status": "standby",
        "version": env!("CARGO_PKG_VERSION"),
        "reason": "another node owns the store; this one takes over when that node's lease runs out",
        "active": active.as_ref().map(|a| json!({ "node": a.node, "epoch": a.epoch })),
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn redirect(State(standby): State<Standby>, request: Request) -> Response {
    let target = standby.active().and_then(|a| a.node).map(|n| n.http);
    match target {
        Some(base) => {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, format!("{base}{path}"))],
            )
                .into_response()
        }
        None => crate::http::error(TcError::new(
            ErrorCode::Standby,
            "this ferrata-tc node stands by and knows no active node at the moment (none yet, or it is taking \
             over itself); retry shortly, or ask another node",
        )),
    }
}
