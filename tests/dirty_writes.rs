//! No dirty writes through the proxy, with a real `ferrata-tc` process, real proxy processes
//! and a real MariaDB server: a write outside any global transaction never commits over a
//! row an unfinished global transaction holds. It waits for the global transaction to end,
//! or fails with 1205 naming it; a global rollback is never made dirty by such a write; tables
//! without global locks take the fast path.

use std::time::Duration;

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{server_error, until};
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

#[tokio::test]
async fn a_non_global_update_is_held_back_until_the_global_commit() -> Result<()> {
    let (db, _tc, proxy) = setup(300).await?;
    let (mut g, xid) = hold_row(&proxy).await?;
    let mut other = proxy.conn().await?;

    // Autocommit: refused after the wait, naming the holder, and not run.
    let e = other
        .query_drop("UPDATE account SET balance = balance + 1 WHERE id = 1")
        .await
        .expect_err("the row is held");
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
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
    until("the proxy to trust its view of the coordinator", async || {
        c.query_drop("UPDATE account SET balance = balance + 1 WHERE id = 2")
            .await?;
        Ok(proxy
            .metric("ferrata_proxy_unbound_writes_total{route=\"wrap\"}")
            .await?
            > 0.0)
    })
    .await?;
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
    let e = c
        .query_drop("REPLACE INTO account VALUES (1, 5)")
        .await
        .expect_err("row 1 is held");
    assert_eq!(server_error(&e)?.0, 1205);
    let e = c
        .query_drop("INSERT INTO account VALUES (1, 5) ON DUPLICATE KEY UPDATE balance = 5")
        .await
        .expect_err("row 1 is held");
    assert_eq!(server_error(&e)?.0, 1205);
    c.query_drop("INSERT INTO account VALUES (2, 5) ON DUPLICATE KEY UPDATE balance = balance + 1")
        .await?;
    // Multi-table writes: the rows of every table they write, by their own join and WHERE.
    c.query_drop("INSERT INTO audit VALUES (1, 'x') ON DUPLICATE KEY UPDATE note = 'x'")
        .await?;
    let e = c
        .query_drop("UPDATE account a JOIN audit u ON u.id = a.id SET a.balance = 0, u.note = 'j'")
        .await
        .expect_err("row 1 is held");
    assert_eq!(server_error(&e)?.0, 1205);
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
    let e = c
        .query_drop("INSERT INTO account VALUES (2, 1)")
        .await
        .expect_err("held");
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
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
    for route in ["observe", "wrap", "check", "refuse"] {
        let series = format!("ferrata_proxy_unbound_writes_total{{route=\"{route}\"}}");
        assert_eq!(off.metric(&series).await?, 0.0, "no write took the {route} route");
    }
    g.query_drop("COMMIT GLOBAL").await?;
    Ok(())
}
