//! Each transaction's timeline (`GET /v1/transactions/{xid}/events`) and version, against the
//! real binary: what the events say, that every change bumps the version, and that a failed
//! transaction's timeline and a finished one's survive kill -9.

mod support;

use ferrata_rpc::ErrorCode;
use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use ferrata_rpc::pb::GlobalStatus as G;

async fn timeline(tc: &Tc, xid: &str) -> Result<Value> {
    tc.http().get_json(&format!("/v1/transactions/{xid}/events")).await
}

/// The event types, in order.
fn types(t: &Value) -> Vec<String> {
    t["events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["type"].as_str().unwrap_or("?").to_owned()).collect())
        .unwrap_or_default()
}

fn events_of<'a>(t: &'a Value, kind: &str) -> Vec<&'a Value> {
    t["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// Versions rise with every event, and the timeline's version is the last one's.
fn assert_versions(t: &Value) {
    let versions: Vec<u64> = t["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["version"].as_u64().expect("version"))
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(Some(&t["version"].as_u64().expect("version")), versions.last(), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirty_rollbacks_timeline_survives_kill9_and_goes_on_after_an_operators_retry() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    // Row 5 is held by `holder`; the transaction's first branch waits for it.
    let holder = begin(&c, 0).await?;
    register(&c, &holder, "db1", t_rows(&["5"]), 0).await?;
    let xid = begin(&c, 0).await?;
    let waiting = {
        let (c, xid) = (c.clone(), xid.clone());
        tokio::spawn(async move { register(&c, &xid, "db1", t_rows(&["1", "5"]), 30_000).await })
    };
    eventually("the branch to queue for row 5", || {
        let http = tc.http();
        async move {
            let locks = http.get_json("/v1/locks").await?;
            Ok((locks["locks"][0]["waiters"].as_array().map_or(0, Vec::len) == 1).then_some(()))
        }
    })
    .await?;
    commit(&c, &holder).await?;
    let b1 = waiting.await??;
    let b2 = register(&c, &xid, "db1", t_rows(&["2"]), 0).await?;
    // A branch on rows this transaction holds is refused: that is part of the story too.
    let other = begin(&c, 0).await?;
    let refused = register(&c, &other, "db1", t_rows(&["2"]), 0).await.unwrap_err();
    assert_code(&refused, ErrorCode::LockWaitTimeout);

    let detail = json!({"rows": [{"primary_key": ["2"], "state": "changed"}]});
    rec.script(
        b2,
        [
            Reply::Retryable("resource busy".into()),
            Reply::Retryable("resource busy".into()),
            Reply::Unretryable {
                reason: "rows changed outside the global transaction".into(),
                detail_json: detail.to_string(),
            },
        ],
    );
    rollback(&c, &xid).await?;
    wait_status(&c, &xid, G::RollbackFailed).await?;

    let t = timeline(&tc, &xid).await?;
    assert_eq!(
        types(&t),
        [
            "begun",
            "lock_waited",
            "branch_registered",
            "branch_registered",
            "decided",
            "phase_two",
            "phase_two_failed"
        ],
        "{t:#}"
    );
    assert_versions(&t);
    let e = &t["events"];
    assert_eq!(e[1]["holders"], json!([holder]), "{t:#}");
    assert_eq!(e[1]["branch_id"], b1);
    assert_eq!((&e[2]["branch_id"], &e[2]["lock_keys"]), (&json!(b1), &json!(2)));
    assert_eq!(
        (&e[4]["decision"], &e[4]["by"]),
        (&json!("rollback"), &json!("application"))
    );
    // Two retries with the same reason are one event.
    assert_eq!(
        (&e[5]["branch_id"], &e[5]["result"], &e[5]["attempts"], &e[5]["reason"]),
        (&json!(b2), &json!("retry"), &json!(2), &json!("resource busy")),
        "{t:#}"
    );
    assert!(e[5]["next_attempt_ms"].as_u64() >= e[5]["at_ms"].as_u64());
    assert_eq!(e[6]["detail"], detail);
    let version = t["version"].as_u64().expect("version");
    let show = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(show["version"], version);
    let refusals = events_of(&timeline(&tc, &other).await?, "registration_refused")
        .into_iter()
        .map(|e| (e["code"].clone(), e["holder"].clone()))
        .collect::<Vec<_>>();
    assert_eq!(refusals, [(json!("lock_wait_timeout"), json!(xid))]);

    // Kill -9: the failed transaction's timeline is still there, and a restart is recorded.
    let (c, _rec, _rm) = kill9_and_reattach(&mut tc, rm).await?;
    let after = timeline(&tc, &xid).await?;
    assert_eq!(
        after["events"].as_array().map(|a| a[..7].to_vec()),
        t["events"].as_array().cloned()
    );
    assert_eq!(types(&after).last().map(String::as_str), Some("restored"));
    assert_eq!(after["version"], version + 1);

    // The operator's retry, with its reason, rolls the rest back.
    let r = tc
        .http()
        .post(
            &format!("/v1/transactions/{xid}/retry"),
            Some(r#"{"reason": "row 2 repaired by hand, ticket 7"}"#),
        )
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    wait_status(&c, &xid, G::Rollbacked).await?;
    let done = timeline(&tc, &xid).await?;
    assert_eq!(
        types(&done)[8..],
        [
            "operator_action",
            "phase_two",
            "locks_released",
            "phase_two",
            "locks_released",
            "finished"
        ],
        "{done:#}"
    );
    assert_versions(&done);
    let action = events_of(&done, "operator_action")[0];
    assert_eq!(
        (&action["action"], &action["reason"]),
        (&json!("retry"), &json!("row 2 repaired by hand, ticket 7"))
    );
    assert_eq!(events_of(&done, "finished")[0]["status"], "Rollbacked");

    // Finished, it is remembered with its timeline across another kill -9 (the Finish is
    // detached: one more durable write puts it on disk first).
    let probe = begin(&c, 0).await?;
    register(&c, &probe, "db1", t_rows(&["probe"]), 0).await?;
    tc.kill9()?;
    tc.restart().await?;
    assert_eq!(timeline(&tc, &xid).await?, done);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeline_says_who_decided() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let committed = begin(&c, 0).await?;
    let b = register(&c, &committed, "db1", t_rows(&["1"]), 0).await?;
    commit(&c, &committed).await?;
    wait_status(&c, &committed, G::Committed).await?;
    let t = timeline(&tc, &committed).await?;
    assert_eq!(
        types(&t),
        [
            "begun",
            "branch_registered",
            "decided",
            "locks_released",
            "phase_two",
            "finished"
        ],
        "{t:#}"
    );
    assert_versions(&t);
    let e = &t["events"];
    assert_eq!(
        (&e[2]["decision"], &e[2]["by"]),
        (&json!("commit"), &json!("application"))
    );
    assert_eq!((&e[4]["branch_id"], &e[4]["result"]), (&json!(b), &json!("done")));

    let timed_out = begin(&c, 100).await?;
    register(&c, &timed_out, "db1", t_rows(&["2"]), 0).await?;
    wait_status(&c, &timed_out, G::TimeoutRollbacked).await?;
    let t = timeline(&tc, &timed_out).await?;
    let decided = events_of(&t, "decided");
    assert_eq!(decided.len(), 1);
    assert_eq!(
        (&decided[0]["decision"], &decided[0]["by"]),
        (&json!("rollback"), &json!("timeout"))
    );
    assert_eq!(events_of(&t, "finished")[0]["status"], "TimeoutRollbacked");

    let r = tc.http().get("/v1/transactions/1-999999/events").await?;
    assert_eq!((r.status, r.json()["code"].clone()), (404, json!("global_not_found")));
    Ok(())
}
