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
use tokio_util::sync::CancellationToken;

use crate::error::TcError;
use crate::store::etcd::EtcdStore;

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
    /// Records the owner met while waiting (`None`: its owner key describes no node).
    pub fn saw(&self, node: Option<NodeDescription>, epoch: i64) {
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

/// Campaigns for `store` as `me` until this node owns it, returning its epoch (`None` if
/// `stop` came first); `met` hears of every other owner on the way, with its description
/// (`None`: the owner key describes no ferrata-tc node, which is logged).
pub async fn campaign(
    store: &Arc<EtcdStore>,
    me: &NodeDescription,
    stop: &CancellationToken,
    mut met: impl FnMut(Option<NodeDescription>, i64) + Send + 'static,
) -> anyhow::Result<Option<i64>> {
    let description = serde_json::to_string(me)?;
    let (store, stop) = (Arc::clone(store), stop.clone());
    let epoch = tokio::task::spawn_blocking(move || {
        store.acquire(&description, &stop, &mut |owner| {
            let node = serde_json::from_str(&owner.description).ok();
            if node.is_none() {
                tracing::warn!(description = %owner.description, store = %store.area(), "the owner key does not describe a ferrata-tc node");
            }
            met(node, owner.epoch);
        })
    })
    .await??;
    Ok(epoch)
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
