//! The coordinator's core: global transactions in memory (backed by the journal), the
//! requests that change them (begin, register, report, commit, rollback) and the queries
//! that read them. Background work (timeouts, phase 2) lives in `phase2.rs`.
//!
//! Invariants:
//! - A change is submitted to the journal while the session's mutex is held, so the store
//!   sees a session's changes in the order memory did; nothing awaits with a mutex held.
//! - A request is acknowledged only after its change is durable.
//! - A decision (commit, rollback, an operator's retry) runs to its end in a task of its
//!   own, even if the request that asked for it is cancelled meanwhile.
//! - Rows are released only after the change that releases them has been submitted, so a
//!   later holder's branch is never durable before the earlier holder's release.
//! - A branch's tables are guarded (every resource manager confirmed it checks non-global
//!   writes to them, see `at/guards.rs`) before its rows are locked; a transaction pins its
//!   tables until it finishes.
//!
//! What is AT mode's (row locks, table guards) is in `at/`; this file calls it at the points
//! of a transaction's life where AT mode has something to do.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrata_rpc::{ErrorCode, pb};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::at::guards::Table;
use crate::at::remote::{Leadership, RemoteAt};
use crate::at::{At, LockAuthority, RowsFound};
use crate::audit::Audit;
use crate::auth::Tokens;
use crate::calls::Caller;
use crate::config::Config;
use crate::error::TcError;
use crate::history::History;
use crate::lock_key::LockKey;
use crate::metrics::Metrics;
use crate::model::{
    BranchError, BranchMode, BranchRecord, BranchStatus, Failure, FinishedRecord, GlobalRecord, GlobalStatus, now_ms,
};
use crate::msg::MsgBranch;
use crate::rm::RmRegistry;
use crate::store::journal::Journal;
use crate::store::{Mutation, Snapshot, StoreError};
use crate::tcc::TccBranch;
use crate::timeline::{DecidedBy, Decision, Event, EventKind, Timeline};
use crate::xid::{Ids, format_xid, node_of, parse_xid};

/// One live global transaction.
pub struct Session {
    pub txn_id: u64,
    pub xid: String,
    /// When the timeout check moves it to TimeoutRollbacking if it is still in Begin.
    pub(crate) deadline: Instant,
    pub(crate) state: Mutex<SessionState>,
    /// Counts the passes of the tasks driving it: each rollback pass, and each time a saga's
    /// actions stop or wait to retry; GlobalRollback and DTM's wait_result wait for the next.
    pub(crate) passes: watch::Sender<u64>,
    /// Wakes the task driving it (its saga's actions, its rollback) to retry now.
    pub(crate) wake: Notify,
}

pub(crate) struct SessionState {
    pub record: GlobalRecord,
    /// In registration order; a branch leaves once its phase 2 is done.
    pub branches: Vec<BranchRecord>,
    /// Branches ever registered (those restored from the store, after a restart).
    pub registered: usize,
    /// A rollback driver task is running for this session.
    pub rollback_running: bool,
    /// The first branch failure of the latest phase-2 pass.
    pub failure: Option<Failure>,
    /// The tables this transaction pins in the guarded set, unpinned when it finishes.
    pub guarded: BTreeSet<Table>,
    /// The global record is in the store. It goes there with the first branch: until a
    /// branch exists there is nothing to recover, so a begin costs no store write (after a
    /// crash such an XID is simply unknown; ids are never reused).
    pub stored: bool,
    /// What happened to it so far, and its version.
    pub timeline: Timeline,
    /// An operator's repair is running (one at a time per transaction).
    pub acting: bool,
    /// An operator paused its automatic phase-2 retries (kept in the timeline).
    pub paused: bool,
}

impl SessionState {
    /// A saga: its steps are its branches, and nothing else joins it.
    pub fn is_saga(&self) -> bool {
        self.branches.iter().any(|b| b.mode == BranchMode::Saga)
    }

    /// Records an event of the transaction's timeline, bumping its version.
    pub fn record(&mut self, kind: EventKind) {
        self.timeline.record(kind);
    }

    /// `writes`, and the events the store does not have yet, for one batch.
    pub fn with_events(&mut self, mut writes: Vec<Mutation>) -> Vec<Mutation> {
        writes.extend(self.timeline.unsaved(self.record.txn_id));
        writes
    }

    /// What the history and the store keep of this transaction once it ends; ended now
    /// (a resolved failure's retention counts from its resolution, not from the failure).
    pub fn finished_record(&self) -> FinishedRecord {
        FinishedRecord {
            record: GlobalRecord {
                updated_ms: now_ms(),
                ..self.record.clone()
            },
            branch_count: self.registered,
            failure: self.failure.clone(),
        }
    }
}

/// A status answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub xid: String,
    pub status: GlobalStatus,
    pub failure: Option<Failure>,
}

impl Session {
    /// Tells those waiting for a pass that one ended.
    pub(crate) fn pass_ended(&self) {
        self.passes.send_modify(|n| *n += 1);
    }
}

/// A transaction seen from outside, for the HTTP API.
#[derive(Clone, Debug)]
pub struct TxnView {
    pub xid: String,
    pub record: GlobalRecord,
    /// Empty for finished transactions (their branches are gone).
    pub branches: Vec<BranchRecord>,
    pub branch_count: usize,
    pub failure: Option<Failure>,
    pub finished: bool,
    /// Bumped by every change (see `timeline.rs`).
    pub version: u64,
    /// Its automatic phase-2 retries are paused by an operator.
    pub paused: bool,
}

/// The answer to a lock query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockQueryOutcome {
    pub lockable: bool,
    pub holders: Vec<(LockKey, u64, Option<GlobalStatus>)>,
}

/// A branch commit waiting to be sent, in the asynchronous phase-2 queue.
#[derive(Clone, Debug)]
pub(crate) struct PendingCommit {
    pub txn_id: u64,
    pub branch_id: u64,
    pub resource_id: String,
    /// The branch as the commit names it.
    pub reference: pb::BranchRef,
    pub attempt: u32,
    pub not_before: Instant,
    /// When its first attempt was due (Unix milliseconds): a message's schedule counts
    /// from it.
    pub first_ms: u64,
}

/// The longest transaction name, in bytes.
const MAX_NAME_BYTES: usize = 256;

pub struct Coordinator {
    pub(crate) config: Config,
    pub(crate) ids: Arc<Ids>,
    pub(crate) journal: Journal,
    /// AT mode: row locks and table guards, this node's own or the cluster's lock leader's.
    pub at: LockAuthority,
    pub(crate) sessions: RwLock<HashMap<u64, Arc<Session>>>,
    pub(crate) finished: Mutex<History>,
    pub(crate) timeouts: Mutex<BTreeSet<(Instant, u64)>>,
    pub rms: Arc<RmRegistry>,
    /// HTTP calls to services: TCC branches' confirm and cancel.
    pub(crate) caller: Caller,
    pub(crate) commit_queue: Mutex<Vec<PendingCommit>>,
    pub(crate) commit_wake: Notify,
    /// Commit decisions whose rows were released before the decision was durable (see
    /// `commit_now`): while there are any, a lock query waits for the journal.
    unsettled_releases: AtomicUsize,
    pub metrics: Metrics,
    /// Who may call (named tokens, the root token).
    pub tokens: Arc<Tokens>,
    /// The operator actions' trail (see `operator.rs`).
    pub(crate) audit: Mutex<Audit>,
    /// Held by a token change from its check to its store write.
    pub(crate) token_changes: tokio::sync::Mutex<()>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// `Ok` for a transaction in Begin, the only status that accepts branches (and guards for
/// them); `what` says what was refused.
fn begin_only(state: &SessionState, xid: &str, what: &str) -> Result<(), TcError> {
    if state.is_saga() {
        return Err(TcError::invalid(format!(
            "{xid} is a saga: its steps came with it, and nothing else joins it"
        )));
    }
    match state.record.status {
        GlobalStatus::Begin => Ok(()),
        s => Err(TcError::status_invalid(
            xid,
            s,
            &format!("{what} (only a transaction in Begin accepts branches)"),
        )),
    }
}

impl Coordinator {
    /// Builds the coordinator from what the store holds: sessions, branches and their locks
    /// come back, unfinished phase 2 is queued. Background tasks start with `start_background`.
    /// The locks are its own, or with `lock_leader` those of the cluster's lock leader. Its
    /// resource managers and tokens are its own, or those of the coordinator it serves
    /// `beside` on the same node (an adopted namespace beside the node's own).
    pub async fn recover(
        config: Config,
        journal: Journal,
        snapshot: Snapshot,
        caller: Caller,
        lock_leader: Option<Leadership>,
        beside: Option<&Coordinator>,
    ) -> Result<Arc<Coordinator>, StoreError> {
        // An id is leased durably before a coordinator serves anything: a store without one
        // never had a coordinator whose guard set a resource manager could still trust.
        let fresh_store = snapshot.id_ceiling == 0;
        let ids = Ids::start(config.node_id, snapshot.id_ceiling, journal.clone()).await?;
        let metrics = Metrics::of_namespace(config.etcd.serving().then_some(config.node_id));
        let (rms, tokens) = match beside {
            Some(node) => (Arc::clone(&node.rms), Arc::clone(&node.tokens)),
            None => (
                Arc::new(RmRegistry::default()),
                Arc::new(Tokens::new(
                    config.token.as_ref().map(|t| t.0.as_str()),
                    snapshot.tokens.clone(),
                    config.auth.viewers_see_values,
                )),
            ),
        };
        let shutdown = CancellationToken::new();
        let at = match lock_leader {
            None => LockAuthority::Local(Arc::new(At::new(&config, Arc::clone(&rms), fresh_store, &metrics))),
            Some(leader) => LockAuthority::Remote(RemoteAt::start(
                config.node_id,
                leader,
                journal.clone(),
                shutdown.clone(),
            )),
        };
        if let Err(broken) = crate::audit::verify(&snapshot.audit) {
            // Kept and served as it is: it is the evidence; GET /v1/audit/verify reports it.
            tracing::error!(
                record = broken.id,
                problem = broken.problem,
                "the audit trail in the store is broken"
            );
        }
        let audit = Mutex::new(Audit::restore(snapshot.audit.clone()));
        let coordinator = Arc::new(Coordinator {
            config,
            ids,
            journal,
            at,
            sessions: RwLock::new(HashMap::new()),
            finished: Mutex::new(History::default()),
            timeouts: Mutex::new(BTreeSet::new()),
            rms,
            caller,
            commit_queue: Mutex::new(Vec::new()),
            commit_wake: Notify::new(),
            unsettled_releases: AtomicUsize::new(0),
            metrics,
            tokens,
            audit,
            token_changes: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
        });
        coordinator.restore(snapshot)?;
        Ok(coordinator)
    }

    fn restore(self: &Arc<Self>, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut events = snapshot.events;
        *self.finished.lock() = History::restore(snapshot.finished, &mut events);
        let mut branches: HashMap<u64, Vec<BranchRecord>> = HashMap::new();
        for b in snapshot.branches {
            branches.entry(b.txn_id).or_default().push(b);
        }
        let now_wall = now_ms();
        let mut resumed = (0, 0, 0);
        // What exists, for a lock leader that may hold more of this node's (`sync_restored`).
        let (mut stored, mut holding) = (Vec::new(), Vec::new());
        for record in snapshot.globals {
            let txn_id = record.txn_id;
            let status = record.status;
            let list = branches.remove(&txn_id).unwrap_or_default();
            stored.push(txn_id);
            holding.extend(crate::at::holding(&record, &list).map(|b| (txn_id, b.branch_id)));
            // Locks of every branch that has not finished phase 2 (commit released them), and
            // their tables, guarded already by the previous instance.
            let guarded = self.at.restore_txn(&record, &list)?;
            let remaining = record
                .begin_ms
                .saturating_add(record.timeout_ms)
                .saturating_sub(now_wall);
            let deadline = Instant::now() + Duration::from_millis(remaining);
            let failure = list
                .iter()
                .find(|b| b.error.is_some() && !matches!(b.status, BranchStatus::PhaseOneFailed))
                .map(|b| Failure {
                    branch_id: b.branch_id,
                    resource_id: b.resource_id.clone(),
                    status: b.status,
                    error: b.error.clone().expect("checked"),
                });
            if status.is_committing() {
                let mut queue = self.commit_queue.lock();
                for b in list.iter().filter(|b| b.awaits_commit()) {
                    queue.push(pending_commit(b, record.updated_ms));
                }
                resumed.0 += 1;
            }
            let mut timeline = Timeline::restore(events.remove(&txn_id).unwrap_or_default());
            timeline.record(EventKind::Restored { status });
            let session = Arc::new(Session {
                txn_id,
                xid: format_xid(txn_id),
                deadline,
                state: Mutex::new(SessionState {
                    record,
                    registered: list.len(),
                    branches: list,
                    rollback_running: false,
                    failure,
                    guarded,
                    stored: true,
                    paused: timeline.paused(),
                    timeline,
                    acting: false,
                }),
                passes: watch::Sender::new(0),
                wake: Notify::new(),
            });
            self.metrics.status(None, Some(status));
            let (saga, timeout_ms) = {
                let state = session.state.lock();
                (state.is_saga(), state.record.timeout_ms)
            };
            // A saga without timeout_to_fail has none.
            if status == GlobalStatus::Begin && timeout_ms != 0 {
                self.timeouts.lock().insert((deadline, txn_id));
            }
            self.sessions.write().insert(txn_id, Arc::clone(&session));
            if status.is_rolling_back() {
                self.start_rollback(&session);
                resumed.1 += 1;
            }
            if status == GlobalStatus::Begin && saga {
                self.start_saga(&session);
                resumed.2 += 1;
            }
        }
        self.at.sync_restored(self.ids.first(), stored, holding);
        self.at.count_held(&self.metrics);
        let sessions = self.sessions.read().len();
        tracing::info!(
            sessions,
            committing = resumed.0,
            rolling_back = resumed.1,
            sagas = resumed.2,
            "restored from the store"
        );
        Ok(())
    }

    pub(crate) fn check_running(&self) -> Result<(), TcError> {
        if self.shutdown.is_cancelled() {
            return Err(TcError::shutting_down());
        }
        if let Some(cause) = self.journal.failed() {
            return Err(StoreError(cause).into());
        }
        if !self.journal.store_serving() {
            return Err(TcError::new(
                ErrorCode::Standby,
                "this node no longer owns the shared store (its etcd lease may have run out) and answers nothing more; \
                 another node takes over: retry there",
            ));
        }
        Ok(())
    }

    /// Whether this node may still act on the store's contents (false once a node on etcd
    /// may have lost its lease).
    pub fn owns_store(&self) -> bool {
        self.journal.store_serving()
    }

    /// Stops background work at once, without waiting for it (a node that lost its lease).
    pub fn stop_now(&self) {
        self.shutdown.cancel();
    }

    /// `None` once the store has failed: the coordinator acknowledges nothing more.
    pub fn store_failure(&self) -> Option<String> {
        self.journal.failed()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// The transaction id of `xid`, if it is one this coordinator serves: with several
    /// serving nodes, only those of its own namespace.
    fn parse(&self, xid: &str) -> Result<u64, TcError> {
        let id = parse_xid(xid).ok_or_else(|| {
            TcError::invalid(format!(
                "{xid:?} is not a Ferrata XID (they look like 1-42: node id, dash, sequence number)"
            ))
        })?;
        let (home, here) = (node_of(id), self.config.node_id);
        if self.config.etcd.serving() && home != here {
            return Err(TcError::new(
                ErrorCode::WrongNode,
                format!(
                    "global transaction {xid} was begun by node {home}, and this is node {here}: send its calls to node {home} \
                     (every node serves the transactions it began)"
                ),
            ));
        }
        Ok(id)
    }

    pub(crate) fn live(&self, txn_id: u64) -> Option<Arc<Session>> {
        self.sessions.read().get(&txn_id).cloned()
    }

    /// The live session, or the error that says why there is none.
    pub(crate) fn session_for(&self, xid: &str, what: &str) -> Result<Arc<Session>, TcError> {
        let txn_id = self.parse(xid)?;
        if let Some(s) = self.live(txn_id) {
            return Ok(s);
        }
        match self.finished.lock().get(txn_id) {
            Some(f) => Err(TcError::status_invalid(xid, f.record.status, what)),
            None => Err(TcError::not_found(xid)),
        }
    }

    /// Moves a session to `to`, keeping the status gauges right.
    pub(crate) fn set_status(&self, state: &mut SessionState, to: GlobalStatus) {
        let from = state.record.status;
        debug_assert!(
            from == to || from.can_become(to) || from.operator_retry() == Some(to),
            "{from:?} -> {to:?}"
        );
        if from != to {
            state.record.status = to;
            state.record.updated_ms = now_ms();
            self.metrics.status(Some(from), Some(to));
            if to.is_final() {
                self.metrics.finished(to);
            }
        }
    }

    /// Forgets a finished session (the caller stores `Mutation::Finish` with
    /// `state.finished_record()`), keeping what is remembered of it in the history. That is in
    /// place before the session leaves the live map, so a status query in between never finds
    /// neither. The history is trimmed in the background (`phase2.rs`, `history_loop`).
    pub(crate) fn finish(&self, session: &Session, state: &SessionState) {
        session.pass_ended();
        self.finished
            .lock()
            .insert(state.finished_record(), state.timeline.clone());
        self.sessions.write().remove(&session.txn_id);
        self.timeouts.lock().remove(&(session.deadline, session.txn_id));
        self.at.forget(session.txn_id, &state.guarded);
        self.metrics.status(Some(state.record.status), None);
        self.at.count_held(&self.metrics);
    }

    pub async fn begin(&self, timeout_ms: u64, name: String) -> Result<String, TcError> {
        Self::check_name(&name)?;
        self.begin_named(timeout_ms, name).await
    }

    /// Refuses a name an application may not give its transaction: the DTM API's.
    pub fn check_name(name: &str) -> Result<(), TcError> {
        if name.starts_with(crate::dtm::NAME_PREFIX) {
            return Err(TcError::invalid(format!(
                "transaction names starting with {:?} are the DTM API's (/api/dtmsvr/)",
                crate::dtm::NAME_PREFIX
            )));
        }
        Ok(())
    }

    /// Refuses a timeout above the configured maximum and a name above 256 bytes.
    pub(crate) fn check_limits(&self, timeout_ms: u64, name: &str) -> Result<(), TcError> {
        let max_timeout_ms = self.config.transactions.max_timeout_ms;
        if timeout_ms > max_timeout_ms {
            return Err(TcError::invalid(format!(
                "timeout_ms {timeout_ms} is above this coordinator's maximum of {max_timeout_ms} ms"
            )));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(TcError::invalid(format!(
                "the transaction name is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
                name.len()
            )));
        }
        Ok(())
    }

    /// `timeout_ms`, or the coordinator's default when it is 0.
    pub(crate) fn timeout_or_default(&self, timeout_ms: u64) -> u64 {
        if timeout_ms == 0 {
            self.config.transactions.default_timeout_ms
        } else {
            timeout_ms
        }
    }

    /// A new transaction's record, in Begin, under a fresh id.
    pub(crate) async fn new_record(&self, name: String, timeout_ms: u64) -> Result<GlobalRecord, TcError> {
        let now = now_ms();
        Ok(GlobalRecord {
            txn_id: self.ids.next().await?,
            name,
            status: GlobalStatus::Begin,
            timeout_ms,
            begin_ms: now,
            updated_ms: now,
        })
    }

    /// Begins a transaction under any name (the DTM API names its own).
    pub(crate) async fn begin_named(&self, timeout_ms: u64, name: String) -> Result<String, TcError> {
        self.check_running()?;
        let timeout_ms = self.timeout_or_default(timeout_ms);
        self.check_limits(timeout_ms, &name)?;
        let record = self.new_record(name, timeout_ms).await?;
        let (session, _) = self.open_session(record, Vec::new());
        tracing::debug!(xid = session.xid, timeout_ms, "begin");
        Ok(session.xid.clone())
    }

    /// Makes a new transaction live (in Begin) and starts its timeout (none if `timeout_ms`
    /// is 0: a saga without timeout_to_fail). With `branches` (a saga's steps, prepared
    /// messages), it is stored whole first: its record, its branches and its timeline are
    /// submitted before anyone else can see it, and the returned future is their durability.
    #[allow(clippy::type_complexity)]
    pub(crate) fn open_session(
        &self,
        record: GlobalRecord,
        branches: Vec<BranchRecord>,
    ) -> (
        Arc<Session>,
        Option<impl Future<Output = Result<(), StoreError>> + use<>>,
    ) {
        let txn_id = record.txn_id;
        let timeout_ms = record.timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut timeline = Timeline::default();
        timeline.record(EventKind::Begun {
            name: record.name.clone(),
            timeout_ms,
        });
        let mut writes = Vec::new();
        if !branches.is_empty() {
            writes.push(Mutation::PutGlobal(record.clone()));
            for b in &branches {
                timeline.record(EventKind::BranchRegistered {
                    branch_id: b.branch_id,
                    resource_id: b.resource_id.clone(),
                    lock_keys: 0,
                });
                writes.push(Mutation::PutBranch(b.clone()));
            }
            self.metrics.branch_registrations.increment(branches.len() as u64);
        }
        let session = Arc::new(Session {
            txn_id,
            xid: format_xid(txn_id),
            deadline,
            state: Mutex::new(SessionState {
                record,
                registered: branches.len(),
                stored: !branches.is_empty(),
                branches,
                rollback_running: false,
                failure: None,
                guarded: BTreeSet::new(),
                timeline,
                acting: false,
                paused: false,
            }),
            passes: watch::Sender::new(0),
            wake: Notify::new(),
        });
        let durable = (!writes.is_empty()).then(|| {
            let writes = session.state.lock().with_events(writes);
            self.journal.submit(writes)
        });
        self.sessions.write().insert(txn_id, Arc::clone(&session));
        if timeout_ms != 0 {
            self.timeouts.lock().insert((deadline, txn_id));
        }
        self.metrics.begins.increment(1);
        self.metrics.status(None, Some(GlobalStatus::Begin));
        (session, durable)
    }

    fn lock_wait(&self, lock_wait_ms: u64) -> (Instant, u64) {
        let ms = lock_wait_ms.min(self.config.transactions.max_lock_wait_ms);
        (Instant::now() + Duration::from_millis(ms), ms)
    }

    /// Pins `tables` for the transaction of `session` (only in Begin: `finish` comes later and
    /// unpins whatever was pinned) and waits until they are guarded.
    async fn guard_for(
        &self,
        session: &Session,
        (xid, what): (&str, &str),
        tables: &[Table],
        deadline: Instant,
    ) -> Result<(), TcError> {
        let guarded = {
            let mut state = session.state.lock();
            begin_only(&state, xid, what)?;
            // Pinned under the session's mutex, so no `finish` (which unpins) runs before.
            state.guarded.extend(tables.iter().cloned());
            self.at.guard(session.txn_id, tables, deadline, &self.shutdown)
        };
        guarded.await
    }

    /// Guards `tables` before a transaction in Begin first writes to them (see the
    /// `GuardTables` call in the protocol).
    pub async fn guard_tables(&self, xid: &str, tables: &[pb::GuardedTable], lock_wait_ms: u64) -> Result<(), TcError> {
        self.check_running()?;
        if tables
            .iter()
            .any(|t| t.resource_id.is_empty() || t.schema.is_empty() || t.table.is_empty())
        {
            return Err(TcError::invalid("every table needs its resource_id, schema and table"));
        }
        let tables: Vec<Table> = tables.iter().map(Table::from_pb).collect();
        let session = self.session_for(xid, "guard tables")?;
        let (deadline, _) = self.lock_wait(lock_wait_ms);
        self.guard_for(&session, (xid, "guard tables"), &tables, deadline).await
    }

    /// Registers a branch of a transaction in Begin and takes its locks (an XA branch takes
    /// none: its database holds them).
    pub async fn register(&self, request: pb::BranchRegisterRequest) -> Result<u64, TcError> {
        let pb::BranchRegisterRequest {
            xid,
            resource_id,
            locks,
            application_data,
            lock_wait_ms,
            branch_type,
            connection_id,
            instance_id,
        } = request;
        let xid = xid.as_str();
        self.check_running()?;
        let mode = pb::BranchType::try_from(branch_type)
            .map(BranchMode::from_pb)
            .map_err(|_| TcError::invalid(format!("unknown branch_type {branch_type}")))?;
        if mode != BranchMode::At && !locks.is_empty() {
            return Err(TcError::invalid(format!(
                "a {} branch takes no global locks: send no locks",
                mode.as_str()
            )));
        }
        if mode == BranchMode::Saga {
            return Err(TcError::invalid(
                "saga steps come with their saga (POST /v1/transactions with \"mode\": \"saga\"); they are not registered one by one",
            ));
        }
        // An HTTP branch's name in its transaction, and the URLs the coordinator will call.
        let (called, resource_id) = match mode {
            BranchMode::Tcc => {
                let branch = TccBranch::decode(&application_data).map_err(TcError::invalid)?;
                if let Some(why) = branch.invalid(&self.caller) {
                    return Err(TcError::invalid(why));
                }
                // Its commits batch by the service it calls, never with a database's.
                let origin = crate::calls::origin(&branch.confirm).to_owned();
                (Some((branch.name, vec![branch.confirm, branch.cancel])), origin)
            }
            BranchMode::Msg => {
                let msg = MsgBranch::decode(&application_data).map_err(TcError::invalid)?;
                if let Some(why) = msg.invalid(&self.caller) {
                    return Err(TcError::invalid(why));
                }
                if msg.has_check() {
                    return Err(TcError::invalid(
                        "query_prepared belongs to prepared messages, stored whole (POST /v1/transactions with \"mode\": \"msg\"); a message added to a transaction goes with its decision",
                    ));
                }
                let origin = crate::calls::origin(&msg.target).to_owned();
                (Some((msg.name, vec![msg.target])), origin)
            }
            _ => (None, resource_id),
        };
        let limit = self.config.transactions.max_application_data;
        if application_data.len() > limit {
            return Err(TcError::invalid(format!(
                "application_data is {} bytes; at most {limit} are allowed",
                application_data.len()
            )));
        }
        let keys = LockKey::from_pb(&resource_id, &locks).map_err(TcError::invalid)?;
        let tables = Table::of_keys(&keys);
        let session = self.session_for(xid, "register a branch")?;
        if Self::prepared_check(&session).is_some() {
            return Err(TcError::invalid(format!(
                "{xid} holds prepared messages that its query_prepared settles: nothing else joins it"
            )));
        }
        let begin_only = |state: &SessionState| begin_only(state, xid, "register a branch");
        // Looked up only for a transaction that could take the branch.
        if let Some((_, urls)) = &called {
            begin_only(&session.state.lock())?;
            self.caller
                .resolves(urls.iter().map(String::as_str))
                .await
                .map_err(TcError::invalid)?;
        }
        let mut application_data = application_data;
        let txn_id = session.txn_id;
        let (deadline, wait_ms) = self.lock_wait(lock_wait_ms);
        // A refusal is part of the transaction's story (which rows, held by whom).
        let refused = |e: TcError| {
            session.state.lock().record(EventKind::RegistrationRefused {
                resource_id: resource_id.clone(),
                code: e.code.as_str().to_owned(),
                message: e.message.clone(),
                holder: e.holder.clone(),
            });
            e
        };
        self.guard_for(&session, (xid, "register a branch"), &tables, deadline)
            .await
            .map_err(refused)?;
        let branch_id = self.ids.next().await?;
        let grant = self
            .at
            .acquire(
                txn_id,
                branch_id,
                &keys,
                (deadline, wait_ms),
                &self.metrics,
                &self.shutdown,
            )
            .await
            .map_err(refused)?;
        let durable = {
            let mut state = session.state.lock();
            if let Err(e) = begin_only(&state) {
                drop(state);
                self.at.release_branch(txn_id, branch_id, &keys);
                return Err(e);
            }
            match called.as_ref().map(|(name, _)| name.as_str()) {
                // A message the registration did not name is named by its branch id.
                Some("") => {
                    let mut msg = MsgBranch::decode(&application_data).map_err(TcError::invalid)?;
                    msg.name = branch_id.to_string();
                    application_data = msg.encode();
                }
                Some(name)
                    if state
                        .branches
                        .iter()
                        .any(|b| b.mode == mode && http_branch_name(b).as_deref() == Some(name)) =>
                {
                    return Err(TcError::new(
                        ErrorCode::AlreadyExists,
                        format!(
                            "global transaction {xid} already has a {} branch {name:?}: give each branch its own branch_id",
                            mode.as_str()
                        ),
                    ));
                }
                _ => {}
            }
            let now = now_ms();
            let branch = BranchRecord {
                txn_id,
                branch_id,
                resource_id,
                lock_keys: keys,
                application_data,
                status: BranchStatus::Registered,
                registered_ms: now,
                updated_ms: now,
                error: None,
                mode,
                connection_id,
                instance_id,
            };
            if let Some(waited) = grant.granted.waited {
                state.record(EventKind::LockWaited {
                    branch_id,
                    holders: grant.granted.holders.iter().map(|t| format_xid(*t)).collect(),
                    waited_ms: waited.as_millis() as u64,
                });
            }
            state.record(EventKind::BranchRegistered {
                branch_id,
                resource_id: branch.resource_id.clone(),
                lock_keys: branch.lock_keys.len() as u64,
            });
            if mode == BranchMode::Xa {
                state.record(EventKind::XaBranch {
                    branch_id,
                    connection_id,
                });
            }
            state.branches.push(branch.clone());
            state.registered += 1;
            let mut writes = Vec::with_capacity(3);
            // What a refusal of the write undoes.
            let undo = (!state.stored, state.timeline.unsaved_from());
            if !state.stored {
                writes.push(Mutation::PutGlobal(state.record.clone()));
                state.stored = true;
            }
            writes.push(Mutation::PutBranch(branch));
            if grant.epoch != 0 {
                writes.push(Mutation::LockFence { epoch: grant.epoch });
            }
            let writes = state.with_events(writes);
            (self.journal.submit_fenced(writes), undo)
        };
        let (durable, (stored_here, events_from)) = durable;
        if let Err(why) = durable.await? {
            // The lock leader that granted the rows no longer leads (several serving nodes):
            // nothing of the registration was stored, and the new leader never knew its rows.
            let e = TcError::new(
                ErrorCode::LockAuthorityUnavailable,
                format!(
                    "the branch was not registered: the cluster's lock leader changed while it was ({why}); retry the \
                     registration"
                ),
            );
            let mut state = session.state.lock();
            state.registered -= 1;
            state.stored &= !stored_here;
            state.timeline.unsaved_again_from(events_from);
            if let Some(i) = state.branches.iter().position(|b| b.branch_id == branch_id) {
                let branch = state.branches.remove(i);
                state.record(EventKind::RegistrationRefused {
                    resource_id: branch.resource_id,
                    code: e.code.as_str().to_owned(),
                    message: e.message.clone(),
                    holder: None,
                });
                drop(state);
                self.at.release_branch(txn_id, branch_id, &branch.lock_keys);
            }
            return Err(e);
        }
        self.metrics.branch_registrations.increment(1);
        self.at.count_held(&self.metrics);
        tracing::debug!(xid, branch_id, "branch registered");
        Ok(branch_id)
    }

    /// A resource manager reports a registered branch's phase-1 outcome:
    /// - `PhaseOneFailed`: its local transaction did not commit (or prepare); its locks are
    ///   released and phase 2 skips it;
    /// - XA only, `Prepared`: the database prepared it; accepted only while the transaction is
    ///   in Begin (a branch prepared after the decision is not part of it and must be rolled
    ///   back by its resource manager);
    /// - XA only, `ReadOnly`: it wrote nothing and was finished in phase 1; phase 2 skips it.
    pub async fn report(&self, xid: &str, branch_id: u64, status: BranchStatus, reason: String) -> Result<(), TcError> {
        self.check_running()?;
        if !matches!(
            status,
            BranchStatus::PhaseOneFailed | BranchStatus::Prepared | BranchStatus::ReadOnly
        ) {
            return Err(TcError::invalid(format!(
                "only PHASE_ONE_FAILED, PHASE_ONE_PREPARED and PHASE_ONE_READ_ONLY can be reported; {} is decided by the coordinator",
                status.as_str()
            )));
        }
        let session = self.session_for(xid, "report a branch")?;
        let (durable, keys) = {
            let mut state = session.state.lock();
            let global = state.record.status;
            let Some(branch) = state.branches.iter_mut().find(|b| b.branch_id == branch_id) else {
                return Err(TcError::new(
                    ErrorCode::BranchNotFound,
                    format!("global transaction {xid} has no branch {branch_id}"),
                ));
            };
            let invalid = |message: String| TcError {
                status: Some(global),
                ..TcError::new(ErrorCode::GlobalStatusInvalid, message)
            };
            if branch.mode.is_http() {
                return Err(TcError::invalid(format!(
                    "branch {branch_id} of {xid} is a {} branch: the coordinator calls its service itself (a failed \
                     try is told by rolling the transaction back), nothing is reported for it",
                    branch.mode.as_str()
                )));
            }
            if status != BranchStatus::PhaseOneFailed && branch.mode != BranchMode::Xa {
                return Err(TcError::invalid(format!(
                    "branch {branch_id} of {xid} is an AT branch; only XA branches are prepared or read-only"
                )));
            }
            match (branch.status, status) {
                (BranchStatus::Registered, BranchStatus::Prepared) if global != GlobalStatus::Begin => {
                    return Err(invalid(format!(
                        "global transaction {xid} was decided ({}) before branch {branch_id} prepared: the branch is not part of it; roll it back",
                        global.as_str()
                    )));
                }
                (BranchStatus::Registered, _) => {}
                (now, then) if now == then => return Ok(()),
                // Ended by the decision before it said how its phase 1 went: nothing to do.
                (BranchStatus::PhaseOneFailed, BranchStatus::ReadOnly) => return Ok(()),
                (BranchStatus::PhaseOneFailed, BranchStatus::Prepared) => {
                    let why = branch.error.as_ref().map_or("", |e| e.reason.as_str());
                    return Err(invalid(format!(
                        "branch {branch_id} of {xid} ended before it prepared ({why}): it is not part of the global transaction; roll it back"
                    )));
                }
                (now, _) => {
                    return Err(invalid(format!(
                        "branch {branch_id} of {xid} is already {}; its phase 1 is over",
                        now.as_str()
                    )));
                }
            }
            branch.status = status;
            branch.updated_ms = now_ms();
            if status == BranchStatus::PhaseOneFailed {
                branch.error = Some(BranchError {
                    reason: reason.clone(),
                    detail_json: String::new(),
                });
            }
            let record = branch.clone();
            let keys = record.lock_keys.clone();
            match status {
                BranchStatus::Prepared => state.record(EventKind::BranchPrepared { branch_id }),
                BranchStatus::ReadOnly => state.record(EventKind::BranchReadOnly { branch_id }),
                _ => {
                    state.record(EventKind::PhaseOneFailed { branch_id, reason });
                    state.record(EventKind::LocksReleased {
                        branch_id: Some(branch_id),
                        rows: keys.len() as u64,
                    });
                }
            }
            let writes = state.with_events(vec![Mutation::PutBranch(record)]);
            (self.journal.submit(writes), keys)
        };
        if status == BranchStatus::PhaseOneFailed {
            self.at.release_branch(session.txn_id, branch_id, &keys);
            self.metrics.branch_phase_one_failed.increment(1);
        }
        durable.await?;
        Ok(())
    }

    pub(crate) fn outcome(session: &Session, state: &SessionState) -> Outcome {
        Outcome {
            xid: session.xid.clone(),
            status: state.record.status,
            failure: state.failure.clone(),
        }
    }

    fn finished_outcome(&self, xid: &str) -> Option<Outcome> {
        let txn_id = parse_xid(xid)?;
        let finished = self.finished.lock();
        let f = finished.get(txn_id)?;
        Some(Outcome {
            xid: xid.to_owned(),
            status: f.record.status,
            failure: f.failure.clone(),
        })
    }

    /// Runs a decision to its end even if the caller goes away (a client that timed out, a
    /// dropped connection cancels its request's future): a decision cut off halfway would
    /// leave the transaction stuck, in Committing with its locks held, or rolling back with
    /// nothing driving the rollback.
    pub(crate) async fn to_the_end<T, F>(self: &Arc<Self>, work: impl FnOnce(Arc<Self>) -> F) -> Result<T, TcError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, TcError>> + Send + 'static,
    {
        match self.tasks.spawn(work(Arc::clone(self))).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(TcError::shutting_down()),
        }
    }

    /// Decides commit. Returns once the decision is durable; the locks pass on as the
    /// decision is submitted and the branches commit in the background.
    pub async fn commit(self: &Arc<Self>, xid: &str) -> Result<Outcome, TcError> {
        let xid = xid.to_owned();
        self.to_the_end(|this| async move { this.commit_now(&xid, DecidedBy::Application).await })
            .await
    }

    /// Decides commit for `by`: the application, or a saga whose actions all succeeded (an
    /// application cannot commit a saga: its actions decide).
    pub(crate) async fn commit_now(&self, xid: &str, by: DecidedBy) -> Result<Outcome, TcError> {
        self.check_running()?;
        let txn_id = self.parse(xid)?;
        let Some(session) = self.live(txn_id) else {
            return match self.finished_outcome(xid) {
                Some(o) if o.status == GlobalStatus::Committed => Ok(o),
                Some(o) => Err(TcError::status_invalid(xid, o.status, "commit")),
                None => Err(TcError::not_found(xid)),
            };
        };
        let (durable, keys, next) = {
            let mut state = session.state.lock();
            match state.record.status {
                GlobalStatus::Begin => {}
                GlobalStatus::Committing | GlobalStatus::AsyncCommitting | GlobalStatus::CommitFailed => {
                    return Ok(Self::outcome(&session, &state));
                }
                s => return Err(TcError::status_invalid(xid, s, "commit")),
            }
            if by == DecidedBy::Application && state.is_saga() {
                return Err(TcError::invalid(format!(
                    "{xid} is a saga: it commits itself once every action succeeded (follow it with GET \
                     /v1/transactions/{xid}); it can be rolled back"
                )));
            }
            self.set_status(&mut state, GlobalStatus::Committing);
            // An XA branch still in phase 1 is not part of the decision: it ends like a failed
            // phase 1 (its late prepare is refused and rolled back by its resource manager).
            let unprepared = not_prepared_in_time(&mut state);
            let pending = state.branches.iter().any(BranchRecord::awaits_commit);
            let keys: Vec<LockKey> = state
                .branches
                .iter()
                .flat_map(|b| b.lock_keys.iter().cloned())
                .collect();
            state.record(EventKind::Decided {
                decision: Decision::Commit,
                by,
            });
            if !keys.is_empty() {
                state.record(EventKind::LocksReleased {
                    branch_id: None,
                    rows: keys.len() as u64,
                });
            }
            let (next, write) = if pending {
                let mut record = state.record.clone();
                record.status = GlobalStatus::AsyncCommitting;
                (GlobalStatus::AsyncCommitting, Mutation::PutGlobal(record))
            } else {
                state.record(EventKind::Finished {
                    status: GlobalStatus::Committed,
                });
                let mut finished = state.finished_record();
                finished.record.status = GlobalStatus::Committed;
                (GlobalStatus::Committed, Mutation::Finish(finished))
            };
            let durable = state.stored.then(|| {
                let mut writes: Vec<Mutation> = unprepared.into_iter().map(Mutation::PutBranch).collect();
                writes.push(write);
                let writes = state.with_events(writes);
                self.journal.submit(writes)
            });
            (durable, keys, next)
        };
        // The rows pass to their next holders now, while the decision's write is on its way:
        // a next holder's registration is submitted after it, so it is never durable (nor
        // acknowledged) before the decision, and both can share one fsync. A lock query
        // waits for the journal while such a release is unsettled (`lock_query`).
        // On a store failure the transaction stays in Committing: the coordinator
        // acknowledges nothing more, and after a restart the store says Begin and the
        // locks are taken again from its branches.
        match durable {
            Some(durable) => self.release_with(txn_id, &keys, durable).await?,
            None => self.at.release_txn(txn_id, &keys),
        }
        {
            let mut state = session.state.lock();
            self.set_status(&mut state, next);
            if next == GlobalStatus::AsyncCommitting {
                let mut queue = self.commit_queue.lock();
                let decided_ms = now_ms();
                for b in state.branches.iter().filter(|b| b.awaits_commit()) {
                    queue.push(pending_commit(b, decided_ms));
                }
            } else {
                self.finish(&session, &state);
            }
        }
        self.timeouts.lock().remove(&(session.deadline, txn_id));
        self.at.count_held(&self.metrics);
        self.metrics.commits.increment(1);
        if next == GlobalStatus::AsyncCommitting {
            self.commit_wake.notify_one();
        }
        tracing::debug!(xid, status = next.as_str(), "commit decided");
        Ok(Outcome {
            xid: xid.to_owned(),
            status: next,
            failure: None,
        })
    }

    /// Releases `keys` of `txn_id` at once, while `durable` (the write that ends their hold)
    /// is on its way, and waits for it: see `commit_now`.
    pub(crate) async fn release_with(
        &self,
        txn_id: u64,
        keys: &[LockKey],
        durable: impl Future<Output = Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let LockAuthority::Local(at) = &self.at else {
            // Another node may be next, writing another journal: the rows wait for this one.
            durable.await?;
            self.at.release_txn(txn_id, keys);
            return Ok(());
        };
        self.unsettled_releases.fetch_add(1, Ordering::SeqCst);
        at.locks.release_txn(txn_id, keys);
        let done = durable.await;
        self.unsettled_releases.fetch_sub(1, Ordering::SeqCst);
        done
    }

    /// Decides rollback (if not decided yet) and waits up to `rollback_wait_ms` for the
    /// branches to roll back.
    pub async fn rollback(self: &Arc<Self>, xid: &str) -> Result<Outcome, TcError> {
        let xid = xid.to_owned();
        self.to_the_end(|this| async move { this.rollback_now(&xid).await })
            .await
    }

    async fn rollback_now(self: &Arc<Self>, xid: &str) -> Result<Outcome, TcError> {
        self.check_running()?;
        let txn_id = self.parse(xid)?;
        let Some(session) = self.live(txn_id) else {
            return match self.finished_outcome(xid) {
                Some(o) if !matches!(o.status, GlobalStatus::Committed | GlobalStatus::CommitFailed) => Ok(o),
                Some(o) => Err(TcError::status_invalid(xid, o.status, "roll back")),
                None => Err(TcError::not_found(xid)),
            };
        };
        let passes = session.passes.subscribe();
        let decided = match self.decide_rollback(&session, GlobalStatus::Rollbacking, DecidedBy::Application) {
            Ok(durable) => Some(durable),
            Err(s) if s.is_rolling_back() => None,
            Err(GlobalStatus::RollbackFailed | GlobalStatus::TimeoutRollbackFailed) => {
                let state = session.state.lock();
                return Ok(Self::outcome(&session, &state));
            }
            Err(s) => return Err(TcError::status_invalid(xid, s, "roll back")),
        };
        if let Some(durable) = decided {
            if let Some(durable) = durable {
                durable.await?;
            }
            self.metrics.rollbacks.increment(1);
            tracing::debug!(xid, "rollback decided");
        }
        self.start_rollback(&session);
        self.until_pass(&session, passes).await;
        let state = session.state.lock();
        Ok(Self::outcome(&session, &state))
    }

    /// Waits, for a client that asked for the outcome (DTM's `wait_result`), until the
    /// first pass ended ([`until_pass`](Self::until_pass)): the status then.
    pub async fn await_pass(&self, xid: &str) -> Result<GlobalStatus, TcError> {
        let Some(session) = self.live(self.parse(xid)?) else {
            return Ok(self.status(xid)?.status);
        };
        let passes = session.passes.subscribe();
        Ok(self.until_pass(&session, passes).await)
    }

    /// Waits until `session` is final, or its rollback's first pass ended (it waits to
    /// retry, or for an operator), or it is paused, or a pass of the task driving it ended
    /// with it still in Begin or committing (an action or a confirm waits to retry), or
    /// `rollback_wait_ms` passed: its status then. `passes` was subscribed before the caller
    /// started what it waits for, so no pass is missed.
    pub(crate) async fn until_pass(&self, session: &Session, mut passes: watch::Receiver<u64>) -> GlobalStatus {
        // A pass that ends with the transaction where it was answers; before a rollback's
        // first pass, only that pass does (a saga's actions stopping is not it).
        let running = |s: GlobalStatus| match s {
            GlobalStatus::Begin => Some(0),
            GlobalStatus::Committing | GlobalStatus::AsyncCommitting => Some(1),
            _ => None,
        };
        let deadline = Instant::now() + self.config.transactions.rollback_wait();
        let (mut waited_in, mut woke) = (None, false);
        loop {
            let (status, paused) = {
                let state = session.state.lock();
                (state.record.status, state.paused)
            };
            // Retrying after a pass: one that began retrying (an operator's retry, a second
            // rollback call) waits for its next pass.
            let settled = status.is_final()
                || paused
                || woke
                    && matches!(
                        status,
                        GlobalStatus::RollbackRetrying | GlobalStatus::TimeoutRollbackRetrying
                    );
            if settled || running(status).is_some_and(|phase| waited_in == Some(phase)) {
                return status;
            }
            waited_in = running(status);
            tokio::select! {
                changed = passes.changed() => {
                    if changed.is_err() {
                        return status;
                    }
                    woke = true;
                }
                _ = tokio::time::sleep_until(deadline) => return status,
                _ = self.shutdown.cancelled() => return status,
            }
        }
    }

    /// Moves a transaction in Begin to `to` (Rollbacking, TimeoutRollbacking), as `by`
    /// decided: its rows now make requesters fail fast and its timeout is off. Returns the
    /// decision's write (none while nothing of it is stored), or the status it is in instead
    /// of Begin. The caller then starts the rollback once the write is durable.
    #[allow(clippy::type_complexity)]
    pub(crate) fn decide_rollback(
        &self,
        session: &Session,
        to: GlobalStatus,
        by: DecidedBy,
    ) -> Result<Option<impl Future<Output = Result<(), StoreError>> + use<>>, GlobalStatus> {
        self.decide_rollback_with(session, to, by, &mut |_| Vec::new())
    }

    /// `decide_rollback`, storing what `cause` changes in the session (the branch that made
    /// the decision) in the same batch.
    #[allow(clippy::type_complexity)]
    pub(crate) fn decide_rollback_with(
        &self,
        session: &Session,
        to: GlobalStatus,
        by: DecidedBy,
        cause: &mut dyn FnMut(&mut SessionState) -> Vec<Mutation>,
    ) -> Result<Option<impl Future<Output = Result<(), StoreError>> + use<>>, GlobalStatus> {
        let durable = {
            let mut state = session.state.lock();
            if state.record.status != GlobalStatus::Begin {
                return Err(state.record.status);
            }
            let mut writes = cause(&mut state);
            self.set_status(&mut state, to);
            state.record(EventKind::Decided {
                decision: Decision::Rollback,
                by,
            });
            state.stored.then(|| {
                writes.push(Mutation::PutGlobal(state.record.clone()));
                let writes = state.with_events(writes);
                self.journal.submit(writes)
            })
        };
        self.at.set_rolling_back(session.txn_id);
        self.timeouts.lock().remove(&(session.deadline, session.txn_id));
        Ok(durable)
    }

    /// Retries now what waits for its next attempt (DTM's resetNextCronTime): a saga's
    /// actions, a rollback's pass, a commit's branch calls.
    pub fn hurry(&self, xid: &str) -> Result<(), TcError> {
        let session = self.session_for(xid, "retry now")?;
        session.wake.notify_one();
        let now = Instant::now();
        let mut queue = self.commit_queue.lock();
        for p in queue.iter_mut().filter(|p| p.txn_id == session.txn_id) {
            p.not_before = now;
        }
        drop(queue);
        self.commit_wake.notify_one();
        Ok(())
    }

    pub fn status(&self, xid: &str) -> Result<Outcome, TcError> {
        let txn_id = self.parse(xid)?;
        if let Some(session) = self.live(txn_id) {
            let state = session.state.lock();
            return Ok(Self::outcome(&session, &state));
        }
        self.finished_outcome(xid).ok_or_else(|| TcError::not_found(xid))
    }

    /// What should become of a prepared XA branch that no session holds (a proxy's orphan
    /// sweep found it). A branch is committed only if it is part of a decided commit; it is
    /// rolled back if the transaction rolls back or keeps no record of it (a branch that
    /// finished phase 2 is no longer prepared; one that reported no prepare before the
    /// decision, or none at all, is not part of it); it waits while the transaction runs, and
    /// is left to an operator while the transaction waits for one on the commit side.
    pub fn xa_orphan(&self, xid: &str, branch_id: u64) -> Result<pb::XaOrphanResponse, TcError> {
        use pb::xa_orphan_response::Verdict;
        let txn_id = self.parse(xid)?;
        let answer =
            |verdict: Verdict, global: Option<GlobalStatus>, branch: Option<BranchStatus>| pb::XaOrphanResponse {
                verdict: verdict as i32,
                global_status: global.map_or(pb::GlobalStatus::Unknown, GlobalStatus::to_pb) as i32,
                branch_status: branch.map_or(pb::BranchStatus::Unknown, BranchStatus::to_pb) as i32,
            };
        if let Some(session) = self.live(txn_id) {
            let state = session.state.lock();
            let global = state.record.status;
            let branch = state
                .branches
                .iter()
                .find(|b| b.branch_id == branch_id)
                .filter(|b| b.mode == BranchMode::Xa)
                .map(|b| b.status);
            let verdict = match (global, branch) {
                (_, None | Some(BranchStatus::PhaseOneFailed | BranchStatus::ReadOnly)) => Verdict::Rollback,
                (GlobalStatus::Begin | GlobalStatus::Committing, Some(_)) => Verdict::Wait,
                (GlobalStatus::AsyncCommitting, Some(BranchStatus::Prepared)) => Verdict::Commit,
                (g, Some(_))
                    if g.is_rolling_back()
                        || matches!(g, GlobalStatus::RollbackFailed | GlobalStatus::TimeoutRollbackFailed) =>
                {
                    Verdict::Rollback
                }
                _ => Verdict::Hold,
            };
            return Ok(answer(verdict, Some(global), branch));
        }
        let finished = self.finished.lock().get(txn_id).map(|f| f.record.status);
        Ok(match finished {
            // Every branch of the commit finished phase 2: one still prepared was not in it.
            Some(g @ (GlobalStatus::Committed | GlobalStatus::Rollbacked | GlobalStatus::TimeoutRollbacked)) => {
                answer(Verdict::Rollback, Some(g), None)
            }
            Some(g) => answer(Verdict::Hold, Some(g), None),
            None => answer(Verdict::UnknownXid, None, None),
        })
    }

    /// Whether the rows could be locked by `xid` (or by anyone, for an empty xid), waiting up
    /// to `lock_wait_ms` for them to be released.
    pub async fn lock_query(
        &self,
        xid: &str,
        resource_id: &str,
        locks: &[pb::TableLocks],
        lock_wait_ms: u64,
    ) -> Result<LockQueryOutcome, TcError> {
        self.check_running()?;
        let txn = if xid.is_empty() { None } else { Some(self.parse(xid)?) };
        let keys = LockKey::from_pb(resource_id, locks).map_err(TcError::invalid)?;
        let (deadline, wait_ms) = self.lock_wait(lock_wait_ms);
        match self.at.query(txn, &keys, (deadline, wait_ms), &self.metrics).await? {
            RowsFound::Free => {
                // The rows may be free by a commit decision not yet durable: should it be
                // lost, its branches would hold them again after a restart. (A decision
                // whose write failed stops the coordinator: asked again here.)
                if self.unsettled_releases.load(Ordering::SeqCst) > 0 {
                    self.journal.submit(Vec::new()).await?;
                }
                self.check_running()?;
                Ok(LockQueryOutcome {
                    lockable: true,
                    holders: Vec::new(),
                })
            }
            RowsFound::Held(rows) => Ok(LockQueryOutcome {
                lockable: false,
                holders: rows
                    .into_iter()
                    .map(|row| {
                        let status = self.live(row.txn).map(|s| s.state.lock().record.status);
                        (row.key, row.txn, status)
                    })
                    .collect(),
            }),
        }
    }

    /// Live transactions matching `status` (all if `None`), oldest first, then finished ones.
    pub fn list(&self, status: Option<GlobalStatus>, limit: usize) -> Vec<TxnView> {
        let mut live: Vec<Arc<Session>> = self.sessions.read().values().cloned().collect();
        live.sort_by_key(|s| s.txn_id);
        let mut out: Vec<TxnView> = live
            .iter()
            .filter_map(|s| {
                let state = s.state.lock();
                (status.is_none() || status == Some(state.record.status)).then(|| Self::view(s, &state))
            })
            .take(limit)
            .collect();
        if out.len() < limit {
            // One finishing meanwhile is in both (`finish` records it before it leaves).
            let listed: std::collections::HashSet<u64> = live.iter().map(|s| s.txn_id).collect();
            let finished = self.finished.lock();
            for f in finished.iter().filter(|f| !listed.contains(&f.record.txn_id)) {
                if status.is_none() || status == Some(f.record.status) {
                    out.push(Self::finished_view(f, finished.timeline(f.record.txn_id)));
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        out
    }

    pub fn get(&self, xid: &str) -> Result<TxnView, TcError> {
        let txn_id = self.parse(xid)?;
        if let Some(s) = self.live(txn_id) {
            let state = s.state.lock();
            return Ok(Self::view(&s, &state));
        }
        let finished = self.finished.lock();
        finished
            .get(txn_id)
            .map(|f| Self::finished_view(f, finished.timeline(txn_id)))
            .ok_or_else(|| TcError::not_found(xid))
    }

    fn view(session: &Session, state: &SessionState) -> TxnView {
        TxnView {
            xid: session.xid.clone(),
            record: state.record.clone(),
            branches: state.branches.clone(),
            branch_count: state.registered,
            failure: state.failure.clone(),
            finished: false,
            version: state.timeline.version(),
            paused: state.paused,
        }
    }

    fn finished_view(f: &FinishedRecord, timeline: Option<&Timeline>) -> TxnView {
        TxnView {
            xid: format_xid(f.record.txn_id),
            record: f.record.clone(),
            branches: Vec::new(),
            branch_count: f.branch_count,
            failure: f.failure.clone(),
            finished: true,
            version: timeline.map_or(0, Timeline::version),
            paused: false,
        }
    }

    /// The timeline of a live or remembered transaction: its version and events.
    pub fn events(&self, xid: &str) -> Result<(u64, Vec<Event>), TcError> {
        let txn_id = self.parse(xid)?;
        if let Some(s) = self.live(txn_id) {
            let state = s.state.lock();
            return Ok((state.timeline.version(), state.timeline.events().to_vec()));
        }
        let finished = self.finished.lock();
        match (finished.get(txn_id), finished.timeline(txn_id)) {
            (Some(_), Some(t)) => Ok((t.version(), t.events().to_vec())),
            (Some(_), None) => Ok((0, Vec::new())),
            (None, _) => Err(TcError::not_found(xid)),
        }
    }

    /// Stops background work and refuses new requests; the journal is flushed by the caller
    /// once the listeners are closed.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Marks the XA branches of a transaction being committed that never reported prepared as
/// failed in phase 1, and returns them to be stored.
fn not_prepared_in_time(state: &mut SessionState) -> Vec<BranchRecord> {
    const REASON: &str = "not prepared when the global transaction committed";
    let mut changed = Vec::new();
    for b in &mut state.branches {
        if b.mode == BranchMode::Xa && b.status == BranchStatus::Registered {
            b.status = BranchStatus::PhaseOneFailed;
            b.updated_ms = now_ms();
            b.error = Some(BranchError {
                reason: REASON.into(),
                detail_json: String::new(),
            });
            changed.push(b.clone());
        }
    }
    for b in &changed {
        state.record(EventKind::PhaseOneFailed {
            branch_id: b.branch_id,
            reason: REASON.into(),
        });
    }
    changed
}

/// The name an HTTP branch has in its transaction (DTM's `branch_id`).
fn http_branch_name(b: &BranchRecord) -> Option<String> {
    match b.mode {
        BranchMode::Tcc => TccBranch::decode(&b.application_data).ok().map(|t| t.name),
        BranchMode::Msg => MsgBranch::decode(&b.application_data).ok().map(|m| m.name),
        _ => None,
    }
}

/// The commit of branch `b` of a transaction decided (or retried by an operator) at
/// `decided_ms`: due at once, a message after its delay.
pub(crate) fn pending_commit(b: &BranchRecord, decided_ms: u64) -> PendingCommit {
    let reference = b.to_ref(&format_xid(b.txn_id));
    let delay = if b.mode == BranchMode::Msg {
        crate::msg::delay(&reference)
    } else {
        Duration::ZERO
    };
    let first_ms = decided_ms.saturating_add(delay.as_millis() as u64);
    PendingCommit {
        txn_id: b.txn_id,
        branch_id: b.branch_id,
        resource_id: b.resource_id.clone(),
        reference,
        attempt: 0,
        not_before: Instant::now() + Duration::from_millis(first_ms.saturating_sub(now_ms())),
        first_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;
    use std::time::Duration;

    use super::*;
    use crate::store::fixtures::HeldStore;

    fn register_row(xid: &str, pk: &str) -> pb::BranchRegisterRequest {
        pb::BranchRegisterRequest {
            xid: xid.into(),
            resource_id: "db1".into(),
            locks: rows(&[pk]),
            lock_wait_ms: 30_000,
            branch_type: pb::BranchType::At as i32,
            ..Default::default()
        }
    }

    fn rows(pks: &[&str]) -> Vec<pb::TableLocks> {
        vec![pb::TableLocks {
            schema: "app".into(),
            table: "t".into(),
            rows: pks
                .iter()
                .map(|pk| pb::PrimaryKey {
                    values: vec![pk.as_bytes().to_vec()],
                })
                .collect(),
        }]
    }

    /// A commit decision hands its rows on as it is submitted: the next holder is granted the
    /// row while the decision's write waits, but its registration is answered only once that
    /// write is durable; a lock query does not answer "free" before then either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_pass_on_with_the_decision_and_nothing_is_answered_before_it_is_durable() {
        let store = Arc::new(HeldStore::default());
        let journal = Journal::start(store.clone());
        let caller = Caller::new(&Config::default().calls).unwrap();
        let tc = Coordinator::recover(Config::default(), journal, Snapshot::default(), caller, None, None)
            .await
            .unwrap();
        let t1 = tc.begin(60_000, String::new()).await.unwrap();
        let t2 = tc.begin(60_000, String::new()).await.unwrap();
        let t2_id = tc.parse(&t2).unwrap();
        tc.register(register_row(&t1, "1")).await.unwrap();
        let mut second = register_row(&t1, "2");
        second.resource_id = "db2".into();
        tc.register(second).await.unwrap();

        let (entered_tx, entered) = sync_channel(1);
        let (release, release_rx) = sync_channel(1);
        *store.held.lock() = Some((entered_tx, release_rx));
        let durable = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let committing = tokio::spawn({
            let tc = Arc::clone(&tc);
            async move { tc.commit(&t1).await }
        });
        let waiting = tokio::spawn({
            let (tc, durable) = (Arc::clone(&tc), Arc::clone(&durable));
            async move {
                let granted = tc.register(register_row(&t2, "1")).await;
                (granted, durable.load(Ordering::SeqCst))
            }
        });
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        // The decision's write is in the store; t2 gets row 1 in memory meanwhile.
        while !tc
            .at
            .held_here()
            .unwrap()
            .locks
            .held_rows(&|_| true, 10)
            .iter()
            .any(|row| row.txn == t2_id)
        {
            tokio::task::yield_now().await;
        }
        let row_2 = rows(&["2"]);
        let query = tc.lock_query("", "db2", &row_2, 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), query).await.is_err(),
            "a lock query saw row 2 free before the decision that freed it was durable"
        );
        durable.store(true, Ordering::SeqCst);
        release.send(()).unwrap();
        assert_eq!(committing.await.unwrap().unwrap().status, GlobalStatus::AsyncCommitting);
        let (granted, after_durable) = waiting.await.unwrap();
        granted.unwrap();
        assert!(
            after_durable,
            "t2's registration was answered before t1's decision was durable"
        );
        let free = tc.lock_query("", "db2", &row_2, 0).await.unwrap();
        assert!(free.lockable);
    }
}
