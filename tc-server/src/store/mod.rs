//! Durable storage of global transactions and branches, behind the `Store` trait: the
//! embedded store for one coordinator node, etcd for several.
//!
//! * `record`: how records are encoded, and the checks every store's `load` runs on them.
//! * `redb`: the embedded store, one redb file in the data directory.
//! * `wal`: the write-ahead log in front of it: a commit is one appended record and an
//!   fdatasync; a checkpointer thread applies the records to the redb file in large batches.
//! * `etcd`: the store of several coordinator nodes, in etcd; only the node that owns it
//!   writes, every write fenced by its epoch. `etcd_members`: its clients, one per member,
//!   moving on from a member that fails.
//! * `journal`: group commit in front of any `Store`: one thread, one durable commit for
//!   everything queued, completions in submission order.

pub mod etcd;
mod etcd_members;
pub mod journal;
pub mod record;
pub mod redb;
pub mod wal;

use std::collections::BTreeMap;

use crate::audit::AuditRecord;
use crate::auth::TokenRecord;
use crate::model::{BranchRecord, FinishedRecord, GlobalRecord};
use crate::timeline::Event;

/// One change to the stored state. A batch of them is applied atomically. The write-ahead log
/// (`wal.rs`) stores batches of them in postcard: a change here is a change of its format.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mutation {
    PutGlobal(GlobalRecord),
    /// Deletes the global transaction and all its branches, keeping what is remembered of it.
    Finish(FinishedRecord),
    /// Stores events of a transaction's timeline from index `first` on (replacing those
    /// stored under the same indexes). They stay until the transaction is forgotten.
    PutEvents {
        txn_id: u64,
        first: u32,
        events: Vec<Event>,
    },
    /// Deletes a finished transaction's record and timeline (its retention has passed).
    Forget {
        txn_id: u64,
    },
    PutBranch(BranchRecord),
    DeleteBranch {
        txn_id: u64,
        branch_id: u64,
    },
    /// Ids below this value may have been handed out; a restart continues above it.
    SetIdCeiling(u64),
    /// Appends a record to the audit trail (never changed or deleted).
    AppendAudit(AuditRecord),
    /// Stores a named token (replacing one of the same name).
    PutToken(TokenRecord),
    DeleteToken {
        name: String,
    },
    /// Writes nothing: the submission it is in is stored only while the lock leader whose
    /// epoch this is still leads (several serving nodes: a branch's rows were granted by
    /// that leader, and a leader elected since rebuilt its locks without them). A store
    /// without a lock leader (the embedded one) has nothing to check.
    LockFence {
        epoch: u64,
    },
}

/// Everything stored, read once at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub id_ceiling: u64,
    pub globals: Vec<GlobalRecord>,
    /// Ordered by (txn_id, branch_id).
    pub branches: Vec<BranchRecord>,
    /// Ordered by txn_id.
    pub finished: Vec<FinishedRecord>,
    /// The timelines of live and finished transactions.
    pub events: BTreeMap<u64, Vec<Event>>,
    /// Oldest first.
    pub audit: Vec<AuditRecord>,
    /// By name.
    pub tokens: Vec<TokenRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Submissions of a committed batch that were refused alone, by their index among the
/// batch's submissions, with why.
pub type Refusals = BTreeMap<usize, String>;

pub trait Store: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `batch` durably and atomically.
    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError>;
    /// Applies the submissions `batch` concatenates, `ends` holding where each ends (the last
    /// is `batch.len()`). The journal commits through this: a store that bounds one commit
    /// (etcd's operations per transaction) splits a batch only at these ends where it can,
    /// so that each submission stays all or nothing. The others commit it whole.
    ///
    /// `Ok` may name submissions refused alone, none of whose writes were applied while the
    /// rest were: with several serving nodes, a registration fenced by a lock leader that no
    /// longer leads ([`Mutation::LockFence`]).
    fn commit_submissions(&self, batch: &[Mutation], ends: &[usize]) -> Result<Refusals, StoreError> {
        let _ = ends;
        self.commit(batch).map(|()| Refusals::new())
    }
    /// Whether this node may still act on what the store holds. The etcd store answers false
    /// once its lease may have run out, checked against the clock at every call (a process
    /// resumed after a pause must not answer from memory before its timers have run).
    fn serving(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
