//! The coordinators a node serves with, one per namespace of XIDs (an XID's namespace is its
//! node id): always its own, and with several serving nodes also those it adopted from nodes
//! that are down (`adoption.rs`). A call that names a transaction goes to the coordinator of
//! its XID's namespace; everything else goes to the node's own coordinator, which refuses
//! XIDs of namespaces not served here (`wrong_node`).
//!
//! Invariant: a namespace is served by at most one coordinator in the cluster at a time, the
//! one whose node owns its etcd area; a coordinator is listed here only while it does.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use parking_lot::RwLock;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::at::authority::Changed;
use crate::coordinator::Coordinator;
use crate::xid::{node_of, parse_xid};

pub struct Namespaces {
    own: Served,
    adopted: RwLock<BTreeMap<u16, Served>>,
    /// Bumped whenever `adopted` changes.
    changed: watch::Sender<u64>,
}

/// One namespace's coordinator and its HTTP API.
#[derive(Clone)]
struct Served {
    coordinator: Arc<Coordinator>,
    http: Router,
}

impl Served {
    fn new(coordinator: Arc<Coordinator>) -> Served {
        let http = crate::http::router(Arc::clone(&coordinator));
        Served { coordinator, http }
    }
}

impl Namespaces {
    /// A node's namespaces: `own`'s, until it adopts another.
    pub fn new(own: Arc<Coordinator>) -> Arc<Namespaces> {
        Arc::new(Namespaces {
            own: Served::new(own),
            adopted: RwLock::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        })
    }

    /// The node's own coordinator.
    pub fn own(&self) -> &Arc<Coordinator> {
        &self.own.coordinator
    }

    /// The coordinator for calls about `xid`: its namespace's if adopted here, else the
    /// node's own (which also says what is wrong with an XID that is not its own).
    pub fn of(&self, xid: &str) -> Arc<Coordinator> {
        Arc::clone(&self.served_for(xid).coordinator)
    }

    fn served_for(&self, xid: &str) -> Served {
        parse_xid(xid)
            .map(node_of)
            .filter(|&n| n != self.own.coordinator.config.node_id)
            .and_then(|n| self.adopted.read().get(&n).cloned())
            .unwrap_or_else(|| self.own.clone())
    }

    /// The namespaces served here: the node's own first, then those it adopted.
    pub fn served(&self) -> Vec<u16> {
        let own = self.own.coordinator.config.node_id;
        std::iter::once(own)
            .chain(self.adopted.read().keys().copied())
            .collect()
    }

    /// Completes once the namespaces served here change after this call.
    pub fn changed(&self) -> Changed {
        let mut seen = self.changed.subscribe();
        Box::pin(async move {
            let _ = seen.changed().await;
        })
    }

    /// Serves namespace `n` with `coordinator` from now on.
    pub fn adopt(&self, n: u16, coordinator: Arc<Coordinator>) {
        self.adopted.write().insert(n, Served::new(coordinator));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stops serving namespace `n` (calls already routed to its coordinator finish there).
    pub fn hand_back(&self, n: u16) {
        if self.adopted.write().remove(&n).is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The HTTP API: a request whose path names a transaction (`/v1/transactions/<xid>...`,
    /// `/v1/notifications/<xid>/...`) goes to its namespace's coordinator, the rest to the
    /// node's own.
    pub fn router(self: &Arc<Namespaces>) -> Router {
        let namespaces = Arc::clone(self);
        Router::new().fallback(move |request: Request| {
            let path = request.uri().path();
            let xid = ["/v1/transactions/", "/v1/notifications/"]
                .iter()
                .find_map(|p| path.strip_prefix(p))
                .and_then(|rest| rest.split('/').next());
            let app = match xid {
                Some(xid) => namespaces.served_for(xid).http,
                None => namespaces.own.http.clone(),
            };
            async move { app.oneshot(request).await }
        })
    }
}
