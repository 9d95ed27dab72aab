//! Durability and failover against the real binary: kill -9 and restart on the same data
//! directory, pending phase 2 resuming, resource managers disconnecting or falling silent,
//! and retries triggered by a resource manager attaching.

mod support;

use std::sync::Arc;

use ferrata_rpc::client::{CommandHandler, IgnoreGuards, TcClient, attach};
use ferrata_rpc::{ErrorCode, holder_of, pb};
use serde_json::json;
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;
use pb::Phase2Action::{Commit, Rollback};

async fn healthz(http: &Http) -> Result<serde_json::Value> {
    let r = http.get("/healthz").await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    Ok(r.json())
}

/// Polls /healthz until it reports `n` attached resource managers.
async fn wait_rms(http: &Http, n: u64) -> Result<()> {
    eventually(&format!("{n} attached resource managers"), || {
        let http = http.clone();
        async move { Ok((healthz(&http).await?["resource_managers"] == n).then_some(())) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_acknowledged() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let left = leave_every_state(&tc.client().await?).await?;
    tc.kill9()?;
    tc.restart().await?;
    tc.wait_log(|l| l.contains("restored from the store")).await?;
    check_every_state_kept(&tc.client().await?, &tc.http(), &left).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_that_passes_while_the_coordinator_is_down_rolls_back_after_restart() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let xid = begin(&c, 3000).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    rec.wait_branch(Rollback, b).await?;
    wait_status(&c, &xid, G::TimeoutRollbacked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_phase_two_resumes_what_is_left() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let mut rm1 = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &xid, "db2", t_rows(&["1"]), 0).await?;
    assert_eq!(status_of(&commit(&c, &xid).await?), G::AsyncCommitting);
    rec.wait_branch(Commit, b1).await?;
    rm1.crash();

    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    assert_eq!(status_of(&status(&c, &xid).await?), G::AsyncCommitting);
    let rec = Recorder::new();
    let _rm1 = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let _rm2 = TestRm::attach(&c, "rm-db2", &["db2"], &rec).await?;
    rec.wait_branch(Commit, b2).await?;
    wait_status(&c, &xid, G::Committed).await?;
    // Phase 2 is idempotent, so b1 may be committed again if its end was not yet durable;
    // nothing else may run.
    assert!(
        rec.actions().iter().all(|a| *a == (Commit, b1) || *a == (Commit, b2)),
        "{:?}",
        rec.actions()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rollback_survives_a_restart_with_its_locks_and_detail() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b1 = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let b2 = register(&c, &xid, "db1", t_rows(&["2"]), 0).await?;
    let detail = json!({"dirty_rows": [["2"]]});
    rec.script(
        b2,
        [Reply::Unretryable {
            reason: "dirty".into(),
            detail_json: detail.to_string(),
        }],
    );
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::RollbackFailed);
    let (c, rec, _rm) = kill9_and_reattach(&mut tc, rm).await?;
    let o = status(&c, &xid).await?;
    assert_eq!(status_of(&o), G::RollbackFailed, "{o:?}");
    let f = o.failure.expect("the failure is kept");
    assert_eq!((f.branch_id, f.reason.as_str()), (b2, "dirty"));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&f.detail_json)?, detail);
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    let statuses: Vec<(u64, &str)> = v["branches"]
        .as_array()
        .expect("branches")
        .iter()
        .map(|b| (b["branch_id"].as_u64().unwrap_or(0), b["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(statuses, vec![(b1, "Registered"), (b2, "RollbackFailedUnretryable")]);

    let other = begin(&c, 0).await?;
    for pk in ["1", "2"] {
        let e = register(&c, &other, "db1", t_rows(&[pk]), 30_000).await.unwrap_err();
        assert_code(&e, ErrorCode::LockHolderRollingBack);
        assert_eq!(holder_of(&e).as_deref(), Some(xid.as_str()));
    }
    // A failed end state is not retried after a restart.
    let probe = begin(&c, 0).await?;
    let pb_ = register(&c, &probe, "db1", t_rows(&["probe"]), 0).await?;
    assert_eq!(status_of(&rollback(&c, &probe).await?), G::Rollbacked);
    assert_eq!(rec.actions(), vec![(Rollback, pb_)], "only the probe was rolled back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_fails_over_to_another_rm_when_its_rm_disconnects() -> Result {
    // Long call timeout and heartbeats: only the disconnect can end the first attempt.
    let tc = Tc::with_config(
        "[phase2]\ncall_timeout_ms = 600000\nheartbeat_interval_ms = 60000\nretry_initial_ms = 20\nretry_max_ms = 200\n",
    )
    .await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let mut a = TestRm::attach_with(&c, "rm-a", &["db1"], &rec, Reply::Hang).await?;

    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let call = tokio::spawn({
        let c = c.clone();
        let xid = xid.clone();
        async move { rollback(&c, &xid).await }
    });
    let first = rec.wait_branch(Rollback, b).await?;
    assert_eq!(first.rm, "rm-a");
    let _b = TestRm::attach(&c, "rm-b", &["db1"], &rec).await?;
    wait_rms(&http, 2).await?;

    a.crash();
    let second = rec.wait_commands(2).await?;
    assert_eq!(second[1].rm, "rm-b", "{second:#?}");
    assert_eq!(second[1].branch_ids(), vec![b]);
    let o = tokio::time::timeout(EVENT, call).await??.map_err(anyhow::Error::from)?;
    // The call answers after the first pass (RollbackRetrying) or the second (Rollbacked).
    assert!(matches!(status_of(&o), G::RollbackRetrying | G::Rollbacked), "{o:?}");
    wait_status(&c, &xid, G::Rollbacked).await?;
    wait_rms(&http, 1).await?;
    Ok(())
}

/// `Attachment` says "Dropping it closes the stream". A resource manager whose handler is
/// still busy with a command when the attachment is dropped must disappear from the
/// coordinator at once, so the command fails over, not only after three silent heartbeat
/// intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_attachment_with_a_command_in_flight_closes_the_stream() -> Result {
    let tc = Tc::with_config(
        "[phase2]\ncall_timeout_ms = 600000\nheartbeat_interval_ms = 60000\nretry_initial_ms = 20\nretry_max_ms = 200\n",
    )
    .await?;
    let c = tc.client().await?;
    let http = tc.http();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let handler: CommandHandler = Arc::new(move |command: pb::BranchCommand| {
        let _ = seen_tx.send(command);
        // A handler stuck on its database.
        Box::pin(std::future::pending())
    });
    let attachment = attach(
        &mut c.rm.clone(),
        hello_of("rm-stuck", &["db1"]),
        handler,
        Arc::new(IgnoreGuards),
    )
    .await?;
    let xid = begin(&c, 0).await?;
    register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let _call = tokio::spawn({
        let c = c.clone();
        let xid = xid.clone();
        async move { rollback(&c, &xid).await }
    });
    tokio::time::timeout(EVENT, seen.recv())
        .await?
        .expect("the command arrives");

    drop(attachment);
    // Far below the 180 s of silence the coordinator would otherwise wait for.
    wait_rms(&http, 0).await?;
    let rec = Recorder::new();
    let _b = TestRm::attach(&c, "rm-b", &["db1"], &rec).await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_rm_is_dropped_after_three_heartbeat_intervals() -> Result {
    let tc = Tc::with_config("[phase2]\nheartbeat_interval_ms = 500\n").await?;
    let c = tc.client().await?;
    let http = tc.http();

    let mut silent = raw_attach(&c, hello("rm-silent", &["db1"])).await?;
    match silent.next().await? {
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(w)),
        }) => assert_eq!(w.heartbeat_interval_ms, 500),
        other => panic!("expected Welcome, got {other:?}"),
    }
    match silent.next().await? {
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Guards(u)),
        }) => assert!(u.full, "{u:?}"),
        other => panic!("expected the complete guard set, got {other:?}"),
    }
    // A well-behaved resource manager stays attached meanwhile.
    let rec = Recorder::new();
    let _alive = TestRm::attach(&c, "rm-alive", &["db1"], &rec).await?;

    // The coordinator heartbeats, then ends the silent stream.
    let mut heartbeats = 0;
    let ended = loop {
        match silent.next().await {
            Ok(Some(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Heartbeat(_)),
            })) => heartbeats += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    assert!(heartbeats >= 1, "the coordinator sends heartbeats");
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    wait_rms(&http, 1).await?;
    tc.wait_log(|l| l.contains("resource manager detached") && l.contains("rm-silent"))
        .await?;

    // Commands now go to the live one only.
    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::Rollbacked);
    assert_eq!(rec.actions(), vec![(Rollback, b)]);
    drop(silent.tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attaching_rm_triggers_pending_phase_two_at_once() -> Result {
    // Retries would otherwise wait a minute.
    let tc = Tc::with_config("[phase2]\nretry_initial_ms = 60000\nretry_max_ms = 60000\n").await?;
    let c = tc.client().await?;

    let rolling = begin(&c, 0).await?;
    let rb = register(&c, &rolling, "db1", t_rows(&["1"]), 0).await?;
    let o = rollback(&c, &rolling).await?;
    assert_eq!(status_of(&o), G::RollbackRetrying, "{o:?}");
    let committing = begin(&c, 0).await?;
    let cb = register(&c, &committing, "db1", t_rows(&["2"]), 0).await?;
    assert_eq!(status_of(&commit(&c, &committing).await?), G::AsyncCommitting);
    // Make sure the first commit attempt (which finds nobody) has happened, so the next one
    // is a minute away unless the attach triggers it.
    tc.wait_log(|l| l.contains("branch commit failed; will retry")).await?;

    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    // EVENT (20 s) is well below the 60 s backoff.
    rec.wait_branch(Rollback, rb).await?;
    rec.wait_branch(Commit, cb).await?;
    wait_status(&c, &rolling, G::Rollbacked).await?;
    wait_status(&c, &committing, G::Committed).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_announced_later_gets_its_phase_two() -> Result {
    // Retries would otherwise wait a minute.
    let tc = Tc::with_config("[phase2]\nretry_initial_ms = 60000\nretry_max_ms = 60000\n").await?;
    let c = tc.client().await?;
    let xid = begin(&c, 0).await?;
    let branch = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;

    // A resource manager that serves nothing yet (a proxy before its first write).
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let handler: CommandHandler = Arc::new(move |command: pb::BranchCommand| {
        let _ = seen_tx.send(command.clone());
        Box::pin(async move {
            command
                .branches
                .iter()
                .map(|b| pb::BranchOutcome {
                    branch_id: b.branch_id,
                    status: pb::BranchStatus::PhaseTwoRollbacked as i32,
                    reason: String::new(),
                    detail_json: String::new(),
                    ..Default::default()
                })
                .collect()
        })
    });
    let attachment = attach(
        &mut c.rm.clone(),
        hello_of("rm-later", &[]),
        handler,
        Arc::new(IgnoreGuards),
    )
    .await?;
    let o = rollback(&c, &xid).await?;
    assert_eq!(status_of(&o), G::RollbackRetrying, "nobody serves db1 yet: {o:?}");

    assert!(attachment.announce(vec!["db1".to_owned()]).await);
    let command = tokio::time::timeout(EVENT, seen.recv())
        .await?
        .expect("the rollback arrives");
    assert_eq!(command.branches[0].branch_id, branch);
    wait_status(&c, &xid, G::Rollbacked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_batched_up_to_commit_batch() -> Result {
    let tc = Tc::with_config(&format!("{FAST_CONFIG}commit_batch = 2\n")).await?;
    let c = tc.client().await?;
    let xid = begin(&c, 0).await?;
    let mut ids = Vec::new();
    for pk in ["1", "2", "3"] {
        ids.push(register(&c, &xid, "db1", t_rows(&[pk]), 0).await?);
    }
    commit(&c, &xid).await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    wait_status(&c, &xid, G::Committed).await?;
    let commands = rec.commands();
    let mut sizes: Vec<usize> = commands.iter().map(|r| r.branches.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 2], "{commands:#?}");
    let mut all: Vec<u64> = commands.iter().flat_map(|r| r.branch_ids()).collect();
    all.sort_unstable();
    assert_eq!(all, ids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_answer_is_retried() -> Result {
    // A command answered without an outcome for the branch counts as a retryable failure.
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler: CommandHandler = Arc::new(move |command: pb::BranchCommand| {
        let _ = seen_tx.send(command.clone());
        let first = !answered.swap(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if first {
                Vec::new()
            } else {
                command
                    .branches
                    .iter()
                    .map(|b| pb::BranchOutcome {
                        branch_id: b.branch_id,
                        status: pb::BranchStatus::PhaseTwoRollbacked as i32,
                        reason: String::new(),
                        detail_json: String::new(),
                        ..Default::default()
                    })
                    .collect()
            }
        })
    });
    let _attachment = attach(
        &mut c.rm.clone(),
        hello_of("rm-forgetful", &["db1"]),
        handler,
        Arc::new(IgnoreGuards),
    )
    .await?;
    let xid = begin(&c, 0).await?;
    register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    let o = rollback(&c, &xid).await?;
    if status_of(&o) == G::RollbackRetrying {
        let f = o.failure.expect("failure");
        assert!(f.reason.contains("did not cover"), "{f:?}");
    }
    wait_status(&c, &xid, G::Rollbacked).await?;
    let first = tokio::time::timeout(EVENT, seen.recv()).await?.expect("command");
    let second = tokio::time::timeout(EVENT, seen.recv()).await?.expect("retried");
    assert_eq!(first.branches[0].branch_id, second.branches[0].branch_id);
    Ok(())
}

/// Commits `n` one-branch transactions on db1 (served by the recorder's resource manager) to
/// the end, then makes one durable write: the journal commits in order, so every finish
/// submitted before it is durable too.
async fn finish_committed(c: &TcClient, n: usize) -> Result<Vec<String>> {
    let mut xids = Vec::new();
    for _ in 0..n {
        let xid = begin(c, 0).await?;
        register(c, &xid, "db1", t_rows(&[&xid]), 0).await?;
        commit(c, &xid).await?;
        wait_status(c, &xid, G::Committed).await?;
        xids.push(xid);
    }
    let barrier = begin(c, 0).await?;
    register(c, &barrier, "db1", t_rows(&[&barrier]), 0).await?;
    Ok(xids)
}

/// `Some` once the coordinator no longer knows `xid`.
async fn forgotten(c: &TcClient, xid: &str) -> Option<()> {
    let e = status(c, xid).await.err()?;
    (code(&e) == ErrorCode::GlobalNotFound.as_str()).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_outcomes_survive_kill9_so_a_lost_commit_answer_can_be_learned() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let mut rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let committed = finish_committed(&c, 1).await?.remove(0);
    let rolled = begin(&c, 0).await?;
    register(&c, &rolled, "db1", t_rows(&["r"]), 0).await?;
    assert_eq!(status_of(&rollback(&c, &rolled).await?), G::Rollbacked);
    finish_committed(&c, 0).await?;
    rm.crash();

    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    // No resource manager attached: an outcome restored as unfinished would stay unfinished.
    assert_eq!(status_of(&status(&c, &committed).await?), G::Committed);
    assert_eq!(status_of(&status(&c, &rolled).await?), G::Rollbacked);
    // A COMMIT GLOBAL repeated after the restart learns that it committed, and a repeated
    // ROLLBACK GLOBAL that it rolled back; the opposite decision is refused.
    assert_eq!(status_of(&commit(&c, &committed).await?), G::Committed);
    assert_eq!(status_of(&rollback(&c, &rolled).await?), G::Rollbacked);
    assert_code(
        &rollback(&c, &committed).await.unwrap_err(),
        ErrorCode::GlobalStatusInvalid,
    );
    assert_code(&commit(&c, &rolled).await.unwrap_err(), ErrorCode::GlobalStatusInvalid);
    let v = tc.http().get_json(&format!("/v1/transactions/{committed}")).await?;
    assert_eq!(
        (v["status"].as_str(), v["finished"].as_bool()),
        (Some("Committed"), Some(true)),
        "{v}"
    );
    assert_eq!(v["branch_count"], 1, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_outcomes_are_forgotten_by_count_in_memory_and_in_the_store() -> Result {
    let config = FAST_CONFIG.replacen("[transactions]\n", "[transactions]\nfinished_history = 2\n", 1);
    let mut tc = Tc::with_config(&config).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let mut rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xids = finish_committed(&c, 3).await?;
    eventually("the oldest outcome forgotten", || {
        let c = c.clone();
        let oldest = xids[0].clone();
        async move { Ok(forgotten(&c, &oldest).await) }
    })
    .await?;
    let m = tc.http().get("/metrics").await?.body;
    assert_eq!(metric(&m, "ferrata_tc_finished_kept"), Some(2.0), "{m}");
    // The Forget is detached; one more durable write puts it on disk before the kill.
    finish_committed(&c, 0).await?;
    rm.crash();
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    assert_code(&status(&c, &xids[0]).await.unwrap_err(), ErrorCode::GlobalNotFound);
    for xid in &xids[1..] {
        assert_eq!(status_of(&status(&c, xid).await?), G::Committed);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_outcomes_are_forgotten_after_their_retention() -> Result {
    let config = FAST_CONFIG.replacen("[transactions]\n", "[transactions]\nfinished_retention_ms = 300\n", 1);
    let tc = Tc::with_config(&config).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = finish_committed(&c, 1).await?.remove(0);
    eventually("the outcome forgotten after 300 ms", || {
        let c = c.clone();
        let xid = xid.clone();
        async move { Ok(forgotten(&c, &xid).await) }
    })
    .await?;
    Ok(())
}
