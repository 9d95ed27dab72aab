//! The coordinator's data model: global transactions and branches as they are stored, and
//! the status machines that say which changes are allowed. ARCHITECTURE.md draws the same
//! machines; `GlobalStatus::can_become` is the single source of truth.

use ferrata_rpc::pb;
use serde::{Deserialize, Serialize};

use crate::lock_key::LockKey;

/// Status of a global transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GlobalStatus {
    /// Running: branches may register.
    Begin,
    /// Commit accepted, decision not yet durable. Held in memory only: a crash here leaves
    /// the transaction in Begin, which is right because the commit was not acknowledged.
    Committing,
    /// Commit decided and durable, locks released; branches are told to commit (delete their
    /// undo records) in the background.
    AsyncCommitting,
    /// Every branch committed.
    Committed,
    /// A branch can never commit (its resource said so); kept for an operator.
    CommitFailed,
    /// Rollback decided by the transaction manager; branches roll back in reverse order.
    Rollbacking,
    /// A branch rollback failed in a way worth retrying; retried with backoff.
    RollbackRetrying,
    /// Every branch rolled back.
    Rollbacked,
    /// A branch rollback can never succeed (for example its rows were changed outside the
    /// global transaction); the transaction and its locks stay for an operator.
    RollbackFailed,
    /// The same four for a rollback the coordinator started because the transaction outlived
    /// its timeout.
    TimeoutRollbacking,
    TimeoutRollbackRetrying,
    TimeoutRollbacked,
    TimeoutRollbackFailed,
}

impl GlobalStatus {
    pub const ALL: [GlobalStatus; 13] = [
        GlobalStatus::Begin,
        GlobalStatus::Committing,
        GlobalStatus::AsyncCommitting,
        GlobalStatus::Committed,
        GlobalStatus::CommitFailed,
        GlobalStatus::Rollbacking,
        GlobalStatus::RollbackRetrying,
        GlobalStatus::Rollbacked,
        GlobalStatus::RollbackFailed,
        GlobalStatus::TimeoutRollbacking,
        GlobalStatus::TimeoutRollbackRetrying,
        GlobalStatus::TimeoutRollbacked,
        GlobalStatus::TimeoutRollbackFailed,
    ];

    /// Whether the status machine allows `self -> next`.
    pub fn can_become(self, next: GlobalStatus) -> bool {
        use GlobalStatus::*;
        matches!(
            (self, next),
            (Begin, Committing | Rollbacking | TimeoutRollbacking)
                | (Committing, AsyncCommitting | Committed)
                | (AsyncCommitting, Committed | CommitFailed)
                | (
                    Rollbacking | RollbackRetrying,
                    RollbackRetrying | Rollbacked | RollbackFailed
                )
                | (
                    TimeoutRollbacking | TimeoutRollbackRetrying,
                    TimeoutRollbackRetrying | TimeoutRollbacked | TimeoutRollbackFailed
                )
        )
    }

    /// The status an operator's retry moves a failed end state to (after the data was
    /// repaired): the one edge out of a final status, never taken automatically.
    pub fn operator_retry(self) -> Option<GlobalStatus> {
        use GlobalStatus::*;
        match self {
            RollbackFailed => Some(RollbackRetrying),
            TimeoutRollbackFailed => Some(TimeoutRollbackRetrying),
            CommitFailed => Some(AsyncCommitting),
            _ => None,
        }
    }

    /// No further change happens without an operator.
    pub fn is_final(self) -> bool {
        use GlobalStatus::*;
        matches!(
            self,
            Committed | CommitFailed | Rollbacked | RollbackFailed | TimeoutRollbacked | TimeoutRollbackFailed
        )
    }

    /// Decided rollback, still rolling back (rows it holds make requesters fail fast).
    pub fn is_rolling_back(self) -> bool {
        use GlobalStatus::*;
        matches!(
            self,
            Rollbacking | RollbackRetrying | TimeoutRollbacking | TimeoutRollbackRetrying
        )
    }

    /// Decided commit, phase 2 still running.
    pub fn is_committing(self) -> bool {
        matches!(self, GlobalStatus::AsyncCommitting)
    }

    /// Whether requests for its rows fail fast: rolling back, or a rollback that failed
    /// (its rows stay held until an operator resolves it).
    pub fn fails_requesters_fast(self) -> bool {
        self.is_rolling_back() || matches!(self, GlobalStatus::RollbackFailed | GlobalStatus::TimeoutRollbackFailed)
    }

    /// Whether a stored transaction in this status holds its branches' rows: until a commit
    /// decision released them (or a commit failed, after it), and through a rollback,
    /// failed or not.
    pub fn holds_locks(self) -> bool {
        !self.is_committing() && !matches!(self, GlobalStatus::Committed | GlobalStatus::CommitFailed)
    }

    fn timed_out(self) -> bool {
        use GlobalStatus::*;
        matches!(
            self,
            TimeoutRollbacking | TimeoutRollbackRetrying | TimeoutRollbacked | TimeoutRollbackFailed
        )
    }

    /// The retrying form of this rollback (keeps the timeout flavour).
    pub fn rollback_retrying(self) -> GlobalStatus {
        if self.timed_out() {
            GlobalStatus::TimeoutRollbackRetrying
        } else {
            GlobalStatus::RollbackRetrying
        }
    }

    /// The successful end of this rollback.
    pub fn rolled_back(self) -> GlobalStatus {
        if self.timed_out() {
            GlobalStatus::TimeoutRollbacked
        } else {
            GlobalStatus::Rollbacked
        }
    }

    /// The failed end of this rollback.
    pub fn rollback_failed(self) -> GlobalStatus {
        if self.timed_out() {
            GlobalStatus::TimeoutRollbackFailed
        } else {
            GlobalStatus::RollbackFailed
        }
    }

    /// Name as used in the HTTP API, metrics and logs.
    pub fn as_str(self) -> &'static str {
        use GlobalStatus::*;
        match self {
            Begin => "Begin",
            Committing => "Committing",
            AsyncCommitting => "AsyncCommitting",
            Committed => "Committed",
            CommitFailed => "CommitFailed",
            Rollbacking => "Rollbacking",
            RollbackRetrying => "RollbackRetrying",
            Rollbacked => "Rollbacked",
            RollbackFailed => "RollbackFailed",
            TimeoutRollbacking => "TimeoutRollbacking",
            TimeoutRollbackRetrying => "TimeoutRollbackRetrying",
            TimeoutRollbacked => "TimeoutRollbacked",
            TimeoutRollbackFailed => "TimeoutRollbackFailed",
        }
    }

    pub fn parse(s: &str) -> Option<GlobalStatus> {
        GlobalStatus::ALL
            .into_iter()
            .find(|g| g.as_str().eq_ignore_ascii_case(s))
    }

    pub fn to_pb(self) -> pb::GlobalStatus {
        use GlobalStatus::*;
        match self {
            Begin => pb::GlobalStatus::Begin,
            Committing => pb::GlobalStatus::Committing,
            AsyncCommitting => pb::GlobalStatus::AsyncCommitting,
            Committed => pb::GlobalStatus::Committed,
            CommitFailed => pb::GlobalStatus::CommitFailed,
            Rollbacking => pb::GlobalStatus::Rollbacking,
            RollbackRetrying => pb::GlobalStatus::RollbackRetrying,
            Rollbacked => pb::GlobalStatus::Rollbacked,
            RollbackFailed => pb::GlobalStatus::RollbackFailed,
            TimeoutRollbacking => pb::GlobalStatus::TimeoutRollbacking,
            TimeoutRollbackRetrying => pb::GlobalStatus::TimeoutRollbackRetrying,
            TimeoutRollbacked => pb::GlobalStatus::TimeoutRollbacked,
            TimeoutRollbackFailed => pb::GlobalStatus::TimeoutRollbackFailed,
        }
    }
}

/// Status of a branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BranchStatus {
    /// Phase 1 registered; holds its locks.
    Registered,
    /// The local transaction did not commit (reported by the resource manager). Its locks are
    /// released and phase 2 skips it.
    PhaseOneFailed,
    /// Phase-2 commit done (the branch record is then deleted).
    PhaseTwoCommitted,
    /// Phase-2 rollback done (the branch record is then deleted, its locks released).
    PhaseTwoRollbacked,
    /// Rollback failed in a way worth retrying (resource unreachable, SQL error).
    RollbackFailedRetryable,
    /// Rollback can never succeed as is (for example dirty rows); keeps its locks.
    RollbackFailedUnretryable,
    /// The resource can never commit this branch; kept for an operator.
    CommitFailedUnretryable,
    /// XA: the database prepared the branch; phase 2 commits or rolls it back.
    Prepared,
    /// XA: the branch wrote nothing and was finished in phase 1; phase 2 skips it.
    ReadOnly,
    /// Saga: the step's action has not been called (it waits for the steps before it); a
    /// rollback skips it.
    ActionWaiting,
    /// Saga: the action was called, its answer is not in yet (stored before the first call,
    /// so a rollback compensates every step that may have run, even across a restart).
    ActionCalled,
    /// Saga: the action succeeded.
    ActionDone,
    /// Saga: the action refused (FAILURE); the saga rolls back, this step's compensation
    /// included (a refusal may come after a partial effect; the barrier makes the
    /// compensation of an action that did nothing a no-op).
    ActionFailed,
}

impl BranchStatus {
    /// Whether a stored branch in this status holds its rows while its transaction does
    /// ([`GlobalStatus::holds_locks`]): all but one whose local transaction never committed.
    pub fn holds_locks(self) -> bool {
        self != BranchStatus::PhaseOneFailed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BranchStatus::Registered => "Registered",
            BranchStatus::PhaseOneFailed => "PhaseOneFailed",
            BranchStatus::PhaseTwoCommitted => "PhaseTwoCommitted",
            BranchStatus::PhaseTwoRollbacked => "PhaseTwoRollbacked",
            BranchStatus::RollbackFailedRetryable => "RollbackFailedRetryable",
            BranchStatus::RollbackFailedUnretryable => "RollbackFailedUnretryable",
            BranchStatus::CommitFailedUnretryable => "CommitFailedUnretryable",
            BranchStatus::Prepared => "Prepared",
            BranchStatus::ReadOnly => "ReadOnly",
            BranchStatus::ActionWaiting => "ActionWaiting",
            BranchStatus::ActionCalled => "ActionCalled",
            BranchStatus::ActionDone => "ActionDone",
            BranchStatus::ActionFailed => "ActionFailed",
        }
    }

    pub fn to_pb(self) -> pb::BranchStatus {
        match self {
            BranchStatus::Registered => pb::BranchStatus::Registered,
            BranchStatus::PhaseOneFailed => pb::BranchStatus::PhaseOneFailed,
            BranchStatus::PhaseTwoCommitted => pb::BranchStatus::PhaseTwoCommitted,
            BranchStatus::PhaseTwoRollbacked => pb::BranchStatus::PhaseTwoRollbacked,
            BranchStatus::RollbackFailedRetryable => pb::BranchStatus::RollbackFailedRetryable,
            BranchStatus::RollbackFailedUnretryable => pb::BranchStatus::RollbackFailedUnretryable,
            BranchStatus::CommitFailedUnretryable => pb::BranchStatus::CommitFailedUnretryable,
            BranchStatus::Prepared => pb::BranchStatus::PhaseOnePrepared,
            BranchStatus::ReadOnly => pb::BranchStatus::PhaseOneReadOnly,
            BranchStatus::ActionWaiting => pb::BranchStatus::ActionWaiting,
            BranchStatus::ActionCalled => pb::BranchStatus::ActionCalled,
            BranchStatus::ActionDone => pb::BranchStatus::ActionDone,
            BranchStatus::ActionFailed => pb::BranchStatus::ActionFailed,
        }
    }

    pub fn from_pb(status: pb::BranchStatus) -> Option<BranchStatus> {
        Some(match status {
            pb::BranchStatus::Unknown => return None,
            pb::BranchStatus::Registered => BranchStatus::Registered,
            pb::BranchStatus::PhaseOneFailed => BranchStatus::PhaseOneFailed,
            pb::BranchStatus::PhaseTwoCommitted => BranchStatus::PhaseTwoCommitted,
            pb::BranchStatus::PhaseTwoRollbacked => BranchStatus::PhaseTwoRollbacked,
            pb::BranchStatus::RollbackFailedRetryable => BranchStatus::RollbackFailedRetryable,
            pb::BranchStatus::RollbackFailedUnretryable => BranchStatus::RollbackFailedUnretryable,
            pb::BranchStatus::CommitFailedUnretryable => BranchStatus::CommitFailedUnretryable,
            pb::BranchStatus::PhaseOnePrepared => BranchStatus::Prepared,
            pb::BranchStatus::PhaseOneReadOnly => BranchStatus::ReadOnly,
            pb::BranchStatus::ActionWaiting => BranchStatus::ActionWaiting,
            pb::BranchStatus::ActionCalled => BranchStatus::ActionCalled,
            pb::BranchStatus::ActionDone => BranchStatus::ActionDone,
            pb::BranchStatus::ActionFailed => BranchStatus::ActionFailed,
        })
    }

    /// A rollback must still visit this branch (a saga step: compensate it).
    pub fn needs_phase_two(self) -> bool {
        matches!(
            self,
            BranchStatus::Registered
                | BranchStatus::Prepared
                | BranchStatus::RollbackFailedRetryable
                | BranchStatus::ActionCalled
                | BranchStatus::ActionDone
                | BranchStatus::ActionFailed
        )
    }
}

/// How a branch keeps its work until phase 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BranchMode {
    /// Committed locally at once with an undo record; holds global row locks.
    #[default]
    At,
    /// Prepared by the database (XA), which holds its row locks until phase 2.
    Xa,
    /// A service's try (called by the application), confirmed or cancelled by the
    /// coordinator over HTTP (`tcc/`).
    Tcc,
    /// A saga step: an action the coordinator calls forward, a compensation it calls on a
    /// rollback (`saga/`).
    Saga,
    /// A message the coordinator delivers over HTTP as the branch's commit, on its delivery
    /// schedule; a rollback drops it (`msg/`).
    Msg,
}

impl BranchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BranchMode::At => "AT",
            BranchMode::Xa => "XA",
            BranchMode::Tcc => "TCC",
            BranchMode::Saga => "SAGA",
            BranchMode::Msg => "MSG",
        }
    }

    pub fn to_pb(self) -> pb::BranchType {
        match self {
            BranchMode::At => pb::BranchType::At,
            BranchMode::Xa => pb::BranchType::Xa,
            BranchMode::Tcc => pb::BranchType::Tcc,
            BranchMode::Saga => pb::BranchType::Saga,
            BranchMode::Msg => pb::BranchType::Msg,
        }
    }

    pub fn from_pb(t: pb::BranchType) -> BranchMode {
        match t {
            pb::BranchType::At => BranchMode::At,
            pb::BranchType::Xa => BranchMode::Xa,
            pb::BranchType::Tcc => BranchMode::Tcc,
            pb::BranchType::Saga => BranchMode::Saga,
            pb::BranchType::Msg => BranchMode::Msg,
        }
    }

    /// The coordinator calls the branch's service itself, over HTTP: nothing of it goes to a
    /// resource manager (no undo record, no report, no repair).
    pub fn is_http(self) -> bool {
        matches!(self, BranchMode::Tcc | BranchMode::Saga | BranchMode::Msg)
    }

    /// The status a branch of this mode waits for its phase-2 commit in: an AT branch from
    /// its registration (it registers at its local commit), a TCC branch too (registered
    /// before its try, which the application calls), a message from its registration (its
    /// commit is its delivery), an XA branch once prepared. A saga step has no phase-2
    /// commit: its action was its work.
    pub fn committable(self) -> Option<BranchStatus> {
        match self {
            BranchMode::At | BranchMode::Tcc | BranchMode::Msg => Some(BranchStatus::Registered),
            BranchMode::Xa => Some(BranchStatus::Prepared),
            BranchMode::Saga => None,
        }
    }
}

/// Why a branch failed, for the operator: a sentence and a structured detail (JSON), for
/// example the rows that differ from the after image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchError {
    pub reason: String,
    pub detail_json: String,
}

/// A global transaction as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalRecord {
    /// Numeric id; the printable XID is derived from it (see `xid.rs`).
    pub txn_id: u64,
    pub name: String,
    pub status: GlobalStatus,
    pub timeout_ms: u64,
    /// Unix milliseconds.
    pub begin_ms: u64,
    pub updated_ms: u64,
}

/// A branch as stored: enough to restore its locks and run its phase 2 after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub txn_id: u64,
    pub branch_id: u64,
    pub resource_id: String,
    pub lock_keys: Vec<LockKey>,
    /// AT and XA: opaque, handed back to the resource manager with phase 2. TCC: the calls
    /// the coordinator makes itself (`tcc::TccBranch`, JSON).
    pub application_data: Vec<u8>,
    pub status: BranchStatus,
    pub registered_ms: u64,
    pub updated_ms: u64,
    pub error: Option<BranchError>,
    pub mode: BranchMode,
    /// XA: the database connection the branch runs on (0 for AT).
    pub connection_id: u64,
    /// XA: the resource manager process that registered the branch and holds it on that
    /// connection (its Hello's `instance_id`; empty for AT, and for branches stored before
    /// format version 3): phase 2 goes to it while it is attached.
    pub instance_id: String,
}

impl BranchRecord {
    /// Phase 2 must still commit this branch.
    pub fn awaits_commit(&self) -> bool {
        Some(self.status) == self.mode.committable()
    }

    /// The branch as phase-2 commands name it to its resource manager.
    pub fn to_ref(&self, xid: &str) -> pb::BranchRef {
        pb::BranchRef {
            xid: xid.to_owned(),
            branch_id: self.branch_id,
            resource_id: self.resource_id.clone(),
            application_data: self.application_data.clone(),
            branch_type: self.mode.to_pb() as i32,
            connection_id: self.connection_id,
            instance_id: self.instance_id.clone(),
        }
    }
}

/// A branch that failed phase 2, as reported to the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub branch_id: u64,
    pub resource_id: String,
    pub status: BranchStatus,
    pub error: BranchError,
}

impl Failure {
    pub fn to_pb(&self) -> pb::BranchFailure {
        pb::BranchFailure {
            branch_id: self.branch_id,
            resource_id: self.resource_id.clone(),
            status: self.status.to_pb() as i32,
            reason: self.error.reason.clone(),
            detail_json: self.error.detail_json.clone(),
        }
    }
}

/// What is kept of a transaction after it ended, stored so that its outcome can still be
/// asked for after a restart (a client whose `COMMIT GLOBAL` lost its answer asks again).
/// `record.updated_ms` is when it ended; retention counts from there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedRecord {
    pub record: GlobalRecord,
    pub branch_count: usize,
    pub failure: Option<Failure>,
}

/// Milliseconds since the Unix epoch, for stored timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commit_and_rollback_paths() {
        use GlobalStatus::*;
        for path in [
            &[Begin, Committing, AsyncCommitting, Committed][..],
            &[Begin, Committing, Committed],
            &[Begin, Committing, AsyncCommitting, CommitFailed],
            &[Begin, Rollbacking, RollbackRetrying, RollbackRetrying, Rollbacked],
            &[Begin, Rollbacking, RollbackFailed],
            &[
                Begin,
                TimeoutRollbacking,
                TimeoutRollbackRetrying,
                TimeoutRollbackFailed,
            ],
            &[Begin, TimeoutRollbacking, TimeoutRollbacked],
        ] {
            for pair in path.windows(2) {
                assert!(pair[0].can_become(pair[1]), "{:?} -> {:?}", pair[0], pair[1]);
            }
        }
        assert!(!Begin.can_become(AsyncCommitting), "a commit passes through Committing");
        assert!(
            !Rollbacking.can_become(TimeoutRollbacked),
            "rollback flavours do not mix"
        );
        assert!(
            !AsyncCommitting.can_become(Rollbacking),
            "a decided commit is never rolled back"
        );
        assert!(
            !Rollbacking.can_become(Committing),
            "a decided rollback is never committed"
        );
    }

    #[test]
    fn rollback_flavours_are_kept() {
        use GlobalStatus::*;
        assert_eq!(TimeoutRollbacking.rollback_retrying(), TimeoutRollbackRetrying);
        assert_eq!(TimeoutRollbackRetrying.rolled_back(), TimeoutRollbacked);
        assert_eq!(Rollbacking.rollback_failed(), RollbackFailed);
        assert_eq!(RollbackRetrying.rolled_back(), Rollbacked);
    }

    fn any_status() -> impl Strategy<Value = GlobalStatus> {
        prop::sample::select(GlobalStatus::ALL.to_vec())
    }

    proptest! {
        /// Final statuses never change, a commit decision is never reversed into a rollback
        /// and vice versa, and only Begin lets a transaction take either road.
        #[test]
        fn machine_invariants(from in any_status(), to in any_status()) {
            if from.is_final() {
                prop_assert!(!from.can_become(to));
            }
            let commit_side = |s: GlobalStatus| matches!(s, GlobalStatus::Committing | GlobalStatus::AsyncCommitting | GlobalStatus::Committed | GlobalStatus::CommitFailed);
            let rollback_side = |s: GlobalStatus| s != GlobalStatus::Begin && !commit_side(s);
            // The operator's retry stays on the side the decision took.
            if let Some(retry) = from.operator_retry() {
                prop_assert!(from.is_final() && !retry.is_final());
                prop_assert_eq!(commit_side(from), commit_side(retry));
            }
            if from.can_become(to) && from != GlobalStatus::Begin {
                prop_assert_eq!(commit_side(from), commit_side(to));
                prop_assert_eq!(rollback_side(from), rollback_side(to));
            }
            prop_assert!(!to.can_become(GlobalStatus::Begin));
            prop_assert_eq!(GlobalStatus::parse(from.as_str()), Some(from));
        }
    }
}
