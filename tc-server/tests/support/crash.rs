//! One check of "nothing acknowledged is lost", shared by a restart on the same data
//! (`recovery.rs`) and a standby taking over a shared store (`ha.rs`): transactions left in
//! every state the coordinator must keep, then checked, and finished, on whichever
//! coordinator serves next.

use std::collections::HashSet;

use anyhow::Result;
use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, holder_of, pb};
use serde_json::json;

use super::*;

use pb::GlobalStatus as G;
use pb::Phase2Action::{Commit, Rollback};

/// What `leave_every_state` left: XIDs and their branch ids.
pub struct Left {
    /// In Begin, branches on db1 (row a1) and db2 (row a2).
    pub open1: String,
    pub o1b1: u64,
    pub o1b2: u64,
    /// In Begin, a branch on db1 (row b1).
    pub open2: String,
    pub o2b1: u64,
    /// Commit decided, phase 2 pending: nobody serves db1 yet (row c1).
    pub committing: String,
    pub cb: u64,
    /// Rollback decided and retrying: nobody serves db2 yet (row d1).
    pub rolling: String,
    pub rb: u64,
}

/// Leaves transactions in Begin, committing and rolling back, with branches and locks, on the
/// coordinator `c` talks to (no resource manager attached).
pub async fn leave_every_state(c: &TcClient) -> Result<Left> {
    let open1 = begin(c, 600_000).await?;
    let o1b1 = register(c, &open1, "db1", t_rows(&["a1"]), 0).await?;
    let o1b2 = register(c, &open1, "db2", t_rows(&["a2"]), 0).await?;
    let open2 = begin(c, 600_000).await?;
    let o2b1 = register(c, &open2, "db1", t_rows(&["b1"]), 0).await?;
    let committing = begin(c, 600_000).await?;
    let cb = register(c, &committing, "db1", t_rows(&["c1"]), 0).await?;
    assert_eq!(status_of(&commit(c, &committing).await?), G::AsyncCommitting);
    let rolling = begin(c, 600_000).await?;
    let rb = register(c, &rolling, "db2", t_rows(&["d1"]), 0).await?;
    let o = rollback(c, &rolling).await?;
    assert_eq!(status_of(&o), G::RollbackRetrying, "{o:?}");
    assert!(
        o.failure
            .as_ref()
            .is_some_and(|f| f.branch_id == rb && f.reason.contains("db2")),
        "the failure says no resource manager serves db2: {o:?}"
    );
    Ok(Left {
        open1,
        o1b1,
        o1b2,
        open2,
        o2b1,
        committing,
        cb,
        rolling,
        rb,
    })
}

/// Checks that the coordinator behind `c` and `http` holds everything `left` describes (its
/// statuses, branches, locks and id ranges), then attaches resource managers and checks that
/// phase 2 resumes and the open transactions finish.
pub async fn check_every_state_kept(c: &TcClient, http: &Http, left: &Left) -> Result<()> {
    let Left {
        open1,
        o1b1,
        o1b2,
        open2,
        o2b1,
        committing,
        cb,
        rolling,
        rb,
    } = left;
    let (o1b1, o1b2, o2b1, cb, rb) = (*o1b1, *o1b2, *o2b1, *cb, *rb);
    let before: HashSet<String> = [open1, open2, committing, rolling].into_iter().cloned().collect();
    let branches_before: HashSet<u64> = [o1b1, o1b2, o2b1, cb, rb].into();

    // Begin transactions are back with their branches and locks.
    let v = http.get_json(&format!("/v1/transactions/{open1}")).await?;
    assert_eq!(v["status"], "Begin", "{v}");
    assert_eq!(v["timeout_ms"], 600_000, "{v}");
    let branches = v["branches"].as_array().expect("branches");
    assert_eq!(
        branches.iter().map(|b| b["branch_id"].as_u64()).collect::<Vec<_>>(),
        vec![Some(o1b1), Some(o1b2)],
        "{v}"
    );
    assert_eq!(
        branches[1]["lock_keys"],
        json!([{"resource": "db2", "schema": "app", "table": "t", "pk": ["a2"]}])
    );
    assert_eq!(status_of(&status(c, open2).await?), G::Begin);
    assert_eq!(status_of(&status(c, committing).await?), G::AsyncCommitting);
    assert_eq!(status_of(&status(c, rolling).await?), G::RollbackRetrying);

    // New XIDs and branch ids never repeat old ones.
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(begin(c, 0).await?);
    }
    assert!(
        after.iter().all(|x| !before.contains(x)),
        "reused XID: {before:?} vs {after:?}"
    );
    let fresh = after[0].clone();
    let e = register(c, &fresh, "db1", t_rows(&["a1"]), 200).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(holder_of(&e).as_deref(), Some(open1.as_str()));
    let e = register(c, &fresh, "db1", t_rows(&["b1"]), 0).await.unwrap_err();
    assert_eq!(holder_of(&e).as_deref(), Some(open2.as_str()));
    // The rolling-back transaction's rows fail fast, as before the crash.
    let e = register(c, &fresh, "db2", t_rows(&["d1"]), 30_000).await.unwrap_err();
    assert_code(&e, ErrorCode::LockHolderRollingBack);
    assert_eq!(holder_of(&e).as_deref(), Some(rolling.as_str()));
    // The committed transaction's rows were released before the crash and stay free.
    let nb = register(c, &fresh, "db1", t_rows(&["c1"]), 0).await?;
    assert!(!branches_before.contains(&nb), "reused branch id {nb}");

    // Phase 2 resumes once resource managers attach.
    let rec = Recorder::new();
    let _rm1 = TestRm::attach(c, "rm-db1", &["db1"], &rec).await?;
    let _rm2 = TestRm::attach(c, "rm-db2", &["db2"], &rec).await?;
    rec.wait_branch(Commit, cb).await?;
    rec.wait_branch(Rollback, rb).await?;
    wait_status(c, committing, G::Committed).await?;
    wait_status(c, rolling, G::Rollbacked).await?;
    let actions = rec.actions();
    assert_eq!(actions.iter().filter(|a| **a == (Commit, cb)).count(), 1, "{actions:?}");
    assert_eq!(
        actions.iter().filter(|a| **a == (Rollback, rb)).count(),
        1,
        "{actions:?}"
    );
    assert!(
        actions.iter().all(|(_, b)| *b == cb || *b == rb),
        "nothing else runs phase 2: {actions:?}"
    );
    register(c, &fresh, "db2", t_rows(&["d1"]), 0).await?;

    // The open transactions still work normally.
    commit(c, open1).await?;
    wait_status(c, open1, G::Committed).await?;
    assert_eq!(status_of(&rollback(c, open2).await?), G::Rollbacked);
    let actions = rec.actions();
    assert!(
        actions.contains(&(Commit, o1b1)) && actions.contains(&(Commit, o1b2)),
        "{actions:?}"
    );
    assert!(actions.contains(&(Rollback, o2b1)), "{actions:?}");
    Ok(())
}
