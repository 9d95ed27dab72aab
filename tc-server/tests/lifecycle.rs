//! Global transactions end to end against the real binary: begin, register, commit and
//! rollback with phase 2 through attached resource managers, retries, unretryable failures,
//! timeouts, status rules, phase-one failures and the HTTP API.

mod support;

use ferrata_rpc::{ErrorCode, pb};
use serde_json::json;
use support::*;
use tokio_util::sync::CancellationToken;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;
use pb::Phase2Action::{Commit, Rollback};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_releases_locks_at_once_and_commits_each_branch_once_batched_per_resource() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm1 = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let _rm2 = TestRm::attach(&c, "rm-db2", &["db2"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    // The same key on another resource is another row.
    let b2 = register(&c, &xid, "db2", t_rows(&["1"]), 0).await?;
    let b3 = register(&c, &xid, "db1", t_rows(&["2"]), 0).await?;
    assert!(b1 != b2 && b2 != b3 && b1 != b3, "branch ids are distinct");

    let o = commit(&c, &xid).await?;
    assert!(matches!(status_of(&o), G::AsyncCommitting | G::Committed), "{o:?}");
    assert_eq!(o.xid, xid);
    assert!(o.failure.is_none(), "{o:?}");

    // The rows are free the moment the commit is answered: no waiting allowed here.
    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["1", "2"]), 0).await?;
    register(&c, &other, "db2", t_rows(&["1"]), 0).await?;

    let done = wait_status(&c, &xid, G::Committed).await?;
    assert!(done.failure.is_none(), "{done:?}");

    let commands = rec.commands();
    assert!(commands.iter().all(|r| r.action == Commit), "{commands:#?}");
    assert_eq!(commands.len(), 2, "one batched command per resource: {commands:#?}");
    let db1 = commands.iter().find(|r| r.rm == "rm-db1").expect("db1 got a command");
    let mut ids = db1.branch_ids();
    ids.sort_unstable();
    let mut want = vec![b1, b3];
    want.sort_unstable();
    assert_eq!(ids, want, "{db1:#?}");
    let db2 = commands.iter().find(|r| r.rm == "rm-db2").expect("db2 got a command");
    assert_eq!(db2.branch_ids(), vec![b2]);
    for b in commands.iter().flat_map(|r| &r.branches) {
        assert_eq!(b.xid, xid);
        assert_eq!(b.application_data, format!("app-data of {xid}").into_bytes());
        assert_eq!(b.resource_id, if b.branch_id == b2 { "db2" } else { "db1" });
    }

    // A commit repeated after the end answers the same outcome.
    assert_eq!(status_of(&commit(&c, &xid).await?), G::Committed);
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Committed", "{v}");
    assert_eq!(v["finished"], true, "{v}");
    Ok(())
}

/// The summary kept of a finished transaction says how many branches it had (phase 2 deletes
/// the branches themselves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_transactions_remember_their_branch_count() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let committed = begin(&c, 0).await?;
    let rolled_back = begin(&c, 0).await?;
    for (i, xid) in [&committed, &rolled_back].into_iter().enumerate() {
        for pk in ["1", "2", "3"] {
            register(&c, xid, "db1", t_rows(&[&format!("{i}-{pk}")]), 0).await?;
        }
        let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
        assert_eq!(v["branch_count"], 3, "{v}");
    }
    commit(&c, &committed).await?;
    wait_status(&c, &committed, G::Committed).await?;
    assert_eq!(status_of(&rollback(&c, &rolled_back).await?), G::Rollbacked);
    for xid in [&committed, &rolled_back] {
        let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
        assert_eq!(v["finished"], true, "{v}");
        assert_eq!(v["branch_count"], 3, "a finished transaction still had 3 branches: {v}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_without_branches_is_committed_at_once() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let xid = begin(&c, 0).await?;
    let o = commit(&c, &xid).await?;
    assert_eq!(status_of(&o), G::Committed, "{o:?}");
    assert_eq!(status_of(&status(&c, &xid).await?), G::Committed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_runs_branches_newest_first_and_releases_their_rows() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm1 = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let _rm2 = TestRm::attach(&c, "rm-db2", &["db2"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &xid, "db2", t_rows(&["2"]), 0).await?;
    let b3 = register(&c, &xid, "db1", t_rows(&["3"]), 0).await?;

    let o = rollback(&c, &xid).await?;
    assert_eq!(status_of(&o), G::Rollbacked, "{o:?}");
    assert!(o.failure.is_none(), "{o:?}");

    let commands = rec.commands();
    assert!(
        commands.iter().all(|r| r.branches.len() == 1),
        "one branch per rollback command: {commands:#?}"
    );
    assert_eq!(
        rec.actions(),
        vec![(Rollback, b3), (Rollback, b2), (Rollback, b1)],
        "reverse registration order"
    );
    assert_eq!(commands[1].rm, "rm-db2");

    let http = tc.http();
    assert!(held_locks(&http, "").await?.is_empty(), "no row stays held");
    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["1", "3"]), 0).await?;
    register(&c, &other, "db2", t_rows(&["2"]), 0).await?;

    assert_eq!(status_of(&status(&c, &xid).await?), G::Rollbacked);
    // Rolling back again answers the outcome; committing is refused.
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::Rollbacked);
    let e = commit(&c, &xid).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert!(e.message().contains("Rollbacked"), "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_rollback_failures_are_retried_until_the_branch_rolls_back() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let gate = CancellationToken::new();
    rec.script(
        b1,
        [
            Reply::Retryable("db1 unreachable".into()),
            Reply::Retryable("db1 unreachable".into()),
            Reply::After(gate.clone(), Box::new(Reply::Ok)),
        ],
    );

    let o = rollback(&c, &xid).await?;
    assert_eq!(status_of(&o), G::RollbackRetrying, "{o:?}");
    let f = o.failure.expect("the failure names the branch");
    assert_eq!(f.branch_id, b1);
    assert_eq!(f.resource_id, "db1");
    assert_eq!(f.status, pb::BranchStatus::RollbackFailedRetryable as i32);
    assert_eq!(f.reason, "db1 unreachable");

    // The third attempt is in flight (held at the gate): the state is stable to inspect.
    rec.wait_commands(3).await?;
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "RollbackRetrying", "{v}");
    assert_eq!(v["failure"]["branch_id"], b1, "{v}");
    assert_eq!(v["failure"]["reason"], "db1 unreachable", "{v}");
    assert_eq!(v["branches"][0]["status"], "RollbackFailedRetryable", "{v}");
    assert_eq!(v["branches"][0]["error"]["reason"], "db1 unreachable", "{v}");
    let metrics = http.get("/metrics").await?;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric(&metrics.body, r#"ferrata_tc_phase2_retries_total{action="rollback"}"#),
        Some(2.0),
        "{}",
        metrics.body
    );

    gate.cancel();
    let done = wait_status(&c, &xid, G::Rollbacked).await?;
    assert!(done.failure.is_none(), "a finished rollback has no failure: {done:?}");
    assert_eq!(rec.actions(), vec![(Rollback, b1); 3]);
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Rollbacked", "{v}");
    assert!(held_locks(&http, "").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unretryable_rollback_ends_in_rollback_failed_and_keeps_every_lock() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &xid, "db1", t_rows(&["2", "3"]), 0).await?;
    let detail = json!({"dirty_rows": [{"table": "app.t", "pk": ["2"], "now": {"v": 7}}]});
    rec.script(
        b2,
        [Reply::Unretryable {
            reason: "rows changed outside the global transaction".into(),
            detail_json: detail.to_string(),
        }],
    );

    let o = rollback(&c, &xid).await?;
    assert_eq!(status_of(&o), G::RollbackFailed, "{o:?}");
    let f = o.failure.expect("failure");
    assert_eq!(f.branch_id, b2);
    assert_eq!(f.status, pb::BranchStatus::RollbackFailedUnretryable as i32);
    assert_eq!(f.reason, "rows changed outside the global transaction");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&f.detail_json)?, detail);
    // The pass stops at the failed branch: the older one is never rolled back.
    assert_eq!(rec.actions(), vec![(Rollback, b2)]);

    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "RollbackFailed", "{v}");
    assert_eq!(v["finished"], false, "{v}");
    assert_eq!(v["failure"]["detail"], detail, "{v}");
    assert_eq!(v["failure"]["status"], "RollbackFailedUnretryable", "{v}");
    let branches = v["branches"].as_array().expect("branches");
    let failed = branches.iter().find(|b| b["branch_id"] == b2).expect("b2 listed");
    assert_eq!(failed["status"], "RollbackFailedUnretryable", "{v}");
    assert_eq!(failed["error"]["reason"], "rows changed outside the global transaction");
    assert_eq!(failed["error"]["detail"], detail);
    let untouched = branches.iter().find(|b| b["branch_id"] == b1).expect("b1 listed");
    assert_eq!(untouched["status"], "Registered", "{v}");

    // Every row stays held, and requesters fail fast instead of waiting.
    let other = begin(&c, 0).await?;
    for pk in ["1", "2"] {
        let started = std::time::Instant::now();
        let e = register(&c, &other, "db1", t_rows(&[pk]), 30_000).await.unwrap_err();
        assert_code(&e, ErrorCode::LockHolderRollingBack);
        assert_eq!(ferrata_rpc::holder_of(&e).as_deref(), Some(xid.as_str()));
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "fail fast");
    }
    let mut locks = held_locks(&http, "resource=db1").await?;
    locks.sort();
    assert_eq!(
        locks,
        ["1", "2", "3"]
            .map(|pk| (pk.to_owned(), xid.clone(), Vec::new()))
            .to_vec()
    );

    let listed = http.get_json("/v1/transactions?status=RollbackFailed").await?;
    let xids: Vec<&str> = listed["transactions"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["xid"].as_str())
        .collect();
    assert_eq!(xids, vec![xid.as_str()]);

    // The end state is stable: rolling back again answers it, committing is refused.
    let again = rollback(&c, &xid).await?;
    assert_eq!(status_of(&again), G::RollbackFailed);
    assert_eq!(again.failure.map(|f| f.branch_id), Some(b2));
    assert_eq!(rec.commands().len(), 1, "no new rollback attempt");
    assert_code(&commit(&c, &xid).await.unwrap_err(), ErrorCode::GlobalStatusInvalid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unretryable_commit_ends_in_commit_failed() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    rec.script(
        b1,
        [Reply::Unretryable {
            reason: "undo log corrupt".into(),
            detail_json: "{}".into(),
        }],
    );
    assert_eq!(status_of(&commit(&c, &xid).await?), G::AsyncCommitting);
    let o = wait_status(&c, &xid, G::CommitFailed).await?;
    let f = o.failure.expect("failure");
    assert_eq!((f.branch_id, f.reason.as_str()), (b1, "undo log corrupt"));
    assert_eq!(f.status, pb::BranchStatus::CommitFailedUnretryable as i32);
    // A commit decision is never reversed.
    assert_code(&rollback(&c, &xid).await.unwrap_err(), ErrorCode::GlobalStatusInvalid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_its_timeout_is_rolled_back() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 3000).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let empty = begin(&c, 300).await?;

    rec.wait_branch(Rollback, b1).await?;
    wait_status(&c, &xid, G::TimeoutRollbacked).await?;
    wait_status(&c, &empty, G::TimeoutRollbacked).await?;
    assert_eq!(rec.actions(), vec![(Rollback, b1)]);

    let e = commit(&c, &xid).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert!(e.message().contains("TimeoutRollbacked"), "{e:?}");
    let e = register(&c, &xid, "db1", t_rows(&["9"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);

    let http = tc.http();
    let r = http.post(&format!("/v1/transactions/{xid}/commit"), None).await?;
    let v = r.assert_error(409, "global_status_invalid");
    assert_eq!(v["status"], "TimeoutRollbacked", "{v}");

    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["1"]), 0).await?;
    let metrics = http.get("/metrics").await?.body;
    assert_eq!(
        metric(&metrics, "ferrata_tc_global_timeouts_total"),
        Some(2.0),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_transaction_in_begin_accepts_branches() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();

    // After the commit decision (phase 2 pending: nobody serves db-none).
    let committed = begin(&c, 0).await?;
    register(&c, &committed, "db-none", t_rows(&["1"]), 0).await?;
    assert_eq!(status_of(&commit(&c, &committed).await?), G::AsyncCommitting);
    let e = register(&c, &committed, "db-none", t_rows(&["2"]), 0)
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert!(e.message().contains("AsyncCommitting"), "{e:?}");
    // Committing again answers the decision; rolling back is refused.
    assert_eq!(status_of(&commit(&c, &committed).await?), G::AsyncCommitting);
    let e = rollback(&c, &committed).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert!(e.message().contains("AsyncCommitting"), "{e:?}");
    let r = http
        .post(&format!("/v1/transactions/{committed}/rollback"), None)
        .await?;
    assert_eq!(
        r.assert_error(409, "global_status_invalid")["status"],
        "AsyncCommitting"
    );

    // During a rollback (the resource manager never answers).
    let rec = Recorder::new();
    let _rm = TestRm::attach_with(&c, "rm-hang", &["db-hang"], &rec, Reply::Hang).await?;
    let rolling = begin(&c, 0).await?;
    let b = register(&c, &rolling, "db-hang", t_rows(&["1"]), 0).await?;
    let call = tokio::spawn({
        let c = c.clone();
        let rolling = rolling.clone();
        async move { rollback(&c, &rolling).await }
    });
    rec.wait_branch(Rollback, b).await?;
    let e = register(&c, &rolling, "db-hang", t_rows(&["2"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert!(e.message().contains("Rollbacking"), "{e:?}");
    let e = commit(&c, &rolling).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalStatusInvalid);
    assert_eq!(status_of(&status(&c, &rolling).await?), G::Rollbacking);
    assert!(!call.is_finished(), "the rollback call waits for the pass");
    call.abort();

    // Unknown and malformed XIDs.
    let unknown = "1-999999999";
    assert_code(
        &register(&c, unknown, "db1", t_rows(&["1"]), 0).await.unwrap_err(),
        ErrorCode::GlobalNotFound,
    );
    assert_code(&commit(&c, unknown).await.unwrap_err(), ErrorCode::GlobalNotFound);
    assert_code(&rollback(&c, unknown).await.unwrap_err(), ErrorCode::GlobalNotFound);
    assert_code(&status(&c, unknown).await.unwrap_err(), ErrorCode::GlobalNotFound);
    for bad in ["abc", "", "1-", "-1", "1-2-3", " 1-2", "70000-1"] {
        assert_code(
            &register(&c, bad, "db1", t_rows(&["1"]), 0).await.unwrap_err(),
            ErrorCode::InvalidArgument,
        );
        assert_code(&commit(&c, bad).await.unwrap_err(), ErrorCode::InvalidArgument);
        assert_code(&rollback(&c, bad).await.unwrap_err(), ErrorCode::InvalidArgument);
        assert_code(&status(&c, bad).await.unwrap_err(), ErrorCode::InvalidArgument);
    }
    http.get(&format!("/v1/transactions/{unknown}"))
        .await?
        .assert_error(404, "global_not_found");
    http.post(&format!("/v1/transactions/{unknown}/commit"), None)
        .await?
        .assert_error(404, "global_not_found");
    http.get("/v1/transactions/abc")
        .await?
        .assert_error(400, "invalid_argument");
    http.post("/v1/transactions/abc/rollback", None)
        .await?
        .assert_error(400, "invalid_argument");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_reported_phase_one_failed_frees_its_rows_and_is_skipped() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &xid, "db1", t_rows(&["2"]), 0).await?;
    report_failed(&c, &xid, b2).await?;
    // Reporting twice is harmless.
    report_failed(&c, &xid, b2).await?;

    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    let reported = v["branches"]
        .as_array()
        .expect("branches")
        .iter()
        .find(|b| b["branch_id"] == b2)
        .expect("b2");
    assert_eq!(reported["status"], "PhaseOneFailed", "{v}");
    assert_eq!(reported["error"]["reason"], "local commit failed", "{v}");

    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["2"]), 0).await?;
    let e = register(&c, &other, "db1", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(ferrata_rpc::holder_of(&e).as_deref(), Some(xid.as_str()));

    commit(&c, &xid).await?;
    wait_status(&c, &xid, G::Committed).await?;
    assert_eq!(rec.actions(), vec![(Commit, b1)], "phase 2 skips the failed branch");

    // The same for a rollback.
    let rb = begin(&c, 0).await?;
    let r1 = register(&c, &rb, "db1", t_rows(&["5"]), 0).await?;
    let r2 = register(&c, &rb, "db1", t_rows(&["6"]), 0).await?;
    report_failed(&c, &rb, r2).await?;
    assert_eq!(status_of(&rollback(&c, &rb).await?), G::Rollbacked);
    assert_eq!(&rec.actions()[1..], &[(Rollback, r1)]);

    // Wrong reports.
    let live = begin(&c, 0).await?;
    let b = register(&c, &live, "db1", t_rows(&["7"]), 0).await?;
    assert_code(
        &report_failed(&c, &live, b + 1_000_000).await.unwrap_err(),
        ErrorCode::BranchNotFound,
    );
    let e =
        c.rm.clone()
            .branch_report(pb::BranchReportRequest {
                xid: live.clone(),
                branch_id: b,
                status: pb::BranchStatus::PhaseTwoCommitted as i32,
                reason: String::new(),
            })
            .await
            .unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    let e = report_number(&c, &live, b, 99).await.unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_begins_inspects_and_ends_transactions() -> Result {
    let tc = Tc::start(TcOptions {
        args: vec!["--node-id".into(), "7".into()],
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;
    let c = tc.client().await?;
    let http = tc.http();

    let r = http
        .post("/v1/transactions", Some(r#"{"timeout_ms": 60000, "name": "order-42"}"#))
        .await?;
    assert_eq!(r.status, 201, "{r:?}");
    let xid = r.json()["xid"].as_str().expect("xid").to_owned();
    assert!(xid.starts_with("7-"), "the node id leads the XID: {xid}");

    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["xid"], xid.as_str());
    assert_eq!(v["status"], "Begin");
    assert_eq!(v["name"], "order-42");
    assert_eq!(v["timeout_ms"], 60000);
    assert!(v["begin_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{v}");
    assert_eq!(v["branches"], json!([]));

    // Binary key values show as hex; text as strings.
    let locks = vec![pb::TableLocks {
        schema: "app".into(),
        table: "t".into(),
        rows: vec![
            pb::PrimaryKey {
                values: vec![b"\x00\xff".to_vec(), b"x".to_vec()],
            },
            pb::PrimaryKey {
                values: vec![b"1".to_vec(), b"y".to_vec()],
            },
        ],
    }];
    let b = register(&c, &xid, "db1", locks, 0).await?;
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["branch_count"], 1);
    let branch = &v["branches"][0];
    assert_eq!(branch["branch_id"], b);
    assert_eq!(branch["resource_id"], "db1");
    assert_eq!(branch["status"], "Registered");
    assert_eq!(branch["error"], json!(null));
    let mut keys = branch["lock_keys"].as_array().expect("lock_keys").clone();
    keys.sort_by_key(|k| k.to_string());
    assert_eq!(
        keys,
        vec![
            json!({"resource": "db1", "schema": "app", "table": "t", "pk": ["1", "y"]}),
            json!({"resource": "db1", "schema": "app", "table": "t", "pk": [{"hex": "00ff"}, "x"]}),
        ]
    );

    let locks = http.get_json("/v1/locks?resource=db1").await?;
    let rows = locks["locks"].as_array().expect("locks");
    assert_eq!(rows.len(), 2, "{locks}");
    for row in rows {
        assert_eq!(row["holder"], xid.as_str());
        assert_eq!(row["branches"], json!([b]));
        assert!(row["since_ms"].as_u64().is_some_and(|t| t > 1_600_000_000_000));
        assert_eq!(row["waiters"], json!([]));
    }
    for (query, n) in [
        ("resource=db2", 0),
        ("schema=app&table=t", 2),
        ("table=other", 0),
        ("schema=other", 0),
        ("limit=1", 1),
    ] {
        let v = http.get_json(&format!("/v1/locks?{query}")).await?;
        assert_eq!(v["locks"].as_array().map(Vec::len), Some(n), "{query}: {v}");
    }

    let second = http.post("/v1/transactions", None).await?;
    assert_eq!(second.status, 201);
    let second = second.json()["xid"].as_str().expect("xid").to_owned();
    let v = http.get_json(&format!("/v1/transactions/{second}")).await?;
    assert_eq!(v["timeout_ms"], 60000, "an empty body means the defaults: {v}");

    let list = |status: &'static str| {
        let http = http.clone();
        async move {
            let v = http.get_json(&format!("/v1/transactions?status={status}")).await?;
            anyhow::Ok(
                v["transactions"]
                    .as_array()
                    .expect("transactions")
                    .iter()
                    .map(|t| t["xid"].as_str().expect("xid").to_owned())
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(list("Begin").await?, vec![xid.clone(), second.clone()], "oldest first");
    assert_eq!(list("begin").await?.len(), 2, "status names are case-insensitive");
    assert!(list("Committed").await?.is_empty());
    let v = http.get_json("/v1/transactions?limit=1").await?;
    assert_eq!(v["transactions"].as_array().map(Vec::len), Some(1));

    let r = http.post(&format!("/v1/transactions/{xid}/commit"), None).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"xid": xid, "status": "AsyncCommitting", "failure": null}),
        "nobody serves db1 yet, so phase 2 is pending"
    );
    // The rows are free at once.
    assert!(held_locks(&http, "").await?.is_empty());
    assert_eq!(list("AsyncCommitting").await?, vec![xid.clone()]);

    let r = http.post(&format!("/v1/transactions/{second}/rollback"), None).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"xid": second, "status": "Rollbacked", "failure": null})
    );
    assert_eq!(list("Rollbacked").await?, vec![second.clone()]);

    // Phase 2 finishes once a resource manager for db1 attaches.
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    wait_status(&c, &xid, G::Committed).await?;
    assert_eq!(rec.actions(), vec![(Commit, b)]);
    let v = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["status"], "Committed", "{v}");
    assert_eq!(v["finished"], true, "{v}");

    let health = http.get("/healthz").await?;
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["status"], "serving", "{h}");
    assert_eq!(h["resource_managers"], 1, "{h}");
    assert_eq!(h["locks_held"], 0, "{h}");

    let metrics = http.get("/metrics").await?;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers.to_ascii_lowercase().contains("text/plain"),
        "{}",
        metrics.headers
    );
    for (series, value) in [
        ("ferrata_tc_global_begins_total", 2.0),
        ("ferrata_tc_global_commits_total", 1.0),
        ("ferrata_tc_global_rollbacks_total", 1.0),
        ("ferrata_tc_branch_registrations_total", 1.0),
        ("ferrata_tc_resource_managers", 1.0),
        (r#"ferrata_tc_global_finished_total{status="Committed"}"#, 1.0),
        (r#"ferrata_tc_global_finished_total{status="Rollbacked"}"#, 1.0),
        // Live transactions by status: none is left.
        (r#"ferrata_tc_transactions{status="Begin"}"#, 0.0),
        (r#"ferrata_tc_transactions{status="AsyncCommitting"}"#, 0.0),
        (r#"ferrata_tc_transactions{status="Committed"}"#, 0.0),
        (r#"ferrata_tc_transactions{status="Rollbacked"}"#, 0.0),
        ("ferrata_tc_locks_held", 0.0),
    ] {
        assert_eq!(
            metric(&metrics.body, series),
            Some(value),
            "{series} in\n{}",
            metrics.body
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_call_answers_after_rollback_wait_ms_and_the_rollback_goes_on() -> Result {
    let tc = Tc::with_config("[transactions]\nrollback_wait_ms = 300\n[phase2]\nretry_initial_ms = 20\n").await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let gate = CancellationToken::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    rec.script(b, [Reply::After(gate.clone(), Box::new(Reply::Ok))]);
    let started = std::time::Instant::now();
    let o = rollback(&c, &xid).await?;
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(status_of(&o), G::Rollbacking, "{o:?}");
    assert!(o.failure.is_none(), "{o:?}");
    // The HTTP call answers the same way.
    let r = tc
        .http()
        .post(&format!("/v1/transactions/{xid}/rollback"), None)
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "Rollbacking");
    gate.cancel();
    wait_status(&c, &xid, G::Rollbacked).await?;
    assert_eq!(
        rec.actions(),
        vec![(Rollback, b)],
        "one attempt, not restarted by the second call"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_or_resolves_a_failed_transaction() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let dirty = || Reply::Unretryable {
        reason: "dirty".into(),
        detail_json: r#"{"dirty_rows": []}"#.into(),
    };
    let why = Some(r#"{"reason": "repaired by hand"}"#);

    // Retry after repairing: the rollback runs again, from the failed branch on.
    let failed = begin(&c, 0).await?;
    let b1 = register(&c, &failed, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &failed, "db1", t_rows(&["2"]), 0).await?;
    rec.script(b2, [dirty()]);
    assert_eq!(status_of(&rollback(&c, &failed).await?), G::RollbackFailed);
    let r = http.post(&format!("/v1/transactions/{failed}/retry"), why).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "Rollbacked", "{r:?}");
    assert_eq!(rec.actions(), vec![(Rollback, b2), (Rollback, b2), (Rollback, b1)]);
    assert!(held_locks(&http, "").await?.is_empty());

    // Resolve by hand: forgotten, rows released, the failed status stays queryable.
    let resolved = begin(&c, 0).await?;
    let b3 = register(&c, &resolved, "db1", t_rows(&["3"]), 0).await?;
    rec.script(b3, [dirty()]);
    assert_eq!(status_of(&rollback(&c, &resolved).await?), G::RollbackFailed);
    let r = http.post(&format!("/v1/transactions/{resolved}/resolve"), why).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["status"], "RollbackFailed", "{r:?}");
    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["3"]), 0).await?;
    let v = http.get_json(&format!("/v1/transactions/{resolved}")).await?;
    assert_eq!(
        (v["status"].as_str(), v["finished"].as_bool()),
        (Some("RollbackFailed"), Some(true)),
        "{v}"
    );
    http.post(&format!("/v1/transactions/{resolved}/retry"), why)
        .await?
        .assert_error(409, "global_status_invalid");

    // A failed commit is retried as a commit.
    let commit_failed = begin(&c, 0).await?;
    let b4 = register(&c, &commit_failed, "db1", t_rows(&["4"]), 0).await?;
    rec.script(b4, [dirty()]);
    commit(&c, &commit_failed).await?;
    wait_status(&c, &commit_failed, G::CommitFailed).await?;
    let r = http
        .post(&format!("/v1/transactions/{commit_failed}/retry"), why)
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    wait_status(&c, &commit_failed, G::Committed).await?;

    // Only failed transactions take either action.
    for action in ["retry", "resolve"] {
        let v = http
            .post(&format!("/v1/transactions/{other}/{action}"), why)
            .await?
            .assert_error(409, "global_status_invalid");
        assert_eq!(v["status"], "Begin", "{v}");
        http.post(&format!("/v1/transactions/1-999999999/{action}"), why)
            .await?
            .assert_error(404, "global_not_found");
    }
    Ok(())
}
