//! Global row locks through the real binary: conflicts, waiting in FIFO order, wait
//! timeouts, failing fast on a rolling-back holder, deadlocks and lock queries.
//!
//! Whether a request is waiting is read from `GET /v1/locks` (its waiters); the order of
//! grants is checked with events (a task finishes only after the release that lets it in).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, holder_of, pb};
use parking_lot::Mutex;
use support::*;
use tokio::task::JoinHandle;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;

/// Registers in the background; the handle answers the branch id or the error.
fn register_bg(
    c: &TcClient,
    xid: &str,
    pks: &[&str],
    lock_wait_ms: u64,
) -> JoinHandle<std::result::Result<u64, tonic::Status>> {
    let c = c.clone();
    let xid = xid.to_owned();
    let pks: Vec<String> = pks.iter().map(|p| p.to_string()).collect();
    tokio::spawn(async move {
        let pks: Vec<&str> = pks.iter().map(String::as_str).collect();
        register(&c, &xid, "db1", t_rows(&pks), lock_wait_ms).await
    })
}

async fn finish<T>(h: JoinHandle<T>) -> Result<T> {
    Ok(tokio::time::timeout(EVENT, h).await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_is_granted_when_the_holder_commits() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();

    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    let t3 = begin(&c, 0).await?;
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;

    let released = Arc::new(AtomicBool::new(false));
    let waiting = {
        let released = Arc::clone(&released);
        let h = register_bg(&c, &t2, &["1"], 15_000);
        tokio::spawn(async move {
            let r = h.await.expect("task");
            (r, released.load(Ordering::SeqCst))
        })
    };
    wait_queue(&http, "1", &t1, &[&t2]).await?;

    // A third request with a short wait times out naming the holder.
    let started = Instant::now();
    let e = register(&c, &t3, "db1", t_rows(&["1"]), 200).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));
    assert!(e.message().contains(&t1), "{e:?}");
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited");
    assert!(!waiting.is_finished(), "T2 waits while T1 holds the row");
    released.store(true, Ordering::SeqCst);
    commit(&c, &t1).await?;
    let (granted, after_release) = finish(waiting).await?;
    let b2 = granted.expect("T2 is granted once T1 commits");
    assert!(after_release, "T2 was granted only after T1's commit was sent");
    let v = http.get_json(&format!("/v1/transactions/{t2}")).await?;
    assert_eq!(v["branches"][0]["branch_id"], b2, "{v}");
    wait_queue(&http, "1", &t2, &[]).await?;

    let metrics = http.get("/metrics").await?.body;
    assert_eq!(metric(&metrics, "ferrata_tc_lock_waits_total"), Some(1.0), "{metrics}");
    assert_eq!(
        metric(&metrics, "ferrata_tc_lock_wait_timeouts_total"),
        Some(1.0),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_are_granted_in_arrival_order() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let t: Vec<String> = {
        let mut t = Vec::new();
        for _ in 0..4 {
            t.push(begin(&c, 0).await?);
        }
        t
    };
    register(&c, &t[0], "db1", t_rows(&["1"]), 0).await?;

    let granted: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut waiting = Vec::new();
    for i in 1..4 {
        let h = register_bg(&c, &t[i], &["1"], 30_000);
        let granted = Arc::clone(&granted);
        let xid = t[i].clone();
        waiting.push(tokio::spawn(async move {
            let r = h.await.expect("task");
            granted.lock().push(xid);
            r
        }));
        // Queue them one at a time so their arrival order is known.
        let queued: Vec<&str> = t[1..=i].iter().map(String::as_str).collect();
        wait_queue(&http, "1", &t[0], &queued).await?;
    }

    // Release by commit: T2 gets the row, the others keep their places.
    commit(&c, &t[0]).await?;
    let mut waiting = waiting.into_iter();
    let b2 = finish(waiting.next().expect("T2")).await?.expect("T2 granted");
    wait_queue(&http, "1", &t[1], &[&t[2], &t[3]]).await?;
    assert_eq!(*granted.lock(), vec![t[1].clone()]);

    // Release by a phase-one failure of the holding branch. (Not by a rollback: rows of a
    // rolling-back holder make the waiters fail fast.)
    report_failed(&c, &t[1], b2).await?;
    finish(waiting.next().expect("T3")).await?.expect("T3 granted");
    wait_queue(&http, "1", &t[2], &[&t[3]]).await?;
    assert_eq!(*granted.lock(), vec![t[1].clone(), t[2].clone()]);

    commit(&c, &t[2]).await?;
    finish(waiting.next().expect("T4")).await?.expect("T4 granted");
    wait_queue(&http, "1", &t[3], &[]).await?;
    assert_eq!(*granted.lock(), t[1..].to_vec());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_all_or_nothing_reentrant_and_keyed_by_every_part() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    let t3 = begin(&c, 0).await?;

    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    // Re-entrant: another branch of the same transaction takes the row again, and more.
    register(&c, &t1, "db1", t_rows(&["1", "2"]), 0).await?;
    let held = http.get_json("/v1/locks?resource=db1").await?;
    let one = held["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .find(|l| l["key"]["pk"] == serde_json::json!(["1"]))
        .expect("row 1");
    assert_eq!(
        one["branches"].as_array().map(Vec::len),
        Some(2),
        "both branches hold row 1: {held}"
    );

    // All or nothing: T2 wants 2 (held) and 3 (free) and gets neither.
    let e = register(&c, &t2, "db1", t_rows(&["3", "2"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));
    register(&c, &t3, "db1", t_rows(&["3"]), 0).await?;

    // Same values, different schema, table, resource or split of a composite key: no
    // conflict with T1's row 1.
    register(&c, &t2, "db1", rows("other", "t", &["1"]), 0).await?;
    register(&c, &t2, "db1", rows("app", "u", &["1"]), 0).await?;
    register(&c, &t2, "db2", t_rows(&["1"]), 0).await?;
    let composite = |a: &str, b: &str| {
        vec![pb::TableLocks {
            schema: "app".into(),
            table: "c".into(),
            rows: vec![pb::PrimaryKey {
                values: vec![a.as_bytes().to_vec(), b.as_bytes().to_vec()],
            }],
        }]
    };
    register(&c, &t1, "db1", composite("a_b", "c"), 0).await?;
    register(&c, &t2, "db1", composite("a", "b_c"), 0).await?;
    let e = register(&c, &t2, "db1", composite("a_b", "c"), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_are_capped_by_max_lock_wait_ms() -> Result {
    let tc = Tc::with_config("[transactions]\nmax_lock_wait_ms = 300\n").await?;
    let c = tc.client().await?;
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    let started = Instant::now();
    let e = tokio::time::timeout(EVENT, register(&c, &t2, "db1", t_rows(&["1"]), 600_000))
        .await
        .expect("the wait is capped well below the asked 10 minutes")
        .unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert!(started.elapsed() >= Duration::from_millis(300));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_rolling_back_holder_fail_fast() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach_with(&c, "rm-hang", &["db1"], &rec, Reply::Hang).await?;

    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    let t3 = begin(&c, 0).await?;
    let b1 = register(&c, &t1, "db1", t_rows(&["1", "2"]), 0).await?;

    // T2 was already waiting when T1 started rolling back: it is refused too.
    let waiting = register_bg(&c, &t2, &["1"], 60_000);
    wait_queue(&http, "1", &t1, &[&t2]).await?;

    let call = tokio::spawn({
        let c = c.clone();
        let t1 = t1.clone();
        async move { rollback(&c, &t1).await }
    });
    let e = finish(waiting).await?.unwrap_err();
    assert_code(&e, ErrorCode::LockHolderRollingBack);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));
    rec.wait_branch(pb::Phase2Action::Rollback, b1).await?;

    // A new request fails at once however long it would wait.
    let started = Instant::now();
    let e = register(&c, &t3, "db1", t_rows(&["3", "2"]), 60_000).await.unwrap_err();
    assert_code(&e, ErrorCode::LockHolderRollingBack);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));
    assert!(e.message().contains(&t1), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "fail fast, no wait");
    // And over HTTP-visible state, the rows are still T1's.
    let mut held = held_locks(&http, "resource=db1").await?;
    held.sort();
    assert_eq!(
        held,
        vec![("1".into(), t1.clone(), vec![]), ("2".into(), t1.clone(), vec![])]
    );

    // A lock query on them fails fast as well.
    let e = lock_query(&c, "", "db1", t_rows(&["2"]), 60_000).await.unwrap_err();
    assert_code(&e, ErrorCode::LockHolderRollingBack);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));

    let metrics = http.get("/metrics").await?.body;
    assert!(
        metric(&metrics, "ferrata_tc_lock_fail_fast_total").is_some_and(|v| v >= 2.0),
        "{metrics}"
    );
    assert!(!call.is_finished());
    call.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_refuses_the_younger_transaction() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let rec = Recorder::new();
    let _rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;

    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?; // younger
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    register(&c, &t2, "db1", t_rows(&["2"]), 0).await?;

    let t1_waits = register_bg(&c, &t1, &["2"], 60_000);
    wait_queue(&http, "2", &t2, &[&t1]).await?;

    let e = tokio::time::timeout(
        Duration::from_secs(10),
        register(&c, &t2, "db1", t_rows(&["1"]), 60_000),
    )
    .await
    .expect("a deadlock is refused at once, not after the wait")
    .unwrap_err();
    assert_code(&e, ErrorCode::Deadlock);
    assert!(e.message().contains(&t1) && e.message().contains(&t2), "{e:?}");
    // T1 keeps waiting: the victim was T2.
    assert!(!t1_waits.is_finished());
    wait_queue(&http, "2", &t2, &[&t1]).await?;

    // T2 gives way. Its rows are then those of a rolling-back transaction, so T1's wait
    // ends in a fail-fast refusal (documented: "including the ones waiting now"), after
    // which T1's retry is granted.
    assert_eq!(status_of(&rollback(&c, &t2).await?), G::Rollbacked);
    let e = finish(t1_waits).await?.unwrap_err();
    assert_code(&e, ErrorCode::LockHolderRollingBack);
    assert_eq!(holder_of(&e).as_deref(), Some(t2.as_str()));
    register(&c, &t1, "db1", t_rows(&["2"]), 0).await?;
    wait_queue(&http, "2", &t1, &[]).await?;
    let metrics = http.get("/metrics").await?.body;
    assert_eq!(metric(&metrics, "ferrata_tc_deadlocks_total"), Some(1.0), "{metrics}");
    // Operators find it in the deadlock history, with the transaction that gave way.
    let history = http.get_json("/v1/deadlocks").await?;
    let d = &history["deadlocks"][0];
    assert_eq!(
        (&d["victim"], &d["table"]),
        (&serde_json::json!(t2), &serde_json::json!("t")),
        "{history}"
    );
    let cycle = d["cycle"].as_array().expect("cycle");
    assert!(
        cycle.contains(&serde_json::json!(t1)) && cycle.contains(&serde_json::json!(t2)),
        "{history}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_victim_is_the_youngest_even_if_it_waited_first() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();

    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?; // younger
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    register(&c, &t2, "db1", t_rows(&["2"]), 0).await?;

    let t2_waits = register_bg(&c, &t2, &["1"], 60_000);
    wait_queue(&http, "1", &t1, &[&t2]).await?;
    let t1_waits = register_bg(&c, &t1, &["2"], 60_000);

    let e = finish(t2_waits).await?.unwrap_err();
    assert_code(&e, ErrorCode::Deadlock);
    // T1 waits on T2's row; committing T2 lets it in.
    wait_queue(&http, "2", &t2, &[&t1]).await?;
    commit(&c, &t2).await?;
    finish(t1_waits).await?.expect("T1 granted after T2's commit");
    wait_queue(&http, "2", &t1, &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_way_deadlock_is_found() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    let t3 = begin(&c, 0).await?;
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    register(&c, &t2, "db1", t_rows(&["2"]), 0).await?;
    register(&c, &t3, "db1", t_rows(&["3"]), 0).await?;
    let _w1 = register_bg(&c, &t1, &["2"], 60_000);
    wait_queue(&http, "2", &t2, &[&t1]).await?;
    let _w2 = register_bg(&c, &t2, &["3"], 60_000);
    wait_queue(&http, "3", &t3, &[&t2]).await?;
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        register(&c, &t3, "db1", t_rows(&["1"]), 60_000),
    )
    .await
    .expect("refused at once")
    .unwrap_err();
    assert_code(&e, ErrorCode::Deadlock);
    for t in [&t1, &t2, &t3] {
        assert!(e.message().contains(t.as_str()), "the cycle is named: {e:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_query_reports_lockable_rows_and_holders() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let http = tc.http();
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;

    // Free rows, for anyone and for a transaction.
    let q = lock_query(&c, "", "db1", t_rows(&["1", "2"]), 0).await?;
    assert!(q.lockable && q.holders.is_empty(), "{q:?}");
    let q = lock_query(&c, &t2, "db1", t_rows(&["1"]), 0).await?;
    assert!(q.lockable, "{q:?}");

    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    // Own rows are lockable.
    let q = lock_query(&c, &t1, "db1", t_rows(&["1", "2"]), 0).await?;
    assert!(q.lockable && q.holders.is_empty(), "{q:?}");
    // Others' are not, and the holder is named.
    for who in ["", t2.as_str()] {
        let q = lock_query(&c, who, "db1", t_rows(&["1", "2"]), 0).await?;
        assert!(!q.lockable, "{q:?}");
        assert_eq!(q.holders.len(), 1, "{q:?}");
        let h = &q.holders[0];
        assert_eq!(h.xid, t1);
        assert_eq!(h.status, G::Begin as i32);
        assert_eq!((h.schema.as_str(), h.table.as_str()), ("app", "t"));
        assert_eq!(h.row.as_ref().map(|r| r.values.clone()), Some(vec![b"1".to_vec()]));
    }
    // A query takes nothing.
    register(&c, &t2, "db1", t_rows(&["2"]), 0).await?;

    // A query that waits answers lockable once the holder commits.
    let released = Arc::new(AtomicBool::new(false));
    let waiting = tokio::spawn({
        let c = c.clone();
        let released = Arc::clone(&released);
        async move {
            let r = lock_query(&c, "", "db1", t_rows(&["1"]), 15_000).await;
            (r, released.load(Ordering::SeqCst))
        }
    });
    // Queries do not queue, so nothing shows they wait; a short query sent after the long
    // one and refused after its whole wait shows the row was still held meanwhile.
    let q = lock_query(&c, "", "db1", t_rows(&["1"]), 300).await?;
    assert!(!q.lockable, "{q:?}");
    assert!(!waiting.is_finished(), "the long query still waits");
    assert!(
        held_locks(&http, "").await?.iter().all(|(_, _, w)| w.is_empty()),
        "queries are not waiters"
    );
    released.store(true, Ordering::SeqCst);
    commit(&c, &t1).await?;
    let (q, after) = finish(waiting).await?;
    let q = q?;
    assert!(q.lockable, "{q:?}");
    assert!(after, "lockable only after the commit");

    let e = lock_query(&c, "", "", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    let e = lock_query(&c, "nonsense", "db1", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    Ok(())
}
