//! The global lock manager: which global transaction holds which rows, and the FIFO queues
//! of requests waiting for them. (Interface stub; implementation in progress.)

use std::time::Duration;

use tokio::time::Instant;

use crate::lock_key::LockKey;

/// Why a lock request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockError {
    /// Rows stayed held by `holder` until the deadline.
    WaitTimeout { holder: u64, key: LockKey },
    /// Rows are held by `holder`, which is rolling back: fail fast.
    HolderRollingBack { holder: u64, key: LockKey },
    /// Waiting would close a wait-for cycle; this request's transaction is the youngest in
    /// it. `cycle` lists the transactions in the cycle.
    Deadlock { cycle: Vec<u64> },
}

/// How a granted request went, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// Time spent waiting in queues, if the request had to wait at all.
    pub waited: Option<Duration>,
}

/// One held row, for the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRow {
    pub key: LockKey,
    pub txn: u64,
    pub branches: Vec<u64>,
    /// Unix milliseconds at which the row was first granted to `txn`.
    pub since_ms: u64,
    /// Transactions queued for the row, oldest request first.
    pub waiters: Vec<u64>,
}

#[derive(Default)]
pub struct LockManager {}

impl LockManager {
    pub fn new() -> LockManager {
        todo!()
    }
    pub async fn acquire(
        &self,
        _txn: u64,
        _branch: u64,
        _keys: &[LockKey],
        _deadline: Instant,
    ) -> Result<Granted, LockError> {
        todo!()
    }
    pub fn restore(&self, _txn: u64, _branch: u64, _keys: &[LockKey]) -> Result<(), LockError> {
        todo!()
    }
    pub async fn query(&self, _txn: Option<u64>, _keys: &[LockKey], _deadline: Instant) -> Result<Granted, LockError> {
        todo!()
    }
    pub fn release_branch(&self, _txn: u64, _branch: u64, _keys: &[LockKey]) {
        todo!()
    }
    pub fn release_txn(&self, _txn: u64, _keys: &[LockKey]) {
        todo!()
    }
    pub fn set_rolling_back(&self, _txn: u64) {
        todo!()
    }
    pub fn forget_txn(&self, _txn: u64) {
        todo!()
    }
    pub fn held_rows(&self, _filter: &dyn Fn(&LockKey) -> bool, _limit: usize) -> Vec<HeldRow> {
        todo!()
    }
    pub fn held_count(&self) -> usize {
        todo!()
    }
}
