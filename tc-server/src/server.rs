//! Starting and stopping the coordinator: open the store, restore state, bind the gRPC and
//! HTTP listeners (optionally with TLS), serve until told to stop, then drain in order:
//! refuse new work, let in-flight requests finish (bounded by `shutdown_timeout_ms`), and
//! flush the journal last.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::grpc::services;
use crate::store::Store;
use crate::store::journal::Journal;
use crate::store::wal::{self, LoggedStore};

pub struct Server {
    config: Config,
    coordinator: Arc<Coordinator>,
    journal: Journal,
    rpc: TcpListener,
    http: TcpListener,
}

impl Server {
    /// Opens the store, restores what it holds and binds both listeners; fails early on
    /// anything that cannot work.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        config.validate()?;
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
        let store = LoggedStore::open(&config.data_dir, wal::Settings::default())?;
        let snapshot = store.load()?;
        let journal = Journal::start(Arc::new(store) as Arc<dyn Store>);
        let caller = crate::calls::Caller::new(&config.calls)?;
        let coordinator = Coordinator::recover(config.clone(), journal.clone(), snapshot, caller).await?;
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
        Ok(Server {
            config,
            coordinator,
            journal,
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

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// Serves until `stop` is cancelled, then shuts down gracefully.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Server {
            config,
            coordinator,
            journal,
            rpc,
            http,
        } = self;
        coordinator.start_background();
        tracing::info!(rpc = %rpc.local_addr()?, http = %http.local_addr()?, node_id = config.node_id, tls = config.tls.is_some(), "ferrata-tc serving");

        let (tm, rm) = services(&coordinator, config.max_message_bytes());
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
        let grpc = builder.add_service(tm).add_service(rm).serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait for delayed ACKs (40 ms tails).
            tonic::transport::server::TcpIncoming::from(rpc).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );

        let app =
            crate::http::router(Arc::clone(&coordinator)).into_make_service_with_connect_info::<crate::http::Peer>();
        let http_stop = stop.clone().cancelled_owned();
        let http_tls = config.tls.clone();
        let http_server = async move {
            match &http_tls {
                None => axum::serve(http, app).with_graceful_shutdown(http_stop).await,
                Some(tls) => {
                    let acceptor = ferrata_rpc::tls::acceptor(&tls.cert, &tls.key)?;
                    axum::serve(TlsListener::new(http, acceptor), app)
                        .with_graceful_shutdown(http_stop)
                        .await
                }
            }
            .context("serving HTTP")
        };

        let drain = async {
            stop.cancelled().await;
            tracing::info!("shutting down: refusing new work, finishing in-flight requests");
            // Background work and waiting requests end; the listeners drain meanwhile.
            coordinator.shutdown().await;
        };
        let serve = async {
            let (g, h, ()) = tokio::join!(grpc, http_server, drain);
            g.context("serving gRPC")?;
            h
        };
        let result = tokio::select! {
            r = serve => r,
            _ = async { stop.cancelled().await; tokio::time::sleep(config.shutdown_timeout()).await } => {
                tracing::warn!(timeout_ms = config.shutdown_timeout_ms, "in-flight requests did not finish in time; closing");
                Ok(())
            }
        };
        // Everything acknowledged is already durable; this writes what was still queued.
        journal.shutdown();
        tracing::info!("ferrata-tc stopped");
        result
    }
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
