//! Accepts client connections, enforces the connection limit, spawns one session task per
//! client, and shuts down gracefully: stop accepting, let in-flight commands finish up to
//! the configured deadline, then cut what is left.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::modes::Modes;
use crate::protocol::err::ErrPacket;
use crate::session::{self, Shared};
use crate::threads::SessionThreads;
use ferrata_rpc::tls;

/// A bound proxy, ready to serve.
pub struct Server {
    listener: TcpListener,
    admin: Option<admin::AdminServer>,
    shared: Arc<Shared>,
    modes: Modes,
}

impl Server {
    /// Binds the client and admin listeners and loads TLS material; fails early on any
    /// setting that cannot work.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        let tls_acceptor = config
            .tls
            .as_ref()
            .map(|t| tls::acceptor(&t.cert, &t.key))
            .transpose()?;
        let backend_tls = config
            .backend_tls
            .as_ref()
            .map(|t| tls::connector(&t.ca, t.server_name.as_deref(), config.backend_host()))
            .transpose()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let modes = Modes::from_config(&config);
        let shared = Arc::new(Shared {
            modes: modes.modes.clone(),
            tls_acceptor,
            backend_tls,
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            config,
        });
        let admin = match shared.config.admin_listen {
            Some(addr) => Some(admin::AdminServer::bind(addr, shared.clone(), modes.guards()).await?),
            None => None,
        };
        Ok(Server {
            listener,
            admin,
            shared,
            modes,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// Serves until `stop` is cancelled, then shuts down gracefully.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Server {
            listener,
            admin,
            shared,
            modes,
        } = self;
        // The admin listener outlives the drain, so that `/healthz` says 503 (and `/metrics`
        // keeps answering) while in-flight commands finish.
        let admin_stop = CancellationToken::new();
        let admin_addr = admin.as_ref().map(|a| a.local_addr().to_string()).unwrap_or_default();
        let admin_task = admin.map(|a| tokio::spawn(a.serve(admin_stop.clone())));
        // Phase-2 commands keep coming through the drain (a session's rollback may need them).
        let attach_stop = CancellationToken::new();
        if modes.coordinated() {
            let rm_id = shared
                .config
                .coordinator
                .as_ref()
                .and_then(|c| c.rm_id.clone())
                .unwrap_or_else(|| {
                    format!(
                        "ferrata-proxy@{}",
                        listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
                    )
                });
            modes.start(rm_id, attach_stop.clone());
        }
        let sessions = TaskTracker::new();
        let threads = SessionThreads::start(shared.config.worker_threads)?;
        let permits = Arc::new(Semaphore::new(shared.config.max_connections));
        let next_id = AtomicU64::new(1);
        tracing::info!(listen = %listener.local_addr()?, admin = %admin_addr, backend = %shared.config.backend, "ferrata-proxy ready");
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the others.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => break,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                shared.metrics.connections_rejected.increment(1);
                tracing::warn!(client = %addr, limit = shared.config.max_connections, "refusing client: connection limit reached");
                sessions.spawn(refuse(tcp, shared.config.max_connections));
                continue;
            };
            shared.metrics.connections_accepted.increment(1);
            shared.metrics.connections_active.increment(1.0);
            let shared = shared.clone();
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(client = %addr, error = %e, "could not hand the connection to a session thread");
                    shared.metrics.connections_active.decrement(1.0);
                    continue;
                }
            };
            threads.spawn(sessions.track_future(async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => session::run(tcp, id, shared.clone()).await,
                    Err(e) => tracing::warn!(client = %addr, error = %e, "could not register the connection"),
                }
                shared.metrics.connections_active.decrement(1.0);
                drop(permit);
            }));
        }
        drop(listener);
        sessions.close();
        shared.shutdown.cancel();
        let deadline = shared.config.shutdown_timeout();
        tracing::info!(
            sessions = sessions.len(),
            ?deadline,
            "stopped accepting; waiting for in-flight commands"
        );
        if tokio::time::timeout(deadline, sessions.wait()).await.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "shutdown deadline passed; closing the remaining sessions"
            );
        }
        attach_stop.cancel();
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        // Last: what sessions spawned (best-effort reports) ends with their threads.
        drop(threads);
        tracing::info!("ferrata-proxy stopped");
        Ok(())
    }
}

/// Tells a client over the limit why it is turned away, as a server would: an ERR packet in
/// place of the greeting.
async fn refuse(mut tcp: TcpStream, limit: usize) {
    let _ = tcp
        .write_all(&ErrPacket::too_many_connections(limit).to_greeting_packet())
        .await;
    let _ = tcp.shutdown().await;
}
