//! XA branches at the coordinator, against the real binary: registered before the database
//! starts them (no global locks, the connection they run on), reported prepared or read-only,
//! committed only once prepared, left out of a commit they did not prepare in time (their late
//! prepare refused), rolled back whether prepared or not, and kept across a restart.

mod support;

use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, pb};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use pb::BranchStatus::{PhaseOneFailed, PhaseOnePrepared, PhaseOneReadOnly};
use pb::GlobalStatus as G;
use pb::Phase2Action::{Commit, Rollback};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_xa_branch_commits_beside_an_at_branch_and_takes_no_locks() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let xa = register_xa(&c, &xid, "db1", 42).await?;
    let at = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;

    // An XA branch's locks are its database's.
    let with_locks =
        c.rm.clone()
            .branch_register(pb::BranchRegisterRequest {
                xid: xid.clone(),
                resource_id: "db1".into(),
                locks: t_rows(&["3"]),
                branch_type: pb::BranchType::Xa as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_code(&with_locks, ErrorCode::InvalidArgument);
    // Only XA branches prepare.
    assert_code(
        &report(&c, &xid, at, PhaseOnePrepared).await.unwrap_err(),
        ErrorCode::InvalidArgument,
    );

    report(&c, &xid, xa, PhaseOnePrepared).await?;
    // Said twice (an answer lost on the way): the same.
    report(&c, &xid, xa, PhaseOnePrepared).await?;
    let view = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    let branch = |id: u64| {
        view["branches"]
            .as_array()
            .and_then(|bs| bs.iter().find(|b| b["branch_id"] == id))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(branch(xa)["mode"], "XA", "{view}");
    assert_eq!(branch(xa)["status"], "Prepared", "{view}");
    assert_eq!(branch(xa)["connection_id"], 42, "{view}");
    assert_eq!(branch(xa)["lock_keys"].as_array().map(Vec::len), Some(0), "{view}");
    assert_eq!(branch(at)["mode"], "AT", "{view}");
    assert!(branch(at)["connection_id"].is_null(), "{view}");

    commit(&c, &xid).await?;
    wait_status(&c, &xid, G::Committed).await?;
    let commands = rec.commands();
    let commits: Vec<&pb::BranchRef> = commands
        .iter()
        .filter(|r| r.action == Commit)
        .flat_map(|r| &r.branches)
        .collect();
    assert_eq!(commits.len(), 2, "{commands:#?}");
    let xa_ref = commits
        .iter()
        .find(|b| b.branch_id == xa)
        .expect("the XA branch committed");
    assert_eq!(xa_ref.branch_type, pb::BranchType::Xa as i32);
    assert_eq!(xa_ref.connection_id, 42);
    let at_ref = commits
        .iter()
        .find(|b| b.branch_id == at)
        .expect("the AT branch committed");
    assert_eq!(at_ref.branch_type, pb::BranchType::At as i32);

    let events = tc.http().get_json(&format!("/v1/transactions/{xid}/events")).await?;
    let types: Vec<&str> = events["events"]
        .as_array()
        .map(|es| es.iter().filter_map(|e| e["type"].as_str()).collect())
        .unwrap_or_default();
    for t in ["xa_branch", "branch_prepared"] {
        assert!(types.contains(&t), "{t} missing: {events}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xa_branch_not_prepared_at_commit_is_left_out_and_its_late_prepare_refused() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let late = register_xa(&c, &xid, "db1", 7).await?;
    let prepared = register_xa(&c, &xid, "db1", 8).await?;
    report(&c, &xid, prepared, PhaseOnePrepared).await?;
    // The prepared branch's commit waits, so the transaction is still live below.
    let gate = tokio_util::sync::CancellationToken::new();
    rec.script(prepared, [Reply::After(gate.clone(), Box::new(Reply::Ok))]);

    commit(&c, &xid).await?;
    let refused = report(&c, &xid, late, PhaseOnePrepared).await.unwrap_err();
    assert_code(&refused, ErrorCode::GlobalStatusInvalid);
    assert!(refused.message().contains("roll it back"), "{refused:?}");
    // A read-only branch needs nothing either way.
    report(&c, &xid, late, PhaseOneReadOnly).await?;

    let view = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    let late_view = view["branches"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["branch_id"] == late))
        .cloned()
        .unwrap_or_default();
    assert_eq!(late_view["status"], "PhaseOneFailed", "{view}");
    assert_eq!(
        late_view["error"]["reason"], "not prepared when the global transaction committed",
        "{view}"
    );

    gate.cancel();
    wait_status(&c, &xid, G::Committed).await?;
    let commands = rec.commands();
    assert!(
        commands.iter().all(|r| !r.branch_ids().contains(&late)),
        "the unprepared branch is not committed: {commands:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reaches_xa_branches_prepared_or_not_and_skips_read_only_ones() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let prepared = register_xa(&c, &xid, "db1", 1).await?;
    let active = register_xa(&c, &xid, "db1", 2).await?;
    let read_only = register_xa(&c, &xid, "db1", 3).await?;
    let failed = register_xa(&c, &xid, "db1", 4).await?;
    report(&c, &xid, prepared, PhaseOnePrepared).await?;
    report(&c, &xid, read_only, PhaseOneReadOnly).await?;
    report(&c, &xid, failed, PhaseOneFailed).await?;
    // Phase 1 is over for these.
    for b in [read_only, failed] {
        assert_code(
            &report(&c, &xid, b, PhaseOnePrepared).await.unwrap_err(),
            ErrorCode::GlobalStatusInvalid,
        );
    }

    let o = rollback(&c, &xid).await?;
    assert_eq!(status_of(&o), G::Rollbacked, "{o:?}");
    let rolled: Vec<u64> = rec
        .commands()
        .iter()
        .filter(|r| r.action == Rollback)
        .flat_map(|r| r.branch_ids())
        .collect();
    assert_eq!(rolled, vec![active, prepared], "last registered first");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_xa_branch_and_its_connection_survive_a_coordinator_kill() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let xa = register_xa(&c, &xid, "db1", 4_000_000_001).await?;
    report(&c, &xid, xa, PhaseOnePrepared).await?;

    let (c, rec, _rm) = kill9_and_reattach(&mut tc, rm).await?;
    commit(&c, &xid).await?;
    let received = rec.wait_branch(Commit, xa).await?;
    let b = &received.branches[0];
    assert_eq!(
        (b.branch_type, b.connection_id),
        (pb::BranchType::Xa as i32, 4_000_000_001)
    );
    wait_status(&c, &xid, G::Committed).await?;
    Ok(())
}

async fn orphan(c: &TcClient, xid: &str, branch_id: u64) -> Result<pb::xa_orphan_response::Verdict> {
    let r =
        c.rm.clone()
            .xa_orphan(pb::XaOrphanRequest {
                xid: xid.into(),
                branch_id,
            })
            .await?
            .into_inner();
    Ok(r.verdict())
}

/// What a proxy's orphan sweep is told to do with a prepared branch no session holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_branch_is_committed_only_as_part_of_a_commit() -> Result {
    use pb::xa_orphan_response::Verdict::{Commit as CommitIt, Rollback as RollBackIt, UnknownXid, Wait};
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    assert_eq!(orphan(&c, "1-999999", 1).await?, UnknownXid, "never issued");
    let xid = begin(&c, 0).await?;
    let registered = register_xa(&c, &xid, "db1", 1).await?;
    let prepared = register_xa(&c, &xid, "db1", 2).await?;
    report(&c, &xid, prepared, PhaseOnePrepared).await?;
    assert_eq!(orphan(&c, &xid, registered).await?, Wait, "still running");
    assert_eq!(orphan(&c, &xid, prepared).await?, Wait);
    assert_eq!(orphan(&c, &xid, 12345).await?, RollBackIt, "not a branch of it");

    let gate = tokio_util::sync::CancellationToken::new();
    rec.script(prepared, [Reply::After(gate.clone(), Box::new(Reply::Ok))]);
    commit(&c, &xid).await?;
    assert_eq!(orphan(&c, &xid, prepared).await?, CommitIt, "part of the commit");
    assert_eq!(orphan(&c, &xid, registered).await?, RollBackIt, "left out of it");
    gate.cancel();
    wait_status(&c, &xid, G::Committed).await?;
    assert_eq!(
        orphan(&c, &xid, prepared).await?,
        RollBackIt,
        "the commit is over: a branch still prepared was not in it"
    );

    let xid = begin(&c, 0).await?;
    let b = register_xa(&c, &xid, "db1", 3).await?;
    report(&c, &xid, b, PhaseOnePrepared).await?;
    rollback(&c, &xid).await?;
    assert_eq!(orphan(&c, &xid, b).await?, RollBackIt);
    Ok(())
}
