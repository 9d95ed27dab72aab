//! Durable storage of global transactions and branches, behind the `Store` trait so a
//! shared-database store for several coordinator nodes can follow the embedded one.
//! (Interface stub; implementation in progress.)

pub mod journal;
pub mod redb;

use crate::model::{BranchRecord, GlobalRecord};

/// One change to the stored state. A batch of them is applied atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    PutGlobal(GlobalRecord),
    /// Deletes the global transaction and all its branches.
    DeleteGlobal {
        txn_id: u64,
    },
    PutBranch(BranchRecord),
    DeleteBranch {
        txn_id: u64,
        branch_id: u64,
    },
    /// Ids below this value may have been handed out; a restart continues above it.
    SetIdCeiling(u64),
}

/// Everything stored, read once at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub id_ceiling: u64,
    pub globals: Vec<GlobalRecord>,
    /// Ordered by (txn_id, branch_id).
    pub branches: Vec<BranchRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

pub trait Store: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    fn commit(&self, batch: &[Mutation]) -> Result<(), StoreError>;
}
