//! A DBA resolves a dirty rollback through the coordinator's API, with a real `ferrata-tc`, a
//! real `ferrata-proxy` and MariaDB: inspect the rows with their types and digests, accept one
//! row's current values, restore another's before image, each in one local transaction with a
//! `ferrata_audit` row; a stale digest is refused with the fresh rows; a dry run changes
//! nothing; the retried rollback then finishes, and the audit names every step. Accepting a
//! whole branch finishes the rollback; resolving can delete the undo records left.

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::dirty::{self, audit_rows, table};
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::undo_records;
use mysql_async::prelude::*;
use serde_json::{Value, json};

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// The servers of `dirty::servers` with a dirty rollback whose `rows` changed outside: the
/// XID, the failed branch and the path of its routes.
async fn dirty_rollback(rows: &[i32]) -> Result<(MariaDb, Coordinator, ProxyProcess, String, u64, String)> {
    let (db, tc, proxy) = dirty::servers(TC, PROXY).await?;
    let (xid, branch) = dirty::rollback(&db, &proxy, &tc, rows).await?;
    let base = format!("/v1/transactions/{xid}/branches/{branch}");
    Ok((db, tc, proxy, xid, branch, base))
}

/// An operator's retry, which must finish the rollback.
async fn retry_to_the_end(tc: &Coordinator, xid: &str, reason: &str) -> Result<()> {
    let (status, done) = tc
        .post(&format!("/v1/transactions/{xid}/retry"), &json!({ "reason": reason }))
        .await?;
    anyhow::ensure!(status == 200 && done["status"] == "Rollbacked", "{status} {done}");
    Ok(())
}

fn row<'a>(inspected: &'a Value, id: &str) -> &'a Value {
    inspected["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["primary_key"]["id"] == id))
        .unwrap_or_else(|| panic!("row {id} in {inspected:#}"))
}

fn column<'a>(row: &'a Value, name: &str) -> &'a Value {
    row["columns"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["column"] == name))
        .unwrap_or_else(|| panic!("column {name} in {row:#}"))
}

#[tokio::test]
async fn a_dba_accepts_one_row_restores_another_and_the_retried_rollback_finishes() -> Result<()> {
    let (db, tc, _proxy, xid, _, base) = dirty_rollback(&[1, 2]).await?;

    // The rows as they are now: two changed outside, one as the transaction left it.
    let seen = tc.get(&format!("{base}/dirty")).await?;
    assert_eq!(
        (&seen["row_count"], &seen["dirty_rows"]),
        (&json!(3), &json!(2)),
        "{seen:#}"
    );
    let (one, two) = (row(&seen, "1"), row(&seen, "2"));
    assert_eq!(
        (&one["state"], &two["state"], &row(&seen, "3")["state"]),
        (&json!("changed"), &json!("changed"), &json!("clean"))
    );
    let note = column(one, "note");
    assert_eq!(note["type"], "varchar(20)");
    assert_eq!(note["display"], json!({"before": "a", "after": "a!", "current": "x1"}));
    assert_eq!(note["differs"], true);
    let amount = column(one, "amount");
    assert_eq!(
        (&amount["type"], &amount["before"], &amount["after"], &amount["current"]),
        (&json!("decimal(10,2)"), &json!("1.00"), &json!("2.00"), &json!("2.00"))
    );
    assert_eq!(amount["differs"], false);
    let version = seen["version"].as_u64().expect("version");

    // A digest that is not what the rows hold now is refused, with the rows as they are.
    let stale = json!({ "reason": "keep the fix", "rows": [{ "row": one["row"], "digest": "00" }] });
    let (status, e) = tc.post(&format!("{base}/accept"), &stale).await?;
    assert_eq!((status, &e["code"]), (409, &json!("precondition_failed")), "{e}");
    assert_eq!(e["detail"]["rows"][0]["digest"], one["digest"], "{e}");
    // Nor without a reason.
    let (status, e) = tc
        .post(
            &format!("{base}/accept"),
            &json!({ "rows": [{ "row": one["row"], "digest": one["digest"] }] }),
        )
        .await?;
    assert_eq!((status, &e["code"]), (400, &json!("reason_required")), "{e}");

    // A dry run says what would happen and changes nothing.
    let accept_one = json!({
        "reason": "support fixed note 1 by hand, ticket 7: keep it",
        "expect_version": version,
        "rows": [{ "row": one["row"], "digest": one["digest"] }],
    });
    let mut dry = accept_one.clone();
    dry["dry_run"] = json!(true);
    let before_tables = table(&db).await?;
    let (status, would) = tc.post(&format!("{base}/accept"), &dry).await?;
    assert_eq!(status, 200, "{would}");
    assert_eq!(
        (&would["dry_run"], &would["remaining_dirty"]),
        (&json!(true), &json!(1)),
        "{would:#}"
    );
    assert_eq!(table(&db).await?, before_tables);
    assert!(audit_rows(&db).await?.is_empty(), "a dry run writes no audit row");
    assert_eq!(tc.get(&format!("/v1/transactions/{xid}")).await?["version"], version);

    // Accept row 1: it keeps today's values; its lock goes.
    let locks_before = tc.get("/v1/locks").await?["locks"].as_array().map_or(0, Vec::len);
    let (status, accepted) = tc.post(&format!("{base}/accept"), &accept_one).await?;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(
        (
            &accepted["locks_released"],
            &accepted["remaining_dirty"],
            &accepted["branch_done"]
        ),
        (&json!(1), &json!(1), &json!(false)),
        "{accepted:#}"
    );
    assert_eq!(
        tc.get("/v1/locks").await?["locks"].as_array().map_or(0, Vec::len),
        locks_before - 1
    );
    // The version moved: acting on what was seen before is refused.
    let (status, e) = tc.post(&format!("{base}/accept"), &accept_one).await?;
    assert_eq!((status, &e["code"]), (409, &json!("precondition_failed")), "{e}");

    // Restore row 2: its before image overwrites the outside change.
    let seen = tc.get(&format!("{base}/dirty")).await?;
    assert_eq!(seen["row_count"], 2, "row 1 left the undo record: {seen:#}");
    let two = row(&seen, "2");
    let restore_two = json!({
        "reason": "the outside change to row 2 was a mistake, ticket 8",
        "expect_version": seen["version"],
        "rows": [{ "row": two["row"], "digest": two["digest"] }],
    });
    let (status, restored) = tc.post(&format!("{base}/restore"), &restore_two).await?;
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["remaining_dirty"], 0, "{restored:#}");
    assert!(
        restored["statements"][0]["sql"]
            .as_str()
            .is_some_and(|s| s.starts_with("UPDATE")),
        "{restored:#}"
    );
    assert_eq!(
        table(&db).await?,
        [
            (1, "x1".into(), "2.00".into()),
            (2, "b".into(), "2.00".into()),
            (3, "c!".into(), "4.00".into())
        ]
    );

    // The business database says what was done to it, and why.
    let audit = audit_rows(&db).await?;
    assert_eq!(audit.len(), 2);
    assert_eq!((audit[0].1.as_str(), audit[0].2.as_str()), ("accept", "local"));
    assert_eq!(audit[1].1, "restore");
    assert!(audit[1].3.contains("ticket 8"));
    let overwritten: Value = serde_json::from_str(&audit[1].4)?;
    assert_eq!(
        column(&overwritten["rows"][0], "note")["display"]["current"],
        "x2",
        "{overwritten:#}"
    );

    // Nothing dirty is left: a retry's dry run says so, and the retry finishes the rollback.
    let (status, would) = tc
        .post(
            &format!("/v1/transactions/{xid}/retry"),
            &json!({ "reason": "rows settled", "dry_run": true }),
        )
        .await?;
    assert_eq!((status, &would["still_dirty"]), (200, &json!(false)), "{would:#}");
    retry_to_the_end(&tc, &xid, "rows settled").await?;
    assert_eq!(
        table(&db).await?,
        [
            (1, "x1".into(), "2.00".into()),
            (2, "b".into(), "2.00".into()),
            (3, "c".into(), "3.00".into())
        ]
    );
    assert_eq!(undo_records(&db).await?, 0);

    // The coordinator's audit has each step, linked to the business database's rows.
    let records = tc.get(&format!("/v1/audit?xid={xid}")).await?;
    let actions: Vec<&str> = records["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(actions, ["dirty.accept", "dirty.restore", "retry"]);
    assert_eq!(records["records"][0]["target"]["action_id"], json!(audit[0].0));
    assert_eq!(records["records"][1]["target"]["action_id"], json!(audit[1].0));
    assert_eq!(tc.get("/v1/audit/verify").await?["ok"], true);
    Ok(())
}

#[tokio::test]
async fn accepting_a_whole_branch_finishes_the_rollback_and_resolve_can_delete_the_undo() -> Result<()> {
    let (db, tc, proxy, xid, _, base) = dirty_rollback(&[3]).await?;
    let seen = tc.get(&format!("{base}/dirty")).await?;
    let blind = json!({ "reason": "keep everything", "all": true });
    let (status, e) = tc.post(&format!("{base}/restore"), &blind).await?;
    assert_eq!(
        (status, &e["code"]),
        (400, &json!("invalid_argument")),
        "all rows only as seen: {e}"
    );
    let all = json!({ "reason": "keep everything as it is", "all": true, "branch_digest": seen["branch_digest"] });
    let (status, done) = tc.post(&format!("{base}/accept"), &all).await?;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        (&done["branch_done"], &done["status"]),
        (&json!(true), &json!("Rollbacked")),
        "{done:#}"
    );
    assert_eq!(undo_records(&db).await?, 0);
    assert!(
        tc.get("/v1/locks").await?["locks"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    let t = tc.get(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!((&t["status"], &t["finished"]), (&json!("Rollbacked"), &json!(true)));

    // Another dirty rollback, resolved with its undo record deleted by the proxy.
    let (xid, _) = dirty::rollback(&db, &proxy, &tc, &[2]).await?;
    let resolve = |dry_run| json!({ "reason": "fixed by hand, ticket 9", "delete_undo": true, "dry_run": dry_run });
    let (status, would) = tc
        .post(&format!("/v1/transactions/{xid}/resolve"), &resolve(true))
        .await?;
    assert_eq!(
        (status, &would["undo_discarded"][0]["undo_record_deleted"]),
        (200, &json!(true)),
        "{would:#}"
    );
    assert_eq!(undo_records(&db).await?, 1, "a dry run deletes nothing");
    let (status, resolved) = tc
        .post(&format!("/v1/transactions/{xid}/resolve"), &resolve(false))
        .await?;
    assert_eq!((status, &resolved["forgotten"]), (200, &json!(true)), "{resolved}");
    assert_eq!(undo_records(&db).await?, 0);
    let discards: Vec<(String, String, String, String, String)> = audit_rows(&db).await?;
    assert_eq!(
        discards.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["accept", "discard"]
    );
    Ok(())
}

/// `t` in a database, ready for [`a_dirty_rollback_through_two_proxies_is_settled_branch_by_branch_across_a_kill9`].
async fn bank(tc: &Coordinator) -> Result<(MariaDb, ProxyProcess)> {
    let db = MariaDb::start().await?;
    db.conn()
        .await?
        .query_drop(
            "CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(20), amount DECIMAL(10,2));
             INSERT INTO t VALUES (1, 'a', 1.00), (2, 'b', 2.00)",
        )
        .await?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 500)?;
    Ok((db, proxy))
}

#[tokio::test]
async fn a_dirty_rollback_through_two_proxies_is_settled_branch_by_branch_across_a_kill9() -> Result<()> {
    let mut tc = Coordinator::start(TC)?;
    let (db_a, proxy_a) = bank(&tc).await?;
    let (db_b, proxy_b) = bank(&tc).await?;
    // One global transaction, a branch on each database.
    let (mut a, mut b) = (proxy_a.conn().await?, proxy_b.conn().await?);
    let xid = ferrata_tests::start_global(&mut a).await?;
    a.query_drop("UPDATE t SET note = CONCAT(note, '!')").await?;
    b.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
    b.query_drop("UPDATE t SET amount = amount + 1").await?;
    b.query_drop("LEAVE GLOBAL TRANSACTION").await?;
    // Both databases get an outside change.
    db_a.conn()
        .await?
        .query_drop("UPDATE t SET note = 'outside' WHERE id = 1")
        .await?;
    db_b.conn()
        .await?
        .query_drop("UPDATE t SET amount = 99 WHERE id = 2")
        .await?;
    assert!(a.query_drop("ROLLBACK GLOBAL").await.is_err());

    // The rollback stopped at the last branch (database B): restore its row there.
    let t = tc.get(&format!("/v1/transactions/{xid}")).await?;
    let branch_b = t["failure"]["branch_id"].as_u64().expect("a failed branch");
    let seen = tc
        .get(&format!("/v1/transactions/{xid}/branches/{branch_b}/dirty"))
        .await?;
    assert_eq!(
        seen["resource_id"]
            .as_str()
            .map(|r| r.ends_with(&format!("{}/test", db_b.port()))),
        Some(true),
        "{seen}"
    );
    let two = row(&seen, "2");
    assert_eq!(column(two, "amount")["current"], "99.00");
    let restore =
        json!({ "reason": "B: amount 99 was a typo", "rows": [{ "row": two["row"], "digest": two["digest"] }] });
    let (status, r) = tc
        .post(&format!("/v1/transactions/{xid}/branches/{branch_b}/restore"), &restore)
        .await?;
    assert_eq!(status, 200, "{r}");

    // The coordinator is killed and comes back: the transaction, its timeline and the audit
    // are all there, and the proxies attach again.
    tc.kill9_and_restart()?;
    let events = tc.get(&format!("/v1/transactions/{xid}/events")).await?;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert!(
        kinds.contains(&"operator_action") && kinds.last() == Some(&"restored"),
        "{kinds:?}"
    );
    assert_eq!(tc.get("/v1/audit/verify").await?["records"], 1);
    ferrata_tests::until("both proxies to attach again", async || {
        Ok(tc.get("/healthz").await?["resource_managers"] == 2)
    })
    .await?;

    // The retry rolls B back and stops at A, whose row 1 changed outside: accept it.
    let (status, r) = tc
        .post(
            &format!("/v1/transactions/{xid}/retry"),
            &json!({ "reason": "B settled" }),
        )
        .await?;
    assert_eq!((status, &r["status"]), (200, &json!("RollbackFailed")), "{r}");
    let branch_a = r["failure"]["branch_id"].as_u64().expect("the next failed branch");
    assert_ne!(branch_a, branch_b);
    let seen = tc
        .get(&format!("/v1/transactions/{xid}/branches/{branch_a}/dirty"))
        .await?;
    let all = json!({ "reason": "A: keep the outside note", "all": true, "branch_digest": seen["branch_digest"] });
    let (status, r) = tc
        .post(&format!("/v1/transactions/{xid}/branches/{branch_a}/accept"), &all)
        .await?;
    assert_eq!((status, &r["status"]), (200, &json!("Rollbacked")), "{r}");

    assert_eq!(
        table(&db_a).await?[..2],
        [(1, "outside".into(), "1.00".into()), (2, "b!".into(), "2.00".into())]
    );
    assert_eq!(
        table(&db_b).await?[..2],
        [(1, "a".into(), "1.00".into()), (2, "b".into(), "2.00".into())]
    );
    assert_eq!((undo_records(&db_a).await?, undo_records(&db_b).await?), (0, 0));
    assert_eq!(
        audit_rows(&db_a).await?.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        ["accept"]
    );
    assert_eq!(
        audit_rows(&db_b).await?.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        ["restore"]
    );
    let actions: Vec<Value> = tc.get(&format!("/v1/audit?xid={xid}")).await?["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["action"].clone())
        .collect();
    assert_eq!(actions, [json!("dirty.restore"), json!("retry"), json!("dirty.accept")]);
    assert_eq!(tc.get("/v1/audit/verify").await?["ok"], true);
    Ok(())
}

#[tokio::test]
async fn one_operator_action_at_a_time_per_transaction() -> Result<()> {
    let (db, tc, _proxy, xid, branch, base) = dirty_rollback(&[1]).await?;
    let seen = tc.get(&format!("{base}/dirty")).await?;
    let one = row(&seen, "1");
    // Someone holds row 1 directly: the restore waits for it inside the proxy.
    let mut blocker = ferrata_tests::lock_directly(&db, "t", 1).await?;
    let restore =
        json!({ "reason": "undo the outside note", "rows": [{ "row": one["row"], "digest": one["digest"] }] });
    let (http, path) = (tc.http, format!("{base}/restore"));
    let running = tokio::spawn(async move { ferrata_tests::http_post(http, &path, &restore.to_string()).await });
    ferrata_tests::a_lock_wait(&db).await?;
    // Meanwhile every other action on the transaction is refused.
    for (action, body) in [
        ("retry", json!({ "reason": "r" })),
        ("resolve", json!({ "reason": "r" })),
        (
            &format!("branches/{branch}/accept")[..],
            json!({ "reason": "r", "rows": [{ "row": one["row"], "digest": one["digest"] }] }),
        ),
    ] {
        let (status, e) = tc.post(&format!("/v1/transactions/{xid}/{action}"), &body).await?;
        assert_eq!(
            (status, &e["code"]),
            (409, &json!("precondition_failed")),
            "{action}: {e}"
        );
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("another operator action")),
            "{e}"
        );
    }
    blocker.query_drop("COMMIT").await?;
    let (status, done) = running.await??;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        table(&db).await?[0],
        (1, "a".into(), "1.00".into()),
        "restored once the row was free"
    );
    retry_to_the_end(&tc, &xid, "settled").await?;
    Ok(())
}
