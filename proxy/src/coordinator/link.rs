//! The proxy's link to the transaction coordinator: a client for calls, with failover across
//! the configured nodes, and the supervised Attach stream on which phase-2 commands arrive
//! (re-opened with backoff whenever it ends, re-announcing every resource served), which also
//! keeps the guarded-table view (`guards.rs`) current and, while it is open, carries the
//! sessions' per-transaction calls (`ferrata_rpc::calls`), so that they share its frames.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferrata_rpc::calls::StreamCalls;
use ferrata_rpc::client::{self, ClientConfig, CommandHandler, GuardSink, TcClient};
use ferrata_rpc::pb;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Home;
use crate::config::Coordinator;

pub struct Link {
    configs: Vec<ClientConfig>,
    /// The connected client and the index of its node.
    current: tokio::sync::Mutex<Option<(usize, TcClient)>>,
    /// Node to try first on the next connect.
    next: Mutex<usize>,
    /// The open Attach stream's calls and its node's index: clients of that node make their
    /// per-transaction calls on it.
    stream: Mutex<Option<(usize, StreamCalls)>>,
    resources: Mutex<BTreeSet<String>>,
    announce: mpsc::UnboundedSender<String>,
    announced: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// This process on the coordinator (random at start): it names the XA branches it
    /// registers, so that their phase 2 comes back here (`pb::Hello::instance_id`).
    pub instance_id: String,
    /// Where the channel is made (`home.rs`), whoever asks for it first.
    home: Home,
}

/// The coordinator cannot be reached at all.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl Link {
    pub fn new(config: &Coordinator) -> Link {
        let scheme = if config.tls_ca.is_some() { "https" } else { "http" };
        let configs = config
            .endpoints
            .iter()
            .map(|e| ClientConfig {
                endpoint: if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                },
                token: config.token.as_ref().map(|t| t.0.clone()),
                tls_ca: config.tls_ca.clone(),
                max_message_bytes: None,
            })
            .collect();
        let (announce, announced) = mpsc::unbounded_channel();
        Link {
            configs,
            current: tokio::sync::Mutex::new(None),
            next: Mutex::new(0),
            stream: Mutex::new(None),
            resources: Mutex::new(BTreeSet::new()),
            announce,
            announced: Mutex::new(Some(announced)),
            instance_id: unique_id(),
            home: Home::current(),
        }
    }

    /// What `ferrata_proxy_coordinator_attached` says: whether the Attach stream is open.
    fn set_attached(attached: bool) {
        metrics::gauge!("ferrata_proxy_coordinator_attached").set(if attached { 1.0 } else { 0.0 });
    }

    /// A connected client, connecting to the first node that answers (starting after the
    /// last one that failed).
    pub async fn client(&self) -> Result<TcClient, Unreachable> {
        self.connected().await.map(|(_, c)| c)
    }

    /// The connected client and its node's index.
    async fn connected(&self) -> Result<(usize, TcClient), Unreachable> {
        let mut current = self.current.lock().await;
        if let Some((index, c)) = current.as_ref() {
            return Ok((*index, c.clone()));
        }
        let start = *self.next.lock();
        let mut causes = Vec::new();
        for i in 0..self.configs.len() {
            let index = (start + i) % self.configs.len();
            let config = self.configs[index].clone();
            let connected = self.home.run(async move { TcClient::connect(&config).await }).await;
            match connected.unwrap_or_else(|| Err(anyhow::anyhow!("ferrata-proxy is shutting down"))) {
                Ok(c) => {
                    let c = match self.stream.lock().as_ref() {
                        Some((node, calls)) if *node == index => c.with_stream(calls.clone()),
                        _ => c,
                    };
                    *current = Some((index, c.clone()));
                    return Ok((index, c));
                }
                Err(e) => causes.push(format!("{e:#}")),
            }
        }
        Err(Unreachable(causes.join("; ")))
    }

    /// Forgets the connection after a transport failure, so the next call tries the next node.
    pub async fn failed(&self, status: &tonic::Status) {
        if !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
            || ferrata_rpc::ErrorCode::of(status).is_some()
        {
            return;
        }
        let mut current = self.current.lock().await;
        if let Some((index, _)) = current.take() {
            *self.next.lock() = (index + 1) % self.configs.len();
            tracing::warn!(endpoint = self.configs[index].endpoint, error = %status.message(), "coordinator unreachable; failing over");
        }
    }

    /// The resources this proxy serves.
    pub fn served(&self) -> Vec<String> {
        self.resources.lock().iter().cloned().collect()
    }

    /// Makes sure the coordinator knows this proxy serves `resource`.
    pub fn serve(&self, resource: &str) {
        if self.resources.lock().insert(resource.to_owned()) {
            let _ = self.announce.send(resource.to_owned());
        }
    }

    /// Keeps an Attach stream open until `stop`, handing phase-2 commands to `handler`.
    pub async fn run_attach(
        self: Arc<Self>,
        rm_id: String,
        handler: CommandHandler,
        guards: Arc<dyn GuardSink>,
        stop: CancellationToken,
    ) {
        let Some(mut announced) = self.announced.lock().take() else {
            return;
        };
        Link::set_attached(false);
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let attached = match self.connected().await {
                Ok((index, mut c)) => {
                    let hello = pb::Hello {
                        rm_id: rm_id.clone(),
                        resource_ids: self.resources.lock().iter().cloned().collect(),
                        instance_id: self.instance_id.clone(),
                    };
                    client::attach(&mut c.rm, hello, Arc::clone(&handler), Arc::clone(&guards))
                        .await
                        .map(|attachment| (index, attachment))
                        .map_err(|e| format!("{e:#}"))
                }
                Err(Unreachable(e)) => Err(e),
            };
            match attached {
                Ok((index, mut attachment)) => {
                    tracing::info!(rm_id, "attached to the coordinator");
                    // Calls go on the stream from now on, while it is open (then as unary
                    // calls again, until the next one).
                    *self.stream.lock() = Some((index, attachment.calls()));
                    Link::set_attached(true);
                    if let Some((current, c)) = self.current.lock().await.as_mut()
                        && *current == index
                    {
                        *c = c.clone().with_stream(attachment.calls());
                    }
                    backoff = Duration::from_millis(100);
                    // `None`: stopped.
                    let ended = loop {
                        tokio::select! {
                            ended = attachment.closed() => break Some(ended.err().map(|e| format!("{e:#}"))),
                            Some(resource) = announced.recv() => {
                                attachment.announce(vec![resource]).await;
                            }
                            _ = stop.cancelled() => break None,
                        }
                    };
                    *self.stream.lock() = None;
                    Link::set_attached(false);
                    let Some(ended) = ended else { return };
                    tracing::warn!(
                        error = ended.as_deref().unwrap_or("closed by the coordinator"),
                        "coordinator stream ended; re-attaching"
                    );
                    *self.current.lock().await = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot attach to the coordinator");
                    *self.current.lock().await = None;
                }
            }
            // Resources learnt meanwhile go out with the next Hello.
            while announced.try_recv().is_ok() {}
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// 128 random bits, hex: unique among every proxy (and outbox hand-over) a coordinator
/// meets.
pub fn unique_id() -> String {
    let mut bytes = [0u8; 16];
    // Without the OS's randomness the time and process id still tell processes apart.
    if getrandom::fill(&mut bytes).is_err() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (now ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    crate::sql::hex(&bytes)
}
