//! Records and checks for the store tests: every store runs the same checks
//! (`every_mutation_round_trips` and the ones after it) against its own backend.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender};

use super::{Mutation, Refusals, Snapshot, Store, StoreError};
use crate::audit::AuditRecord;
use crate::auth::TokenRecord;
use crate::lock_key::LockKey;
use crate::model::{BranchError, BranchRecord, BranchStatus, FinishedRecord, GlobalRecord, GlobalStatus};
use crate::timeline::Event;

/// A store that commits nothing, and, once held, keeps its next commit waiting until
/// released (announcing it has entered).
#[derive(Default)]
pub(crate) struct HeldStore {
    pub(crate) held: parking_lot::Mutex<Option<(SyncSender<()>, Receiver<()>)>>,
    /// Refuses every submission fenced by a lock leader's epoch, as etcd does once another
    /// leader leads.
    pub(crate) refuse_fenced: std::sync::atomic::AtomicBool,
}

impl Store for HeldStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }
    fn commit(&self, _batch: &[Mutation]) -> Result<(), StoreError> {
        if let Some((entered, release)) = self.held.lock().take() {
            entered.send(()).unwrap();
            release.recv().unwrap();
        }
        Ok(())
    }
    fn commit_submissions(&self, batch: &[Mutation], ends: &[usize]) -> Result<Refusals, StoreError> {
        self.commit(batch)?;
        let mut refusals = Refusals::new();
        if self.refuse_fenced.load(std::sync::atomic::Ordering::SeqCst) {
            let starts = std::iter::once(0).chain(ends.iter().copied());
            for (i, (start, &end)) in starts.zip(ends).enumerate() {
                if batch[start..end]
                    .iter()
                    .any(|m| matches!(m, Mutation::LockFence { .. }))
                {
                    refusals.insert(i, "another lock leader leads".into());
                }
            }
        }
        Ok(refusals)
    }
}

pub(crate) fn commit(store: &dyn Store, batch: Vec<Mutation>) {
    store.commit(&batch).unwrap();
}

pub(crate) fn global(txn_id: u64, status: GlobalStatus) -> GlobalRecord {
    GlobalRecord {
        txn_id,
        name: format!("txn-{txn_id}"),
        status,
        timeout_ms: 60_000,
        begin_ms: 1_700_000_000_000 + txn_id,
        updated_ms: 1_700_000_000_500 + txn_id,
    }
}

pub(crate) fn finished(txn_id: u64, status: GlobalStatus) -> FinishedRecord {
    FinishedRecord {
        record: global(txn_id, status),
        branch_count: 2,
        failure: None,
    }
}

pub(crate) fn branch(txn_id: u64, branch_id: u64) -> BranchRecord {
    BranchRecord {
        txn_id,
        branch_id,
        resource_id: "jdbc:mysql://db/orders".into(),
        lock_keys: vec![
            LockKey::new("jdbc:mysql://db/orders", "shop", "orders", &[b"1".as_slice(), b"a,b;c"]),
            LockKey::new("jdbc:mysql://db/orders", "shop", "orders", &[[0u8, 255, 7]]),
        ],
        application_data: vec![0, 1, 2, 255],
        status: BranchStatus::Registered,
        registered_ms: 1_700_000_000_100,
        updated_ms: 1_700_000_000_200,
        error: None,
        mode: crate::model::BranchMode::At,
        connection_id: 0,
        instance_id: "3f9c0a".into(),
    }
}
pub(crate) fn audit_record(id: u64) -> AuditRecord {
    let mut trail = crate::audit::Audit::default();
    let mut record = None;
    for _ in 0..id {
        let r = trail.seal(
            crate::audit::AuditEntry {
                actor: "alice".into(),
                action: "retry".into(),
                ..Default::default()
            },
            7,
        );
        trail.append(r.clone());
        record = Some(r);
    }
    record.expect("id >= 1")
}

pub(crate) fn token(name: &str) -> TokenRecord {
    TokenRecord {
        name: name.into(),
        role: crate::auth::Role::Operator,
        digest: crate::auth::digest(name),
        created_ms: 5,
        created_by: "root".into(),
        expires_ms: Some(10),
    }
}

pub(crate) fn event(version: u64) -> Event {
    Event {
        version,
        at_ms: 1_700_000_000_000 + version,
        kind: crate::timeline::EventKind::OperatorAction {
            action: "retry".into(),
            actor: "alice".into(),
            reason: format!("attempt {version}"),
            audit_id: version,
        },
    }
}

/// Every kind of mutation, committed and read back after the store is opened again by `open`
/// (which must give a store on the same data each time).
pub(crate) fn every_mutation_round_trips(open: &mut dyn FnMut() -> Box<dyn Store>) {
    let mut failed_branch = branch(2, 21);
    failed_branch.status = BranchStatus::RollbackFailedUnretryable;
    failed_branch.error = Some(BranchError {
        reason: "rows changed outside the global transaction".into(),
        detail_json: r#"{"rows":[1,2]}"#.into(),
    });
    {
        let store = open();
        assert_eq!(store.load().unwrap(), Snapshot::default());
        commit(
            &*store,
            vec![
                Mutation::SetIdCeiling(1000),
                Mutation::PutGlobal(global(1, GlobalStatus::Begin)),
                Mutation::PutGlobal(global(2, GlobalStatus::Begin)),
                Mutation::PutGlobal(global(3, GlobalStatus::Begin)),
                Mutation::PutBranch(branch(1, 11)),
                Mutation::PutBranch(branch(1, 12)),
                Mutation::PutBranch(branch(2, 22)),
                Mutation::PutBranch(branch(2, 21)),
                Mutation::PutEvents {
                    txn_id: 2,
                    first: 0,
                    events: vec![event(1), event(2)],
                },
            ],
        );
        // An event replaced (a folded retry) and one added.
        commit(
            &*store,
            vec![Mutation::PutEvents {
                txn_id: 2,
                first: 1,
                events: vec![event(3), event(4)],
            }],
        );
        commit(
            &*store,
            vec![
                // overwrite
                Mutation::PutGlobal(global(2, GlobalStatus::RollbackFailed)),
                Mutation::PutBranch(failed_branch.clone()),
                Mutation::DeleteBranch {
                    txn_id: 1,
                    branch_id: 12,
                },
                // deleting what is not there is fine
                Mutation::DeleteBranch {
                    txn_id: 9,
                    branch_id: 9,
                },
                Mutation::Finish(finished(3, GlobalStatus::Committed)),
                Mutation::PutEvents {
                    txn_id: 3,
                    first: 0,
                    events: vec![event(1), event(2)],
                },
                Mutation::Finish(finished(4, GlobalStatus::Rollbacked)),
                Mutation::PutEvents {
                    txn_id: 4,
                    first: 0,
                    events: vec![event(1)],
                },
                Mutation::Forget { txn_id: 4 },
                Mutation::AppendAudit(audit_record(1)),
                Mutation::AppendAudit(audit_record(2)),
                Mutation::PutToken(token("ops")),
                Mutation::PutToken(token("gone")),
                Mutation::DeleteToken { name: "gone".into() },
                // forgetting what is not there is fine
                Mutation::Forget { txn_id: 8 },
                Mutation::SetIdCeiling(2000),
            ],
        );
        // empty batch: no-op
        commit(&*store, vec![]);
    }
    let store = open();
    let snap = store.load().unwrap();
    assert_eq!(
        snap,
        Snapshot {
            id_ceiling: 2000,
            globals: vec![global(1, GlobalStatus::Begin), global(2, GlobalStatus::RollbackFailed)],
            branches: vec![branch(1, 11), failed_branch, branch(2, 22)],
            finished: vec![finished(3, GlobalStatus::Committed)],
            events: BTreeMap::from([(2, vec![event(1), event(3), event(4)]), (3, vec![event(1), event(2)])]),
            audit: vec![audit_record(1), audit_record(2)],
            tokens: vec![token("ops")],
        }
    );
}

/// Later mutations of one batch see the earlier ones; `store` starts empty.
pub(crate) fn mutations_apply_in_order_within_a_batch(store: &dyn Store) {
    commit(
        store,
        vec![
            Mutation::PutGlobal(global(5, GlobalStatus::Begin)),
            Mutation::PutBranch(branch(5, 1)),
            Mutation::Finish(finished(5, GlobalStatus::Committed)),
            Mutation::PutGlobal(global(5, GlobalStatus::Committing)),
            Mutation::PutBranch(branch(5, 2)),
        ],
    );
    let snap = store.load().unwrap();
    assert_eq!(snap.globals, vec![global(5, GlobalStatus::Committing)]);
    assert_eq!(snap.branches, vec![branch(5, 2)]);
    assert_eq!(snap.finished, vec![finished(5, GlobalStatus::Committed)]);
}

/// A transaction's finish deletes its branches and no other's, at the extremes of the
/// branch ids too; `store` starts empty.
pub(crate) fn finish_removes_only_its_own_branches(store: &dyn Store) {
    let mut batch = Vec::new();
    for txn in [4, 5, 6] {
        batch.push(Mutation::PutGlobal(global(txn, GlobalStatus::Begin)));
        // includes the extreme branch ids, to check the range bounds
        for b in [0, 1, 7, u64::MAX] {
            batch.push(Mutation::PutBranch(branch(txn, b)));
        }
    }
    commit(store, batch);
    commit(store, vec![Mutation::Finish(finished(5, GlobalStatus::Committed))]);
    let snap = store.load().unwrap();
    assert_eq!(
        snap.globals,
        vec![global(4, GlobalStatus::Begin), global(6, GlobalStatus::Begin)]
    );
    let keys: Vec<_> = snap.branches.iter().map(|b| (b.txn_id, b.branch_id)).collect();
    assert_eq!(
        keys,
        vec![
            (4, 0),
            (4, 1),
            (4, 7),
            (4, u64::MAX),
            (6, 0),
            (6, 1),
            (6, 7),
            (6, u64::MAX)
        ]
    );
}

/// The id ceiling only goes up, within a batch, across batches and across an `open` again
/// (which must give a store on the same, at first empty, data each time).
pub(crate) fn id_ceiling_never_decreases(open: &mut dyn FnMut() -> Box<dyn Store>) {
    {
        let store = open();
        commit(&*store, vec![Mutation::SetIdCeiling(500)]);
        commit(&*store, vec![Mutation::SetIdCeiling(100)]);
        assert_eq!(store.load().unwrap().id_ceiling, 500);
        commit(&*store, vec![Mutation::SetIdCeiling(700), Mutation::SetIdCeiling(600)]);
        assert_eq!(store.load().unwrap().id_ceiling, 700);
    }
    let store = open();
    commit(&*store, vec![Mutation::SetIdCeiling(0)]);
    assert_eq!(store.load().unwrap().id_ceiling, 700);
}
