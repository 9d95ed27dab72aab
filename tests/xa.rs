//! XA mode through the proxy, with real `ferrata-tc` and `ferrata-proxy` processes and real
//! MariaDB servers: branches prepared by the database at the client's COMMIT and finished in
//! phase 2 (on the preparing connection, or from a service connection once it is gone),
//! across two databases, beside AT and TCC branches, after a proxy or the coordinator was killed;
//! read-only branches finished in phase 1; what MariaDB refuses inside XA, refused first.
//! After every test no prepared branch is left on any server.

use anyhow::{Result, ensure};
use ferrata_rpc::pb;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::ferrata_testkit::service::Service;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{server_error, until, until_undo_records_gone};
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// A database with table `t (id INT PRIMARY KEY, v INT)` holding `(1, 10)` and `(2, 20)`, and
/// a proxy process in front of it that trusts its view of the coordinator.
struct Side {
    db: MariaDb,
    proxy: ProxyProcess,
}

impl Side {
    async fn start(tc: &Coordinator) -> Result<Side> {
        Self::start_with(tc, "lock_wait_ms = 2000", "").await
    }

    /// With `coordinator_toml` and `more_toml` for the proxy (see `ProxyProcess::start_with`).
    async fn start_with(tc: &Coordinator, coordinator_toml: &str, more_toml: &str) -> Result<Side> {
        let db = MariaDb::start().await?;
        let mut direct = db.conn().await?;
        direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
        direct.query_drop("INSERT INTO t VALUES (1, 10), (2, 20)").await?;
        let proxy = ProxyProcess::start_with(PROXY, db.addr(), &tc.endpoint(), coordinator_toml, more_toml)?;
        proxy.await_trust(&mut proxy.conn().await?).await?;
        Ok(Side { db, proxy })
    }

    /// Row 1 back to 10, straight on the server.
    async fn reset(&self) -> Result<()> {
        self.db
            .conn()
            .await?
            .query_drop("UPDATE t SET v = 10 WHERE id = 1")
            .await?;
        Ok(())
    }

    /// Registers an XA branch of `xid` on this database straight with the coordinator, as a
    /// proxy that died before `XA START` (or before its report) would have left it.
    async fn register_xa(&self, tc: &Coordinator, xid: &str) -> Result<u64> {
        let request = pb::BranchRegisterRequest {
            xid: xid.into(),
            resource_id: format!("{}/test", self.db.addr()),
            branch_type: pb::BranchType::Xa as i32,
            ..Default::default()
        };
        Ok(tc
            .client()
            .await?
            .rm
            .branch_register(request)
            .await?
            .into_inner()
            .branch_id)
    }

    async fn value(&self, id: i64) -> Result<Option<i64>> {
        let mut c = self.db.conn().await?;
        Ok(c.exec_first("SELECT v FROM t WHERE id = ?", (id,)).await?)
    }

    /// Every prepared XA transaction on the server, as `XA RECOVER` lists them.
    async fn prepared(&self) -> Result<Vec<String>> {
        let mut c = self.db.conn().await?;
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = c.query("XA RECOVER").await?;
        Ok(rows
            .into_iter()
            .map(|(format, _, _, data)| format!("{format}:{}", String::from_utf8_lossy(&data)))
            .collect())
    }

    async fn until_nothing_prepared(&self) -> Result<()> {
        until("no prepared XA transaction on the server", async || {
            Ok(self.prepared().await?.is_empty())
        })
        .await
    }
}

async fn start_xa(conn: &mut mysql_async::Conn) -> Result<String> {
    let xid: Option<String> = conn.query_first("START GLOBAL TRANSACTION MODE XA").await?;
    xid.ok_or_else(|| anyhow::anyhow!("START GLOBAL TRANSACTION returned no XID"))
}

async fn add(conn: &mut mysql_async::Conn, id: i64, delta: i64) -> Result<()> {
    conn.exec_drop("UPDATE t SET v = v + ? WHERE id = ?", (delta, id))
        .await?;
    Ok(())
}

/// A local transaction adding `delta` to row `id`: an XA branch the database prepares at its
/// COMMIT.
async fn prepare_add(conn: &mut mysql_async::Conn, id: i64, delta: i64) -> Result<()> {
    conn.query_drop("BEGIN").await?;
    add(conn, id, delta).await?;
    conn.query_drop("COMMIT").await?;
    Ok(())
}

fn code(e: &mysql_async::Error) -> u16 {
    server_error(e).map(|(c, _, _)| c).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_on_two_databases_prepare_at_commit_and_finish_with_the_decision() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let (a, b) = (Side::start(&tc).await?, Side::start(&tc).await?);

    for commit in [true, false] {
        let mut on_a = a.proxy.conn().await?;
        let mut on_b = b.proxy.conn().await?;
        let xid = start_xa(&mut on_a).await?;
        on_b.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}' MODE XA"))
            .await?;
        for conn in [&mut on_a, &mut on_b] {
            prepare_add(conn, 1, 5).await?;
        }
        // Prepared by each database before the client's OK, invisible until phase 2.
        for side in [&a, &b] {
            ensure!(side.prepared().await?.len() == 1, "one prepared branch on each server");
            ensure!(side.value(1).await? == Some(10), "not committed before the decision");
        }
        let view = tc.get(&format!("/v1/transactions/{xid}")).await?;
        let modes: Vec<&str> = view["branches"]
            .as_array()
            .map(|bs| bs.iter().filter_map(|b| b["mode"].as_str()).collect())
            .unwrap_or_default();
        ensure!(modes == ["XA", "XA"], "{view}");
        ensure!(view["branches"][0]["status"] == "Prepared", "{view}");

        on_a.query_drop(if commit { "COMMIT GLOBAL" } else { "ROLLBACK GLOBAL" })
            .await?;
        let want = if commit { 15 } else { 10 };
        for side in [&a, &b] {
            until("the branch to finish", async || Ok(side.value(1).await? == Some(want))).await?;
            side.until_nothing_prepared().await?;
        }
        until("the global transaction to end", async || {
            let status = tc.status(&xid).await?;
            Ok(status == if commit { "Committed" } else { "Rollbacked" })
        })
        .await?;
        // Both connections are free again.
        for conn in [&mut on_a, &mut on_b] {
            let v: Option<i64> = conn.query_first("SELECT v FROM t WHERE id = 2").await?;
            ensure!(v == Some(20));
        }
        // Reset for the next round.
        a.reset().await?;
        b.reset().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_writes_are_wrapped_and_read_only_branches_end_in_phase_one() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;

    let mut reader = a.proxy.conn().await?;
    let xid = start_xa(&mut reader).await?;
    // Reads only: committed in one phase, nothing held.
    reader.query_drop("BEGIN").await?;
    let v: Option<i64> = reader.query_first("SELECT v FROM t WHERE id = 1 FOR UPDATE").await?;
    ensure!(v == Some(10));
    reader.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.is_empty(), "a read-only branch is not held");
    // Plain reads: the same (the session's row-change counters did not move).
    reader.query_drop("BEGIN").await?;
    let v: Option<i64> = reader.query_first("SELECT v FROM t WHERE id = 2").await?;
    ensure!(v == Some(20));
    reader.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.is_empty());
    // A read that writes through a stored function is no read-only branch: the server's count
    // of changed rows says so.
    a.db.conn()
        .await?
        .query_drop(
            "CREATE FUNCTION bump() RETURNS INT MODIFIES SQL DATA BEGIN UPDATE t SET v = v + 100 WHERE id = 1; RETURN 1; END",
        )
        .await?;
    let mut sneaky = a.proxy.conn().await?;
    start_xa(&mut sneaky).await?;
    sneaky.query_drop("BEGIN").await?;
    let bumped: Option<i64> = sneaky.query_first("SELECT bump()").await?;
    ensure!(bumped == Some(1));
    sneaky.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.len() == 1, "prepared, not committed in one phase");
    sneaky.query_drop("ROLLBACK GLOBAL").await?;
    a.until_nothing_prepared().await?;
    ensure!(a.value(1).await? == Some(10), "rolled back with its global transaction");

    let mut writer = a.proxy.conn().await?;
    writer
        .query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}' MODE XA"))
        .await?;
    let result = writer.query_iter("UPDATE t SET v = v + 1 WHERE id = 2").await?;
    ensure!(result.affected_rows() == 1, "the statement's own answer");
    drop(result);
    ensure!(
        a.prepared().await?.len() == 1,
        "the autocommit write is a prepared branch"
    );
    ensure!(a.value(2).await? == Some(20));

    writer.query_drop("COMMIT GLOBAL").await?;
    until("the write to commit", async || Ok(a.value(2).await? == Some(21))).await?;
    a.until_nothing_prepared().await?;
    let view = tc.get(&format!("/v1/transactions/{xid}/events")).await?;
    let read_only = view["events"]
        .as_array()
        .map(|es| es.iter().filter(|e| e["type"] == "branch_read_only").count())
        .unwrap_or(0);
    ensure!(read_only == 2, "{view}");

    // An autocommit write that changed no row may still have written: a trigger fires for a
    // row matched but not changed. It is prepared, and rolls back with its transaction.
    let mut direct = a.db.conn().await?;
    direct.query_drop("CREATE TABLE audit (n INT)").await?;
    direct
        .query_drop("CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW INSERT INTO audit VALUES (1)")
        .await?;
    let mut touch = a.proxy.conn().await?;
    start_xa(&mut touch).await?;
    let result = touch.query_iter("UPDATE t SET v = v WHERE id = 1").await?;
    ensure!(result.affected_rows() == 0, "matched, not changed");
    drop(result);
    ensure!(a.prepared().await?.len() == 1, "prepared, not committed in one phase");
    touch.query_drop("ROLLBACK GLOBAL").await?;
    a.until_nothing_prepared().await?;
    let audited: Option<i64> = direct.query_first("SELECT COUNT(*) FROM audit").await?;
    ensure!(audited == Some(0), "the trigger's row rolled back with the branch");
    Ok(())
}

/// One global transaction holding an AT branch on one database, an XA branch on another and a
/// TCC branch on an HTTP service: the commit keeps both writes and confirms the TCC branch
/// (the AT undo records go), the rollback restores the AT row, never commits the XA branch
/// and cancels the TCC branch; each call made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_xa_and_tcc_branches_in_one_global_transaction() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let (a, b) = (Side::start(&tc).await?, Side::start(&tc).await?);
    let service = Service::start().await?;

    for commit in [true, false] {
        let mut at = a.proxy.conn().await?;
        let xid: Option<String> = at.query_first("START GLOBAL TRANSACTION").await?;
        let xid = xid.unwrap_or_default();
        add(&mut at, 1, 1).await?;
        let mut xa = b.proxy.conn().await?;
        xa.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}' MODE XA"))
            .await?;
        add(&mut xa, 1, 1).await?;
        let tcc = serde_json::json!({
            "mode": "tcc",
            "branch_id": "payment",
            "confirm": format!("{}/ok/confirm", service.base),
            "cancel": format!("{}/ok/cancel", service.base),
            "data": {"amount": 1},
        });
        let (status, answer) = tc.post(&format!("/v1/transactions/{xid}/branches"), &tcc).await?;
        ensure!(status == 201, "TCC branch registered: {status} {answer}");
        ensure!(a.value(1).await? == Some(11), "AT commits locally at once");
        ensure!(b.value(1).await? == Some(10), "XA waits for phase 2");
        at.query_drop(if commit { "COMMIT GLOBAL" } else { "ROLLBACK GLOBAL" })
            .await?;
        let (want, op) = if commit { (11, "confirm") } else { (10, "cancel") };
        until("every branch to finish", async || {
            Ok(tc.status(&xid).await? == if commit { "Committed" } else { "Rollbacked" })
        })
        .await?;
        ensure!(a.value(1).await? == Some(want) && b.value(1).await? == Some(want));
        b.until_nothing_prepared().await?;
        until_undo_records_gone(&[&a.db]).await?;
        let story = service.story(&xid, &["branch_id", "op"]);
        ensure!(story == [format!("/ok/{op} payment {op}")], "{story:?}");
        a.reset().await?;
        b.reset().await?;
    }
    Ok(())
}

/// XA branches writing a table where AT-mode branches hold rows (committed locally, locked
/// globally): the rows each branch wrote are checked against other global transactions'
/// locks before it prepares. A held row gets ERR 1205 naming the holder after the lock wait,
/// with nothing prepared (an explicit branch stays open, an autocommit write is rolled
/// back); free rows, and rows of the branch's own global transaction, prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xa_writes_are_checked_against_the_rows_at_branches_hold() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;
    let mut at = a.proxy.conn().await?;
    let holder: Option<String> = at.query_first("START GLOBAL TRANSACTION").await?;
    let holder = holder.unwrap_or_default();
    add(&mut at, 1, 1).await?;

    let mut xa = a.proxy.conn().await?;
    start_xa(&mut xa).await?;
    xa.query_drop("BEGIN").await?;
    add(&mut xa, 2, 5).await?;
    add(&mut xa, 1, 5).await?;
    let e = xa.query_drop("COMMIT").await.expect_err("row 1 is held");
    ensure!(code(&e) == 1205 && e.to_string().contains(&holder), "{e}");
    ensure!(a.prepared().await?.is_empty(), "nothing was prepared");
    xa.query_drop("ROLLBACK").await?;
    let e = xa
        .query_drop("DELETE FROM t WHERE id = 1")
        .await
        .expect_err("row 1 is held");
    ensure!(code(&e) == 1205 && e.to_string().contains(&holder), "{e}");
    ensure!(a.prepared().await?.is_empty(), "the autocommit write was rolled back");
    ensure!(a.value(1).await? == Some(11) && a.value(2).await? == Some(20));
    // A free row of the guarded table: an autocommit branch, prepared.
    xa.query_drop("INSERT INTO t VALUES (3, 30)").await?;
    ensure!(a.prepared().await?.len() == 1);
    xa.query_drop("COMMIT GLOBAL").await?;
    until("the insert to commit", async || Ok(a.value(3).await? == Some(30))).await?;

    // The holder's own XA branch writes its row.
    let mut joined = a.proxy.conn().await?;
    joined
        .query_drop(format!("JOIN GLOBAL TRANSACTION '{holder}' MODE XA"))
        .await?;
    prepare_add(&mut joined, 1, 5).await?;
    ensure!(a.prepared().await?.len() == 1);
    at.query_drop("COMMIT GLOBAL").await?;
    until("both branches to commit", async || Ok(a.value(1).await? == Some(16))).await?;
    a.until_nothing_prepared().await?;
    ferrata_tests::until_undo_records_gone(&[&a.db]).await?;

    // A COMMIT held back by a row retried once the row's transaction ended: prepared.
    let holder: Option<String> = at.query_first("START GLOBAL TRANSACTION").await?;
    add(&mut at, 2, 1).await?;
    start_xa(&mut xa).await?;
    xa.query_drop("BEGIN").await?;
    add(&mut xa, 2, 1).await?;
    let e = xa.query_drop("COMMIT").await.expect_err("row 2 is held");
    ensure!(code(&e) == 1205, "{e}");
    at.query_drop("COMMIT GLOBAL").await?;
    xa.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.len() == 1, "prepared at the retried COMMIT");
    xa.query_drop("COMMIT GLOBAL").await?;
    until("the retried branch to commit", async || {
        Ok(a.value(2).await? == Some(22))
    })
    .await?;
    a.until_nothing_prepared().await?;
    ensure!(holder.is_some());

    // The other order: the XA branch starts first, an AT branch of the same transaction
    // writes the row and commits it locally, then the XA branch writes it too. The rollback
    // undoes the XA branch first (the AT restore would wait for its row lock), then the AT
    // branch: the row is as it was.
    let mut first = a.proxy.conn().await?;
    let xid = start_xa(&mut first).await?;
    first.query_drop("BEGIN").await?;
    let mut later = a.proxy.conn().await?;
    later.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
    add(&mut later, 1, 100).await?;
    add(&mut first, 1, 1000).await?;
    first.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.len() == 1);
    later.query_drop("ROLLBACK GLOBAL").await?;
    until("both branches to roll back", async || Ok(a.value(1).await? == Some(16))).await?;
    a.until_nothing_prepared().await?;
    ferrata_tests::until_undo_records_gone(&[&a.db]).await?;
    ensure!(tc.status(&xid).await? == "Rollbacked", "{}", tc.status(&xid).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_prepared_by_a_killed_proxy_is_finished_by_another_and_by_its_restart() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let mut a = Side::start(&tc).await?;
    let mut second = ProxyProcess::start(PROXY, a.db.addr(), &tc.endpoint(), 2000)?;
    second.await_trust(&mut second.conn().await?).await?;

    // Prepared through the second proxy, which is killed: the first one commits it.
    let mut conn = second.conn().await?;
    let xid = start_xa(&mut conn).await?;
    add(&mut conn, 1, 7).await?;
    ensure!(a.prepared().await?.len() == 1);
    second.kill9()?;
    drop(conn);
    let mut app = a.proxy.conn().await?;
    app.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    until("the branch to commit", async || Ok(a.value(1).await? == Some(17))).await?;
    a.until_nothing_prepared().await?;

    // Prepared through the first proxy, which is killed and restarted: the restarted proxy
    // rolls it back.
    let mut conn = a.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;
    add(&mut conn, 2, 7).await?;
    a.proxy.kill9_and_restart()?;
    drop(conn);
    let mut app = a.proxy.conn().await?;
    // Attached to the coordinator again (else the rollback waits for a proxy to serve it).
    a.proxy.await_trust(&mut app).await?;
    app.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await?;
    a.until_nothing_prepared().await?;
    ensure!(a.value(2).await? == Some(20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_branches_survive_the_coordinator_killed_between_the_phases() -> Result<()> {
    let mut tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;
    let mut conn = a.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;
    prepare_add(&mut conn, 1, 3).await?;
    tc.kill9_and_restart()?;
    // The proxy reconnects; the decision finds the prepared branch in the coordinator's store.
    until("the commit to be accepted", async || {
        Ok(conn.query_drop(format!("COMMIT GLOBAL '{xid}'")).await.is_ok())
    })
    .await?;
    until("the branch to commit", async || Ok(a.value(1).await? == Some(13))).await?;
    a.until_nothing_prepared().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_xa_branch_cannot_run_is_refused_before_it_is_sent() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;
    let mut conn = a.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;

    let refused = async |conn: &mut mysql_async::Conn, sql: &str| -> Result<u16> {
        let e = conn.query_drop(sql).await.err();
        Ok(e.as_ref().map(code).unwrap_or(0))
    };
    ensure!(
        refused(&mut conn, "CREATE TABLE u (id INT)").await? == 1235,
        "DDL while bound"
    );
    ensure!(
        refused(&mut conn, "XA START 'mine'").await? == 1235,
        "a client XA while bound"
    );
    ensure!(refused(&mut conn, "START TRANSACTION READ ONLY").await? == 1235);
    ensure!(
        refused(&mut conn, "BEGIN BRANCH 'g' '01' 'try'").await? == 1235,
        "a handler's barrier opens a transaction of its own, outside global transactions"
    );
    ensure!(
        refused(&mut conn, "COMMIT AND CHAIN").await? == 1235,
        "bound in XA mode: no plain transaction chains on the connection"
    );
    ensure!(refused(&mut conn, "LOCK TABLES t WRITE").await? == 1235);
    ensure!(
        refused(&mut conn, "LOAD DATA INFILE '/nonexistent' INTO TABLE t").await? == 1235,
        "an autocommit LOAD DATA (it would need a branch around a file transfer)"
    );
    ensure!(
        refused(
            &mut conn,
            "UPDATE t SET v = v WHERE id = 1; UPDATE t SET v = v WHERE id = 2"
        )
        .await?
            == 1235,
        "an autocommit multi-statement string (a later failure would roll back what the client saw succeed)"
    );

    conn.query_drop("BEGIN").await?;
    add(&mut conn, 1, 1).await?;
    for (sql, want) in [
        ("CREATE TABLE u (id INT)", 1399),
        ("BEGIN", 1399),
        ("SAVEPOINT s", 1235),
        ("LEAVE GLOBAL TRANSACTION", 1399),
        ("COMMIT AND CHAIN", 1235),
        ("ROLLBACK WORK RELEASE", 1235),
    ] {
        ensure!(refused(&mut conn, sql).await? == want, "{sql}");
    }
    // Two branches of one global transaction on one database through one proxy would wait
    // for each other's rows.
    let mut other = a.proxy.conn().await?;
    other
        .query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}' MODE XA"))
        .await?;
    ensure!(
        refused(&mut other, "BEGIN").await? == 1235,
        "a second branch on the same database"
    );
    // ROLLBACK GLOBAL of another transaction leaves this one's branch alone.
    ensure!(refused(&mut conn, "ROLLBACK GLOBAL '1-999999'").await? == 1397);
    // The branch is intact.
    conn.query_drop("COMMIT /* the default */ AND NO CHAIN").await?;
    ensure!(a.prepared().await?.len() == 1, "the branch prepared at its COMMIT");
    ensure!(
        refused(&mut conn, "COMMIT RELEASE").await? == 1235,
        "the connection holding a prepared branch stays open"
    );
    conn.query_drop("ROLLBACK GLOBAL").await?;
    ensure!(a.value(1).await? == Some(10));

    // With autocommit off, a statement the gate lets through may open a plain transaction
    // (here a SET reading a table): nothing written or committed in it escapes.
    let mut off = a.proxy.conn().await?;
    off.query_drop(format!(
        "JOIN GLOBAL TRANSACTION '{}' MODE XA",
        start_xa(&mut a.proxy.conn().await?).await?
    ))
    .await?;
    off.query_drop("SET autocommit = 0").await?;
    off.query_drop("SET @v = (SELECT v FROM t WHERE id = 1)").await?;
    ensure!(refused(&mut off, "UPDATE t SET v = 0 WHERE id = 1").await? == 1399);
    ensure!(refused(&mut off, "COMMIT").await? == 1399);
    off.query_drop("ROLLBACK").await?;
    off.query_drop("UPDATE t SET v = v + 1 WHERE id = 1").await?;
    off.query_drop("COMMIT").await?;
    ensure!(a.prepared().await?.len() == 1, "the UPDATE became a branch of its own");
    off.query_drop("ROLLBACK GLOBAL").await?;
    ensure!(a.value(1).await? == Some(10));

    // Nobody touches Ferrata's branches with plain XA statements.
    let format = ferrata_proxy::xa::xid::FORMAT_ID;
    let mut plain = a.proxy.conn().await?;
    ensure!(refused(&mut plain, &format!("XA ROLLBACK 'x','1',{format}")).await? == 1227);
    ensure!(
        refused(&mut plain, &format!("DO 1; XA ROLLBACK 'x','1',{format}")).await? == 1227,
        "behind another statement too"
    );
    a.until_nothing_prepared().await?;
    Ok(())
}

/// A proxy whose host hangs keeps its backend connection, and MariaDB lets no other
/// connection finish the branch that connection prepared: another proxy ends that
/// connection (recorded with the branch) and finishes phase 2 at once, instead of after the
/// server's `wait_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_proxy_s_connection_is_ended_so_another_proxy_can_finish_its_branch() -> Result<()> {
    let tc = Coordinator::start_with(
        TC,
        "[phase2]\nheartbeat_interval_ms = 200\ncall_timeout_ms = 1000\nretry_max_ms = 500\n",
    )?;
    let a = Side::start(&tc).await?;
    let other = idle_killer(&tc, &a)?;

    let mut conn = a.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;
    add(&mut conn, 1, 4).await?;
    // Attached to the proxy's connection: nobody else may finish it (MariaDB's XAER_NOTA).
    let mut direct = a.db.conn().await?;
    let listed: Vec<(i64, i64, i64, String)> = direct.query("XA RECOVER FORMAT='SQL'").await?;
    ensure!(listed.len() == 1, "{listed:?}");
    let attached = direct
        .query_drop(format!("XA COMMIT {}", listed[0].3))
        .await
        .unwrap_err();
    ensure!(code(&attached) == 1397, "{attached:?}");
    a.proxy.pause()?;

    let mut app = other.conn().await?;
    app.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    until("the branch to commit", async || Ok(a.value(1).await? == Some(14))).await?;
    a.until_nothing_prepared().await?;
    a.proxy.resume()?;
    Ok(())
}

/// A second proxy in front of `a`'s server that ends a holder idle for a second (at least a
/// second: a live session between commands).
fn idle_killer(tc: &Coordinator, a: &Side) -> Result<ProxyProcess> {
    ProxyProcess::start_with(
        PROXY,
        a.db.addr(),
        &tc.endpoint(),
        "lock_wait_ms = 2000",
        "xa_kill_idle_ms = 1000",
    )
}

/// Phase 2 of a prepared branch goes to the proxy process whose session holds it, although a
/// second proxy in front of the same server serves the database too and would end a holder
/// idle for a second: the holding session keeps its connection. (The coordinator takes the
/// proxies serving a resource in turn otherwise, so two rounds reach the second one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_2_goes_to_the_proxy_holding_the_branch() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;
    let other = idle_killer(&tc, &a)?;
    let mut app = other.conn().await?;
    other.await_trust(&mut app).await?;
    let mut direct = a.db.conn().await?;
    for round in 1..=2 {
        let mut holder = a.proxy.conn().await?;
        let backend: Option<u64> = holder.query_first("SELECT CONNECTION_ID()").await?;
        let xid = start_xa(&mut holder).await?;
        add(&mut holder, 1, 1).await?;
        ensure!(a.prepared().await?.len() == 1, "round {round}: prepared and held");
        until(
            "the holding connection to idle past the other proxy's limit",
            async || {
                let idle: Option<f64> = direct
                    .exec_first(
                        "SELECT TIME_MS FROM information_schema.PROCESSLIST WHERE ID = ? AND COMMAND = 'Sleep'",
                        (backend,),
                    )
                    .await?;
                Ok(idle.is_some_and(|ms| ms > 1500.0))
            },
        )
        .await?;
        app.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
        until("the branch to commit", async || {
            Ok(a.value(1).await? == Some(10 + round))
        })
        .await?;
        a.until_nothing_prepared().await?;
        let still: Option<u64> = holder.query_first("SELECT CONNECTION_ID()").await?;
        ensure!(
            still == backend,
            "round {round}: the holding session kept its connection"
        );
    }
    Ok(())
}

/// MariaDB keeps a prepared branch, row locks included, across its own crash: phase 2 after
/// the restart commits it from a service connection (the preparing connection is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_survives_a_database_restart_and_commits_after_it() -> Result<()> {
    let tc = Coordinator::start_with(TC, "[phase2]\nretry_max_ms = 500\n")?;
    let mut a = Side::start(&tc).await?;
    let mut conn = a.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;
    add(&mut conn, 2, 2).await?;
    a.db.restart().await?;
    ensure!(a.prepared().await?.len() == 1, "prepared across the crash");
    ensure!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the session's connection died with the server"
    );

    let mut app = a.proxy.conn().await?;
    app.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    until("the branch to commit", async || Ok(a.value(2).await? == Some(22))).await?;
    a.until_nothing_prepared().await?;
    Ok(())
}

/// XAER_NOTA is never taken as done: a branch decided committed that its database neither
/// holds prepared nor committed (no commit evidence) is a failure for an operator, counted and
/// logged; rolled back, the same unknown branch is simply done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_its_database_does_not_know_is_never_reported_committed() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let a = Side::start(&tc).await?;
    let mut c = tc.client().await?;
    for commit in [false, true] {
        let mut conn = a.proxy.conn().await?;
        let xid = start_xa(&mut conn).await?;
        let branch = a.register_xa(&tc, &xid).await?;
        c.rm.branch_report(pb::BranchReportRequest {
            xid: xid.clone(),
            branch_id: branch,
            status: pb::BranchStatus::PhaseOnePrepared as i32,
            reason: String::new(),
        })
        .await?;
        if commit {
            conn.query_drop("COMMIT GLOBAL").await?;
            until("the commit to fail for an operator", async || {
                Ok(tc.status(&xid).await? == "CommitFailed")
            })
            .await?;
            let view = tc.get(&format!("/v1/transactions/{xid}")).await?;
            ensure!(
                view["failure"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("no commit evidence")),
                "{view}"
            );
            ensure!(a.proxy.metric("ferrata_proxy_xa_contradictions_total").await? == 1.0);
        } else {
            conn.query_drop("ROLLBACK GLOBAL").await?;
            ensure!(tc.status(&xid).await? == "Rollbacked");
        }
    }
    Ok(())
}

/// Runs `XA START` ... `XA PREPARE` of `id` (an `XA RECOVER FORMAT='SQL'` identifier) on a
/// direct connection that then closes: a branch prepared by a proxy that died before it could
/// report it.
async fn prepare_directly(db: &MariaDb, id: &str, sql: &str) -> Result<()> {
    let mut c = db.conn().await?;
    c.query_drop(format!("XA START {id}")).await?;
    c.query_drop(sql).await?;
    c.query_drop(format!("XA END {id}")).await?;
    c.query_drop(format!("XA PREPARE {id}")).await?;
    c.disconnect().await?;
    Ok(())
}

/// The XA identifier of Ferrata's branch `branch_id` of `xid`, as SQL.
fn ferrata_id(xid: &str, branch_id: u64) -> String {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02X}")).collect::<String>();
    format!(
        "X'{}',X'{}',{}",
        hex(xid),
        hex(&branch_id.to_string()),
        ferrata_proxy::xa::xid::FORMAT_ID
    )
}

/// A proxy that died between `XA PREPARE` and its report leaves a branch no phase 2 reaches
/// (the coordinator left it out of the commit): the orphan sweep of another proxy rolls it
/// back. One whose XID the coordinator does not know is quarantined, never finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_settles_what_no_phase_2_reaches_and_quarantines_the_unknown() -> Result<()> {
    let tc = Coordinator::start(TC)?;
    let side = Side::start_with(&tc, "lock_wait_ms = 2000", "xa_sweep_interval_ms = 100").await?;

    let mut conn = side.proxy.conn().await?;
    let xid = start_xa(&mut conn).await?;
    let branch = side.register_xa(&tc, &xid).await?;
    prepare_directly(&side.db, &ferrata_id(&xid, branch), "UPDATE t SET v = 11 WHERE id = 1").await?;
    conn.query_drop("COMMIT GLOBAL").await?;
    until("the sweep to roll the branch back", async || {
        Ok(side.prepared().await?.is_empty())
    })
    .await?;
    ensure!(side.value(1).await? == Some(10), "not part of the commit: rolled back");
    ensure!(
        side.proxy
            .metric("ferrata_proxy_xa_orphans_settled_total{action=\"ROLLBACK\"}")
            .await?
            == 1.0
    );

    // Never issued by this coordinator.
    let stranger = ferrata_id("9-1", 1);
    prepare_directly(&side.db, &stranger, "UPDATE t SET v = 21 WHERE id = 2").await?;
    until("the branch to be quarantined", async || {
        Ok(side.proxy.metric("ferrata_proxy_xa_quarantined_branches").await? == 1.0)
    })
    .await?;
    ensure!(side.prepared().await?.len() == 1, "kept prepared");
    side.db
        .conn()
        .await?
        .query_drop(format!("XA ROLLBACK {stranger}"))
        .await?;
    side.until_nothing_prepared().await?;
    Ok(())
}

/// The coordinator never takes the branch's PREPARED report (paused, then killed and
/// restarted): the client's COMMIT says the outcome is unknown (1180). Its COMMIT GLOBAL
/// reports the branch again before it decides, so the decision includes the branch, which
/// commits (without that the branch would be left out and rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_prepared_report_is_made_again_before_the_session_commits() -> Result<()> {
    let mut tc = Coordinator::start(TC)?;
    let side = Side::start_with(
        &tc,
        "lock_wait_ms = 2000\noutcome_wait_ms = 500",
        "xa_sweep_interval_ms = 100",
    )
    .await?;
    let mut conn = side.proxy.conn().await?;
    start_xa(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    add(&mut conn, 1, 9).await?;
    tc.pause()?;
    let unknown = conn.query_drop("COMMIT").await.unwrap_err();
    tc.kill9_and_restart()?;
    ensure!(code(&unknown) == 1180, "{unknown:?}");
    ensure!(side.prepared().await?.len() == 1, "prepared all the same");
    until("COMMIT GLOBAL to go through", async || {
        Ok(conn.query_drop("COMMIT GLOBAL").await.is_ok())
    })
    .await?;
    until("the branch to commit", async || Ok(side.value(1).await? == Some(19))).await?;
    side.until_nothing_prepared().await?;
    Ok(())
}
