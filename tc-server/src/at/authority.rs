//! `LockAuthority`: where a coordinator's lock calls go. On one node, and on the active node
//! of several sharing a store, to its own [`At`]; with several serving nodes, to the
//! cluster's lock leader over the lock stream ([`RemoteAt`]). The coordinator core calls
//! this and never asks which.
//!
//! Invariant: through the lock stream, rows and table pins are let go only once everything
//! the coordinator submitted before is durable (`after_durable.rs`). On one node the
//! journal's order gives that for free (a next holder's registration is submitted after the
//! release's change, so it is never durable first, and the early hand-off in
//! `Coordinator::release_with` relies on it); a next holder on another node writes another
//! journal, so there the release waits. A coordinator's own `At` is never served to other
//! nodes: a lock leader serves an `At` of its own (`lock_leader/`).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::guards::Table;
use super::locks::Granted;
use super::remote::RemoteAt;
use super::{At, RowsFound, until_shutdown};
use crate::error::TcError;
use crate::lock_key::LockKey;
use crate::metrics::Metrics;
use crate::model::{BranchRecord, GlobalRecord};
use crate::store::StoreError;

/// Completes when what it watches changed.
pub type Changed = Pin<Box<dyn Future<Output = ()> + Send>>;

pub enum LockAuthority {
    /// This coordinator holds the locks, for itself alone.
    Local(Arc<At>),
    /// The cluster's lock leader holds them.
    Remote(RemoteAt),
}

/// Rows granted, and the epoch of the lock leader that granted them (0: this node's own).
#[derive(Debug)]
pub struct Grant {
    pub granted: Granted,
    pub epoch: u64,
}

impl LockAuthority {
    /// The locks this node holds: its own, or the cluster's while it leads them. For the
    /// guard protocol on resource managers' streams and for listing held rows and deadlocks.
    pub fn held_here(&self) -> Option<Arc<At>> {
        match self {
            LockAuthority::Local(at) => Some(Arc::clone(at)),
            LockAuthority::Remote(remote) => remote.leadership.here.borrow().clone(),
        }
    }

    /// The locks this node holds now (as `held_here`), and a future that completes when
    /// that changes (it begins or stops leading them); never on one node alone.
    pub fn held_here_until_changed(&self) -> (Option<Arc<At>>, Changed) {
        match self {
            LockAuthority::Local(at) => (Some(Arc::clone(at)), Box::pin(std::future::pending())),
            LockAuthority::Remote(remote) => {
                let mut here = remote.leadership.here.clone();
                let now = here.borrow_and_update().clone();
                let changed = async move {
                    if here.changed().await.is_err() {
                        // Nobody can change it any more.
                        std::future::pending::<()>().await;
                    }
                };
                (now, Box::pin(changed))
            }
        }
    }

    /// After a restart or an adoption: a stored transaction's rows are held again, its
    /// tables guarded and its mark set (`At::restore_txn`). Returns the tables, for it to pin.
    /// The lock leader holds a remote node's rows already (or rebuilt them from the store
    /// when it was elected).
    pub fn restore_txn(&self, record: &GlobalRecord, branches: &[BranchRecord]) -> Result<BTreeSet<Table>, StoreError> {
        match self {
            LockAuthority::Local(at) => at.restore_txn(record, branches),
            LockAuthority::Remote(_) => Ok(super::holding(record, branches)
                .flat_map(|b| Table::of_keys(&b.lock_keys))
                .collect()),
        }
    }

    /// After a restart: of the ids below `below`, the stored transactions `txns` are all
    /// that exist and their branches `holding` all that hold rows, so the lock leader lets
    /// go of anything else it holds for this node (grants whose registration never became
    /// durable). This node's own locks were restored from the store already.
    pub fn sync_restored(&self, below: u64, txns: Vec<u64>, holding: Vec<(u64, u64)>) {
        if let LockAuthority::Remote(remote) = self {
            remote.sync(below, txns, holding);
        }
    }

    /// Pins `tables` for `txn` at once, so that a later `forget` unpins them; the returned
    /// future waits until every resource manager guards them.
    pub fn guard<'a>(
        &'a self,
        txn: u64,
        tables: &'a [Table],
        deadline: Instant,
        shutdown: &'a CancellationToken,
    ) -> Pin<Box<dyn Future<Output = Result<(), TcError>> + Send + 'a>> {
        match self {
            LockAuthority::Local(at) => {
                at.guards.pin(txn, tables);
                Box::pin(at.guard(tables, deadline, shutdown))
            }
            LockAuthority::Remote(remote) => {
                let guarded = remote.guard(txn, tables, deadline);
                Box::pin(async move { until_shutdown(guarded, shutdown).await? })
            }
        }
    }

    /// Takes a branch's rows, waiting in the queues until `deadline` (`wait_ms` is how long
    /// that is, for the error) or the coordinator's shutdown.
    pub async fn acquire(
        &self,
        txn: u64,
        branch: u64,
        keys: &[LockKey],
        wait: (Instant, u64),
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Grant, TcError> {
        match self {
            LockAuthority::Local(at) => at
                .acquire(txn, branch, keys, wait, metrics, shutdown)
                .await
                .map(|granted| Grant { granted, epoch: 0 }),
            // Waits and refusals are counted where the queues are, at the leader.
            LockAuthority::Remote(remote) => {
                until_shutdown(remote.acquire(txn, branch, keys, wait.0), shutdown).await?
            }
        }
    }

    /// Waits until no transaction but `txn` (if any) holds any of `keys`; takes nothing.
    pub async fn query(
        &self,
        txn: Option<u64>,
        keys: &[LockKey],
        wait: (Instant, u64),
        metrics: &Metrics,
    ) -> Result<RowsFound, TcError> {
        match self {
            LockAuthority::Local(at) => at.query(txn, keys, wait, metrics).await,
            LockAuthority::Remote(remote) => remote.query(txn, keys, wait.0).await,
        }
    }

    /// Branch `branch` of `txn` lets go of `keys`.
    pub fn release_branch(&self, txn: u64, branch: u64, keys: &[LockKey]) {
        match self {
            LockAuthority::Local(at) => at.locks.release_branch(txn, branch, keys),
            LockAuthority::Remote(remote) => remote.release(txn, Some(branch), keys),
        }
    }

    /// `txn` lets go of `keys`, whichever of its branches took them.
    pub fn release_txn(&self, txn: u64, keys: &[LockKey]) {
        match self {
            LockAuthority::Local(at) => at.locks.release_txn(txn, keys),
            LockAuthority::Remote(remote) => remote.release(txn, None, keys),
        }
    }

    /// Requests for `txn`'s rows fail fast from now on.
    pub fn set_rolling_back(&self, txn: u64) {
        match self {
            LockAuthority::Local(at) => at.locks.set_rolling_back(txn),
            LockAuthority::Remote(remote) => remote.set_rolling_back(txn),
        }
    }

    /// A finished transaction leaves no rows, marks or table pins behind.
    pub fn forget(&self, txn: u64, guarded: &BTreeSet<Table>) {
        match self {
            LockAuthority::Local(at) => at.forget(txn, guarded),
            LockAuthority::Remote(remote) => remote.forget(txn, guarded),
        }
    }

    /// Updates the held-rows gauge after rows were taken or released (the leader keeps it
    /// for remote nodes).
    pub fn count_held(&self, metrics: &Metrics) {
        if let LockAuthority::Local(at) = self {
            at.count_held(metrics);
        }
    }
}
