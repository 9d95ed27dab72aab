//! What the coordinator keeps for AT mode: the global row locks of the branches that
//! register lock keys ([`locks`]: FIFO queues, deadlock detection, fail-fast on rolling-back
//! holders) and the guarded tables every resource manager is told of ([`guards`]: the
//! no-dirty-writes check). The coordinator core drives them at the points of a transaction's
//! life this file names: a branch's tables guarded and rows taken at registration, rows
//! released at commit and per branch rolled back, everything restored at start and
//! forgotten when the transaction ends.

pub mod after_durable;
pub mod authority;
pub mod guards;
pub mod locks;
pub mod remote;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use ferrata_rpc::ErrorCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::metrics::Metrics;
use crate::model::{BranchRecord, GlobalRecord};
use crate::rm::RmRegistry;
use crate::store::StoreError;
use crate::xid::format_xid;
pub use authority::{Grant, LockAuthority};
use ferrata_rpc::pb;
use guards::{Table, TableGuards};
use locks::{Granted, HeldRow, LockError, LockManager};

/// AT mode's state in the coordinator.
pub struct At {
    pub locks: LockManager,
    pub guards: Arc<TableGuards>,
    /// The most recent deadlocks broken, oldest first.
    deadlocks: parking_lot::Mutex<std::collections::VecDeque<Deadlock>>,
}

/// A deadlock the lock manager broke: the transactions waiting for each other and the one
/// refused (the youngest, which asked last), with the table it asked rows of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deadlock {
    pub at_ms: u64,
    pub cycle: Vec<u64>,
    pub victim: u64,
    pub resource: String,
    pub schema: String,
    pub table: String,
}

/// What a lock query found once its wait was over.
#[derive(Debug, PartialEq, Eq)]
pub enum RowsFound {
    /// No other transaction holds any of the rows.
    Free,
    /// Other transactions still held these of them.
    Held(Vec<HeldRow>),
}

/// Deadlocks kept for operators.
const DEADLOCKS_KEPT: usize = 1000;

impl At {
    /// `fresh_store`: no coordinator ever served from this store (see `TableGuards::new`).
    pub fn new(config: &Config, rms: Arc<RmRegistry>, fresh_store: bool, metrics: &Metrics) -> At {
        At {
            deadlocks: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            locks: LockManager::new(),
            guards: TableGuards::new(
                rms,
                config.phase2.guard_lease(),
                config.transactions.guard_linger(),
                fresh_store,
                metrics,
            ),
        }
    }

    /// After a restart, an adoption or a new lock leader's election: a stored transaction's
    /// rows are held again, its tables guarded (whoever held them before guarded them) and
    /// its rolling-back mark set, as its status says. Returns the tables, for it to pin.
    pub fn restore_txn(&self, record: &GlobalRecord, branches: &[BranchRecord]) -> Result<BTreeSet<Table>, StoreError> {
        let mut tables = BTreeSet::new();
        for b in holding(record, branches) {
            tables.extend(self.restore_branch(record.txn_id, b.branch_id, &b.lock_keys)?);
        }
        if record.status.fails_requesters_fast() {
            self.locks.set_rolling_back(record.txn_id);
        }
        Ok(tables)
    }

    fn restore_branch(&self, txn: u64, branch: u64, keys: &[LockKey]) -> Result<Vec<Table>, StoreError> {
        self.locks.restore(txn, branch, keys).map_err(|e| {
            StoreError(format!(
                "the stored locks conflict ({e:?}) between global transaction {} and another one; the store is inconsistent",
                format_xid(txn)
            ))
        })?;
        let tables = Table::of_keys(keys);
        self.guards.restore(txn, &tables);
        Ok(tables)
    }

    /// Confirms the tables' guards before any of their rows is locked: a round trip to the
    /// resource managers, not a wait for other transactions, so it gets at least one lease
    /// even when the request waits for no rows.
    pub async fn guard(
        &self,
        tables: &[Table],
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Result<(), TcError> {
        let deadline = deadline.max(Instant::now() + self.guards.lease());
        until_shutdown(self.guards.ensure(tables, deadline), shutdown).await?
    }

    /// Takes a branch's rows, waiting in the queues until `deadline` (`wait_ms` is how long
    /// that is, for the error) or the coordinator's shutdown (which leaves the queue, so that
    /// a stopping coordinator answers at once); says how long it waited, and for whom.
    pub async fn acquire(
        &self,
        txn: u64,
        branch: u64,
        keys: &[LockKey],
        (deadline, wait_ms): (Instant, u64),
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Granted, TcError> {
        match until_shutdown(self.locks.acquire(txn, branch, keys, deadline), shutdown).await? {
            Ok(granted) => {
                if let Some(waited) = granted.waited {
                    metrics.lock_conflicts.increment(1);
                    metrics.lock_waits.increment(1);
                    metrics.lock_wait_seconds.record(waited.as_secs_f64());
                }
                Ok(granted)
            }
            Err(e) => {
                if let (LockError::Deadlock { cycle }, Some(key)) = (&e, keys.first()) {
                    let p = key.parts();
                    let mut kept = self.deadlocks.lock();
                    if kept.len() == DEADLOCKS_KEPT {
                        kept.pop_front();
                    }
                    kept.push_back(Deadlock {
                        at_ms: crate::model::now_ms(),
                        cycle: cycle.clone(),
                        victim: txn,
                        resource: p.resource.to_owned(),
                        schema: p.schema.to_owned(),
                        table: p.table.to_owned(),
                    });
                }
                Err(lock_error(e, wait_ms, metrics))
            }
        }
    }

    /// Waits until no transaction but `txn` (if any) holds any of `keys`, up to the deadline
    /// (`wait_ms` is how long that is, for the error); takes nothing.
    pub async fn query(
        &self,
        txn: Option<u64>,
        keys: &[LockKey],
        (deadline, wait_ms): (Instant, u64),
        metrics: &Metrics,
    ) -> Result<RowsFound, TcError> {
        match self.locks.query(txn, keys, deadline).await {
            Ok(_) => Ok(RowsFound::Free),
            Err(LockError::WaitTimeout { .. }) => {
                let wanted: std::collections::HashSet<&LockKey> = keys.iter().collect();
                let held = self
                    .locks
                    .held_rows(&|k| wanted.contains(k), keys.len())
                    .into_iter()
                    .filter(|row| Some(row.txn) != txn)
                    .collect();
                Ok(RowsFound::Held(held))
            }
            Err(e) => Err(lock_error(e, wait_ms, metrics)),
        }
    }

    /// The deadlocks broken recently, oldest first.
    pub fn deadlocks(&self) -> Vec<Deadlock> {
        self.deadlocks.lock().iter().cloned().collect()
    }

    /// A finished transaction leaves no rows, queue entries or table pins behind.
    pub fn forget(&self, txn: u64, guarded: &BTreeSet<Table>) {
        self.locks.forget_txn(txn);
        self.guards.unpin(txn, guarded);
    }

    /// A node (re)loaded namespace `namespace`: of its transactions and branches numbered
    /// below `below`, only `txns` exist and only `holding` hold rows; everything else of
    /// them goes (rows, marks, pins). Ids from `below` on were issued since, and stay.
    pub fn sync_namespace(&self, namespace: u16, below: u64, txns: &HashSet<u64>, holding: &HashSet<(u64, u64)>) {
        let before = |id: u64| crate::xid::node_of(id) == namespace && id < below;
        let txn_gone = |txn: u64| before(txn) && !txns.contains(&txn);
        let branch_gone = |txn: u64, branch: u64| before(txn) && before(branch) && !holding.contains(&(txn, branch));
        self.locks.drop_gone(&branch_gone, &txn_gone);
        self.guards.unpin_gone(&txn_gone);
    }

    /// Updates the held-rows gauge after rows were taken or released.
    pub fn count_held(&self, metrics: &Metrics) {
        metrics.locks_held.set(self.locks.held_count() as f64);
    }
}

/// A refused lock request as the caller's error, counted.
pub fn lock_error(e: LockError, wait_ms: u64, m: &Metrics) -> TcError {
    m.lock_conflicts.increment(1);
    match e {
        LockError::WaitTimeout { holder, key } => {
            m.lock_wait_timeouts.increment(1);
            let p = key.parts();
            let holder = format_xid(holder);
            TcError::new(
                ErrorCode::LockWaitTimeout,
                format!(
                    "row of {}.{} on {} is held by global transaction {holder}; it was still held after waiting {wait_ms} ms",
                    p.schema, p.table, p.resource
                ),
            )
            .with_holder(holder)
        }
        LockError::HolderRollingBack { holder, key } => {
            m.lock_fail_fast.increment(1);
            let p = key.parts();
            let holder = format_xid(holder);
            TcError::new(
                ErrorCode::LockHolderRollingBack,
                format!(
                    "row of {}.{} on {} is held by global transaction {holder}, which is rolling back: roll back the local transaction so the rollback can proceed, then retry",
                    p.schema, p.table, p.resource
                ),
            )
            .with_holder(holder)
        }
        LockError::Deadlock { cycle } => {
            m.deadlocks.increment(1);
            let cycle: Vec<String> = cycle.into_iter().map(format_xid).collect();
            TcError::new(
                ErrorCode::Deadlock,
                format!(
                    "deadlock between global transactions {}; this request's transaction is the youngest and was chosen to give way: roll it back and retry",
                    cycle.join(", ")
                ),
            )
        }
    }
}

/// What `work` gives, unless the coordinator shuts down first: dropped then (a waiting
/// request leaves its queue), and answered `shutting_down` at once.
pub async fn until_shutdown<T>(work: impl Future<Output = T>, shutdown: &CancellationToken) -> Result<T, TcError> {
    tokio::select! {
        done = work => Ok(done),
        _ = shutdown.cancelled() => Err(TcError::shutting_down()),
    }
}

/// The branches of a stored transaction whose rows it holds (see `holds_locks`).
pub fn holding<'a>(record: &GlobalRecord, branches: &'a [BranchRecord]) -> impl Iterator<Item = &'a BranchRecord> {
    let holds = record.status.holds_locks();
    branches.iter().filter(move |b| holds && b.status.holds_locks())
}

/// A held row as the lock stream carries it.
pub fn held_row_pb(row: HeldRow) -> pb::LockHeldRow {
    pb::LockHeldRow {
        key: row.key.as_bytes().to_vec(),
        txn: row.txn,
        branches: row.branches,
        since_ms: row.since_ms,
        waiters: row.waiters,
    }
}
