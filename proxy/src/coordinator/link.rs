//! The proxy's link to the transaction coordinator: an Attach stream to every configured
//! node (each re-opened with backoff whenever it ends, re-announcing every resource served),
//! on which phase-2 commands arrive and which keeps the guarded-table view (`guards.rs`)
//! current, and a client per node for calls, made on that node's stream while it is open
//! (`ferrata_rpc::calls`), so that they share its frames.
//!
//! The guard view is kept by one stream at a time ([`GuardFeed`]): only a node that holds
//! the locks sends guards, and a newer stream that sends them takes the view over.
//!
//! Where a call goes:
//! - One coordinator, or the active one of several sharing a store (a standby refuses the
//!   stream): to the node attached to; while none is, to the first node that answers, in
//!   order, starting after the last one that failed.
//! - Several serving nodes (their Welcome says so): a global transaction's calls go to the
//!   node that began it, which its XID names (`<node id>-<n>`), since only that node serves
//!   it, or, while that node is down, to the node whose Welcome says it adopted its
//!   namespace; while no open stream serves it (a hand-back, a stream attaching again) a
//!   call waits up to [`WAIT_FOR_SERVING_NODE`] for one, then goes as a plain call to the
//!   node that last served it. A begin goes to the attached nodes in turn.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ferrata_rpc::calls::StreamCalls;
use ferrata_rpc::client::{self, AckWhen, ClientConfig, CommandHandler, GuardSink, TcClient, ack_now};
use ferrata_rpc::pb;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Home;
use crate::config::Coordinator;

pub struct Link {
    nodes: Vec<Node>,
    /// Whether a node ever said it is one of several serving nodes.
    serving: AtomicBool,
    /// Where the next look for a node starts: begins take the attached nodes in turn, and a
    /// failure moves it on.
    next: AtomicUsize,
    /// The resources this proxy serves: each stream's Hello names them, and every open
    /// stream announces those added later.
    resources: watch::Sender<BTreeSet<String>>,
    /// This process on the coordinator (random at start): it names the XA branches it
    /// registers, so that their phase 2 comes back here (`pb::Hello::instance_id`).
    pub instance_id: String,
    /// Where the channels are made (`home.rs`), whoever asks for them first.
    home: Home,
    /// Told whenever a stream attaches (a call waiting for its node's stream hears it).
    attached: watch::Sender<()>,
}

/// One configured coordinator node.
struct Node {
    config: ClientConfig,
    /// Its client once connected; forgotten when the node fails.
    client: tokio::sync::Mutex<Option<TcClient>>,
    /// Its Attach stream's calls while it is open.
    stream: Mutex<Option<StreamCalls>>,
    /// With several serving nodes, the namespaces it serves as its last Welcome said (node
    /// ids: the XIDs it serves start with one of them), its own first; kept while its stream
    /// is down, so its transactions' calls still go there.
    namespaces: Mutex<Vec<u16>>,
}

/// The coordinator cannot be reached at all.
#[derive(Debug)]
pub struct Unreachable(pub String);

/// The longest pause between two tries to attach to a node: a standby that becomes active
/// is attached to within about this long.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long a call about a transaction waits for a stream of a node serving its namespace,
/// while none is open (a node handing the namespace back, or its node attaching again),
/// before it goes as a plain call to the node that last served it.
const WAIT_FOR_SERVING_NODE: Duration = Duration::from_secs(2);

impl Link {
    pub fn new(config: &Coordinator) -> Link {
        let scheme = if config.tls_ca.is_some() { "https" } else { "http" };
        let nodes = config
            .endpoints
            .iter()
            .map(|e| Node {
                config: ClientConfig {
                    endpoint: if e.contains("://") {
                        e.clone()
                    } else {
                        format!("{scheme}://{e}")
                    },
                    token: config.token.as_ref().map(|t| t.0.clone()),
                    tls_ca: config.tls_ca.clone(),
                    max_message_bytes: None,
                },
                client: tokio::sync::Mutex::new(None),
                stream: Mutex::new(None),
                namespaces: Mutex::new(Vec::new()),
            })
            .collect();
        Link {
            nodes,
            serving: AtomicBool::new(false),
            next: AtomicUsize::new(0),
            resources: watch::Sender::new(BTreeSet::new()),
            instance_id: unique_id(),
            home: Home::current(),
            attached: watch::Sender::new(()),
        }
    }

    /// What `ferrata_proxy_coordinator_attached` says: how many Attach streams are open.
    fn count_attached(&self) {
        let open = self.nodes.iter().filter(|n| n.stream.lock().is_some()).count();
        metrics::gauge!("ferrata_proxy_coordinator_attached").set(open as f64);
    }

    /// A client for a call about global transaction `xid` (`None`: a begin, or a call about
    /// none), on the right node's stream if it is open (see the module's doc).
    pub async fn client(&self, xid: Option<&str>) -> Result<TcClient, Unreachable> {
        // A malformed XID goes anywhere: the node says what is wrong with it.
        let home = xid
            .and_then(|x| x.split_once('-'))
            .and_then(|(n, _)| n.parse::<u16>().ok());
        if let (true, Some(home), Some(xid)) = (self.serving.load(Ordering::Relaxed), home, xid) {
            // A node whose stream is open first: when node `home` is down, the node that
            // adopted its namespace says so, while `home` is still listed as it last was.
            let serves = |n: &Node| n.namespaces.lock().contains(&home);
            let open = |n: &Node| n.stream.lock().is_some();
            let deadline = tokio::time::Instant::now() + WAIT_FOR_SERVING_NODE;
            let mut attached = self.attached.subscribe();
            let serving = loop {
                if let Some(i) = self.nodes.iter().position(|n| serves(n) && open(n)) {
                    break Some(i);
                }
                if !matches!(tokio::time::timeout_at(deadline, attached.changed()).await, Ok(Ok(()))) {
                    break None;
                }
            };
            let found = serving
                .or_else(|| {
                    self.nodes
                        .iter()
                        .position(|n| n.namespaces.lock().first() == Some(&home))
                })
                .or_else(|| self.nodes.iter().position(serves));
            let Some(i) = found else {
                return Err(Unreachable(format!(
                    "node {home} began global transaction {xid}, and no node among [coordinator] endpoints has said \
                     it serves node {home}'s transactions (it is node {home}, or adopted them while node {home} is \
                     down)"
                )));
            };
            // On its stream if it is open; as a unary call while it attaches again.
            let stream = self.nodes[i].stream.lock().clone();
            let c = self.connect(i).await.map_err(Unreachable)?;
            return Ok(match stream {
                Some(calls) => c.with_stream(calls),
                None => c,
            });
        }
        let attached: Vec<(usize, StreamCalls)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.stream.lock().clone().map(|s| (i, s)))
            .collect();
        if !attached.is_empty() {
            let (i, calls) = &attached[self.next.fetch_add(1, Ordering::Relaxed) % attached.len()];
            if let Ok(c) = self.connect(*i).await {
                return Ok(c.with_stream(calls.clone()));
            }
        }
        // No stream is open: the first node that answers.
        let start = self.next.load(Ordering::Relaxed);
        let mut causes = Vec::new();
        for k in 0..self.nodes.len() {
            match self.connect((start + k) % self.nodes.len()).await {
                Ok(c) => return Ok(c),
                Err(e) => causes.push(e),
            }
        }
        Err(Unreachable(causes.join("; ")))
    }

    /// Node `i`'s client, connecting first if need be.
    async fn connect(&self, i: usize) -> Result<TcClient, String> {
        let node = &self.nodes[i];
        let mut client = node.client.lock().await;
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let config = node.config.clone();
        let connected = self.home.run(async move { TcClient::connect(&config).await }).await;
        match connected.unwrap_or_else(|| Err(anyhow::anyhow!("ferrata-proxy is shutting down"))) {
            Ok(c) => {
                *client = Some(c.clone());
                Ok(c)
            }
            Err(e) => Err(format!("{}: {e:#}", node.config.endpoint)),
        }
    }

    /// After a transport failure: the nodes without an open stream are connected afresh,
    /// and the next call without one starts at the next node.
    pub async fn failed(&self, status: &tonic::Status) {
        if !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
            || ferrata_rpc::ErrorCode::of(status).is_some()
        {
            return;
        }
        for node in &self.nodes {
            // A node being connected to meanwhile is left to that.
            if node.stream.lock().is_none()
                && let Ok(mut client) = node.client.try_lock()
            {
                *client = None;
            }
        }
        self.next.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %status.message(), "coordinator unreachable; trying the next node");
    }

    /// The resources this proxy serves.
    pub fn served(&self) -> Vec<String> {
        self.resources.borrow().iter().cloned().collect()
    }

    /// Makes sure the coordinator knows this proxy serves `resource`.
    pub fn serve(&self, resource: &str) {
        self.resources
            .send_if_modified(|served| served.insert(resource.to_owned()));
    }

    /// Keeps an Attach stream open to every node until `stop`, handing phase-2 commands to
    /// `handler` and guard updates to `guards`.
    pub async fn run_attach(
        self: Arc<Self>,
        rm_id: String,
        handler: CommandHandler,
        guards: Arc<dyn GuardSink>,
        stop: CancellationToken,
    ) {
        self.count_attached();
        let feed = Arc::new(GuardFeed {
            view: guards,
            feeding: Mutex::new(Feeding::default()),
            streams: AtomicU64::new(0),
        });
        let streams = (0..self.nodes.len()).map(|i| {
            let (link, rm_id, handler, feed, stop) = (
                Arc::clone(&self),
                rm_id.clone(),
                Arc::clone(&handler),
                Arc::clone(&feed),
                stop.clone(),
            );
            tokio::spawn(async move { link.attach_to(i, &rm_id, &handler, &feed, &stop).await })
        });
        for stream in streams.collect::<Vec<_>>() {
            let _ = stream.await;
        }
    }

    /// Keeps node `i`'s Attach stream open until `stop`.
    async fn attach_to(
        &self,
        i: usize,
        rm_id: &str,
        handler: &CommandHandler,
        feed: &Arc<GuardFeed>,
        stop: &CancellationToken,
    ) {
        let node = &self.nodes[i];
        let endpoint = node.config.endpoint.as_str();
        let mut resources = self.resources.subscribe();
        let mut backoff = Duration::from_millis(100);
        // Whether the last try failed too: a standby refuses every one, said once.
        let mut refused = false;
        while !stop.is_cancelled() {
            let announced = resources.borrow_and_update().clone();
            let attached = match self.connect(i).await {
                Ok(mut c) => {
                    let hello = pb::Hello {
                        rm_id: rm_id.to_owned(),
                        resource_ids: announced.iter().cloned().collect(),
                        instance_id: self.instance_id.clone(),
                    };
                    client::attach(&mut c.rm, hello, Arc::clone(handler), feed.stream())
                        .await
                        .map_err(|e| format!("{e:#}"))
                }
                Err(e) => Err(e),
            };
            match attached {
                Ok(mut attachment) => {
                    let serving = attachment.serving.clone();
                    tracing::info!(rm_id, endpoint, namespaces = ?serving, "attached to the coordinator");
                    // Calls to this node go on the stream from now on, while it is open.
                    *node.stream.lock() = Some(attachment.calls());
                    if let Some(namespaces) = serving {
                        *node.namespaces.lock() = namespaces;
                        self.serving.store(true, Ordering::Relaxed);
                    }
                    self.attached.send_replace(());
                    self.count_attached();
                    (backoff, refused) = (Duration::from_millis(100), false);
                    let mut announced = announced;
                    // `None`: stopped.
                    let ended = loop {
                        tokio::select! {
                            ended = attachment.closed() => break Some(ended.err().map(|e| format!("{e:#}"))),
                            Ok(()) = resources.changed() => {
                                let now = resources.borrow_and_update().clone();
                                let added: Vec<String> = now.difference(&announced).cloned().collect();
                                announced = now;
                                attachment.announce(added).await;
                            }
                            _ = stop.cancelled() => break None,
                        }
                    };
                    *node.stream.lock() = None;
                    self.count_attached();
                    let Some(ended) = ended else { return };
                    tracing::warn!(
                        endpoint,
                        error = ended.as_deref().unwrap_or("closed by the coordinator"),
                        "coordinator stream ended; re-attaching"
                    );
                    *node.client.lock().await = None;
                }
                Err(e) => {
                    // Said once: a standby refuses every try until it is active.
                    if refused {
                        tracing::debug!(endpoint, error = %e, retry_in = ?backoff, "cannot attach to the coordinator");
                    } else {
                        tracing::warn!(endpoint, error = %e, retry_in = ?backoff, "cannot attach to the coordinator; retrying");
                    }
                    refused = true;
                    *node.client.lock().await = None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The proxy's guard view, fed by one Attach stream at a time: the latest to send a guard
/// set (a stream's first is its complete set). What an earlier stream still says of guards
/// is acknowledged and not applied, so a node that no longer holds the locks (it lost its
/// lease, or another took over) cannot unsettle the view its successor keeps.
struct GuardFeed {
    view: Arc<dyn GuardSink>,
    feeding: Mutex<Feeding>,
    /// Numbers the streams, in the order they attach.
    streams: AtomicU64,
}

#[derive(Default)]
struct Feeding {
    /// The stream that keeps the view, while it is open.
    current: Option<u64>,
    /// The latest stream that ever kept it: no earlier one takes it over again.
    latest: u64,
}

impl GuardFeed {
    /// What a new stream hands its guard messages to.
    fn stream(self: &Arc<Self>) -> Arc<dyn GuardSink> {
        Arc::new(StreamGuards {
            feed: Arc::clone(self),
            stream: self.streams.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }
}

/// One stream's end of the [`GuardFeed`].
struct StreamGuards {
    feed: Arc<GuardFeed>,
    stream: u64,
}

impl GuardSink for StreamGuards {
    fn update(&self, update: &pb::GuardUpdate) -> AckWhen {
        let mut feeding = self.feed.feeding.lock();
        if feeding.current != Some(self.stream) {
            if self.stream < feeding.latest {
                return ack_now();
            }
            if feeding.current.is_some() {
                // The view the other stream kept is not kept current any more.
                self.feed.view.lost();
            }
            (feeding.current, feeding.latest) = (Some(self.stream), self.stream);
        }
        // Under the lock: two streams' updates never interleave.
        self.feed.view.update(update)
    }

    fn confirmed(&self, sent: std::time::Instant, lease: Duration) {
        if self.feed.feeding.lock().current == Some(self.stream) {
            self.feed.view.confirmed(sent, lease);
        }
    }

    fn lost(&self) {
        let mut feeding = self.feed.feeding.lock();
        if feeding.current == Some(self.stream) {
            feeding.current = None;
            self.feed.view.lost();
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
