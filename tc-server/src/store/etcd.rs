//! The etcd store, for several coordinator nodes sharing one state: the records live as etcd
//! keys, and only the node that owns the store may write them.
//!
//! ## Ownership and fencing
//!
//! Every node takes out an etcd lease when it campaigns, kept alive by a task of the store's
//! own runtime (a standby whose lease ran out takes out another). The node
//! that creates `<prefix>owner` under its lease (with `create_revision == 0` as the condition)
//! owns the store; the key's create revision is its *epoch*. Every write is one etcd
//! transaction conditioned on `create_revision(<prefix>owner) == epoch`, so once the lease has
//! run out (the key is deleted with it) or another node has created the key anew, etcd refuses
//! the old owner's writes, even ones sent before a pause and delivered after it. A node also
//! stops by itself ([`EtcdStore::lost`]) once it can no longer be sure its lease is alive: one
//! TTL, less a fifth for clock-rate drift, after the last renewal it sent that etcd confirmed.
//!
//! ## Keys (under the configured prefix, `/ferrata/` by default)
//!
//! * `owner`: the owning node's description (JSON), under its lease,
//! * `g/<txn>`, `b/<txn>/<branch>`, `f/<txn>`, `e/<txn>/<index>`, `a/<id>`: global, branch,
//!   finished, event and audit records (ids as 16 lowercase hex digits, event indexes as 8,
//!   so that key order is number order),
//! * `t/<name>`: tokens,
//! * `meta/id_ceiling/<node>`: the id ceiling of each node id (4 hex digits; ids carry their
//!   node id, so each node continues its own), in decimal,
//! * `meta/writer`: the epoch of the owner whose write made the current revision, in decimal,
//!   written by every write: etcd's history then says which owner wrote what (the HA tests
//!   check no write came from a node that no longer owned the store),
//! * `lock/owner`: with several serving nodes, the lock leader's key; its create revision is
//!   the lock epoch. A transaction holding a registration whose rows a leader granted is also
//!   conditioned on `create_revision(lock/owner) == ` that leader's epoch
//!   ([`Mutation::LockFence`]): a leader elected since rebuilt the locks without it.
//! * `nodes/<n>` and `namespaces/<n>`: with several serving nodes, node `n` is up (its
//!   description, under the lease it campaigns for its namespace with) and its namespace
//!   exists (kept when it goes). Both are written by its campaign, so a namespace whose node
//!   is not up can be adopted by another, which hands it back once the node is up again
//!   ([`EtcdStore::watch_nodes`]).
//!
//! With several serving nodes, each node id's transactions are a namespace of their own
//! ([`Area::Namespace`]): the same keys (its own `owner` and `meta/writer` included) under
//! `ns/<node>/` (4 hex digits), owned and fenced apart from the others; `lock/owner` stays at
//! the top. A store of the whole prefix refuses to load one that holds namespaces.
//!
//! [`StoredKey`] is this layout in code, for the store and for programs that read it.
//!
//! Values are records as `record.rs` encodes them, as in the embedded store.
//!
//! ## Batches
//!
//! etcd bounds one transaction (`--max-txn-ops`, 128 by default, and `--max-request-bytes`,
//! 1.5 MiB) and refuses one that writes a key twice or writes into a range it deletes. So a
//! journal batch becomes the fewest transactions within `etcd.max_txn_ops` and
//! `etcd.max_txn_bytes`, each holding whole submissions where they fit (a submission is
//! all or nothing unless it alone is over the bounds), with later writes of a key folded into
//! earlier ones. A write into a range an earlier mutation of the same transaction deleted (a
//! branch stored after its transaction finished, which the coordinator never does) goes into
//! the next one. A crash between two transactions of one batch leaves a prefix of it, none of
//! which was acknowledged. A transaction refused by a lock fence wrote nothing: the
//! submissions fenced by a former lock leader are refused alone, and the rest of the batch
//! is written again without them ([`EtcdStore::write`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchResponse};
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::etcd_members::{EtcdError, Members};
use super::record::{Loader, encode, read_branch, read_global};
use super::{Mutation, Refusals, Snapshot, Store, StoreError};
use crate::config::Etcd as Settings;
use crate::model::{BranchRecord, GlobalRecord};

/// Keys read per range request while loading, and the largest answer accepted: a record is
/// at most `max_txn_bytes` (1 MiB by default), so a page of them fits.
const LOAD_PAGE: i64 = 64;
const LOAD_PAGE_BYTES: usize = 96 * 1024 * 1024;
/// What a scan hands every key and its value to.
type KeyVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Per-operation overhead counted against `max_txn_bytes` besides key and value.
const OP_OVERHEAD_BYTES: usize = 32;

pub struct EtcdStore {
    /// `Some` until dropped; its one worker runs the lease's keep-alive.
    runtime: Option<tokio::runtime::Runtime>,
    members: Arc<Members>,
    settings: Settings,
    /// This node's lease: replaced only while it stands by, never once it owned the store.
    lease: Mutex<Lease>,
    /// Create revision of the owner key this node made; 0 until it owns the store.
    epoch: AtomicI64,
    /// The keys it owns; their node id (if any) is the one whose id ceiling it keeps.
    area: Area,
    /// The highest id ceiling stored for the area's node id, so a lower one is never written.
    ceiling: AtomicU64,
    /// What this node does with the area.
    role: Role,
}

/// What a node does with a store's area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Campaigns to own it as its own: for a namespace, its campaign also says the node is up
    /// (`nodes/<n>`) and its namespace exists (`namespaces/<n>`).
    Own,
    /// Campaigns for the namespace of a node that is down.
    Adopt,
    /// Only reads the cluster's nodes ([`EtcdStore::watch_nodes`]).
    Observe,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.settings.endpoints)
            .field("prefix", &self.settings.prefix)
            .field("epoch", &self.epoch())
            .finish()
    }
}

/// An etcd lease this node holds, kept alive by `keep_alive`.
#[derive(Clone)]
struct Lease {
    id: i64,
    /// The latest instant the lease is surely alive until.
    alive_until: Arc<Mutex<Instant>>,
    /// Cancelled once the lease may have run out.
    lost: CancellationToken,
    /// The area it is for, for metrics.
    area: Area,
}

impl Lease {
    /// No lease yet (id 0, which etcd never grants): as good as one that ran out.
    fn none(area: Area) -> Lease {
        let lost = CancellationToken::new();
        lost.cancel();
        Lease {
            id: 0,
            alive_until: Arc::new(Mutex::new(Instant::now())),
            lost,
            area,
        }
    }

    /// Whether it is surely alive: not lost, and within its sure time.
    fn alive(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < *self.alive_until.lock()
    }
}

/// The part of a cluster's keys (under the configured prefix) a store owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// All of them: one active node at a time, and its standbys. `node_id` is the active
    /// node's.
    Whole { node_id: u16 },
    /// The transactions of node id `n` and its id ceiling, under `ns/<n>/` (4 hex digits):
    /// one namespace of several serving nodes. Whoever owns it issues ids as node `n`.
    Namespace(u16),
    /// `lock/`: its owner (`lock/owner`, [`StoredKey::LockLeader`]) is the cluster's lock
    /// leader, and the key's create revision the lock epoch. It holds no records: the leader
    /// reads every namespace ([`EtcdStore::load_namespaces`]).
    LockLeader,
}

impl Area {
    /// The node id whose id ceiling it keeps (none for the lock leader's).
    fn node_id(self) -> Option<u16> {
        match self {
            Area::Whole { node_id } | Area::Namespace(node_id) => Some(node_id),
            Area::LockLeader => None,
        }
    }

    /// Where its keys start, under the cluster's prefix.
    fn path(self) -> String {
        match self {
            Area::Whole { .. } => String::new(),
            Area::Namespace(n) => format!("ns/{n:04x}/"),
            Area::LockLeader => "lock/".to_owned(),
        }
    }
}

/// The `area` label of the store's metrics: `whole`, `ns/<n>` or `lock`.
impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Area::Whole { .. } => write!(f, "whole"),
            Area::Namespace(n) => write!(f, "ns/{n:04x}"),
            Area::LockLeader => write!(f, "lock"),
        }
    }
}

/// The cluster's nodes as [`EtcdStore::watch_nodes`] saw them at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNodes {
    /// The node ids whose namespace exists.
    pub namespaces: BTreeSet<u16>,
    /// The nodes that are up, with the description each wrote.
    pub up: BTreeMap<u16, String>,
}

/// The owner of the store other than this node, as `acquire` found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// What the owning node wrote into the owner key (its description).
    pub description: String,
    /// Its epoch.
    pub epoch: i64,
}

impl EtcdStore {
    /// The store of node `node_id` on the etcd members of `settings`: all of the cluster's
    /// keys. Nothing is asked of etcd yet: [`EtcdStore::acquire`] takes out the node's lease
    /// (waiting for etcd if it is out of reach, until stopped) and then owns the store. Call
    /// it off the async runtime.
    pub fn connect(settings: &Settings, node_id: u16) -> Result<EtcdStore, StoreError> {
        EtcdStore::open(settings, Area::Whole { node_id }, Role::Own)
    }

    /// The store of namespace `n` alone (several serving nodes), as `connect` opens it, for
    /// node `n` itself: its campaign says the node is up, so a node that adopted the
    /// namespace meanwhile hands it back.
    pub fn connect_namespace(settings: &Settings, n: u16) -> Result<EtcdStore, StoreError> {
        EtcdStore::open(settings, Area::Namespace(n), Role::Own)
    }

    /// The store of namespace `n` for a node that adopts it while node `n` is down.
    pub fn adopt_namespace(settings: &Settings, n: u16) -> Result<EtcdStore, StoreError> {
        EtcdStore::open(settings, Area::Namespace(n), Role::Adopt)
    }

    /// A store that only watches the cluster's nodes ([`EtcdStore::watch_nodes`]).
    pub fn observe_nodes(settings: &Settings) -> Result<EtcdStore, StoreError> {
        EtcdStore::open(settings, Area::LockLeader, Role::Observe)
    }

    /// The lock leader's area (several serving nodes): owning it is leading, `acquire` is
    /// the election.
    pub fn connect_lock_leader(settings: &Settings) -> Result<EtcdStore, StoreError> {
        EtcdStore::open(settings, Area::LockLeader, Role::Own)
    }

    /// The keys this store owns.
    pub fn area(&self) -> Area {
        self.area
    }

    fn open(settings: &Settings, area: Area, role: Role) -> Result<EtcdStore, StoreError> {
        metrics::describe_gauge!(
            "ferrata_tc_active",
            "1 while this node owns the area of the etcd store (label area) and serves, 0 while it stands by"
        );
        metrics::describe_gauge!(
            "ferrata_tc_store_epoch",
            "This node's epoch as owner of the area of the etcd store (label area), 0 before"
        );
        metrics::describe_counter!(
            "ferrata_tc_takeovers_total",
            "Times this node came to own the area of the etcd store (label area) after another node had owned it"
        );
        metrics::describe_counter!(
            "ferrata_tc_lease_lost_total",
            "Times this node's etcd lease for an area (label area) may have run out (an owner stops; a standby takes out another)"
        );
        if role != Role::Observe {
            metrics::gauge!("ferrata_tc_active", "area" => area.to_string()).set(0.0);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferrata-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start the etcd client's runtime: {e}")))?;
        let place = describe(settings, area);
        let members = Arc::new(Members::new(settings).map_err(|e| StoreError(format!("store {place}: {e}")))?);
        Ok(EtcdStore {
            runtime: Some(runtime),
            members,
            settings: settings.clone(),
            lease: Mutex::new(Lease::none(area)),
            epoch: AtomicI64::new(0),
            area,
            ceiling: AtomicU64::new(0),
            role,
        })
    }

    /// The lease this node holds now.
    fn lease(&self) -> Lease {
        self.lease.lock().clone()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    fn place(&self) -> String {
        describe(&self.settings, self.area)
    }

    fn owner_key(&self) -> Vec<u8> {
        self.stored(StoredKey::Owner)
    }

    fn stored(&self, key: StoredKey<'_>) -> Vec<u8> {
        self.key(&key.to_string())
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{}{rest}", self.settings.prefix, self.area.path()).into_bytes()
    }

    /// A key of the whole cluster, whatever this store's area.
    fn cluster_key(&self, key: StoredKey<'_>) -> Vec<u8> {
        self.cluster_key_text(&key.to_string()).into_bytes()
    }

    fn cluster_key_text(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.prefix)
    }

    /// Cancelled once this node's lease may have run out: it must stop acting as the owner.
    /// Meaningful once `acquire` returned an epoch (the lease never changes after that; while
    /// the node stands by, `acquire` takes out a new lease instead).
    pub fn lost(&self) -> CancellationToken {
        self.lease().lost
    }

    /// This node's epoch, 0 while it does not own the store.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Waits until this node owns the store, writing `description` into the owner key, and
    /// returns its epoch; `None` if `stop` was cancelled first. `waiting` hears of every other
    /// owner met on the way (a standby's wait). Takes out the node's lease first, and a new
    /// one whenever it runs out meanwhile (etcd out of reach for a while). Blocks: call it off
    /// the async runtime.
    pub fn acquire(
        &self,
        description: &str,
        stop: &CancellationToken,
        waiting: &mut dyn FnMut(&Owner),
    ) -> Result<Option<i64>, StoreError> {
        let owner_key = self.owner_key();
        let place = self.place();
        if self.role == Role::Observe {
            return Err(StoreError(format!(
                "store {place}: opened to watch the cluster's nodes, not to own"
            )));
        }

        let mut met_another = false;
        self.runtime().block_on(async {
            loop {
                if stop.is_cancelled() {
                    return Ok(None);
                }
                let Some(lease) = self.leased(stop).await? else {
                    return Ok(None);
                };
                // A node campaigning for its own namespace says it is up under the same
                // lease, whether or not it wins at once (`nodes/<n>` goes with the lease).
                let joined: Vec<TxnOp> = match self.area {
                    Area::Namespace(node) if self.role == Role::Own => vec![
                        TxnOp::put(
                            self.cluster_key(StoredKey::NodeUp { node }),
                            description,
                            Some(PutOptions::new().with_lease(lease.id)),
                        ),
                        TxnOp::put(self.cluster_key(StoredKey::NamespaceOf { node }), "", None),
                    ],
                    _ => Vec::new(),
                };
                let won = [TxnOp::put(
                    owner_key.clone(),
                    description,
                    Some(PutOptions::new().with_lease(lease.id)),
                )];
                let mut free = vec![Compare::create_revision(owner_key.clone(), CompareOp::Equal, 0)];
                if let (Area::Namespace(node), Role::Adopt) = (self.area, self.role) {
                    // Never from a node that said it is up (it waits for its namespace).
                    let up = self.cluster_key(StoredKey::NodeUp { node });
                    free.push(Compare::create_revision(up, CompareOp::Equal, 0));
                }
                let campaign = Txn::new()
                    .when(free)
                    .and_then(won.into_iter().chain(joined.clone()).collect::<Vec<_>>())
                    .or_else(
                        [TxnOp::get(owner_key.clone(), None)]
                            .into_iter()
                            .chain(joined)
                            .collect::<Vec<_>>(),
                    );
                let response = match self.members.call(|mut c| async move { c.txn(campaign).await }).await {
                    Ok(r) => r,
                    // The lease ran out in etcd before this node noticed: take out another.
                    Err(e) if e.to_string().contains("requested lease not found") => {
                        lose(&lease);
                        continue;
                    }
                    Err(e) if e.retryable => {
                        tracing::warn!(error = %e, "etcd did not answer the campaign for the store; retrying");
                        pause_or_lost(&lease.lost, Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(e) => return Err(StoreError(format!("store {place}: cannot campaign: {e}"))),
                };
                let revision = response.header().map_or(0, |h| h.revision());
                if response.succeeded() {
                    return self.owned(revision, met_another).await.map(Some);
                }
                let [holder] = got(&response);
                // Our own key: an earlier campaign landed but its answer was lost.
                if let Some(kv) = holder.as_ref().filter(|kv| kv.lease() == lease.id) {
                    return self.owned(kv.create_revision(), met_another).await.map(Some);
                }
                if let Some(kv) = &holder {
                    met_another = true;
                    waiting(&Owner {
                        description: String::from_utf8_lossy(kv.value()).into_owned(),
                        epoch: kv.create_revision(),
                    });
                }
                // Wait for the owner key to go (deleted, or its lease ran out), from the
                // revision the campaign saw, so that a deletion in between is not missed.
                let deleted = |r: &WatchResponse| r.events().iter().any(|e| e.event_type() == EventType::Delete);
                let options = WatchOptions::new().with_start_revision(revision + 1);
                tokio::select! {
                    () = self.watch_until(owner_key.clone(), options, "the store's owner key", &lease.lost, deleted) => {}
                    () = stop.cancelled() => {}
                }
            }
        })
    }

    /// The node's lease, taken out first if it has none or the one it had ran out (only
    /// while it does not own the store); `None` if `stop` came first.
    async fn leased(&self, stop: &CancellationToken) -> Result<Option<Lease>, StoreError> {
        let lease = self.lease();
        if lease.alive() {
            return Ok(Some(lease));
        }
        // Past its sure time perhaps before `keep_alive` noticed: a campaign under it could
        // meet "lease not found".
        lose(&lease);
        let place = self.place();
        if lease.id != 0 {
            tracing::warn!(store = %place, "this standby's lease ran out; taking out a new one");
            // It may still be alive in etcd (only this node was unsure of it), holding an
            // owner key a lost campaign answer left: hand it back first, best effort (it
            // runs out by itself otherwise).
            if let Err(e) = revoke(&self.members, lease.id).await {
                tracing::debug!(store = %place, error = %e, "the lease that ran out could not be handed back");
            }
        }
        let lease = tokio::select! {
            lease = grant(&self.members, self.settings.lease_ttl(), (&place, self.area)) => lease?,
            () = stop.cancelled() => return Ok(None),
        };
        *self.lease.lock() = lease.clone();
        Ok(Some(lease))
    }

    /// This node owns the store from `epoch` on: reads its id ceiling and records it.
    async fn owned(&self, epoch: i64, took_over: bool) -> Result<i64, StoreError> {
        self.epoch.store(epoch, Ordering::Release);
        if let Some(node) = self.area.node_id() {
            self.ceiling.store(self.read_ceiling(node).await?, Ordering::Release);
        }
        let area = self.area.to_string();
        metrics::gauge!("ferrata_tc_store_epoch", "area" => area.clone()).set(epoch as f64);
        // The whole store's owner is active once it has loaded it and serves (`server.rs`).
        if !matches!(self.area, Area::Whole { .. }) {
            metrics::gauge!("ferrata_tc_active", "area" => area.clone()).set(1.0);
        }
        if took_over {
            metrics::counter!("ferrata_tc_takeovers_total", "area" => area).increment(1);
        }
        Ok(epoch)
    }

    /// Watches `key` (with `options`) until it `hears` an answer it waits for, etcd cancels
    /// the watch, a watch window has passed, or `stop`; a failed watch is logged (about
    /// `what`), its member left, and waited after a little. The caller looks again in every
    /// case: a watch on a member cut off from the others may hear nothing.
    async fn watch_until(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
        what: &str,
        stop: &CancellationToken,
        hears: impl Fn(&WatchResponse) -> bool,
    ) {
        let watch = async {
            let (used, client) = self.members.current().await.map_err(|e| (None, e.to_string()))?;
            let watched = async {
                let mut stream = client.watch_client().watch(key, Some(options)).await?;
                while let Some(response) = stream.message().await? {
                    if response.canceled() || hears(&response) {
                        break;
                    }
                }
                Ok::<(), etcd_client::Error>(())
            };
            watched.await.map_err(|e| (Some(used), e.to_string()))
        };
        tokio::select! {
            result = watch => if let Err((used, e)) = result {
                tracing::warn!(error = %e, "watching {what} failed; looking again");
                if let Some(used) = used {
                    self.members.failed(used);
                }
                pause_or_lost(stop, Duration::from_millis(200)).await;
            },
            () = tokio::time::sleep(self.watch_window()) => {}
            () = stop.cancelled() => {}
        }
    }

    fn ceiling_key(&self, node: u16) -> Vec<u8> {
        self.stored(StoredKey::IdCeiling { node })
    }

    async fn read_ceiling(&self, node: u16) -> Result<u64, StoreError> {
        let key = self.ceiling_key(node);
        let response = self
            .retrying("read the id ceiling", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        match response.kvs().first() {
            None => Ok(0),
            Some(kv) => parse_ceiling(kv.value()).ok_or_else(|| {
                StoreError(format!(
                    "store {}: {} is not a number",
                    self.place(),
                    String::from_utf8_lossy(&self.ceiling_key(node))
                ))
            }),
        }
    }

    /// Hands every key starting with `prefix`, and its value, to `each`, in key order, as
    /// they all were at one revision (read page by page); returns that revision.
    async fn scan(&self, prefix: &[u8], each: &mut KeyVisitor<'_>) -> Result<i64, StoreError> {
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        // Every page at the first page's revision: one consistent view.
        let mut revision = 0;
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE)
                .with_revision(revision);
            let mut page = self
                .retrying("read the stored records", |c| {
                    let (from, options) = (from.clone(), options.clone());
                    let mut kv = c.kv_client().max_decoding_message_size(LOAD_PAGE_BYTES);
                    async move { kv.get(from, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let kvs = page.take_kvs();
            for kv in &kvs {
                each(kv.key(), kv.value())?;
            }
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(revision),
            }
        }
    }

    /// Watches the cluster's nodes until `stop`: hands `seen` every namespace that exists and
    /// the nodes that are up, at once and after every change (looked at again after a watch
    /// window at the latest, as a watch on a member cut off from the others may hear
    /// nothing). Blocks: call it off the async runtime.
    pub fn watch_nodes(&self, stop: &CancellationToken, seen: &mut dyn FnMut(&ClusterNodes)) {
        let namespaces = self.cluster_key_text("namespaces/");
        let nodes = self.cluster_key_text("nodes/");
        self.runtime().block_on(async {
            while !stop.is_cancelled() {
                let read = Txn::new().and_then([
                    TxnOp::get(
                        namespaces.clone(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    ),
                    TxnOp::get(nodes.clone(), Some(GetOptions::new().with_prefix())),
                ]);
                let response = match self.members.call(|mut c| async move { c.txn(read).await }).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the cluster's nodes; trying again");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                            () = stop.cancelled() => return,
                        }
                    }
                };
                let revision = response.header().map_or(0, |h| h.revision());
                let mut view = ClusterNodes::default();
                for (i, found) in response.op_responses().into_iter().enumerate() {
                    let etcd_client::TxnOpResponse::Get(found) = found else {
                        continue;
                    };
                    for kv in found.kvs() {
                        let key = kv.key().strip_prefix(self.settings.prefix.as_bytes()).unwrap_or_default();
                        match (i, StoredKey::parse(key)) {
                            (0, Some(StoredKey::NamespaceOf { node })) => {
                                view.namespaces.insert(node);
                            }
                            (1, Some(StoredKey::NodeUp { node })) => {
                                view.up.insert(node, String::from_utf8_lossy(kv.value()).into_owned());
                            }
                            _ => tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "not a key of the cluster's nodes; ignored"),
                        }
                    }
                }
                seen(&view);
                let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
                let changed = |r: &WatchResponse| !r.events().is_empty();
                self.watch_until(nodes.clone().into_bytes(), options, "the cluster's nodes", stop, changed)
                    .await;
            }
        });
    }

    /// How long a watch runs before it is started again: under the request timeout, at which
    /// the client's transport cuts every request, a watch included (it would look like a
    /// failed member), and so under the lease's TTL too.
    fn watch_window(&self) -> Duration {
        self.members.timeout() * 9 / 10
    }

    /// Every namespace's transactions with their branches, as they were at one revision read
    /// now (several serving nodes): what a lock leader rebuilds the locks from once it is
    /// elected. Finished transactions, events and the rest are not read.
    pub fn load_namespaces(&self) -> Result<Vec<(GlobalRecord, Vec<BranchRecord>)>, StoreError> {
        let place = self.place();
        let prefix = self.cluster_key_text("ns/");
        let mut globals: BTreeMap<u64, (Option<GlobalRecord>, Vec<BranchRecord>)> = BTreeMap::new();
        self.runtime()
            .block_on(self.scan(prefix.as_bytes(), &mut |key, value| {
                let unknown = || {
                    StoreError(format!(
                        "store {place}: the key {:?} is not one this ferrata-tc writes",
                        String::from_utf8_lossy(key)
                    ))
                };
                // `ns/<4 hex digits>/<key of the namespace>`.
                let (namespace, rest) = key[prefix.len()..].split_at_checked(5).ok_or_else(unknown)?;
                let namespace = std::str::from_utf8(namespace).ok().and_then(|n| n.strip_suffix('/'));
                if namespace.is_none_or(|n| n.len() != 4 || u16::from_str_radix(n, 16).is_err()) {
                    return Err(unknown());
                }
                match StoredKey::parse(rest).ok_or_else(unknown)? {
                    StoredKey::Global(txn) => globals.entry(txn).or_default().0 = Some(read_global(&place, value)?),
                    StoredKey::Branch { txn, .. } => {
                        globals.entry(txn).or_default().1.push(read_branch(&place, value)?)
                    }
                    _ => {}
                }
                Ok(())
            }))?;
        // A branch's transaction is stored with it (`Finish` deletes both in one write).
        Ok(globals
            .into_values()
            .filter_map(|(global, branches)| Some((global?, branches)))
            .collect())
    }

    /// Runs `request` until it succeeds, fails for a reason a retry cannot help, or the lease
    /// may have run out.
    async fn retrying<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, StoreError>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut delay = Duration::from_millis(20);
        let lost = self.lost();
        loop {
            if lost.is_cancelled() {
                return Err(self.lost_error());
            }
            match self.members.call(&mut request).await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable => {
                    tracing::warn!(error = %e, "etcd did not answer ({what}); trying again (a repeated write changes nothing)");
                    pause_or_lost(&lost, delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(StoreError(format!("store {}: cannot {what}: {e}", self.place()))),
            }
        }
    }

    fn lost_error(&self) -> StoreError {
        StoreError(format!(
            "store {}: this node's lease may have run out, so it no longer owns the store (epoch {}) and writes \
             nothing more; another node takes over",
            self.place(),
            self.epoch()
        ))
    }

    /// One transaction of `ops`, fenced by this node's epoch and by the lock leader's
    /// `lock_epochs` (the leaders that granted rows of registrations among them); `Some`
    /// when it was refused while this node still owns the store: the lock leader changed.
    async fn fenced(&self, mut ops: Vec<TxnOp>, lock_epochs: &[u64]) -> Result<Option<LockFenced>, StoreError> {
        let epoch = self.epoch();
        if epoch == 0 {
            return Err(StoreError(format!(
                "store {}: this node does not own the store and cannot write to it",
                self.place()
            )));
        }
        let owner_key = self.owner_key();
        let lock_key = self.cluster_key(StoredKey::LockLeader);
        ops.push(TxnOp::put(
            self.stored(StoredKey::Writer),
            writer_stamp(epoch, lock_epochs),
            None,
        ));
        let mut conditions = vec![Compare::create_revision(owner_key.clone(), CompareOp::Equal, epoch)];
        conditions.extend(
            lock_epochs
                .iter()
                .map(|e| Compare::create_revision(lock_key.clone(), CompareOp::Equal, *e as i64)),
        );
        let txn = Txn::new()
            .when(conditions)
            .and_then(ops)
            .or_else([TxnOp::get(owner_key, None), TxnOp::get(lock_key, None)]);
        // A retry after an unknown outcome repeats the same puts and deletes under the same
        // epoch, which nobody else can write under: it changes nothing that the first try did.
        let response = self
            .retrying("commit", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if response.succeeded() {
            return Ok(None);
        }
        let [now, leader] = got(&response);
        if now.as_ref().is_some_and(|kv| kv.create_revision() == epoch) {
            // Still the owner: the lock leader changed since it granted rows of a
            // registration here. Nothing of the transaction was written.
            let leader = leader.map(|kv| kv.create_revision() as u64);
            return Ok(Some(LockFenced {
                why: format!(
                    "store {}: the lock leader that granted the registration's rows no longer leads (now {}), and the \
                     one elected since rebuilt the locks without them; nothing of it was stored",
                    self.place(),
                    leader.map_or("none".to_owned(), |e| format!("epoch {e}")),
                ),
                leader,
            }));
        }
        lose(&self.lease());
        Err(StoreError(match now {
            Some(kv) => format!(
                "store {}: another node owns the store since revision {} ({}); this node (epoch {epoch}) writes \
                 nothing more",
                self.place(),
                kv.create_revision(),
                String::from_utf8_lossy(kv.value())
            ),
            None => format!(
                "store {}: this node's ownership (epoch {epoch}) ended, its lease ran out; it writes nothing more",
                self.place()
            ),
        }))
    }

    /// The etcd operations of one mutation, in order.
    fn ops_of(&self, m: &Mutation, ceiling: &mut u64, ops: &mut Vec<Op>) -> Result<(), StoreError> {
        match m {
            Mutation::PutGlobal(g) => ops.push(Op::Put(self.stored(StoredKey::Global(g.txn_id)), encode(g)?)),
            Mutation::Finish(f) => {
                let txn_id = f.record.txn_id;
                ops.push(Op::Delete(self.stored(StoredKey::Global(txn_id))));
                ops.push(Op::DeletePrefix(self.key(&StoredKey::branches_of(txn_id))));
                ops.push(Op::Put(self.stored(StoredKey::Finished(txn_id)), encode(f)?));
            }
            Mutation::PutEvents { txn_id, first, events } => {
                for (index, event) in (*first..).zip(events) {
                    let key = StoredKey::Event { txn: *txn_id, index };
                    ops.push(Op::Put(self.stored(key), encode(event)?));
                }
            }
            Mutation::Forget { txn_id } => {
                ops.push(Op::Delete(self.stored(StoredKey::Finished(*txn_id))));
                ops.push(Op::DeletePrefix(self.key(&StoredKey::events_of(*txn_id))));
            }
            Mutation::PutBranch(b) => ops.push(Op::Put(
                self.stored(StoredKey::Branch {
                    txn: b.txn_id,
                    branch: b.branch_id,
                }),
                encode(b)?,
            )),
            Mutation::DeleteBranch { txn_id, branch_id } => ops.push(Op::Delete(self.stored(StoredKey::Branch {
                txn: *txn_id,
                branch: *branch_id,
            }))),
            Mutation::SetIdCeiling(new) => {
                let node = crate::xid::node_of(*new);
                if self.area.node_id() != Some(node) {
                    let this = self.area.node_id().map_or_else(
                        || "and the lock leader's area issues no ids".to_owned(),
                        |n| format!("not to this node {n}"),
                    );
                    return Err(StoreError(format!(
                        "store {}: the id ceiling {new} belongs to node {node}, {this}",
                        self.place(),
                    )));
                }
                if *new > *ceiling {
                    *ceiling = *new;
                    ops.push(Op::Put(self.ceiling_key(node), new.to_string().into_bytes()));
                }
            }
            Mutation::AppendAudit(r) => ops.push(Op::Put(self.stored(StoredKey::Audit(r.id)), encode(r)?)),
            Mutation::PutToken(t) => ops.push(Op::Put(self.stored(StoredKey::Token(&t.name)), encode(t)?)),
            Mutation::DeleteToken { name } => ops.push(Op::Delete(self.stored(StoredKey::Token(name)))),
            // A condition of the transactions that hold the submission (`transactions`).
            Mutation::LockFence { .. } => {}
        }
        Ok(())
    }

    /// Writes the submissions of `batch` (`ends` as in `commit_submissions`) as `parts`. A
    /// part refused by a lock fence wrote nothing: the submissions fenced by a leader that
    /// no longer leads are refused, and the rest, from that part on, are written again
    /// without them. Only a submission over the bounds alone, refused after its first part
    /// landed, fails the whole.
    async fn write(&self, batch: &[Mutation], ends: &[usize], mut parts: Vec<Part>) -> Result<Refusals, StoreError> {
        let mut refusals = Refusals::new();
        // The submissions `parts` write, by index in `batch`.
        let mut todo: Vec<usize> = (0..ends.len()).collect();
        loop {
            let mut refused = None;
            for part in parts {
                let (from, continued) = (part.from, part.continued);
                let lock_epochs = part.lock_epochs.iter().copied().collect::<Vec<_>>();
                if let Some(fence) = self.fenced(part.into_ops(), &lock_epochs).await? {
                    if continued {
                        return Err(StoreError(format!(
                            "{}; part of a submission too big for one etcd transaction was stored already, so this \
                             node gives up the store to load it again from what is durable",
                            fence.why
                        )));
                    }
                    refused = Some((from, fence));
                    break;
                }
            }
            let Some((from, fence)) = refused else {
                return Ok(refusals);
            };
            let stale = |i: usize| {
                let epochs = lock_fences(submission(batch, ends, i));
                epochs.iter().any(|&e| Some(e) != fence.leader)
            };
            let at = todo
                .binary_search(&from)
                .expect("a part's submissions are still to write");
            todo.drain(..at);
            for &i in todo.iter().filter(|&&i| stale(i)) {
                tracing::warn!(reason = %fence.why, "a registration fenced by a former lock leader was refused; the rest of the batch is stored");
                refusals.insert(i, fence.why.clone());
            }
            todo.retain(|&i| !stale(i));
            let (rest, rest_ends) = gather(batch, ends, &todo);
            (parts, _) = self.transactions(&rest, &rest_ends)?;
            // `parts` count their submissions from the first of `todo`.
            for part in &mut parts {
                part.from = todo[part.from];
            }
        }
    }

    /// The transactions that apply `batch`, split as the module docs say.
    fn transactions(&self, batch: &[Mutation], ends: &[usize]) -> Result<(Vec<Part>, u64), StoreError> {
        // Room for the writer's stamp that `fenced` adds.
        let max_ops = self.settings.max_txn_ops - 1;
        let stamp = Op::Put(
            self.stored(StoredKey::Writer),
            writer_stamp(i64::MAX, &[u64::MAX]).into_bytes(),
        );
        let max_bytes = self.settings.max_txn_bytes - stamp.bytes();
        let mut ceiling = self.ceiling.load(Ordering::Acquire);
        debug_assert_eq!(ends.last().copied().unwrap_or(0), batch.len(), "ends cover the batch");
        let mut parts = vec![Part::default()];
        let mut start = 0;
        let mut ops = Vec::new();
        for (index, &end) in ends.iter().enumerate() {
            ops.clear();
            let submission = &batch[start..end];
            for m in submission {
                self.ops_of(m, &mut ceiling, &mut ops)?;
            }
            let lock_epochs = lock_fences(submission);
            start = end;
            let bytes: usize = ops.iter().map(Op::bytes).sum();
            let current = parts.last().expect("never empty");
            // A submission that fits in a transaction of its own never straddles two: it
            // starts a new one if the current one is too full, or deletes a range it writes in.
            let clashes = ops.iter().any(|op| !current.can_take(op));
            if !current.is_empty()
                && (clashes || current.ops() + ops.len() > max_ops || current.bytes + bytes > max_bytes)
            {
                parts.push(Part::starting(index, false));
            }
            for (n, op) in ops.drain(..).enumerate() {
                let current = parts.last_mut().expect("never empty");
                let full =
                    !current.is_empty() && (current.ops() + 1 > max_ops || current.bytes + op.bytes() > max_bytes);
                if full || !current.can_take(&op) {
                    parts.push(Part::starting(index, n > 0));
                }
                let current = parts.last_mut().expect("never empty");
                if current.is_empty() {
                    (current.from, current.continued) = (index, n > 0);
                }
                current.take(op);
                current.lock_epochs.extend(&lock_epochs);
            }
        }
        parts.retain(|p| !p.is_empty());
        Ok((parts, ceiling))
    }
}

/// A transaction refused by its lock fence: why, and the lock leader's epoch now.
struct LockFenced {
    why: String,
    leader: Option<u64>,
}

/// The lock leader epochs `submission` is fenced by.
fn lock_fences(submission: &[Mutation]) -> BTreeSet<u64> {
    submission
        .iter()
        .filter_map(|m| match m {
            Mutation::LockFence { epoch } => Some(*epoch),
            _ => None,
        })
        .collect()
}

/// Submission `i` of `batch`.
fn submission<'a>(batch: &'a [Mutation], ends: &[usize], i: usize) -> &'a [Mutation] {
    let start = if i == 0 { 0 } else { ends[i - 1] };
    &batch[start..ends[i]]
}

/// The submissions `which` of `batch`, as a batch of their own with its ends.
fn gather(batch: &[Mutation], ends: &[usize], which: &[usize]) -> (Vec<Mutation>, Vec<usize>) {
    let (mut rest, mut rest_ends) = (Vec::new(), Vec::with_capacity(which.len()));
    for &i in which {
        rest.extend_from_slice(submission(batch, ends, i));
        rest_ends.push(rest.len());
    }
    (rest, rest_ends)
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Hand the lease back so a standby need not wait for it to run out; a process that
        // dies instead leaves that to the TTL.
        if let Some(runtime) = self.runtime.take() {
            if self.epoch() != 0 {
                // Handed back (an adopted namespace), or the node stops.
                metrics::gauge!("ferrata_tc_active", "area" => self.area.to_string()).set(0.0);
            }
            // Id 0: no lease was ever taken out.
            let id = self.lease().id;
            if id != 0 {
                let members = self.members.clone();
                let handle = runtime.spawn(async move { revoke(&members, id).await });
                // Dropping a runtime may not block inside another one (a failed start on the
                // server's runtime); wait for the revoke only where that is allowed.
                if tokio::runtime::Handle::try_current().is_err() {
                    let _ = runtime.block_on(handle);
                }
            }
            runtime.shutdown_background();
        }
    }
}

/// The owner key as a failed transaction's `or_else` read it (`None`: there is no owner).
/// The keys a transaction's `Get`s found (`None`: absent), in order.
fn got<const N: usize>(response: &etcd_client::TxnResponse) -> [Option<etcd_client::KeyValue>; N] {
    let mut found = response.op_responses().into_iter().filter_map(|r| match r {
        etcd_client::TxnOpResponse::Get(mut g) => Some(g.take_kvs().into_iter().next()),
        _ => None,
    });
    std::array::from_fn(|_| found.next().flatten())
}

fn parse_ceiling(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn describe(settings: &Settings, area: Area) -> String {
    format!(
        "etcd {} {}{}",
        settings.endpoints.join(","),
        settings.prefix,
        area.path()
    )
}

/// How long a lease granted for `granted` is surely alive after the renewal was sent: less a
/// fifth, for the difference between this machine's clock rate and etcd's.
fn sure(granted: Duration) -> Duration {
    granted - granted / 5
}

/// One etcd operation of a transaction.
enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes every key starting with these bytes.
    DeletePrefix(Vec<u8>),
}

impl Op {
    fn bytes(&self) -> usize {
        OP_OVERHEAD_BYTES
            + match self {
                Op::Put(k, v) => k.len() + v.len(),
                Op::Delete(k) | Op::DeletePrefix(k) => k.len(),
            }
    }
}

/// The operations of one etcd transaction, folded so that no key is written twice, and the
/// lock epochs it is conditioned on besides the owner's.
#[derive(Default)]
struct Part {
    puts: BTreeMap<Vec<u8>, Vec<u8>>,
    deletes: BTreeSet<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
    bytes: usize,
    lock_epochs: BTreeSet<u64>,
    /// The first submission it holds operations of, by index in the batch, and whether that
    /// one's first operations are in an earlier part (a submission over the bounds alone).
    from: usize,
    continued: bool,
}

impl Part {
    /// An empty part whose first operations are submission `from`'s.
    fn starting(from: usize, continued: bool) -> Part {
        Part {
            from,
            continued,
            ..Part::default()
        }
    }

    fn ops(&self) -> usize {
        self.puts.len() + self.deletes.len() + self.prefixes.len()
    }

    fn is_empty(&self) -> bool {
        self.ops() == 0
    }

    fn deleted_by_prefix(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// Whether `op` can join without writing into a range this transaction deletes (etcd
    /// refuses that, and the order within one transaction could not express it).
    fn can_take(&self, op: &Op) -> bool {
        match op {
            Op::Put(k, _) => !self.deleted_by_prefix(k),
            Op::Delete(_) | Op::DeletePrefix(_) => true,
        }
    }

    fn take(&mut self, op: Op) {
        self.bytes += op.bytes();
        match op {
            Op::Put(k, v) => {
                self.deletes.remove(&k);
                self.puts.insert(k, v);
            }
            Op::Delete(k) => {
                self.puts.remove(&k);
                if !self.deleted_by_prefix(&k) {
                    self.deletes.insert(k);
                }
            }
            Op::DeletePrefix(p) => {
                self.puts.retain(|k, _| !k.starts_with(&p));
                self.deletes.retain(|k| !k.starts_with(&p));
                self.prefixes.retain(|q| !q.starts_with(&p));
                if !self.deleted_by_prefix(&p) {
                    self.prefixes.push(p);
                }
            }
        }
    }

    fn into_ops(self) -> Vec<TxnOp> {
        let mut ops = Vec::with_capacity(self.ops());
        ops.extend(self.prefixes.into_iter().map(|p| {
            let end = prefix_end(&p);
            TxnOp::delete(p, Some(etcd_client::DeleteOptions::new().with_range(end)))
        }));
        ops.extend(self.deletes.into_iter().map(|k| TxnOp::delete(k, None)));
        ops.extend(self.puts.into_iter().map(|(k, v)| TxnOp::put(k, v, None)));
        ops
    }
}

/// The first key after every key starting with `prefix` (prefixes here end in `/`, never in
/// 0xff).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Takes out a lease of `ttl` and starts keeping it alive; until etcd answers (a node
/// started while etcd is out of reach waits for it).
async fn grant(members: &Arc<Members>, ttl: Duration, (place, area): (&str, Area)) -> Result<Lease, StoreError> {
    loop {
        let sent = Instant::now();
        let ttl_s = ttl.as_secs() as i64;
        match members
            .call(|mut c| async move { c.lease_grant(ttl_s, None).await })
            .await
        {
            Ok(granted) => {
                let lease = Lease {
                    id: granted.id(),
                    alive_until: Arc::new(Mutex::new(
                        sent + sure(Duration::from_secs(granted.ttl().max(0) as u64)),
                    )),
                    lost: CancellationToken::new(),
                    area,
                };
                tokio::spawn(keep_alive(members.clone(), lease.clone(), ttl, place.to_owned()));
                return Ok(lease);
            }
            Err(e) if e.retryable => {
                tracing::warn!(store = %place, error = %e, "cannot take out a lease yet; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(StoreError(format!("store {place}: cannot take out a lease: {e}"))),
        }
    }
}

/// Hands lease `id` back to etcd (its keys go with it).
async fn revoke(members: &Members, id: i64) -> Result<(), EtcdError> {
    members
        .call(|c| async move { c.lease_client().revoke(id).await })
        .await
        .map(drop)
}

/// What a write puts into `meta/writer`: the writer's epoch, then ` lock=<epoch>` for each
/// lock leader epoch it is fenced by (a history check compares them with the owners').
pub fn writer_stamp(epoch: i64, lock_epochs: &[u64]) -> String {
    let mut stamp = epoch.to_string();
    for e in lock_epochs {
        stamp.push_str(&format!(" lock={e}"));
    }
    stamp
}

/// Marks the lease as lost (once).
fn lose(lease: &Lease) {
    if !lease.lost.is_cancelled() {
        lease.lost.cancel();
        let area = lease.area.to_string();
        metrics::counter!("ferrata_tc_lease_lost_total", "area" => area.clone()).increment(1);
        metrics::gauge!("ferrata_tc_active", "area" => area).set(0.0);
    }
}

/// Sleeps for `delay`, or less if the lease is lost meanwhile.
async fn pause_or_lost(lost: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = lost.cancelled() => {}
    }
}

/// Renews the lease every sixth of its TTL (so that a renewal just before an etcd leader
/// change leaves most of the TTL to ride it out), moving `alive_until` on with each confirmed
/// renewal, and cancels `lost` once `alive_until` has passed or etcd says the lease is gone.
async fn keep_alive(members: Arc<Members>, lease: Lease, ttl: Duration, place: String) {
    let (lease_id, alive_until, lost) = (lease.id, Arc::clone(&lease.alive_until), lease.lost.clone());
    let mut stream = None;
    loop {
        let deadline = *alive_until.lock();
        if Instant::now() >= deadline {
            tracing::error!(store = %place, "this node's etcd lease may have run out: no renewal was confirmed in time");
            lose(&lease);
            return;
        }
        let sent = Instant::now();
        let renewal = async {
            if stream.is_none() {
                // A member that cannot be connected to is left by `current` itself.
                let (used, client) = members.current().await.map_err(|e| (None, e.to_string()))?;
                let opened = client.lease_client().keep_alive(lease_id).await;
                stream = Some((used, opened.map_err(|e| (Some(used), e.to_string()))?));
            }
            let (used, (keeper, responses)) = stream.as_mut().expect("just set");
            let used = Some(*used);
            keeper.keep_alive().await.map_err(|e| (used, e.to_string()))?;
            match responses.message().await.map_err(|e| (used, e.to_string()))? {
                Some(response) => Ok(response.ttl()),
                None => Err((used, "the keep-alive stream ended".to_owned())),
            }
        };
        // One renewal may take a request timeout, not the whole remaining lease: a member
        // cut off from its leader holds requests for longer.
        let until = deadline.min(Instant::now() + members.timeout());
        match tokio::time::timeout_at(until, renewal).await {
            Ok(Ok(granted)) if granted > 0 => {
                let until = sent + sure(Duration::from_secs(granted as u64));
                let mut alive = alive_until.lock();
                *alive = (*alive).max(until);
            }
            Ok(Ok(_)) => {
                tracing::error!(store = %place, "etcd says this node's lease has run out");
                lose(&lease);
                return;
            }
            Ok(Err((used, e))) => {
                tracing::warn!(store = %place, error = %e, "renewing this node's etcd lease failed; trying another member");
                if let Some(used) = used {
                    members.failed(used);
                }
                stream = None;
                pause_or_lost(&lost, Duration::from_millis(50)).await;
                continue;
            }
            // Too slow: try the next member (the loop's check reports a lease run out).
            Err(_) => {
                if let Some((used, _)) = &stream {
                    members.failed(*used);
                }
                stream = None;
                continue;
            }
        }
        pause_or_lost(&lost, ttl / 6).await;
        if lost.is_cancelled() {
            return;
        }
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let place = self.place();
        let prefix = self.key("");
        let mut loader = Loader::new(&place);
        let own_node = self.area.node_id();
        self.runtime().block_on(self.scan(&prefix, &mut |key, value| {
            load_key(&mut loader, &key[prefix.len()..], value, &place, own_node)
        }))?;
        Ok(loader.finish())
    }

    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        match self.commit_submissions(batch, &[batch.len()])?.into_values().next() {
            None => Ok(()),
            Some(refused) => Err(StoreError(refused)),
        }
    }

    fn serving(&self) -> bool {
        self.epoch() != 0 && self.lease().alive()
    }

    fn commit_submissions(&self, batch: &[Mutation], ends: &[usize]) -> Result<Refusals, StoreError> {
        if self.lost().is_cancelled() {
            return Err(self.lost_error());
        }
        if self.area == Area::LockLeader {
            return Err(StoreError(format!(
                "store {}: the lock leader's area holds no records; they go to a namespace",
                self.place()
            )));
        }
        let written = self.transactions(batch, ends).and_then(|(parts, ceiling)| {
            let refusals = self.runtime().block_on(self.write(batch, ends, parts))?;
            Ok((ceiling, refusals))
        });
        match written {
            Ok((ceiling, refusals)) => {
                self.ceiling.fetch_max(ceiling, Ordering::AcqRel);
                Ok(refusals)
            }
            Err(e) => {
                // The journal writes nothing after a failure; another node may be able to,
                // so this one gives up its ownership.
                tracing::error!(error = %e, "the etcd store failed; this node gives up its ownership");
                lose(&self.lease());
                Err(e)
            }
        }
    }
}

/// What a key under the prefix holds (the layout in the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredKey<'a> {
    Owner,
    Writer,
    LockLeader,
    Global(u64),
    Branch {
        txn: u64,
        branch: u64,
    },
    Finished(u64),
    Event {
        txn: u64,
        index: u32,
    },
    Audit(u64),
    Token(&'a str),
    IdCeiling {
        node: u16,
    },
    /// `nodes/<n>`: node `n` is up (under its namespace's lease, with its description).
    NodeUp {
        node: u16,
    },
    /// `namespaces/<n>`: node `n`'s namespace exists (kept when the node goes).
    NamespaceOf {
        node: u16,
    },
}

impl<'a> StoredKey<'a> {
    /// The prefix of every branch key of `txn`.
    pub fn branches_of(txn: u64) -> String {
        format!("b/{txn:016x}/")
    }

    /// The prefix of every event key of `txn`.
    pub fn events_of(txn: u64) -> String {
        format!("e/{txn:016x}/")
    }

    /// `key` without the prefix; `None` if it is no key this version writes.
    pub fn parse(key: &'a [u8]) -> Option<StoredKey<'a>> {
        // Exactly `digits` lowercase hex digits, as written.
        fn hex<T: TryFrom<u64>>(s: &str, digits: usize) -> Option<T> {
            let written = s.len() == digits && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            u64::from_str_radix(s, 16)
                .ok()
                .filter(|_| written)
                .and_then(|n| T::try_from(n).ok())
        }
        let text = std::str::from_utf8(key).ok()?;
        // `<txn>/<second>`.
        let pair = |ids: &'a str| {
            let (txn, second) = ids.split_once('/')?;
            Some((hex::<u64>(txn, 16)?, second))
        };
        Some(match text.split_once('/').unwrap_or((text, "")) {
            ("owner", "") if text == "owner" => StoredKey::Owner,
            ("meta", "writer") => StoredKey::Writer,
            ("lock", "owner") => StoredKey::LockLeader,
            ("nodes", n) => StoredKey::NodeUp { node: hex(n, 4)? },
            ("namespaces", n) => StoredKey::NamespaceOf { node: hex(n, 4)? },
            ("meta", rest) => StoredKey::IdCeiling {
                node: hex(rest.strip_prefix("id_ceiling/")?, 4)?,
            },
            ("g", id) => StoredKey::Global(hex(id, 16)?),
            ("f", id) => StoredKey::Finished(hex(id, 16)?),
            ("a", id) => StoredKey::Audit(hex(id, 16)?),
            ("t", name) if !name.is_empty() => StoredKey::Token(name),
            ("b", ids) => {
                let (txn, branch) = pair(ids)?;
                StoredKey::Branch {
                    txn,
                    branch: hex(branch, 16)?,
                }
            }
            ("e", ids) => {
                let (txn, index) = pair(ids)?;
                StoredKey::Event {
                    txn,
                    index: hex(index, 8)?,
                }
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for StoredKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredKey::Owner => write!(f, "owner"),
            StoredKey::Writer => write!(f, "meta/writer"),
            StoredKey::LockLeader => write!(f, "lock/owner"),
            StoredKey::Global(txn) => write!(f, "g/{txn:016x}"),
            StoredKey::Branch { txn, branch } => write!(f, "{}{branch:016x}", StoredKey::branches_of(*txn)),
            StoredKey::Finished(txn) => write!(f, "f/{txn:016x}"),
            StoredKey::Event { txn, index } => write!(f, "{}{index:08x}", StoredKey::events_of(*txn)),
            StoredKey::Audit(id) => write!(f, "a/{id:016x}"),
            StoredKey::Token(name) => write!(f, "t/{name}"),
            StoredKey::IdCeiling { node } => write!(f, "meta/id_ceiling/{node:04x}"),
            StoredKey::NodeUp { node } => write!(f, "nodes/{node:04x}"),
            StoredKey::NamespaceOf { node } => write!(f, "namespaces/{node:04x}"),
        }
    }
}

/// Loads one stored key (without the prefix) into `loader`; of the id ceilings, only node
/// `own_node`'s is this node's.
fn load_key(
    loader: &mut Loader<'_>,
    key: &[u8],
    value: &[u8],
    place: &str,
    own_node: Option<u16>,
) -> Result<(), StoreError> {
    let unknown = || {
        StoreError(format!(
            "store {place}: cannot load: the key {:?} is not one this ferrata-tc writes (written by a newer one, or \
             another program shares the prefix)",
            String::from_utf8_lossy(key)
        ))
    };
    match StoredKey::parse(key).ok_or_else(unknown)? {
        StoredKey::Owner
        | StoredKey::Writer
        | StoredKey::LockLeader
        | StoredKey::NodeUp { .. }
        | StoredKey::NamespaceOf { .. } => Ok(()),
        StoredKey::Global(txn) => loader.global(txn, value),
        StoredKey::Finished(txn) => loader.finished(txn, value),
        StoredKey::Audit(id) => loader.audit(id, value),
        StoredKey::Token(name) => loader.token(name, value),
        StoredKey::Branch { txn, branch } => loader.branch(txn, branch, value),
        StoredKey::Event { txn, index } => loader.event(txn, index, value),
        StoredKey::IdCeiling { node } => {
            let value = parse_ceiling(value).ok_or_else(unknown)?;
            if Some(node) == own_node {
                loader.id_ceiling(value);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use etcd_client::Client;
    use ferrata_testkit::etcd::{EtcdCluster, EtcdOptions};

    use super::*;
    use crate::config::Secret;
    use crate::model::GlobalStatus;
    use crate::store::fixtures::{self, commit, global};

    static PREFIXES: AtomicUsize = AtomicUsize::new(0);

    /// Settings for `cluster` under a prefix no other test uses.
    fn settings(cluster: &EtcdCluster) -> Settings {
        Settings {
            endpoints: cluster.endpoints(),
            prefix: format!(
                "/test-{}-{}/",
                std::process::id(),
                PREFIXES.fetch_add(1, Ordering::Relaxed)
            ),
            lease_ttl_s: 2,
            request_timeout_ms: 1_000,
            ..Settings::default()
        }
    }

    fn cluster(members: usize) -> (tokio::runtime::Runtime, EtcdCluster) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let cluster = runtime.block_on(EtcdCluster::start(members)).unwrap();
        (runtime, cluster)
    }

    /// A store on `settings` that owns it.
    /// The lease `store` campaigns under, taken out now.
    fn leased(store: &EtcdStore) -> Lease {
        store
            .runtime()
            .block_on(store.leased(&CancellationToken::new()))
            .unwrap()
            .expect("not stopped")
    }

    fn owned(settings: &Settings, name: &str) -> EtcdStore {
        let store = EtcdStore::connect(settings, 0).unwrap();
        store
            .acquire(name, &CancellationToken::new(), &mut |_| {})
            .unwrap()
            .unwrap();
        store
    }

    #[test]
    fn every_store_check_passes_with_etcds_own_limits_and_with_tiny_transactions() {
        let (_rt, cluster) = cluster(1);
        // etcd's default --max-txn-ops is 128: the first run's batches (up to 4,096 mutations)
        // only pass if they are split; the second splits almost every submission.
        for max_txn_ops in [128, 4] {
            let s = Settings {
                max_txn_ops,
                ..settings(&cluster)
            };
            fixtures::every_mutation_round_trips(&mut || Box::new(owned(&s, "node")));
            let s = Settings {
                max_txn_ops,
                ..settings(&cluster)
            };
            fixtures::mutations_apply_in_order_within_a_batch(&owned(&s, "node"));
            let s = Settings {
                max_txn_ops,
                ..settings(&cluster)
            };
            fixtures::finish_removes_only_its_own_branches(&owned(&s, "node"));
            let s = Settings {
                max_txn_ops,
                ..settings(&cluster)
            };
            fixtures::id_ceiling_never_decreases(&mut || Box::new(owned(&s, "node")));
        }
    }

    #[test]
    fn a_registration_is_stored_only_while_the_lock_leader_that_granted_its_rows_leads() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let store = owned(&s, "node");
        let mut client = rt.block_on(Client::connect(cluster.endpoints(), None)).unwrap();
        let lock_key = format!("{}{}", s.prefix, StoredKey::LockLeader);
        // A leader elected anew: its key created again, its epoch that create revision.
        let mut elect = || {
            rt.block_on(async {
                client.delete(lock_key.clone(), None).await.unwrap();
                let put = client.put(lock_key.clone(), "a leader", None).await.unwrap();
                put.header().unwrap().revision() as u64
            })
        };
        let registration = |txn, epoch| {
            vec![
                Mutation::PutGlobal(global(txn, GlobalStatus::Begin)),
                Mutation::PutBranch(fixtures::branch(txn, 1)),
                Mutation::LockFence { epoch },
            ]
        };
        let first = elect();
        store.commit(&registration(1, first)).unwrap();
        // Every transaction holding part of a fenced submission carries its condition.
        let tiny = EtcdStore::connect(
            &Settings {
                max_txn_ops: 2,
                ..s.clone()
            },
            0,
        )
        .unwrap();
        let (parts, _) = tiny.transactions(&registration(3, first), &[3]).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.lock_epochs == BTreeSet::from([first])));

        // Fenced submissions share transactions with the others.
        let plain = |txn| vec![Mutation::PutGlobal(global(txn, GlobalStatus::Begin))];
        let batch: Vec<Mutation> = [plain(4), registration(2, first), plain(5)].concat();
        let ends = [1, 4, 5];
        let (parts, _) = store.transactions(&batch, &ends).unwrap();
        assert_eq!(parts.len(), 1);

        // Once another leader leads, the registration is refused alone: the rest is written
        // again without it, and the node still owns its store.
        let second = elect();
        assert!(second > first);
        // With a registration the new leader granted, which stays.
        let batch: Vec<Mutation> = [batch, registration(6, second)].concat();
        let ends = [1, 4, 5, 8];
        let refusals = store.commit_submissions(&batch, &ends).unwrap();
        let e = &refusals[&1];
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(
            e.contains("no longer leads") && e.contains(&format!("now epoch {second}")),
            "{e}"
        );
        assert!(store.serving(), "a refused registration costs the node nothing else");
        let e = store.commit(&registration(2, first)).unwrap_err().to_string();
        assert!(e.contains("no longer leads"), "{e}");
        let globals = rt.block_on(async {
            let got = client
                .get(format!("{}g/", s.prefix), Some(GetOptions::new().with_prefix()))
                .await
                .unwrap();
            got.kvs().len()
        });
        assert_eq!(globals, 4, "transactions 1, 4, 5 and 6");
        let stored = rt.block_on(async {
            let branches = format!("{}b/", s.prefix);
            let got = client
                .get(branches, Some(GetOptions::new().with_prefix()))
                .await
                .unwrap();
            got.kvs().iter().map(|kv| kv.key().to_vec()).collect::<Vec<_>>()
        });
        let branch_of = |txn| format!("{}{}", s.prefix, StoredKey::Branch { txn, branch: 1 }).into_bytes();
        assert_eq!(
            stored,
            [branch_of(1), branch_of(6)],
            "only the registrations granted by the leader of their time"
        );
    }

    #[test]
    fn namespaces_are_owned_and_fenced_apart_and_the_whole_prefix_refuses_them() {
        let (_rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let own = |n| {
            let store = EtcdStore::connect_namespace(&s, n).unwrap();
            let epoch = store.acquire(&format!("node {n}"), &CancellationToken::new(), &mut |_| {});
            (store, epoch.unwrap().unwrap())
        };
        // Two owners at once, each with its own epoch.
        let ((one, first), (two, second)) = (own(1), own(2));
        assert_ne!(first, second);
        let txn = |node: u16, seq| (u64::from(node) << 48) | seq;
        commit(&one, vec![Mutation::PutGlobal(global(txn(1, 1), GlobalStatus::Begin))]);
        commit(&one, vec![Mutation::SetIdCeiling(txn(1, 100))]);
        commit(
            &two,
            vec![Mutation::PutGlobal(global(txn(2, 1), GlobalStatus::Committing))],
        );
        let loaded = one.load().unwrap();
        assert_eq!(loaded.globals, [global(txn(1, 1), GlobalStatus::Begin)]);
        assert_eq!(loaded.id_ceiling, txn(1, 100));
        assert_eq!(
            two.load().unwrap().globals,
            [global(txn(2, 1), GlobalStatus::Committing)]
        );
        // A namespace's store issues ids as its node only.
        let e = two
            .commit(&[Mutation::SetIdCeiling(txn(1, 200))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to node 1"), "{e}");
        // Another node waits for namespace 1 while its owner holds it.
        let adopter = EtcdStore::adopt_namespace(&s, 1).unwrap();
        let mut met = None;
        let stop = CancellationToken::new();
        let waiting = &mut |o: &Owner| {
            met = Some(o.epoch);
            stop.cancel();
        };
        assert_eq!(adopter.acquire("node 3", &stop, waiting).unwrap(), None);
        assert_eq!(met, Some(first), "it met namespace 1's owner");
        let whole = owned(&s, "step 1");
        let e = whole.load().unwrap_err().to_string();
        assert!(e.contains("ns/0001/"), "{e}");
    }

    #[test]
    fn one_node_leads_the_locks_its_key_is_the_fence_and_another_takes_over_when_it_goes() {
        let (_rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let first = EtcdStore::connect_lock_leader(&s).unwrap();
        let epoch = first
            .acquire("node 1", &CancellationToken::new(), &mut |_| {})
            .unwrap()
            .unwrap();
        assert_eq!(first.area().to_string(), "lock");
        // Its key is the one registrations are fenced by.
        let namespace = own_namespace(&s, 1);
        let registration = |txn, epoch| {
            vec![
                Mutation::PutBranch(fixtures::branch(txn, 1)),
                Mutation::LockFence { epoch },
            ]
        };
        namespace.commit(&registration(1, epoch as u64)).unwrap();
        // Another candidate meets the leader, with its description, and waits.
        let second = Arc::new(EtcdStore::connect_lock_leader(&s).unwrap());
        let (met_tx, met) = std::sync::mpsc::channel();
        let campaign = {
            let second = Arc::clone(&second);
            std::thread::spawn(move || {
                let mut waiting = |o: &Owner| {
                    let _ = met_tx.send((o.description.clone(), o.epoch));
                };
                second.acquire("node 2", &CancellationToken::new(), &mut waiting)
            })
        };
        assert_eq!(met.recv().unwrap(), ("node 1".to_owned(), epoch));
        // The leader goes (its lease handed back): the other leads, with a later epoch.
        drop(first);
        let next = campaign.join().unwrap().unwrap().unwrap();
        assert!(next > epoch, "{next} after {epoch}");
        let e = namespace
            .commit(&registration(2, epoch as u64))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no longer leads"), "{e}");
    }

    /// A store that owns namespace `n` of `s`.
    #[test]
    fn a_node_says_it_is_up_and_its_namespace_is_adopted_only_while_it_is_down() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let (seen, views) = std::sync::mpsc::channel();
        let stop = CancellationToken::new();
        let watcher = std::thread::spawn({
            let (observer, stop) = (EtcdStore::observe_nodes(&s).unwrap(), stop.clone());
            move || observer.watch_nodes(&stop, &mut |v| drop(seen.send(v.clone())))
        });
        let view_where = |what: &str, want: &dyn Fn(&ClusterNodes) -> bool| loop {
            let v = views.recv_timeout(Duration::from_secs(10)).expect(what);
            if want(&v) {
                return v;
            }
        };
        view_where("the first view", &|v| v.namespaces.is_empty() && v.up.is_empty());
        let e = EtcdStore::observe_nodes(&s).unwrap();
        let e = e.acquire("x", &CancellationToken::new(), &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("not to own"), "{e}");

        // Node 1's campaign for its namespace says it is up, and that its namespace exists.
        let one = own_namespace(&s, 1);
        let v = view_where("node 1 up", &|v| !v.up.is_empty());
        assert_eq!(v.namespaces, BTreeSet::from([1]));
        assert_eq!(v.up, BTreeMap::from([(1, "node".to_owned())]));
        // It goes: its namespace stays, and another node adopts it, without saying node 1
        // is up.
        drop(one);
        let v = view_where("node 1 down", &|v| v.up.is_empty());
        assert_eq!(v.namespaces, BTreeSet::from([1]));
        let adopter = EtcdStore::adopt_namespace(&s, 1).unwrap();
        let adopted = adopter.acquire("node 3", &CancellationToken::new(), &mut |_| {});
        assert!(adopted.unwrap().is_some());
        let up = rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            let key = format!("{}{}", s.prefix, StoredKey::NodeUp { node: 1 });
            client.get(key, None).await.unwrap().kvs().len()
        });
        assert_eq!(up, 0, "the adopter does not say node 1 is up");
        // Node 1 comes back: it says it is up before it waits for the adopter to hand back.
        let back = std::thread::spawn({
            let s = s.clone();
            move || own_namespace(&s, 1)
        });
        view_where("node 1 up again", &|v| v.up.contains_key(&1));
        drop(adopter);
        let back = back.join().unwrap();
        assert!(back.epoch() > 0);
        stop.cancel();
        watcher.join().unwrap();
    }

    fn own_namespace(s: &Settings, n: u16) -> EtcdStore {
        let store = EtcdStore::connect_namespace(s, n).unwrap();
        store
            .acquire("node", &CancellationToken::new(), &mut |_| {})
            .unwrap()
            .unwrap();
        store
    }

    #[test]
    fn a_lock_leader_reads_every_namespaces_transactions_and_branches() {
        let (_rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let txn = |node: u16, seq| (u64::from(node) << 48) | seq;
        let (one, two) = (own_namespace(&s, 1), own_namespace(&s, 0xbeef));
        commit(
            &one,
            vec![
                Mutation::PutGlobal(global(txn(1, 1), GlobalStatus::Begin)),
                Mutation::PutBranch(fixtures::branch(txn(1, 1), 1)),
                Mutation::PutBranch(fixtures::branch(txn(1, 1), 2)),
                Mutation::PutGlobal(global(txn(1, 2), GlobalStatus::Begin)),
                Mutation::PutBranch(fixtures::branch(txn(1, 2), 1)),
            ],
        );
        commit(
            &one,
            vec![Mutation::Finish(fixtures::finished(txn(1, 2), GlobalStatus::Committed))],
        );
        commit(
            &two,
            vec![
                Mutation::PutGlobal(global(txn(0xbeef, 1), GlobalStatus::Rollbacking)),
                Mutation::PutBranch(fixtures::branch(txn(0xbeef, 1), 9)),
            ],
        );
        // Read by whichever store the leader owns (its reads stop with its lease).
        let leader = owned(&s, "lock leader");
        let found = leader.load_namespaces().unwrap();
        let summary: Vec<(u64, GlobalStatus, Vec<u64>)> = found
            .iter()
            .map(|(g, b)| (g.txn_id, g.status, b.iter().map(|b| b.branch_id).collect()))
            .collect();
        assert_eq!(
            summary,
            [
                (txn(1, 1), GlobalStatus::Begin, vec![1, 2]),
                (txn(0xbeef, 1), GlobalStatus::Rollbacking, vec![9]),
            ],
            "the finished one is gone with its branches"
        );
        assert_eq!(found[0].1[0], fixtures::branch(txn(1, 1), 1));
    }

    #[test]
    fn a_batch_far_over_etcds_limits_lands_whole() {
        let (_rt, cluster) = cluster(1);
        let s = Settings {
            max_txn_bytes: 64 * 1024,
            ..settings(&cluster)
        };
        let store = owned(&s, "node");
        let mut batch = Vec::new();
        let mut ends = Vec::new();
        for txn in 1..=1_000u64 {
            batch.push(Mutation::PutGlobal(global(txn, GlobalStatus::Begin)));
            batch.push(Mutation::PutBranch(fixtures::branch(txn, 1)));
            ends.push(batch.len());
        }
        // Every tenth branch is 20 KB: about three of them fill a transaction's bytes.
        for m in batch.iter_mut().skip(1).step_by(20) {
            if let Mutation::PutBranch(b) = m {
                b.application_data = vec![7; 20_000];
            }
        }
        store.commit_submissions(&batch, &ends).unwrap();
        let (parts, _) = store.transactions(&batch, &ends).unwrap();
        // 2,000 operations would take 16 transactions by count alone; the bytes need more.
        assert!(parts.len() > 30, "{} transactions", parts.len());
        assert!(parts.iter().all(|p| p.ops() <= 128 && p.bytes <= 64 * 1024));
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.globals.len(), 1_000);
        assert_eq!(snapshot.branches.len(), 1_000);
        assert_eq!(snapshot.globals[999], global(1_000, GlobalStatus::Begin));
        assert_eq!(snapshot.branches[0].application_data.len(), 20_000);
    }

    #[test]
    fn whole_submissions_share_a_transaction_and_later_writes_fold_into_earlier_ones() {
        let (_rt, cluster) = cluster(1);
        let s = Settings {
            max_txn_ops: 4,
            ..settings(&cluster)
        };
        let store = owned(&s, "node");
        // Three submissions of two operations; the first's two writes of one key fold into
        // one. The third would make five, so it starts the second transaction instead of
        // being cut in two.
        let batch = vec![
            Mutation::PutGlobal(global(1, GlobalStatus::Begin)),
            Mutation::PutGlobal(global(1, GlobalStatus::Committing)),
            Mutation::PutGlobal(global(2, GlobalStatus::Begin)),
            Mutation::PutBranch(fixtures::branch(2, 1)),
            Mutation::PutGlobal(global(3, GlobalStatus::Begin)),
            Mutation::PutBranch(fixtures::branch(3, 1)),
        ];
        let (parts, _) = store.transactions(&batch, &[2, 4, 6]).unwrap();
        assert_eq!(parts.iter().map(Part::ops).collect::<Vec<_>>(), [3, 2]);
        // A branch written after its transaction's finish in one submission goes on into a
        // transaction of its own (etcd refuses a put into a range deleted in the same one).
        let batch = vec![
            Mutation::PutBranch(fixtures::branch(4, 1)),
            Mutation::Finish(fixtures::finished(4, GlobalStatus::Committed)),
            Mutation::PutBranch(fixtures::branch(4, 2)),
        ];
        let (parts, _) = store.transactions(&batch, &[3]).unwrap();
        assert_eq!(parts.iter().map(Part::ops).collect::<Vec<_>>(), [3, 1]);
        // The same as two submissions: the second goes whole into the next transaction.
        let (parts, _) = store.transactions(&batch, &[2, 3]).unwrap();
        assert_eq!(parts.iter().map(Part::ops).collect::<Vec<_>>(), [3, 1]);
        commit(&store, batch);
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.branches, vec![fixtures::branch(4, 2)]);
    }

    #[test]
    fn a_standby_waits_for_the_owner_then_takes_over_and_the_old_owner_is_fenced() {
        let (rt, cluster) = cluster(3);
        let s = settings(&cluster);
        let first = owned(&s, "first");
        commit(&first, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);

        let second = Arc::new(EtcdStore::connect(&s, 0).unwrap());
        let (met, heard) = std::sync::mpsc::channel();
        let standby = {
            let second = second.clone();
            std::thread::spawn(move || {
                second.acquire("second", &CancellationToken::new(), &mut |owner| {
                    met.send(owner.clone()).unwrap()
                })
            })
        };
        let owner = heard.recv().unwrap();
        assert_eq!(
            owner,
            Owner {
                description: "first".into(),
                epoch: first.epoch()
            }
        );

        // The first node's lease runs out as if it had paused: revoked behind its back.
        let id = first.lease().id;
        rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            client.lease_revoke(id).await.unwrap();
        });
        let epoch = standby.join().unwrap().unwrap().unwrap();
        assert!(epoch > first.epoch(), "{epoch} after {}", first.epoch());

        // The old owner's write is refused (by etcd, naming the new owner, or already by the
        // node, if its renewal heard of the revoked lease first) and leaves nothing.
        let err = first
            .commit(&[Mutation::PutGlobal(global(2, GlobalStatus::Begin))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another node owns the store") && err.contains("second")
                || err.contains("no longer owns the store"),
            "{err}"
        );
        assert!(first.lost().is_cancelled() && !first.serving());
        let snapshot = second.load().unwrap();
        assert_eq!(snapshot.globals, vec![global(1, GlobalStatus::Begin)]);
        commit(&*second, vec![Mutation::PutGlobal(global(3, GlobalStatus::Begin))]);
        assert_eq!(second.load().unwrap().globals.len(), 2);
    }

    #[test]
    fn a_lease_that_runs_out_is_noticed_and_stops_all_writes() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let store = owned(&s, "node");
        let id = store.lease().id;
        rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            client.lease_revoke(id).await.unwrap();
            // The next renewal hears that the lease is gone.
            tokio::time::timeout(Duration::from_secs(10), store.lost().cancelled())
                .await
                .expect("the lost lease was not noticed within 10 s");
        });
        assert!(!store.serving());
        let err = store
            .commit(&[Mutation::PutGlobal(global(1, GlobalStatus::Begin))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no longer owns the store"), "{err}");
    }

    #[test]
    fn a_node_waits_for_etcd_out_of_reach_until_it_is_stopped() {
        // "etcd" accepts connections and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = Settings {
            endpoints: vec![format!("http://{}", silent.local_addr().unwrap())],
            lease_ttl_s: 2,
            request_timeout_ms: 200,
            ..Settings::default()
        };
        // Nothing is asked of etcd before `acquire`, which waits until stopped.
        let store = Arc::new(EtcdStore::connect(&s, 0).unwrap());
        let stop = CancellationToken::new();
        let waiting = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || store.acquire("node", &stop, &mut |_| {}))
        };
        let (_held, _) = silent.accept().unwrap();
        stop.cancel();
        assert_eq!(waiting.join().unwrap().unwrap(), None);
        assert!(!store.serving());
    }

    #[test]
    fn a_standby_whose_lease_runs_out_takes_out_another_and_still_takes_over() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let owner = owned(&s, "owner");
        let standby = Arc::new(EtcdStore::connect(&s, 0).unwrap());
        let Lease { id: first, lost, .. } = leased(&standby);
        let waiting = {
            let standby = standby.clone();
            std::thread::spawn(move || standby.acquire("standby", &CancellationToken::new(), &mut |_| {}))
        };
        rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            client.lease_revoke(first).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), lost.cancelled())
                .await
                .expect("the standby's lost lease was not noticed within 10 s");
        });
        // The owner goes; the standby takes over under a lease of its own (a key cannot be
        // put under the revoked one).
        let before = owner.epoch();
        drop(owner);
        let epoch = waiting.join().unwrap().unwrap().expect("not stopped");
        assert!(epoch > before, "{epoch} > {before}");
        assert_ne!(standby.lease().id, first);
        assert!(standby.serving());
        commit(&*standby, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
    }

    #[test]
    fn each_node_continues_its_own_id_ceiling_and_a_stopped_standby_stops_waiting() {
        let (_rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let node = |id: u16| {
            let store = EtcdStore::connect(&s, id).unwrap();
            store
                .acquire("node", &CancellationToken::new(), &mut |_| {})
                .unwrap()
                .unwrap();
            store
        };
        let one = node(1);
        commit(&one, vec![Mutation::SetIdCeiling((1 << 48) + 500)]);
        let err = one
            .commit(&[Mutation::SetIdCeiling((2 << 48) + 1)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to node 2, not to this node 1"), "{err}");

        // A standby told to stop gives up its wait.
        let waiting = EtcdStore::connect(&s, 2).unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(waiting.acquire("two", &stop, &mut |_| {}).unwrap(), None);
        drop((one, waiting));

        let two = node(2);
        assert_eq!(two.load().unwrap().id_ceiling, 0);
        commit(&two, vec![Mutation::SetIdCeiling((2 << 48) + 7)]);
        drop(two);
        let one = node(1);
        assert_eq!(one.load().unwrap().id_ceiling, (1 << 48) + 500);
        // The ceiling read at ownership keeps a lower one from being written.
        commit(&one, vec![Mutation::SetIdCeiling((1 << 48) + 100)]);
        assert_eq!(one.load().unwrap().id_ceiling, (1 << 48) + 500);
    }

    #[test]
    fn the_owner_keeps_its_lease_and_writes_when_the_member_it_uses_dies() {
        let (rt, mut cluster) = cluster(3);
        // Long enough to ride out an election, should the member that dies lead, on a
        // machine busy with the other tests' clusters (only a failure waits for it).
        let s = Settings {
            lease_ttl_s: 10,
            ..settings(&cluster)
        };
        let store = owned(&s, "node");
        let used = store.members.current_index();
        let killed = Instant::now();
        cluster.kill(used);
        // Until a renewal sent after the death was confirmed (by another member), the lease
        // must hold. Nothing announces a renewal: `alive_until` is looked at.
        let ttl = s.lease_ttl();
        rt.block_on(async {
            let deadline = Instant::now() + 2 * ttl;
            while *store.lease().alive_until.lock() <= killed + sure(ttl) {
                assert!(
                    !store.lost().is_cancelled(),
                    "the lease was lost when one member of three died"
                );
                assert!(
                    Instant::now() < deadline,
                    "no renewal confirmed within {:?} of the death",
                    2 * ttl
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(!store.lost().is_cancelled());
        commit(&store, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
        assert_eq!(store.load().unwrap().globals, vec![global(1, GlobalStatus::Begin)]);
        assert_ne!(store.members.current_index(), used);
    }

    #[test]
    fn a_campaign_whose_answer_was_lost_is_recognised_as_won() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let store = EtcdStore::connect(&s, 0).unwrap();
        let lease = leased(&store);
        // The owner key as the lost campaign left it: under this node's lease.
        let created = rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            let options = PutOptions::new().with_lease(lease.id);
            let put = client
                .put(format!("{}owner", s.prefix), "node", Some(options))
                .await
                .unwrap();
            put.header().unwrap().revision()
        });
        let mut others = 0;
        let epoch = store
            .acquire("node", &CancellationToken::new(), &mut |_| others += 1)
            .unwrap()
            .unwrap();
        assert_eq!((epoch, others), (created, 0));
        assert!(store.serving());
        commit(&store, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
    }

    #[test]
    fn credentials_are_used_and_wrong_or_missing_ones_are_refused_at_once() {
        let (_rt, cluster) = cluster(1);
        cluster.enable_auth("root-secret").unwrap();
        let s = Settings {
            username: Some("root".into()),
            password: Some(Secret("root-secret".into())),
            ..settings(&cluster)
        };
        let store = owned(&s, "node");
        commit(&store, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
        assert_eq!(store.load().unwrap().globals.len(), 1);

        let wrong = Settings {
            password: Some(Secret("guess".into())),
            ..s.clone()
        };
        let never = CancellationToken::new();
        let err = EtcdStore::connect(&wrong, 0)
            .and_then(|store| store.acquire("node", &never, &mut |_| {}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("authentication failed"), "{err}");
        assert!(!err.contains("guess"), "the password never shows: {err}");
        let anonymous = Settings {
            username: None,
            password: None,
            ..s
        };
        // etcd 3.4 grants leases to anyone; writing needs the user.
        let err = EtcdStore::connect(&anonymous, 0)
            .and_then(|store| store.acquire("node", &CancellationToken::new(), &mut |_| {}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot campaign"), "{err}");
    }

    /// A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files in `dir`.
    fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn tls_to_etcd_verifies_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path(), "etcd");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let cluster = runtime
            .block_on(EtcdCluster::start_with(
                1,
                EtcdOptions {
                    tls: Some((cert.clone(), key)),
                    ..EtcdOptions::default()
                },
            ))
            .unwrap();
        assert!(cluster.endpoint(0).starts_with("https://"));
        let tls = |ca: &std::path::Path| {
            Some(crate::config::EtcdTls {
                ca: ca.to_owned(),
                cert: None,
                key: None,
            })
        };
        let s = Settings {
            tls: tls(&cert),
            ..settings(&cluster)
        };
        let store = owned(&s, "node");
        commit(&store, vec![Mutation::PutGlobal(global(1, GlobalStatus::Begin))]);
        assert_eq!(store.load().unwrap().globals.len(), 1);

        // Another CA: the member is not trusted, and that is a configuration error, not a
        // member to wait for.
        let (other, _) = certificate(dir.path(), "other");
        let err = EtcdStore::connect(&Settings { tls: tls(&other), ..s }, 0)
            .and_then(|store| store.acquire("node", &CancellationToken::new(), &mut |_| {}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate"), "{err}");
    }

    #[test]
    fn every_stored_key_reads_back_as_written_and_nothing_else_is_one() {
        let keys = [
            StoredKey::Owner,
            StoredKey::Writer,
            StoredKey::LockLeader,
            StoredKey::Global(u64::MAX),
            StoredKey::Branch {
                txn: 1 << 48,
                branch: 7,
            },
            StoredKey::Finished(3),
            StoredKey::Event {
                txn: 3,
                index: u32::MAX,
            },
            StoredKey::Audit(0),
            StoredKey::Token("ops/alice"),
            StoredKey::IdCeiling { node: 0xbeef },
            StoredKey::NodeUp { node: 2 },
            StoredKey::NamespaceOf { node: 0xffff },
        ];
        for key in keys {
            let text = key.to_string();
            assert_eq!(StoredKey::parse(text.as_bytes()), Some(key), "{text}");
        }
        for other in [
            "",
            "owner/",
            "owners",
            "g/1",
            "g/000000000000000g",
            "g/+000000000000001",
            "g/000000000000000A",
            "b/0000000000000001",
            "e/0000000000000001/1",
            "meta/id_ceiling/1",
            "meta/id_ceiling/10000",
            "meta/other",
            "nodes/2",
            "namespaces/",
            "t/",
            "x/0000000000000001",
        ] {
            assert_eq!(StoredKey::parse(other.as_bytes()), None, "{other:?}");
        }
    }

    #[test]
    fn keys_this_version_does_not_write_are_refused_on_load() {
        let (rt, cluster) = cluster(1);
        let s = settings(&cluster);
        let store = owned(&s, "node");
        rt.block_on(async {
            let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
            client.put(format!("{}x/1", s.prefix), "?", None).await.unwrap();
        });
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("\"x/1\" is not one this ferrata-tc writes"), "{err}");
    }
}
