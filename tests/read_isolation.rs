//! Global read isolation through the proxy, with a real `ferrata-tc` process, real proxy
//! processes and a real MariaDB server: a locking read in a global transaction waits for
//! rows another global transaction holds and then sees its committed data (MariaDB has no
//! FOR SHARE: LOCK IN SHARE MODE is its shared form); NOWAIT fails at
//! once and SKIP LOCKED leaves such rows out; a transaction's own rows are not waited for.

use std::time::{Duration, Instant};

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::server_error;
use ferrata_tests::start_global as start;
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// One server with `account` rows 1..=3, a coordinator, and a proxy with `lock_wait_ms`.
async fn setup(lock_wait_ms: u64) -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), lock_wait_ms)?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance BIGINT NOT NULL)")
        .await?;
    c.query_drop("INSERT INTO account VALUES (1, 100), (2, 100), (3, 100)")
        .await?;
    Ok((db, tc, proxy))
}

/// A global transaction that took 10 from account 1 and committed its branch: the row is
/// globally locked (and not locked in the database) until it ends.
async fn hold_row(proxy: &ProxyProcess) -> Result<(mysql_async::Conn, String)> {
    let mut g = proxy.conn().await?;
    let xid = start(&mut g).await?;
    g.query_drop("UPDATE account SET balance = balance - 10 WHERE id = 1")
        .await?;
    Ok((g, xid))
}

#[tokio::test]
async fn a_locking_read_waits_for_the_global_commit_and_sees_its_data() -> Result<()> {
    let (_db, _tc, proxy) = setup(20_000).await?;
    let (mut holder, _) = hold_row(&proxy).await?;
    let opts = proxy.opts();
    let mut read = tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        start(&mut c).await?;
        c.query_drop("BEGIN").await?;
        let balance: Option<i64> = c
            .query_first("SELECT balance FROM account WHERE id = 1 FOR UPDATE")
            .await?;
        c.query_drop("COMMIT").await?;
        c.query_drop("COMMIT GLOBAL").await?;
        anyhow::Ok(balance)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut read)
            .await
            .is_err(),
        "the read waits while the row's global transaction is open"
    );
    holder.query_drop("COMMIT GLOBAL").await?;
    assert_eq!(read.await??, Some(90), "it sees the committed data");
    Ok(())
}

#[tokio::test]
async fn a_locking_read_that_waits_too_long_names_the_holder() -> Result<()> {
    let (_db, _tc, proxy) = setup(300).await?;
    let (mut holder, xid) = hold_row(&proxy).await?;
    let mut c = proxy.conn().await?;
    start(&mut c).await?;
    for sql in [
        "SELECT balance FROM account WHERE id = 1 FOR UPDATE",
        "SELECT balance FROM account WHERE id = 1 LOCK IN SHARE MODE",
        "SELECT balance FROM account WHERE id <= 2 LOCK IN SHARE MODE",
        "SELECT a.id FROM account a JOIN account b ON b.id = a.id + 1 WHERE b.id = 2 FOR UPDATE",
    ] {
        let e = c.query_drop(sql).await.expect_err(sql);
        let (code, _, message) = server_error(&e)?;
        assert_eq!(code, 1205, "{sql}: {message}");
        assert!(message.contains(&xid), "{sql}: names the holder: {message}");
    }
    // Rows nobody holds are read at once, also through a prepared statement.
    let balance: Option<i64> = c
        .exec_first("SELECT balance FROM account WHERE id = ? FOR UPDATE", (2,))
        .await?;
    assert_eq!(balance, Some(100));
    let e = c
        .exec_drop("SELECT balance FROM account WHERE id = ? FOR UPDATE", (1,))
        .await
        .expect_err("held");
    assert_eq!(server_error(&e)?.0, 1205);
    // The holder reads its own rows without waiting.
    let own: Option<i64> = holder
        .query_first("SELECT balance FROM account WHERE id = 1 FOR UPDATE")
        .await?;
    assert_eq!(own, Some(90));
    c.query_drop("ROLLBACK GLOBAL").await?;
    holder.query_drop("COMMIT GLOBAL").await?;
    Ok(())
}

#[tokio::test]
async fn nowait_fails_at_once_and_skip_locked_leaves_held_rows_out() -> Result<()> {
    let (_db, _tc, proxy) = setup(20_000).await?;
    let (mut holder, xid) = hold_row(&proxy).await?;
    let mut c = proxy.conn().await?;
    start(&mut c).await?;
    let began = Instant::now();
    let e = c
        .query_drop("SELECT * FROM account WHERE id = 1 FOR UPDATE NOWAIT")
        .await
        .expect_err("held");
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
    assert!(message.contains(&xid), "{message}");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "NOWAIT does not wait for the 20 s lock timeout"
    );

    c.query_drop("BEGIN").await?;
    let first: Vec<i64> = c
        .query("SELECT id FROM account ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")
        .await?;
    assert_eq!(
        first,
        [2],
        "the globally locked row 1 is skipped, and LIMIT still fills"
    );
    let all: Vec<i64> = c
        .query("SELECT id FROM account WHERE balance > 0 ORDER BY id FOR UPDATE SKIP LOCKED")
        .await?;
    assert_eq!(all, [2, 3]);
    c.query_drop("COMMIT").await?;
    // In autocommit too; the client still sees autocommit.
    let ids: Vec<i64> = c
        .query("SELECT id FROM account ORDER BY id FOR UPDATE SKIP LOCKED")
        .await?;
    assert_eq!(ids, [2, 3]);
    let in_trans: Option<i64> = c.query_first("SELECT @@in_transaction").await?;
    assert_eq!(in_trans, Some(0));
    c.query_drop("COMMIT GLOBAL").await?;
    holder.query_drop("COMMIT GLOBAL").await?;
    Ok(())
}
