//! Starting and stopping the coordinator: open the store, restore state, bind the gRPC and
//! HTTP listeners (optionally with TLS), serve until told to stop, then drain in order:
//! refuse new work, let in-flight requests finish (bounded by `shutdown_timeout_ms`), and
//! flush the journal last.
//!
//! With the etcd store, a node first stands by (`standby.rs`) until it owns the store, then
//! loads it and serves as a restarted coordinator would. If it loses its lease it stops at
//! once, with an error: it answers nothing more, since another node may already be active.
//! With several serving nodes, the store it owns so is its namespace of XIDs, and it
//! campaigns to lead the cluster's locks meanwhile (`serving.rs`); losing either lease
//! stops it. It also adopts the namespaces of nodes that are down (`adoption.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::Request;
use parking_lot::RwLock;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::adoption::Adoption;
use crate::at::remote::Leadership;
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::grpc::{lock_service, services};
use crate::lock_leader::LeaderSlot;
use crate::namespaces::Namespaces;
use crate::serving::Campaign;
use crate::standby::{NodeDescription, Standby, campaign};
use crate::store::etcd::EtcdStore;
use crate::store::journal::Journal;
use crate::store::wal::{self, LoggedStore};
use crate::store::{Snapshot, Store};

pub struct Server {
    config: Config,
    backing: Backing,
    rpc: TcpListener,
    http: TcpListener,
}

/// The store a node runs on, as far as `bind` got with it.
enum Backing {
    /// The embedded store, restored: the node serves at once.
    Ready {
        coordinator: Arc<Coordinator>,
        journal: Journal,
    },
    /// The etcd store, connected: the node stands by until it owns it.
    Shared(Arc<EtcdStore>),
    /// Several serving nodes: the node's namespace of the etcd store, which it waits to own
    /// as `Shared`, and the lock leader's area it campaigns for.
    Serving {
        namespace: Arc<EtcdStore>,
        locks: Arc<EtcdStore>,
    },
}

impl Server {
    /// Opens the store (restoring what the embedded one holds) and binds both listeners;
    /// fails early on anything that cannot work.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
        // Checked here, once the flags and the environment are applied.
        anyhow::ensure!(
            !config.etcd.serving() || config.token.is_some(),
            "etcd.mode = \"serving\" needs the root token (token, token_file or FERRATA_TC_TOKEN): the nodes open \
             each other's lock stream with it"
        );
        // Before anything records: the etcd store does from its start.
        ferrata_rpc::process::prometheus();
        if let Some(tls) = &config.tls {
            // Load now so a bad certificate stops the start, not the first connection.
            ferrata_rpc::tls::acceptor(&tls.cert, &tls.key)?;
        }
        let rpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {} (listen)", config.listen))?;
        let http = TcpListener::bind(config.http)
            .await
            .with_context(|| format!("listening on {} (http)", config.http))?;
        let backing = if config.etcd.serving() {
            let settings = config.etcd.clone();
            let node_id = config.node_id;
            let (namespace, locks) = tokio::task::spawn_blocking(move || {
                anyhow::Ok((
                    EtcdStore::connect_namespace(&settings, node_id)?,
                    EtcdStore::connect_lock_leader(&settings)?,
                ))
            })
            .await??;
            Backing::Serving {
                namespace: Arc::new(namespace),
                locks: Arc::new(locks),
            }
        } else if config.etcd.enabled() {
            let settings = config.etcd.clone();
            let node_id = config.node_id;
            let store = tokio::task::spawn_blocking(move || EtcdStore::connect(&settings, node_id)).await??;
            Backing::Shared(Arc::new(store))
        } else {
            let store = LoggedStore::open(&config.data_dir, wal::Settings::default())?;
            let snapshot = store.load()?;
            let (coordinator, journal) = restore(&config, Arc::new(store), snapshot, None).await?;
            Backing::Ready { coordinator, journal }
        };
        Ok(Server {
            config,
            backing,
            rpc,
            http,
        })
    }

    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc.local_addr().expect("bound")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound")
    }

    /// Serves until `stop` is cancelled, then shuts down gracefully.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Server {
            config,
            backing,
            rpc,
            http,
        } = self;
        let rpc_addr = rpc.local_addr()?;
        let http_addr = http.local_addr()?;
        // Closes the listeners: at `stop`, or at once when the lease is lost.
        let serving = stop.child_token();
        let app = Switch::default();
        let http_server = tokio::spawn(serve_http(http, app.clone(), config.tls.clone(), serving.clone()));

        let me = NodeDescription {
            node_id: config.node_id,
            rpc: config.advertised_rpc(rpc_addr),
            http: config.advertised_http(http_addr),
        };
        let owning = |store| Owning {
            store,
            me: me.clone(),
            bound: (rpc_addr, http_addr),
            app: app.clone(),
            stop: stop.clone(),
        };
        // The cluster's lock leader this node runs while it leads (several serving nodes).
        let slot = Arc::new(LeaderSlot::default());
        // Its campaign for that: `Err` when it led and lost the lead.
        let mut campaign = None;
        // Where the lock leader is, for namespaces this node adopts (several serving nodes).
        let mut adopting = None;
        let (coordinator, journal, lost, rpc) = match backing {
            Backing::Ready { coordinator, journal } => (coordinator, journal, CancellationToken::new(), rpc),
            Backing::Shared(store) => {
                // Closed while standing by, bound again when active (`Owning::take_over`).
                drop(rpc);
                match owning(store).take_over(&config, None).await? {
                    Some(owned) => owned,
                    None => return http_server.await.context("the HTTP server panicked")?,
                }
            }
            Backing::Serving { namespace, locks } => {
                drop(rpc);
                let (run, leadership) = Campaign::new(locks, me.clone(), config.clone(), Arc::clone(&slot));
                adopting = Some(leadership.clone());
                match owning(namespace).take_over(&config, Some(leadership)).await? {
                    Some(owned) => {
                        // The leader's guards are confirmed by the resource managers attached
                        // here, to the coordinator.
                        campaign = Some(tokio::spawn(run.run(Arc::clone(&owned.0.rms), serving.clone())));
                        owned
                    }
                    None => return http_server.await.context("the HTTP server panicked")?,
                }
            }
        };
        let namespaces = Namespaces::new(Arc::clone(&coordinator));
        app.set(namespaces.router());
        coordinator.start_background();
        let adoption = adopting.map(|leadership| {
            let adoption = Adoption {
                config: config.clone(),
                me: me.clone(),
                leadership,
                namespaces: Arc::clone(&namespaces),
            };
            let stop = serving.clone();
            tokio::spawn(async move {
                // Said at once: the node serves on without adopting.
                if let Err(e) = adoption.run(stop).await {
                    tracing::error!(error = %format!("{e:#}"), "adopting the namespaces of nodes that are down failed; this node no longer adopts any");
                }
            })
        });
        tracing::info!(rpc = %rpc_addr, http = %http_addr, node_id = config.node_id, tls = config.tls.is_some(), "ferrata-tc serving");

        let (tm, rm) = services(&namespaces, config.max_message_bytes());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            let cert = std::fs::read(&tls.cert).with_context(|| format!("reading {}", tls.cert.display()))?;
            let key = std::fs::read(&tls.key).with_context(|| format!("reading {}", tls.key.display()))?;
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .context("setting up TLS for gRPC")?;
        }
        // Offered by every serving node: it refuses streams while the node does not lead.
        let locks = campaign
            .is_some()
            .then(|| lock_service(&slot, Arc::clone(&coordinator.tokens), config.max_message_bytes()));
        let grpc = builder
            .add_service(tm)
            .add_service(rm)
            .add_optional_service(locks)
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, small responses wait for delayed ACKs (40 ms tails).
                tonic::transport::server::TcpIncoming::from(rpc).with_nodelay(Some(true)),
                serving.clone().cancelled_owned(),
            );

        let drain = async {
            stop.cancelled().await;
            tracing::info!("shutting down: refusing new work, finishing in-flight requests");
            // Background work and waiting requests end; the listeners drain meanwhile.
            coordinator.shutdown().await;
        };
        let serve = async {
            let (g, h, ()) = tokio::join!(grpc, http_server, drain);
            g.context("serving gRPC")?;
            h.context("the HTTP server panicked")?
        };
        let lead_lost = async {
            let Some(task) = campaign.as_mut() else {
                return std::future::pending().await;
            };
            let ended = task.await;
            campaign = None;
            match ended {
                Ok(Ok(())) => std::future::pending().await,
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("the campaign for the cluster's locks panicked: {e}"),
            }
        };
        let failed = journal.failure_signal();
        let store_failed = async {
            // On its own store a node answers `store_failed` until restarted (/healthz says
            // so); a node sharing etcd stops, to load its store again from what is durable
            // while another may take over.
            if config.etcd.enabled() {
                failed.cancelled().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = serve => r,
            _ = async { stop.cancelled().await; tokio::time::sleep(config.shutdown_timeout()).await } => {
                tracing::warn!(timeout_ms = config.shutdown_timeout_ms, "in-flight requests did not finish in time; closing");
                Ok(())
            }
            () = lost.cancelled() => {
                // Every request already refuses (`Coordinator::check_running`); background work
                // ends too, and the listeners close.
                coordinator.stop_now();
                serving.cancel();
                tracing::error!("this node lost its etcd lease: it stops at once, answering nothing more, while another node takes over");
                Err(anyhow::anyhow!(
                    "lost the ownership of the etcd store (lease ran out or another node took over); restart this node to stand by"
                ))
            }
            () = store_failed => {
                coordinator.stop_now();
                serving.cancel();
                let cause = journal.failed().unwrap_or_default();
                tracing::error!(cause, "the etcd store failed: this node stops at once, answering nothing more");
                Err(anyhow::anyhow!(
                    "the etcd store failed ({cause}); restart this node to load it again from what is durable"
                ))
            }
            e = lead_lost => {
                coordinator.stop_now();
                serving.cancel();
                tracing::error!(error = %format!("{e:#}"), "this node stops at once, answering nothing more, while another node leads the cluster's locks");
                Err(e)
            }
        };
        serving.cancel();
        if let Some(task) = adoption {
            // It hands back what it adopted, so that the next owner need not wait either.
            let _ = tokio::time::timeout(config.shutdown_timeout(), task).await;
        }
        if let Some(task) = campaign {
            // It stops leading and hands its lease back, so the next leader need not wait
            // for it to run out.
            let _ = tokio::time::timeout(config.shutdown_timeout(), task).await;
        }
        // Everything acknowledged is already durable; this writes what was still queued (a
        // node that lost its lease writes nothing: etcd refuses it).
        journal.shutdown();
        tracing::info!("ferrata-tc stopped");
        result
    }
}

/// Starts the journal in front of `store` and the coordinator on what it held (its locks at
/// the cluster's lock leader with `leadership`), checking that nothing is served beyond
/// loopback unprotected.
async fn restore(
    config: &Config,
    store: Arc<dyn Store>,
    snapshot: Snapshot,
    leadership: Option<Leadership>,
) -> anyhow::Result<(Arc<Coordinator>, Journal)> {
    let journal = Journal::start(store);
    let caller = crate::calls::Caller::new(&config.calls)?;
    let coordinator = Coordinator::recover(config.clone(), journal.clone(), snapshot, caller, leadership, None).await?;
    let loopback = config.listen.ip().is_loopback() && config.http.ip().is_loopback();
    if !loopback {
        coordinator.tokens.forbid_open();
    }
    if coordinator.tokens.none_exists() {
        for (addr, what) in [(config.listen, "listen"), (config.http, "http")] {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "refusing to serve on {addr} ({what}) without a token: anyone who can reach it could run transactions and \
                 act as an operator. Set the root token (token, token_file or FERRATA_TC_TOKEN), or listen on loopback \
                 and create named tokens first"
            );
        }
    }
    Ok((coordinator, journal))
}

/// A node of several sharing the etcd store, on its way to owning `store` (the whole store,
/// or its namespace with several serving nodes).
struct Owning {
    store: Arc<EtcdStore>,
    me: NodeDescription,
    /// The gRPC and HTTP listeners' addresses.
    bound: (SocketAddr, SocketAddr),
    app: Switch,
    stop: CancellationToken,
}

impl Owning {
    /// Stands by until this node owns the store (its gRPC port closed, so a proxy's
    /// connection is refused at once and it tries its next endpoint), then loads it and
    /// restores the coordinator on it, and binds the gRPC port again. Returns it, its
    /// journal, the token cancelled when the lease is lost and the gRPC listener; `None` if
    /// stopped first.
    async fn take_over(
        self,
        config: &Config,
        leadership: Option<Leadership>,
    ) -> anyhow::Result<Option<(Arc<Coordinator>, Journal, CancellationToken, TcpListener)>> {
        let standby = Standby::default();
        self.app.set(standby.router());
        let Some(snapshot) = self.own(standby).await? else {
            tracing::info!("stopped while standing by");
            return Ok(None);
        };
        let rpc_addr = self.bound.0;
        let rpc = TcpListener::bind(rpc_addr)
            .await
            .with_context(|| format!("listening on {rpc_addr} (listen) again, now active"))?;
        let (lost, area) = (self.store.lost(), self.store.area().to_string());
        let (coordinator, journal) = restore(config, self.store as Arc<dyn Store>, snapshot, leadership).await?;
        metrics::gauge!("ferrata_tc_active", "area" => area).set(1.0);
        Ok(Some((coordinator, journal, lost, rpc)))
    }

    /// Waits until this node owns the store, telling `standby` of the owners met meanwhile,
    /// then loads it; `None` if stopped first.
    async fn own(&self, standby: Standby) -> anyhow::Result<Option<Snapshot>> {
        let bound = self.bound;
        tracing::info!(rpc = %bound.0, http = %bound.1, store = %self.store.area(), "campaigning to own the etcd store");
        let took_over = Arc::new(AtomicBool::new(false));
        let met = {
            let (standby, took_over) = (standby.clone(), Arc::clone(&took_over));
            move |node: Option<NodeDescription>, epoch| {
                if !took_over.swap(true, Ordering::Relaxed) {
                    tracing::info!(rpc = %bound.0, http = %bound.1, active = ?node, epoch, "standing by: another node owns the store");
                }
                standby.saw(node, epoch);
            }
        };
        let Some(epoch) = campaign(&self.store, &self.me, &self.stop, met).await? else {
            return Ok(None);
        };
        standby.taking_over();
        tracing::info!(
            epoch,
            took_over = took_over.load(Ordering::Relaxed),
            "this node owns the store; loading it"
        );
        let store = Arc::clone(&self.store);
        Ok(Some(tokio::task::spawn_blocking(move || store.load()).await??))
    }
}

/// The HTTP listener's app, switched from the standby's answers to the coordinator's API
/// when the node becomes active.
#[derive(Clone, Default)]
struct Switch {
    app: Arc<RwLock<Router>>,
}

impl Switch {
    fn set(&self, router: Router) {
        *self.app.write() = router;
    }

    fn router(&self) -> Router {
        let app = self.app.clone();
        Router::new().fallback(move |request: Request| {
            let current = app.read().clone();
            async move { current.oneshot(request).await }
        })
    }
}

/// Serves HTTP (with TLS if configured) until `stop`.
async fn serve_http(
    http: TcpListener,
    app: Switch,
    tls: Option<crate::config::Tls>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let app = app.router().into_make_service_with_connect_info::<crate::http::Peer>();
    let stop = stop.cancelled_owned();
    match &tls {
        None => axum::serve(http, app).with_graceful_shutdown(stop).await,
        Some(tls) => {
            let acceptor = ferrata_rpc::tls::acceptor(&tls.cert, &tls.key)?;
            axum::serve(TlsListener::new(http, acceptor), app)
                .with_graceful_shutdown(stop)
                .await
        }
    }
    .context("serving HTTP")
}

/// A TCP listener that hands axum only connections whose TLS handshake finished; handshakes
/// run in their own tasks so a slow client cannot hold up the others.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        let local = listener.local_addr().expect("bound");
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let handed = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for crate::http::Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> crate::http::Peer {
        crate::http::Peer(*stream.remote_addr())
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
