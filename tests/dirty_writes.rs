//! No dirty writes through the proxy, with a real `ferrata-tc` process, real proxy processes
//! and a real MariaDB server: a write outside any global transaction never commits over a
//! row an unfinished global transaction holds. It waits for the global transaction to end,
//! or fails with 1205 naming it; a global rollback is never made dirty by such a write; tables
//! without global locks take the fast path.

use std::time::Duration;

use anyhow::{Context, Result};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{a_lock_wait, lock_directly, server_error, until};
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

const CHECKED: &str = "ferrata_proxy_unbound_writes_total{route=\"check\"}";

async fn setup(lock_wait_ms: u64) -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), lock_wait_ms)?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
        .await?;
    c.query_drop("CREATE TABLE audit (id INT PRIMARY KEY, note VARCHAR(20))")
        .await?;
    c.query_drop("INSERT INTO account VALUES (1, 100), (2, 100)").await?;
    Ok((db, tc, proxy))
}

/// A global transaction that took 10 from account 1 and committed its branch: the row is
/// globally locked until it ends.
async fn hold_row(proxy: &ProxyProcess) -> Result<(mysql_async::Conn, String)> {
    let mut g = proxy.conn().await?;
    let xid = ferrata_tests::start_global(&mut g).await?;
    g.query_drop("UPDATE account SET balance = balance - 10 WHERE id = 1")
        .await?;
    Ok((g, xid))
}

async fn balance(db: &MariaDb, id: i64) -> Result<i64> {
    let b: Option<i64> = db
        .conn()
        .await?
        .exec_first("SELECT balance FROM account WHERE id = ?", (id,))
        .await?;
    Ok(b.expect("the account exists"))
}

/// Sends `sql` on `c`, which must fail with error `code`; returns the message.
async fn refused(c: &mut mysql_async::Conn, sql: &str, code: u16) -> Result<String> {
    let e = c.query_drop(sql).await.expect_err(sql);
    let (got, _, message) = server_error(&e)?;
    anyhow::ensure!(got == code, "{sql}: {got} {message}");
    Ok(message)
}

#[tokio::test]
async fn a_non_global_update_is_held_back_until_the_global_commit() -> Result<()> {
    let (db, _tc, proxy) = setup(300).await?;
    let (mut g, xid) = hold_row(&proxy).await?;
    let mut other = proxy.conn().await?;

    // Autocommit: refused after the wait, naming the holder, and not run.
    let message = refused(
        &mut other,
        "UPDATE account SET balance = balance + 1 WHERE id = 1",
        1205,
    )
    .await?;
    assert!(message.contains(&xid), "names the holder {xid}: {message}");
    assert_eq!(balance(&db, 1).await?, 90, "the statement did not run");

    // In a transaction: the COMMIT is refused and the transaction stays open.
    other.query_drop("BEGIN").await?;
    other
        .query_drop("UPDATE account SET balance = balance + 1 WHERE id = 1")
        .await?;
    let e = other.query_drop("COMMIT").await.expect_err("the row is held");
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
    assert!(message.contains(&xid), "{message}");
    let open: Option<i64> = other.query_first("SELECT @@in_transaction").await?;
    assert_eq!(open, Some(1), "the transaction is still open");

    // Account 2 is not held: its write commits although the table is guarded.
    let mut third = proxy.conn().await?;
    third
        .query_drop("UPDATE account SET balance = balance + 5 WHERE id = 2")
        .await?;
    assert_eq!(balance(&db, 2).await?, 105);

    other.query_drop("ROLLBACK").await?;
    g.query_drop("COMMIT GLOBAL").await?;
    // Once the global transaction ended, the same writes go through.
    other
        .query_drop("UPDATE account SET balance = balance + 1 WHERE id = 1")
        .await?;
    assert_eq!(balance(&db, 1).await?, 91);
    Ok(())
}

#[tokio::test]
async fn a_non_global_update_waits_for_the_global_commit_then_runs() -> Result<()> {
    let (db, _tc, proxy) = setup(20_000).await?;
    let (mut g, _xid) = hold_row(&proxy).await?;
    let checked = proxy.metric(CHECKED).await?;
    let opts = proxy.opts();
    let mut write = tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop("UPDATE account SET balance = balance * 2 WHERE id = 1")
            .await?;
        anyhow::Ok(())
    });
    until("the write to reach its check", async || {
        Ok(proxy.metric(CHECKED).await? > checked)
    })
    .await?;
    // The check waits in the coordinator's queue: the write does not finish on its own.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut write)
            .await
            .is_err(),
        "the write waited for the global transaction"
    );
    g.query_drop("COMMIT GLOBAL").await?;
    write.await??;
    assert_eq!(balance(&db, 1).await?, 180, "applied after the global commit's 90");
    Ok(())
}

#[tokio::test]
async fn a_non_global_write_during_a_global_rollback_does_not_make_it_dirty() -> Result<()> {
    let (db, tc, proxy) = setup(20_000).await?;
    let (mut g, xid) = hold_row(&proxy).await?;
    let opts = proxy.opts();
    let checked = proxy.metric(CHECKED).await?;
    let write = tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop("UPDATE account SET balance = 0 WHERE id = 1").await
    });
    until("the write to reach its check", async || {
        Ok(proxy.metric(CHECKED).await? > checked)
    })
    .await?;
    // The write holds the row in the database and waits for the global lock; the rollback
    // needs the row: the coordinator fails the waiting check fast, the write is undone, and
    // the rollback restores the row.
    g.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await?;
    let e = write.await?.expect_err("the write loses to the rollback");
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
    assert!(message.contains(&xid), "{message}");
    assert_eq!(tc.status(&xid).await?, "Rollbacked", "not a dirty rollback");
    assert_eq!(balance(&db, 1).await?, 100, "restored, and the write was not run");
    // Retried after the rollback, the write goes through.
    proxy
        .conn()
        .await?
        .query_drop("UPDATE account SET balance = 0 WHERE id = 1")
        .await?;
    assert_eq!(balance(&db, 1).await?, 0);
    Ok(())
}

#[tokio::test]
async fn tables_without_global_locks_take_the_fast_path() -> Result<()> {
    let (db, _tc, proxy) = setup(300).await?;
    let mut c = proxy.conn().await?;
    // Nothing is guarded yet: the writes are not checked row by row.
    proxy.await_trust(&mut c).await?;
    let checked = proxy.metric(CHECKED).await?;
    c.query_drop("BEGIN").await?;
    c.query_drop("INSERT INTO audit VALUES (1, 'x')").await?;
    c.query_drop("UPDATE account SET balance = balance + 1 WHERE id = 2")
        .await?;
    c.query_drop("COMMIT").await?;
    c.query_drop("INSERT INTO audit VALUES (2, 'y')").await?;
    assert_eq!(proxy.metric(CHECKED).await?, checked, "no write was checked");

    // Once a global transaction locks a row of `account`, writes to it are checked; writes
    // to `audit` are still not.
    let (mut g, _) = hold_row(&proxy).await?;
    c.query_drop("INSERT INTO audit VALUES (3, 'z')").await?;
    assert_eq!(proxy.metric(CHECKED).await?, checked);
    c.query_drop("UPDATE account SET balance = balance + 1 WHERE id = 2")
        .await?;
    assert_eq!(proxy.metric(CHECKED).await?, checked + 1.0);
    // Upserts and REPLACE are checked by every key their rows name.
    refused(&mut c, "REPLACE INTO account VALUES (1, 5)", 1205).await?;
    refused(
        &mut c,
        "INSERT INTO account VALUES (1, 5) ON DUPLICATE KEY UPDATE balance = 5",
        1205,
    )
    .await?;
    c.query_drop("INSERT INTO account VALUES (2, 5) ON DUPLICATE KEY UPDATE balance = balance + 1")
        .await?;
    // Multi-table writes: the rows of every table they write, by their own join and WHERE.
    c.query_drop("INSERT INTO audit VALUES (1, 'x') ON DUPLICATE KEY UPDATE note = 'x'")
        .await?;
    refused(
        &mut c,
        "UPDATE account a JOIN audit u ON u.id = a.id SET a.balance = 0, u.note = 'j'",
        1205,
    )
    .await?;
    c.query_drop("UPDATE account a, audit u SET a.balance = a.balance + 1 WHERE a.id = 2 AND u.id = 1")
        .await?;
    // Only `audit` is written: reading the held row of `account` in the join is no write.
    c.query_drop("DELETE u FROM audit u JOIN account a ON a.id = u.id WHERE a.id = 1")
        .await?;
    c.query_drop("REPLACE INTO audit VALUES (3, 'zz')").await?;
    g.query_drop("COMMIT GLOBAL").await?;
    assert_eq!(balance(&db, 1).await?, 90);
    Ok(())
}

#[tokio::test]
async fn prepared_writes_and_inserts_are_checked_by_key() -> Result<()> {
    let (db, _tc, proxy) = setup(300).await?;
    let (mut g, xid) = hold_row(&proxy).await?;
    let mut c = proxy.conn().await?;
    // A prepared UPDATE: its bound id names the held row.
    let e = c
        .exec_drop("UPDATE account SET balance = ? WHERE id = ?", (7, 1))
        .await
        .expect_err("held");
    assert_eq!(server_error(&e)?.0, 1205);
    c.exec_drop("UPDATE account SET balance = ? WHERE id = ?", (7, 2))
        .await?;
    // A global DELETE then an INSERT of the same key outside: held.
    g.query_drop("DELETE FROM account WHERE id = 2").await?;
    let message = refused(&mut c, "INSERT INTO account VALUES (2, 1)", 1205).await?;
    assert!(message.contains(&xid), "{message}");
    c.query_drop("INSERT INTO account VALUES (3, 1)").await?;
    g.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await?;
    assert_eq!(balance(&db, 1).await?, 100);
    assert_eq!(balance(&db, 2).await?, 7);
    assert_eq!(balance(&db, 3).await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_proxy_with_the_check_off_lets_writes_through_untouched() -> Result<()> {
    let (db, tc, _proxy) = setup(300).await?;
    let off = ProxyProcess::start_with(
        PROXY,
        db.addr(),
        &tc.endpoint(),
        "lock_wait_ms = 300",
        "[dirty_writes]\ncheck = false",
    )?;
    let (mut g, _) = hold_row(&off).await?;
    let mut c = off.conn().await?;
    // The row is held, but this proxy was told not to check: the write commits over it.
    c.query_drop("UPDATE account SET balance = balance + 1 WHERE id = 1")
        .await?;
    assert_eq!(balance(&db, 1).await?, 91);
    for route in ["observe", "unchecked", "check", "refuse"] {
        let series = format!("ferrata_proxy_unbound_writes_total{{route=\"{route}\"}}");
        assert_eq!(off.metric(&series).await?, 0.0, "no write took the {route} route");
    }
    g.query_drop("COMMIT GLOBAL").await?;
    Ok(())
}

#[tokio::test]
async fn a_set_statement_write_is_checked_like_its_statement() -> Result<()> {
    let (db, _tc, proxy) = setup(300).await?;
    let (mut g, xid) = hold_row(&proxy).await?;
    let mut c = proxy.conn().await?;
    // On a guarded table the proxy cannot run it inside the transaction its check needs
    // (MariaDB refuses some of these variables there), so it refuses it and says why.
    let sql = "SET STATEMENT sql_mode = '' FOR UPDATE account SET balance = 0 WHERE id = 2";
    let message = refused(&mut c, sql, 1235).await?;
    assert!(
        message.contains("SET STATEMENT") && message.contains("test.account"),
        "{message}"
    );
    assert_eq!(balance(&db, 2).await?, 100, "not run");
    // On a table without global locks it runs as sent.
    c.query_drop("SET STATEMENT sql_mode = '' FOR INSERT INTO audit VALUES (1, 'x')")
        .await?;
    g.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(balance(&db, 1).await?, 100, "{xid} rolled back cleanly");
    Ok(())
}

/// An autocommit write through the proxy, in a task of its own.
fn spawn_write(proxy: &ProxyProcess, sql: &'static str) -> tokio::task::JoinHandle<Result<(), mysql_async::Error>> {
    let opts = proxy.opts();
    tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        c.query_drop(sql).await
    })
}

#[tokio::test]
async fn a_table_is_guarded_only_once_the_unchecked_writes_running_on_it_finished() -> Result<()> {
    let (db, _tc, proxy) = setup(20_000).await?;
    db.conn()
        .await?
        .query_drop("INSERT INTO account VALUES (3, 100)")
        .await?;
    proxy.await_trust(&mut proxy.conn().await?).await?;
    // An autocommit write on an unguarded table runs as sent; it waits for row 2.
    let mut blocker = lock_directly(&db, "account", 2).await?;
    let write = spawn_write(&proxy, "UPDATE account SET balance = balance + 1 WHERE id <= 2");
    a_lock_wait(&db).await?;
    // A global transaction writes row 3: the coordinator guards the table first, and this
    // proxy acknowledges only once the write above is done. The guard comes before the
    // global transaction locks row 3, where the write's range scan ends (InnoDB locks the
    // next key): the other way round each would wait for the other until a lock wait ran out.
    let opts = proxy.opts();
    let global = tokio::spawn(async move {
        let mut g = mysql_async::Conn::new(opts).await?;
        let xid = ferrata_tests::start_global(&mut g).await?;
        g.query_drop("UPDATE account SET balance = 0 WHERE id = 3").await?;
        anyhow::Ok((g, xid))
    });
    until("the guard's acknowledgement to wait for the write", async || {
        Ok(proxy.metric("ferrata_proxy_guard_acks_waiting").await? == 1.0)
    })
    .await?;
    assert!(!global.is_finished(), "no branch registers in the table before the ack");
    blocker.query_drop("COMMIT").await?;
    write.await??;
    let (mut g, _xid) = global.await??;
    assert_eq!(proxy.metric("ferrata_proxy_guard_acks_waiting").await?, 0.0);
    g.query_drop("ROLLBACK GLOBAL").await?;
    let balances: Vec<(i64, i64)> = db
        .conn()
        .await?
        .query("SELECT id, balance FROM account ORDER BY id")
        .await?;
    assert_eq!(
        balances,
        [(1, 101), (2, 101), (3, 100)],
        "the write committed, the global one rolled back cleanly"
    );
    Ok(())
}

#[tokio::test]
async fn an_unchecked_write_that_would_outlive_the_coordinators_trust_is_interrupted() -> Result<()> {
    let db = MariaDb::start().await?;
    // Heartbeats every 200 ms: the proxy trusts its view for 600 ms after an answered one.
    let tc = Coordinator::start_with(TC, "[phase2]\nheartbeat_interval_ms = 200\n")?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 2000)?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
        .await?;
    c.query_drop("INSERT INTO account VALUES (1, 100), (2, 100)").await?;
    proxy.await_trust(&mut proxy.conn().await?).await?;
    let before: Vec<i64> = c.query("SELECT balance FROM account ORDER BY id").await?;
    let mut blocker = lock_directly(&db, "account", 2).await?;
    let write = spawn_write(&proxy, "UPDATE account SET balance = balance + 1 WHERE id <= 2");
    a_lock_wait(&db).await?;
    // The coordinator stops answering: before the trust runs out the write is interrupted,
    // since once the coordinator's lease on this proxy ends it may lock rows it writes.
    const TRUSTED: &str = "ferrata_proxy_guard_view_trusted";
    until("operators to see the view trusted", async || {
        Ok(proxy.metric(TRUSTED).await? == 1.0)
    })
    .await?;
    tc.pause()?;
    let e = write.await?.expect_err("interrupted");
    until("operators to see the view untrusted", async || {
        Ok(proxy.metric(TRUSTED).await? == 0.0)
    })
    .await?;
    tc.resume()?;
    until("the view to be trusted again", async || {
        Ok(proxy.metric(TRUSTED).await? == 1.0)
    })
    .await?;
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1317, "{message}");
    // Counted once the watchdog heard back from the KILL, which may be after the client did.
    until("the interruption to be counted", async || {
        let series = "ferrata_proxy_unchecked_writes_interrupted_total{outcome=\"interrupted\"}";
        Ok(proxy.metric(series).await? == 1.0)
    })
    .await?;
    blocker.query_drop("COMMIT").await?;
    let balances: Vec<i64> = db
        .conn()
        .await?
        .query("SELECT balance FROM account ORDER BY id")
        .await?;
    assert_eq!(balances, before, "the statement was rolled back");
    Ok(())
}

#[tokio::test]
async fn a_guard_waits_only_for_unchecked_writes_to_its_own_table() -> Result<()> {
    let (db, _tc, proxy) = setup(20_000).await?;
    db.conn()
        .await?
        .query_drop("INSERT INTO audit VALUES (1, 'a'), (2, 'b')")
        .await?;
    proxy.await_trust(&mut proxy.conn().await?).await?;
    // Nothing is guarded: a write to `audit` runs unchecked, and waits for a row lock.
    let mut blocker = lock_directly(&db, "audit", 2).await?;
    let write = spawn_write(&proxy, "UPDATE audit SET note = 'c' WHERE id IN (1, 2)");
    a_lock_wait(&db).await?;
    // A global transaction's first write to `account` is guarded at once.
    let (mut g, _xid) = tokio::time::timeout(ferrata_tests::EVENT, hold_row(&proxy))
        .await
        .context("the guard on account waited for a write to audit")??;
    assert!(!write.is_finished());
    g.query_drop("COMMIT GLOBAL").await?;
    blocker.query_drop("COMMIT").await?;
    write.await??;
    Ok(())
}
