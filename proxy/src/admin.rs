//! The admin HTTP listener: Prometheus metrics at `/metrics`, liveness at `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::coordinator::guards::TableGuards;
use crate::session::Shared;

pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    /// The guarded-table view, with a coordinator: reported when scraped.
    guards: Option<Arc<TableGuards>>,
}

impl AdminServer {
    pub async fn bind(
        addr: SocketAddr,
        shared: Arc<Shared>,
        guards: Option<Arc<TableGuards>>,
    ) -> anyhow::Result<AdminServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin listener on {addr}"))?;
        Ok(AdminServer {
            listener,
            state: AdminState { shared, guards },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub async fn serve(self, stop: CancellationToken) {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .with_state(self.state);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "admin listener failed");
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> String {
    // Read when scraped: the view's trust ends with time, not with an event.
    if let Some(guards) = &state.guards {
        metrics::gauge!("ferrata_proxy_guard_view_trusted").set(if guards.trusted() { 1.0 } else { 0.0 });
        metrics::gauge!("ferrata_proxy_guarded_tables").set(guards.list().len() as f64);
    }
    ferrata_rpc::process::prometheus().render()
}

/// 200 while the proxy accepts clients, 503 once it is shutting down (so load balancers
/// stop sending new clients).
async fn healthz(State(state): State<AdminState>) -> (axum::http::StatusCode, &'static str) {
    if state.shared.shutdown.is_cancelled() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (axum::http::StatusCode::OK, "ok\n")
    }
}
