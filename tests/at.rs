//! AT mode through the proxy, with a real `ferrata-tc` process and real MariaDB servers:
//! UPDATE and DELETE imaged in a global transaction, committed or rolled back exactly, across
//! two databases; autocommit statements wrapped; dirty rollbacks detected and reported with
//! nothing overwritten; two global transactions on one row.

use std::time::Duration;

use anyhow::Result;
use ferrata_proxy::config::{Coordinator as TcSettings, Secret};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb, MariaDbOptions};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::start_global as start;
use ferrata_tests::{Proxy, server_error, test_config, undo_records, until};
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// A real `ferrata-proxy` process in front of `db`.
async fn proxy_for(db: &MariaDb, tc: &Coordinator, lock_wait_ms: u64) -> Result<ProxyProcess> {
    ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), lock_wait_ms)
}

/// The config of an in-process proxy in front of `db`, attached to `tc`, with the app user
/// as its service user.
fn in_process_config(db: &MariaDb, tc: &Coordinator) -> ferrata_proxy::Config {
    let mut config = test_config(db.addr());
    config.coordinator = Some(TcSettings {
        lock_wait_ms: 2000,
        ..TcSettings::new(vec![tc.endpoint()])
    });
    config.service.user = APP_USER.into();
    config.service.password = Some(Secret(APP_PASSWORD.into()));
    config
}

/// Every column of every row, as hex, read directly from the server: what "byte-identical"
/// is checked against.
async fn snapshot(conn: &mut mysql_async::Conn, table: &str) -> Result<Vec<String>> {
    let columns: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'test' AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (table,),
        )
        .await?;
    let list: Vec<String> = columns.iter().map(|c| format!("IFNULL(HEX(`{c}`), 'NULL')")).collect();
    let sql = format!("SELECT CONCAT_WS('|', {}) FROM `{table}` ORDER BY 1", list.join(", "));
    Ok(conn.query(sql).await?)
}

/// A server with table `t (id INT PRIMARY KEY, v INT)` holding `(1, 1)`, a coordinator, a
/// proxy process in front (lock wait 2 s) and a direct connection.
async fn one_row() -> Result<(MariaDb, Coordinator, ProxyProcess, mysql_async::Conn)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1)").await?;
    Ok((db, tc, proxy, direct))
}

const TYPES: &str = "CREATE TABLE acct (
    id INT NOT NULL, region VARCHAR(10) NOT NULL, balance DECIMAL(20,4) NOT NULL, rate DOUBLE, ratio FLOAT,
    note VARCHAR(50) CHARACTER SET utf8mb4, data BLOB, flags BIT(8), kind ENUM('a','b'), tags SET('x','y'),
    doc JSON, day DATE, at DATETIME(6), ts TIMESTAMP(6) NULL, span TIME(3),
    doubled DECIMAL(21,4) AS (balance * 2) VIRTUAL,
    tiny TINYINT, small SMALLINT UNSIGNED, medium MEDIUMINT, big BIGINT UNSIGNED, fixed CHAR(5), bin BINARY(3),
    yr YEAR, txt TEXT, l1 VARCHAR(10) CHARACTER SET latin1, stored_note VARCHAR(60) AS (CONCAT(note, '!')) STORED,
    PRIMARY KEY (region, id))";

async fn seed(db: &MariaDb) -> Result<Vec<String>> {
    let mut c = db.conn().await?;
    c.query_drop(TYPES).await?;
    c.query_drop(
        "INSERT INTO acct (id, region, balance, rate, ratio, note, data, flags, kind, tags, doc, day, at, ts, span) VALUES
         (1, 'eu', 100.5, 0.1, 1.1234567, 'Grüße 🙂', x'00ff10', b'10100101', 'a', 'x,y', '{\"k\": [1, 2]}', '2024-02-29', '2024-01-01 10:00:00.123456', '2024-03-31 01:30:00.5', '-12:00:00.5'),
         (2, 'eu', 50, 1e308, -0.5, NULL, NULL, NULL, NULL, '', NULL, NULL, NULL, NULL, NULL),
         (3, 'us', 0.0001, -2.5e-300, 3, 'x', x'', b'0', 'b', 'y', '[]', '1999-12-31', '1999-12-31 23:59:59', NULL, '838:59:59')",
    )
    .await?;
    c.query_drop(
        "UPDATE acct SET tiny = -128, small = 65535, medium = -8388608, big = 18446744073709551615, fixed = 'ab',
         bin = x'000102', yr = 2155, txt = REPEAT('long text ', 100), l1 = CONVERT('café' USING latin1) WHERE id = 1",
    )
    .await?;
    snapshot(&mut c, "acct").await
}

#[tokio::test]
async fn rollback_restores_every_type_byte_for_byte() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let original = seed(&db).await?;

    let mut conn = proxy.conn().await?;
    conn.query_drop("SET time_zone = '+05:30', NAMES latin1").await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop(
        "UPDATE acct SET balance = balance + 1, rate = rate / 3, ratio = 2.5, note = 'changed', data = x'01', flags = b'1',
         kind = 'b', tags = 'x', doc = '{}', day = '2000-01-01', at = NOW(6), ts = NOW(6), span = '01:00:00',
         tiny = 1, small = 0, medium = 1, big = 0, fixed = 'zz', bin = x'ffffff', yr = 1901, txt = '', l1 = 'x' WHERE region = 'eu'",
    )
    .await?;
    conn.query_drop("DELETE FROM acct WHERE id = 3").await?;
    conn.query_drop("COMMIT").await?;
    assert_eq!(undo_records(&db).await?, 1, "one branch, one undo record");
    let v = tc.get(&format!("/v1/transactions/{xid}")).await?;
    let keys = v["branches"][0]["lock_keys"].as_array().expect("lock keys").len();
    assert_eq!(keys, 3, "the two updated rows and the deleted one are locked: {v}");

    let mut direct = db.conn().await?;
    assert_ne!(
        snapshot(&mut direct, "acct").await?,
        original,
        "the changes are committed locally"
    );
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(snapshot(&mut direct, "acct").await?, original, "every byte is back");
    assert_eq!(undo_records(&db).await?, 0);
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    Ok(())
}

#[tokio::test]
async fn commit_keeps_the_changes_and_deletes_the_undo_record() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    seed(&db).await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    // Autocommit: the proxy wraps the statement; the client still sees autocommit.
    conn.query_drop("UPDATE acct SET balance = 0 WHERE id = 1").await?;
    let in_trans: Option<i32> = conn.query_first("SELECT @@in_transaction").await?;
    assert_eq!(in_trans, Some(0), "no local transaction is left open");
    assert_eq!(conn.affected_rows(), 0, "affected rows of the SELECT");
    assert_eq!(undo_records(&db).await?, 1);
    conn.query_drop("COMMIT GLOBAL").await?;
    until("the undo record to go", || async { Ok(undo_records(&db).await? == 0) }).await?;
    let mut direct = db.conn().await?;
    let balance: Option<String> = direct.query_first("SELECT balance FROM acct WHERE id = 1").await?;
    assert_eq!(balance.as_deref(), Some("0.0000"));
    assert_eq!(tc.status(&xid).await?, "Committed");
    Ok(())
}

#[tokio::test]
async fn a_wrapped_autocommit_statement_reports_what_the_server_would() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::{RawConn, flags::DEFAULT};
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1), (2, 2)").await?;
    let ok = |packets: Vec<ferrata_tests::ferrata_testkit::raw::Packet>| {
        assert_eq!(packets.len(), 1, "{packets:?}");
        packets[0].payload.clone()
    };
    let mut raw_direct = RawConn::connect(db.addr(), APP_USER, APP_PASSWORD, Some("test"), DEFAULT).await?;
    let expected = ok(raw_direct.query("UPDATE t SET v = v + 10 WHERE id = 1").await?);
    let mut raw_proxied = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), DEFAULT).await?;
    let started = raw_proxied.query("START GLOBAL TRANSACTION").await?;
    assert!(started.len() > 2, "a result set with the XID");
    let got = ok(raw_proxied.query("UPDATE t SET v = v + 10 WHERE id = 2").await?);
    assert_eq!(
        got, expected,
        "the same OK packet: one row affected, autocommit, no transaction open"
    );
    // An error of the proxy's own image read is the server's, SQLSTATE included.
    let failing = "UPDATE t SET v = 0 WHERE id = (SELECT 1 UNION SELECT 2)";
    let expected = ok(raw_direct.query(failing).await?);
    assert_eq!(&expected[..9], b"\xff\xda\x04#21000", "ER_SUBQUERY_NO_1_ROW");
    assert_eq!(ok(raw_proxied.query(failing).await?), expected);
    raw_proxied.query("ROLLBACK GLOBAL").await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 2").await?;
    assert_eq!(v, Some(2));
    Ok(())
}

#[tokio::test]
async fn a_transfer_across_two_databases_commits_or_rolls_back_as_one() -> Result<()> {
    let (db1, db2) = (MariaDb::start().await?, MariaDb::start().await?);
    let tc = Coordinator::start(TC)?;
    let (p1, p2) = (proxy_for(&db1, &tc, 2000).await?, proxy_for(&db2, &tc, 2000).await?);
    for db in [&db1, &db2] {
        let mut c = db.conn().await?;
        c.query_drop("CREATE TABLE account (id INT PRIMARY KEY, balance INT NOT NULL)")
            .await?;
        c.query_drop("INSERT INTO account VALUES (1, 100)").await?;
    }
    let balances = || async {
        let mut a = db1.conn().await?;
        let mut b = db2.conn().await?;
        let x: Option<i32> = a.query_first("SELECT balance FROM account WHERE id = 1").await?;
        let y: Option<i32> = b.query_first("SELECT balance FROM account WHERE id = 1").await?;
        anyhow::Ok((x.unwrap_or(-1), y.unwrap_or(-1)))
    };

    for (decision, expected) in [("ROLLBACK GLOBAL", (100, 100)), ("COMMIT GLOBAL", (70, 130))] {
        let mut payer = p1.conn().await?;
        let mut payee = p2.conn().await?;
        let xid = start(&mut payer).await?;
        payer
            .query_drop("UPDATE account SET balance = balance - 30 WHERE id = 1")
            .await?;
        payee.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
        payee
            .query_drop("UPDATE account SET balance = balance + 30 WHERE id = 1")
            .await?;
        assert_eq!(balances().await?, (70, 130), "phase 1 committed locally on both");
        payer.query_drop(decision).await?;
        until("both databases to settle", || async {
            Ok(balances().await? == expected && undo_records(&db1).await? == 0 && undo_records(&db2).await? == 0)
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_dirty_rollback_overwrites_nothing_and_keeps_the_locks() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 500).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 10), (2, 20)").await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = v + 1").await?;
    // Someone writes behind the proxy's back.
    direct.query_drop("UPDATE t SET v = 99 WHERE id = 2").await?;

    let e = conn.query_drop("ROLLBACK GLOBAL").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1401, "{message}");
    assert!(message.contains("were changed outside"), "{message}");
    assert!(
        message.contains("\"current\":\"99\""),
        "the detail shows the current value: {message}"
    );
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 11), (2, 99)], "nothing was overwritten");
    assert_eq!(tc.status(&xid).await?, "RollbackFailed");
    let locks = tc.get("/v1/locks").await?;
    assert_eq!(
        locks["locks"].as_array().map(Vec::len),
        Some(2),
        "the rows stay locked: {locks}"
    );

    // Another global transaction may not touch the rows meanwhile.
    let xid2 = start(&mut conn).await?;
    let e = conn.query_drop("UPDATE t SET v = 0 WHERE id = 1").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1205, "{message}");
    assert!(message.contains(&xid), "names the holder: {message}");
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(11), "the refused write was rolled back");
    conn.query_drop(format!("ROLLBACK GLOBAL '{xid2}'")).await?;
    Ok(())
}

#[tokio::test]
async fn a_restore_that_does_not_read_back_waits_for_a_dba_with_the_values() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 500).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 10)").await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = 11").await?;
    // From now on writing the before image back (v = 10) stores something else: the
    // restore cannot read back, and never will, however often it is retried.
    direct
        .query_drop("CREATE TRIGGER skew BEFORE UPDATE ON t FOR EACH ROW IF NEW.v = 10 THEN SET NEW.v = 1000; END IF")
        .await?;

    let e = conn.query_drop("ROLLBACK GLOBAL").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1401, "{message}");
    assert!(message.contains("did not read back"), "{message}");
    let v: Option<i32> = direct.query_first("SELECT v FROM t").await?;
    assert_eq!(v, Some(11), "the failed restore was rolled back: nothing was changed");
    // Not retried: a failed rollback for a DBA, with the values that differ.
    assert_eq!(tc.status(&xid).await?, "RollbackFailed");
    let t = tc.get(&format!("/v1/transactions/{xid}")).await?;
    let columns = &t["failure"]["detail"]["rows"][0]["columns"][0];
    assert_eq!(
        (
            columns["column"].as_str(),
            columns["before"].as_str(),
            columns["read_back"].as_str()
        ),
        (Some("v"), Some("10"), Some("1000")),
        "{t}"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_global_transaction_waits_for_the_row() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 10_000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 0)").await?;

    let mut first = proxy.conn().await?;
    let xid1 = start(&mut first).await?;
    first.query_drop("UPDATE t SET v = v + 1 WHERE id = 1").await?;

    let mut second = proxy.conn().await?;
    start(&mut second).await?;
    let waiting = tokio::spawn(async move {
        let r = second.query_drop("UPDATE t SET v = v + 10 WHERE id = 1").await;
        (r, second)
    });
    // The second holds the row in the database and waits for the global lock.
    until("the second to wait in the coordinator", || async {
        let locks = tc.get("/v1/locks").await?;
        Ok(locks["locks"][0]["waiters"].as_array().is_some_and(|w| !w.is_empty()))
    })
    .await?;
    first.query_drop(format!("COMMIT GLOBAL '{xid1}'")).await?;
    let (r, mut second) = waiting.await?;
    r?;
    second.query_drop("COMMIT GLOBAL").await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(11));
    Ok(())
}

#[tokio::test]
async fn inserts_with_given_and_generated_keys_are_undone() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct
        .query_drop("CREATE TABLE pair (a VARCHAR(10), b INT, v TEXT, PRIMARY KEY (a, b))")
        .await?;
    direct
        .query_drop("CREATE TABLE seq (id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT)")
        .await?;
    direct.query_drop("INSERT INTO seq (v) VALUES (0)").await?;
    let before = (
        snapshot(&mut direct, "pair").await?,
        snapshot(&mut direct, "seq").await?,
    );

    let mut conn = proxy.conn().await?;
    conn.query_drop("SET auto_increment_increment = 3").await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop("INSERT INTO pair VALUES ('x', 1, 'one'), ('x''y', -2, NULL)")
        .await?;
    conn.query_drop("INSERT INTO seq (v) VALUES (1), (2), (3)").await?;
    conn.query_drop("INSERT INTO seq VALUES (NULL, 4)").await?;
    conn.query_drop("COMMIT").await?;
    let n: Option<i64> = direct.query_first("SELECT COUNT(*) FROM seq").await?;
    assert_eq!(n, Some(5));
    let v = tc.get(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(
        v["branches"][0]["lock_keys"].as_array().map(Vec::len),
        Some(6),
        "every inserted row is locked: {v}"
    );
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(
        (
            snapshot(&mut direct, "pair").await?,
            snapshot(&mut direct, "seq").await?
        ),
        before
    );

    // Keys the proxy cannot know are refused before anything runs.
    start(&mut conn).await?;
    let e = conn
        .query_drop("INSERT INTO pair VALUES (UUID(), 1, 'u')")
        .await
        .unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1235, "{message}");
    assert!(message.contains("expressions"), "{message}");
    let e = conn
        .query_drop("INSERT INTO seq VALUES (10, 1), (NULL, 2)")
        .await
        .unwrap_err();
    assert!(server_error(&e)?.2.contains("mixes"));
    conn.query_drop("INSERT INTO seq (id, v) VALUES (100, 7)").await?;
    conn.query_drop("COMMIT GLOBAL").await?;
    let n: Option<i64> = direct.query_first("SELECT COUNT(*) FROM seq WHERE id = 100").await?;
    assert_eq!(n, Some(1), "a committed insert stays");
    Ok(())
}

#[tokio::test]
async fn prepared_statements_are_imaged_with_their_parameters() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct
        .query_drop("CREATE TABLE t (k VARCHAR(10), n INT, v DOUBLE, PRIMARY KEY (k, n))")
        .await?;
    direct
        .query_drop("INSERT INTO t VALUES ('a', 1, 0.5), ('a', 2, 1.5), ('b', 1, 2.5)")
        .await?;
    let before = snapshot(&mut direct, "t").await?;

    let mut conn = proxy.conn().await?;
    let update = conn
        .prep("UPDATE t SET v = v * ? WHERE k = ? AND n >= ? ORDER BY n LIMIT ?")
        .await?;
    let delete = conn.prep("DELETE FROM t WHERE k = ?").await?;
    let insert = conn.prep("INSERT INTO t VALUES (?, ?, ?), ('c', ?, NULL)").await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    conn.exec_drop(&update, (3.0, "a", 1, 1)).await?;
    assert_eq!(
        conn.affected_rows(),
        1,
        "LIMIT 1 applies to the image and the statement alike"
    );
    conn.exec_drop(&update, (2.0, "a", 2, 5)).await?;
    conn.exec_drop(&delete, ("b",)).await?;
    conn.exec_drop(&insert, ("d'q", -7, 1.0, 9)).await?;
    conn.query_drop("COMMIT").await?;
    let rows: Vec<(String, i32, Option<f64>)> = direct.query("SELECT k, n, v FROM t ORDER BY k, n").await?;
    assert_eq!(
        rows,
        [
            ("a".into(), 1, Some(1.5)),
            ("a".into(), 2, Some(3.0)),
            ("c".into(), 9, None),
            ("d'q".into(), -7, Some(1.0))
        ]
    );
    let v = tc.get(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(v["branches"][0]["lock_keys"].as_array().map(Vec::len), Some(5), "{v}");
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(
        snapshot(&mut direct, "t").await?,
        before,
        "every prepared change was undone"
    );
    Ok(())
}

#[tokio::test]
async fn undo_records_larger_than_a_packet_are_split() -> Result<()> {
    let db = MariaDb::start_with(MariaDbOptions {
        extra_args: vec!["--max-allowed-packet=1M".into()],
        ..Default::default()
    })
    .await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct
        .query_drop("CREATE TABLE big (id INT PRIMARY KEY, b MEDIUMBLOB)")
        .await?;
    // Random bytes do not compress: 4 rows of 300 KB are a record of several packets.
    for id in 1..=4 {
        direct
            .query_drop(format!("INSERT INTO big VALUES ({id}, RANDOM_BYTES(1024))"))
            .await?;
        for _ in 0..8 {
            direct
                .query_drop(format!(
                    "UPDATE big SET b = CONCAT(b, RANDOM_BYTES(1024), REPEAT(RANDOM_BYTES(1024), 0)) WHERE id = {id}"
                ))
                .await?;
        }
        direct.query_drop(format!("UPDATE big SET b = CONCAT(b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b) WHERE id = {id}")).await?;
    }
    let size: Option<i64> = direct.query_first("SELECT SUM(LENGTH(b)) FROM big").await?;
    assert!(size.unwrap_or(0) > 1_000_000, "{size:?}");
    let before = snapshot(&mut direct, "big").await?;

    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    conn.query_drop("UPDATE big SET b = 'x'").await?;
    let pieces: Option<i64> = direct.query_first("SELECT COUNT(*) FROM undo_log").await?;
    assert!(pieces.unwrap_or(0) > 1, "the record was split into {pieces:?} rows");
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(snapshot(&mut direct, "big").await?, before);
    let left: Option<i64> = direct.query_first("SELECT COUNT(*) FROM undo_log").await?;
    assert_eq!(left, Some(0), "every piece is deleted with the record");

    // A commit deletes every piece too.
    start(&mut conn).await?;
    conn.query_drop("UPDATE big SET b = 'y'").await?;
    conn.query_drop("COMMIT GLOBAL").await?;
    until("the pieces to be deleted", || async {
        let mut c = db.conn().await?;
        let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM undo_log").await?;
        Ok(n == Some(0))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_local_commit_after_the_global_rollback_fails_and_changes_nothing() -> Result<()> {
    let (_db, _tc, proxy, mut direct) = one_row().await?;
    let mut slow = proxy.conn().await?;
    let xid = start(&mut slow).await?;
    slow.query_drop("BEGIN").await?;
    slow.query_drop("UPDATE t SET v = 2 WHERE id = 1").await?;
    // The global transaction is rolled back (here by another session) while this local one
    // is still open: its late commit must not land.
    let mut other = proxy.conn().await?;
    other.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await?;
    let e = slow.query_drop("COMMIT").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1399, "{message}");
    assert!(message.contains("Rollbacked"), "names the status: {message}");
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(1), "the late local commit was rolled back");
    let open: Option<i32> = slow.query_first("SELECT @@in_transaction").await?;
    assert_eq!(open, Some(0));
    Ok(())
}

#[tokio::test]
async fn the_coordinator_killed_between_the_phases_finishes_after_restart() -> Result<()> {
    let db = MariaDb::start().await?;
    let mut tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1), (2, 2)").await?;
    let before = snapshot(&mut direct, "t").await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = v * 10").await?;

    tc.kill9_and_restart()?;
    // The proxy reconnects (the first call may find the old connection dead).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match conn.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let (code, _, message) = server_error(&e)?;
                anyhow::ensure!(code == 1105 || code == 1401, "{message}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(
        snapshot(&mut direct, "t").await?,
        before,
        "the branch rolled back after the restart"
    );
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_coordinator_at_commit_rolls_the_local_transaction_back() -> Result<()> {
    let (_db, mut tc, proxy, mut direct) = one_row().await?;
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop("UPDATE t SET v = 2").await?;
    tc.kill9()?;
    let e = conn.query_drop("COMMIT").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1105, "{message}");
    assert!(
        message.contains("cannot reach the transaction coordinator"),
        "{message}"
    );
    let v: Option<i32> = direct.query_first("SELECT v FROM t").await?;
    assert_eq!(v, Some(1), "nothing half-written");
    let undo: Option<i64> = direct
        .query_first("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_NAME = 'undo_log'")
        .await?;
    assert_eq!(undo, Some(0), "not even an undo table");
    let open: Option<i32> = conn.query_first("SELECT @@in_transaction").await?;
    assert_eq!(open, Some(0), "the local transaction was rolled back");
    Ok(())
}

#[tokio::test]
async fn a_service_user_without_create_gets_the_dba_instructions() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let mut root = mysql_async::Conn::new(db.root_opts()).await?;
    root.query_drop("CREATE USER svc@'%' IDENTIFIED BY 'svc-pw'").await?;
    root.query_drop("GRANT SELECT, INSERT, DELETE ON test.* TO svc@'%'")
        .await?;
    root.query_drop("CREATE TABLE test.t (id INT PRIMARY KEY, v INT)")
        .await?;
    root.query_drop("INSERT INTO test.t VALUES (1, 1)").await?;
    let mut config = in_process_config(&db, &tc);
    config.service.user = "svc".into();
    config.service.password = Some(Secret("svc-pw".into()));
    let proxy = Proxy::start_with(config).await?;
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    let e = conn.query_drop("UPDATE t SET v = 2").await.unwrap_err();
    let (_, _, message) = server_error(&e)?;
    assert!(
        message.contains("a DBA must run") && message.contains("CREATE TABLE IF NOT EXISTS undo_log"),
        "{message}"
    );
    assert!(
        message.contains("GRANT SELECT, INSERT, DELETE ON test.undo_log TO 'svc'"),
        "{message}"
    );
    let v: Option<i32> = root.query_first("SELECT v FROM test.t").await?;
    assert_eq!(v, Some(1), "the statement was rolled back");
    Ok(())
}

#[tokio::test]
async fn a_proxy_killed_after_registering_leaves_nothing_behind() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1)").await?;
    direct.query_drop(undo_log_ddl()).await?;
    let mut proxy = proxy_for(&db, &tc, 2000).await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop("UPDATE t SET v = 2").await?;
    // Hold the undo table so the proxy's commit stops after the branch is registered.
    let mut dba = db.conn().await?;
    dba.query_drop("LOCK TABLES undo_log WRITE").await?;
    let commit = tokio::spawn(async move { conn.query_drop("COMMIT").await });
    until("the branch to be registered", || async {
        Ok(tc.get(&format!("/v1/transactions/{xid}")).await?["branch_count"] == 1)
    })
    .await?;
    proxy.kill9()?;
    assert!(commit.await?.is_err(), "the client lost its connection");
    dba.query_drop("UNLOCK TABLES").await?;

    // Another proxy in front of the same database finishes the rollback.
    let _replacement = proxy_for(&db, &tc, 2000).await?;
    let (status, body) = ferrata_tests::http_post(tc.http, &format!("/v1/transactions/{xid}/rollback"), "").await?;
    assert_eq!(status, 200, "{body}");
    until("the rollback", || async { Ok(tc.status(&xid).await? == "Rollbacked") }).await?;
    // The server had the undo record's INSERT and the COMMIT as one string when the proxy
    // died: it either finished it (the branch committed with its undo record, which the
    // rollback replayed) or gave up at the dead connection (the rollback left an
    // anti-hanging marker). Either way nothing is left of the write.
    let v: Option<i32> = direct.query_first("SELECT v FROM t").await?;
    assert_eq!(v, Some(1), "the write was undone or never committed");
    let records: Option<i64> = direct
        .exec_first(
            "SELECT COUNT(*) FROM undo_log WHERE xid = ? AND log_status = 0",
            (&xid,),
        )
        .await?;
    assert_eq!(records, Some(0), "no undo record is left");
    Ok(())
}

#[tokio::test]
async fn a_database_restarted_during_phase_two_is_rolled_back_once_it_is_back() -> Result<()> {
    let (db_a, mut db_b) = (MariaDb::start().await?, MariaDb::start().await?);
    let tc = Coordinator::start(TC)?;
    let (pa, pb) = (proxy_for(&db_a, &tc, 2000).await?, proxy_for(&db_b, &tc, 2000).await?);
    let mut before = Vec::new();
    for db in [&db_a, &db_b] {
        let mut c = db.conn().await?;
        c.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
        c.query_drop("INSERT INTO t VALUES (1, 1)").await?;
        before.push(snapshot(&mut c, "t").await?);
    }
    let (mut a, mut b) = (pa.conn().await?, pb.conn().await?);
    let xid = start(&mut a).await?;
    a.query_drop("UPDATE t SET v = 2").await?;
    b.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
    b.query_drop("UPDATE t SET v = 3").await?;
    drop(b);

    // Server B crashes: the rollback cannot finish and says which branch is missing.
    db_b.kill();
    let e = a.query_drop("ROLLBACK GLOBAL").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1401, "{message}");
    assert!(message.contains("RollbackRetrying"), "{message}");
    // Back again: the coordinator's retry finishes the job.
    db_b.restart().await?;
    until("the rollback to finish", || async {
        Ok(tc.status(&xid).await? == "Rollbacked")
    })
    .await?;
    for (db, expected) in [(&db_a, &before[0]), (&db_b, &before[1])] {
        let mut c = db.conn().await?;
        assert_eq!(&snapshot(&mut c, "t").await?, expected);
    }
    Ok(())
}

fn undo_log_ddl() -> &'static str {
    ferrata_proxy::coordinator::undo_table::CREATE
}

#[tokio::test]
async fn ddl_through_the_proxy_refreshes_table_metadata() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut conn = proxy.conn().await?;
    conn.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    conn.query_drop("INSERT INTO t VALUES (1, 1)").await?;
    start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = 2").await?; // caches the shape
    conn.query_drop("COMMIT GLOBAL").await?;
    conn.query_drop("ALTER TABLE t ADD COLUMN w VARCHAR(5) DEFAULT 'a'")
        .await?;
    let mut direct = db.conn().await?;
    let before = snapshot(&mut direct, "t").await?;
    start(&mut conn).await?;
    conn.query_drop("UPDATE t SET w = 'b', v = 3").await?;
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(
        snapshot(&mut direct, "t").await?,
        before,
        "the new column was imaged and restored too"
    );
    Ok(())
}

#[tokio::test]
async fn statements_that_cannot_be_imaged_are_refused() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE nokey (v INT)").await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct
        .query_drop("CREATE TABLE audited (id INT PRIMARY KEY, v INT)")
        .await?;
    direct
        .query_drop("CREATE TRIGGER audit BEFORE UPDATE ON audited FOR EACH ROW SET NEW.v = NEW.v")
        .await?;
    direct.query_drop("INSERT INTO nokey VALUES (1)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1)").await?;
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    for (sql, why) in [
        ("UPDATE nokey SET v = 2", "no primary key"),
        ("UPDATE t SET id = 5 WHERE id = 1", "primary-key column"),
        ("UPDATE audited SET v = 2", "triggers"),
        ("UPDATE t JOIN nokey SET nokey.v = 3", "no primary key"),
        ("UPDATE t, nokey SET v = 3", "cannot place"),
        ("DELETE FROM t RETURNING id", "RETURNING"),
        (
            "SET STATEMENT sql_mode = '' FOR UPDATE t SET v = 9 WHERE id = 1",
            "SET STATEMENT",
        ),
        ("BEGIN; UPDATE t SET v = 9 WHERE id = 1; COMMIT", "BEGIN"),
        (
            "SELECT * FROM t FOR UPDATE; UPDATE t SET v = 9 WHERE id = 1",
            "locking read",
        ),
        (
            "set statement max_statement_time = 10 for select * from t for update",
            "SET STATEMENT",
        ),
    ] {
        let e = conn.query_drop(sql).await.unwrap_err();
        let (code, _, message) = server_error(&e)?;
        assert_eq!(code, 1235, "{sql}: {message}");
        assert!(message.contains(why), "{sql}: {message}");
    }
    let e = conn.query_drop("UPDATE missing SET v = 1").await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1146);
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t").await?;
    assert_eq!(rows, [(1, 1)]);
    // BEGIN with protected writes pending would commit them behind the proxy's back, and
    // so would a prepared COMMIT; leaving would let a later DDL do it.
    let prepared_commit = conn.prep("COMMIT").await?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop("UPDATE t SET v = 2 WHERE id = 1").await?;
    let e = conn.query_drop("BEGIN").await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1235);
    let e = conn
        .query_drop("COMMIT; UPDATE t SET v = 3 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(server_error(&e)?.0, 1235);
    let e = conn.exec_drop(&prepared_commit, ()).await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1235);
    let e = conn.query_drop("LEAVE GLOBAL TRANSACTION").await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1399);
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(1), "nothing was committed");
    conn.query_drop("ROLLBACK").await?;
    conn.query_drop("ROLLBACK GLOBAL").await?;
    Ok(())
}

#[tokio::test]
async fn rollback_to_savepoint_discards_exactly_the_undo_records_made_after_it() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 5_000).await?;
    let mut direct = db.conn().await?;
    direct
        .query_drop("CREATE TABLE sp (id INT PRIMARY KEY, v INT NOT NULL)")
        .await?;
    direct
        .query_drop("INSERT INTO sp VALUES (1, 1), (2, 2), (3, 3)")
        .await?;
    let original = snapshot(&mut direct, "sp").await?;

    let mut c = proxy.conn().await?;
    let xid = start(&mut c).await?;
    c.query_drop("BEGIN").await?;
    c.query_drop("UPDATE sp SET v = 10 WHERE id = 1").await?;
    c.query_drop("SAVEPOINT a").await?;
    c.query_drop("UPDATE sp SET v = 20 WHERE id = 2").await?;
    c.query_drop("SAVEPOINT `B`").await?;
    c.query_drop("INSERT INTO sp VALUES (4, 4)").await?;
    c.query_drop("ROLLBACK TO SAVEPOINT b").await?;
    c.query_drop("DELETE FROM sp WHERE id = 3").await?;
    c.query_drop("ROLLBACK TO SAVEPOINT A").await?;
    c.query_drop("UPDATE sp SET v = 30 WHERE id = 3").await?;
    c.query_drop("COMMIT").await?;
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM sp ORDER BY id").await?;
    assert_eq!(
        rows,
        [(1, 10), (2, 2), (3, 30)],
        "the server undid what followed the savepoints"
    );
    // Only rows 1 and 3 were registered: the lock of row 2 (and of the inserted row 4) went
    // with the discarded undo items.
    let locks = tc.get("/v1/locks?table=sp").await?;
    let holders: Vec<&str> = locks["locks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["holder"].as_str())
        .collect();
    assert_eq!(holders, [xid.as_str(); 2], "two rows locked: {locks}");
    // A discarded item left behind would see row 2 or 4 differ from its after image and
    // make the rollback dirty.
    c.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    assert_eq!(snapshot(&mut direct, "sp").await?, original);
    Ok(())
}

#[tokio::test]
async fn a_multi_statement_string_is_imaged_statement_by_statement() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::RawConn;
    use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, DEFAULT};
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 2000).await?;
    let mut direct = db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 1), (2, 1)").await?;
    let original = snapshot(&mut direct, "t").await?;
    let flags = DEFAULT | CLIENT_MULTI_STATEMENTS | CLIENT_MULTI_RESULTS;
    let string = |id: i32, new: i32| {
        format!(
            "UPDATE t SET v = v + 10 WHERE id = {id}; SELECT v, 'x' AS k FROM t WHERE id = {id}; \
             INSERT INTO t VALUES ({new}, 3); DELETE FROM t WHERE id = {new}; UPDATE t SET v = v * 2 WHERE id = {id}"
        )
    };
    // What the server answers, directly, inside a local transaction (rolled back after).
    let mut raw_direct = RawConn::connect(db.addr(), APP_USER, APP_PASSWORD, Some("test"), flags).await?;
    raw_direct.query("BEGIN").await?;
    let expected = raw_direct.query(&string(1, 3)).await?;
    raw_direct.query("ROLLBACK").await?;

    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?;
    raw.query("START GLOBAL TRANSACTION").await?;
    raw.query("BEGIN").await?;
    let got = raw.query(&string(2, 4)).await?;
    let view = |packets: &[ferrata_tests::ferrata_testkit::raw::Packet]| {
        packets.iter().map(|p| (p.seq, p.payload.clone())).collect::<Vec<_>>()
    };
    assert_eq!(
        view(&got),
        view(&expected),
        "every result and OK as the server sends them"
    );
    raw.query("COMMIT").await?;
    // Autocommit: one local transaction of the proxy's own; the client sees autocommit.
    let got = raw.query(&string(2, 5)).await?;
    assert_eq!(got.len(), expected.len());
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 2").await?;
    assert_eq!(v, Some(64), "(1 + 10) * 2, then (22 + 10) * 2");
    let failed = raw
        .query("UPDATE t SET v = 0 WHERE id = 1; INSERT INTO t VALUES (1, 1); UPDATE t SET v = 5 WHERE id = 2")
        .await?;
    assert_eq!(
        failed.last().map(|p| p.payload[0]),
        Some(0xff),
        "stops at the duplicate key"
    );
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(
        rows,
        [(1, 0), (2, 64)],
        "what ran before the error stays, as in autocommit"
    );
    raw.query("ROLLBACK GLOBAL").await?;
    assert_eq!(snapshot(&mut direct, "t").await?, original, "every statement undone");
    // A statement the proxy cannot protect refuses the whole string.
    raw.query("START GLOBAL TRANSACTION").await?;
    let refused = raw
        .query("UPDATE t SET v = 9 WHERE id = 1; CREATE TABLE u (id INT)")
        .await?;
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].payload[0], 0xff);
    assert_eq!(snapshot(&mut direct, "t").await?, original, "nothing ran");
    // Committed.
    raw.query("UPDATE t SET v = 7 WHERE id = 1; INSERT INTO t VALUES (9, 9)")
        .await?;
    let done = raw.query("COMMIT GLOBAL").await?;
    assert_eq!(done.last().map(|p| p.payload[0]), Some(0x00), "{done:?}");
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 7), (2, 1), (9, 9)]);
    // A row one of the statements wrote, changed behind the proxy's back: a dirty rollback.
    let started = raw.query("START GLOBAL TRANSACTION").await?;
    let xid = String::from_utf8_lossy(&started[started.len() - 2].payload[1..]).into_owned();
    raw.query("UPDATE t SET v = 8 WHERE id = 1; DELETE FROM t WHERE id = 9")
        .await?;
    direct.query_drop("UPDATE t SET v = 100 WHERE id = 1").await?;
    let stopped = raw.query("ROLLBACK GLOBAL").await?;
    assert_eq!(stopped.last().map(|p| p.payload[0]), Some(0xff), "{stopped:?}");
    assert_eq!(tc.status(&xid).await?, "RollbackFailed");
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 100), (2, 1)], "nothing was overwritten");
    Ok(())
}

#[tokio::test]
async fn anti_hanging_markers_are_deleted_once_their_retention_has_passed() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let mut direct = db.conn().await?;
    direct.query_drop(undo_log_ddl()).await?;
    // A marker past the retention, a fresh one, and an old undo record (never swept).
    direct
        .query_drop(
            "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) VALUES \
             (1, 'old', 'ferrata:1', '', 1, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR), \
             (2, 'fresh', 'ferrata:1', '', 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6)), \
             (3, 'record', 'ferrata:1', '{}', 0, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) - INTERVAL 1 HOUR)",
        )
        .await?;
    let mut config = in_process_config(&db, &tc);
    config.service.marker_retention_ms = 60_000;
    let proxy = Proxy::start_with(config).await?;
    let series = format!("ferrata_proxy_antihanging_markers{{resource=\"{}/test\"}}", db.addr());
    until("the old marker to be swept", || async {
        let (_, body) = proxy.admin_get("/metrics").await?;
        Ok(ferrata_tests::metric(&body, &series) == Some(1.0))
    })
    .await?;
    let left: Vec<String> = direct.query("SELECT xid FROM undo_log ORDER BY branch_id").await?;
    assert_eq!(left, ["fresh", "record"], "only the marker past its retention is gone");
    Ok(())
}

/// COM_STMT_EXECUTE with statement id 0xFFFFFFFF runs the last statement prepared on the
/// connection (MariaDB's execute-direct, which Connector/C uses when the server offers bulk
/// operations: PREPARE and EXECUTE sent together).
#[tokio::test]
async fn an_execute_of_the_last_prepared_statement_is_protected_like_any_other() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::{RawConn, flags::DEFAULT};
    use ferrata_tests::{execute_payload, raw_prepare};
    const LAST: u32 = u32::MAX;
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = proxy_for(&db, &tc, 300).await?;
    let mut direct = db.conn().await?;
    direct
        .query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT, note VARCHAR(10))")
        .await?;
    direct
        .query_drop("INSERT INTO t VALUES (1, 1, 'a'), (2, 2, 'b')")
        .await?;
    // A string parameter: the proxy reads the before image with a prepared statement of its
    // own, which becomes the server's last prepared statement.
    let note_a = [(0xfe, Some(b"\x01a".to_vec()))];
    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), DEFAULT).await?;
    raw.query("START GLOBAL TRANSACTION").await?;
    raw_prepare(&mut raw, "UPDATE t SET v = 10 WHERE note = ?").await?;
    raw.send_command(&execute_payload(LAST, 0, &note_a)).await?;
    let ok = raw.read_response().await?;
    assert_eq!(ok[0].payload[0], 0x00, "{:?}", String::from_utf8_lossy(&ok[0].payload));
    assert_eq!(undo_records(&db).await?, 1, "imaged like any execute");
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(10), "the client's statement ran, not the proxy's");
    // Outside the global transaction the row is held: the same execute is checked.
    let mut other = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), DEFAULT).await?;
    raw_prepare(&mut other, "UPDATE t SET v = 20 WHERE note = ?").await?;
    other.send_command(&execute_payload(LAST, 0, &note_a)).await?;
    let held = other.read_response().await?;
    assert_eq!(
        held[0].payload[..3],
        [0xff, 0xb5, 0x04],
        "ERR 1205: {:?}",
        String::from_utf8_lossy(&held[0].payload)
    );
    raw.query("ROLLBACK GLOBAL").await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(1), "rolled back");
    Ok(())
}

#[tokio::test]
async fn a_write_that_changed_nothing_rolls_back_cleanly() -> Result<()> {
    let (db, tc, proxy, _direct) = one_row().await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    // Matched, not changed: its before and after images are the same row.
    conn.query_drop("UPDATE t SET v = 1 WHERE id = 1").await?;
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    assert_eq!(undo_records(&db).await?, 0);
    Ok(())
}

/// A deadlock rolls the local transaction of a bound session back with an ERR, which
/// carries no status flags: the proxy must not go on as if it were open. The next
/// autocommit write is still wrapped as a branch of its own, so the global rollback undoes
/// it (were it run as part of the dead transaction, it would commit with no undo record).
#[tokio::test]
async fn an_autocommit_write_after_a_deadlock_is_still_protected() -> Result<()> {
    let (db, _tc, proxy, mut direct) = one_row().await?;
    direct.query_drop("INSERT INTO t VALUES (2, 2), (3, 3)").await?;
    let mut app = proxy.conn().await?;
    start(&mut app).await?;
    // Its blocked write shows as the proxy's before image of the row.
    let (mut app, e) = ferrata_tests::deadlock_victim(app, &db, "t", "v", "%FOR UPDATE%").await?;
    assert_eq!(server_error(&e)?.0, 1213, "{e}");

    app.query_drop("UPDATE t SET v = 99 WHERE id = 3").await?;
    app.query_drop("ROLLBACK GLOBAL").await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 3").await?;
    assert_eq!(v, Some(3), "the global rollback undid the autocommit write");
    Ok(())
}

/// An ERR 1213 does not always end the transaction (a stored function can SIGNAL it): the
/// proxy asks the server rather than assume, so the pending branch and its undo items stay
/// and the global rollback still undoes the write.
#[tokio::test]
async fn a_signalled_deadlock_error_keeps_the_pending_branch() -> Result<()> {
    let (_db, _tc, proxy, mut direct) = one_row().await?;
    direct
        .query_drop(
            "CREATE FUNCTION pretend_deadlock() RETURNS INT BEGIN SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213; \
             RETURN 1; END",
        )
        .await?;
    let mut app = proxy.conn().await?;
    start(&mut app).await?;
    app.query_drop("BEGIN").await?;
    app.query_drop("UPDATE t SET v = 5 WHERE id = 1").await?;
    let e = app
        .query_drop("SELECT pretend_deadlock()")
        .await
        .expect_err("signalled");
    assert_eq!(server_error(&e)?.0, 1213, "{e}");
    app.query_drop("COMMIT").await?;
    app.query_drop("ROLLBACK GLOBAL").await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(1), "the global rollback undid the write");
    Ok(())
}

/// A client that turns multi-statements on after the handshake (COM_SET_OPTION, as
/// connectors' `multi_query` do) gets its strings taken statement by statement in a global
/// transaction, as one that negotiated them: every write imaged, the rollback undoes all.
#[tokio::test]
async fn multi_statements_turned_on_later_are_still_protected() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::RawConn;
    use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, DEFAULT};
    let (_db, _tc, proxy, mut direct) = one_row().await?;
    direct.query_drop("INSERT INTO t VALUES (2, 2)").await?;
    let flags = (DEFAULT | CLIENT_MULTI_RESULTS) & !CLIENT_MULTI_STATEMENTS;
    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?;
    // COM_SET_OPTION, MYSQL_OPTION_MULTI_STATEMENTS_ON.
    raw.send_command(&[0x1b, 0, 0]).await?;
    // Answered with one EOF packet (or an ERR).
    let answer = raw.read_packet().await?;
    assert!(!answer.payload.starts_with(&[0xff]), "the server took the option");
    raw.query("START GLOBAL TRANSACTION").await?;
    let answers = raw
        .query("UPDATE t SET v = 50 WHERE id = 1; UPDATE t SET v = 60 WHERE id = 2")
        .await?;
    assert!(
        answers.iter().all(|p| !p.payload.starts_with(&[0xff])),
        "both ran: {answers:?}"
    );
    raw.query("ROLLBACK GLOBAL").await?;
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 1), (2, 2)], "the global rollback undid both writes");
    Ok(())
}

/// The proxy's own statements around a write go in groups (`ferrata_proxy_backend_round_trips_total`):
/// an autocommit UPDATE takes three round trips to the server (START with the before image,
/// the UPDATE with its after image, the undo record with the COMMIT), whether or not the
/// client turned multi-statement strings on (without them the proxy turns them on around
/// its own string only); in an open transaction the UPDATE takes two, the COMMIT one.
#[tokio::test]
async fn a_write_takes_its_round_trips_in_groups() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::RawConn;
    use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, DEFAULT};
    let (_db, _tc, proxy, mut direct) = one_row().await?;
    direct.query_drop("INSERT INTO t VALUES (2, 2)").await?;
    let round_trips = async || proxy.metric("ferrata_proxy_backend_round_trips_total").await;

    // mysql_async negotiates multi-statement strings.
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    let at = round_trips().await?;
    conn.query_drop("UPDATE t SET v = v + 10 WHERE id = 1").await?;
    assert_eq!(round_trips().await? - at, 3.0, "an autocommit UPDATE");
    conn.query_drop("BEGIN").await?;
    let at = round_trips().await?;
    conn.query_drop("UPDATE t SET v = v + 10 WHERE id = 2").await?;
    assert_eq!(round_trips().await? - at, 2.0, "an UPDATE in an open transaction");
    let at = round_trips().await?;
    conn.query_drop("COMMIT").await?;
    assert_eq!(round_trips().await? - at, 1.0, "its COMMIT");
    conn.query_drop("ROLLBACK GLOBAL").await?;

    // A client that did not.
    let flags = (DEFAULT | CLIENT_MULTI_RESULTS) & !CLIENT_MULTI_STATEMENTS;
    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?;
    raw.query("START GLOBAL TRANSACTION").await?;
    let at = round_trips().await?;
    let answer = raw.query("UPDATE t SET v = v + 10 WHERE id = 1").await?;
    assert_eq!(answer[0].payload[0], 0x00, "an OK: {answer:?}");
    assert_eq!(
        round_trips().await? - at,
        3.0,
        "an autocommit UPDATE without multi-statements"
    );
    let answer = raw.query("SELECT 1; SELECT 2").await?;
    assert_eq!(
        &answer[0].payload[..3],
        &[0xff, 0x28, 0x04],
        "multi-statement strings are still off for the client (ERR 1064): {answer:?}"
    );
    raw.query("ROLLBACK GLOBAL").await?;
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 1), (2, 2)], "both global rollbacks undid their writes");
    Ok(())
}

/// Once its Attach stream is open, a proxy makes its sessions' calls to the coordinator on
/// it (begin, registration, commit), not as HTTP/2 requests of their own.
#[tokio::test]
async fn the_proxys_calls_go_on_its_attach_stream() -> Result<()> {
    let (_db, tc, proxy, _direct) = one_row().await?;
    ferrata_tests::until("the proxy attached to the coordinator", async || {
        Ok(proxy.metric("ferrata_proxy_coordinator_attached").await? == 1.0)
    })
    .await?;
    let stream_calls = async || -> Result<f64> {
        let (_, metrics) = ferrata_tests::http_get(tc.http, "/metrics").await?;
        Ok(ferrata_tests::metric(&metrics, "ferrata_tc_stream_calls_total").unwrap_or(0.0))
    };
    let before = stream_calls().await?;
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = v + 10 WHERE id = 1").await?;
    conn.query_drop("COMMIT GLOBAL").await?;
    let made = stream_calls().await? - before;
    assert!(made >= 3.0, "begin, registration and commit on the stream: {made}");
    Ok(())
}

/// The undo record's INSERT and the COMMIT go to the server as one string, which stops at
/// a failed INSERT: a branch whose undo record cannot be written is never committed. (A
/// trigger refuses the INSERT here as the anti-hanging marker's unique key does for a
/// branch its global transaction already rolled back.)
#[tokio::test]
async fn a_write_whose_undo_record_fails_is_not_committed() -> Result<()> {
    use ferrata_tests::ferrata_testkit::raw::RawConn;
    use ferrata_tests::ferrata_testkit::raw::flags::{CLIENT_MULTI_RESULTS, CLIENT_MULTI_STATEMENTS, DEFAULT};
    let (_db, _tc, proxy, mut direct) = one_row().await?;
    direct.query_drop(undo_log_ddl()).await?;
    direct
        .query_drop(
            "CREATE TRIGGER refuse_undo BEFORE INSERT ON undo_log FOR EACH ROW \
             SIGNAL SQLSTATE '23000' SET MYSQL_ERRNO = 1062, MESSAGE_TEXT = 'Duplicate entry (refused by the test)'",
        )
        .await?;
    let refused = |e: mysql_async::Error| -> Result<()> {
        let (code, state, message) = server_error(&e)?;
        assert_eq!((code, state.as_str()), (1399, "XAE07"), "{message}");
        assert!(message.contains("already rolled this branch back"), "{message}");
        Ok(())
    };
    let mut conn = proxy.conn().await?;
    start(&mut conn).await?;
    refused(conn.query_drop("UPDATE t SET v = 2 WHERE id = 1").await.unwrap_err())?;
    conn.query_drop("BEGIN").await?;
    conn.query_drop("UPDATE t SET v = 3 WHERE id = 1").await?;
    refused(conn.query_drop("COMMIT").await.unwrap_err())?;
    conn.query_drop("ROLLBACK GLOBAL").await?;

    let flags = (DEFAULT | CLIENT_MULTI_RESULTS) & !CLIENT_MULTI_STATEMENTS;
    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), flags).await?;
    raw.query("START GLOBAL TRANSACTION").await?;
    let answer = raw.query("UPDATE t SET v = 4 WHERE id = 1").await?;
    assert_eq!(&answer[0].payload[..3], &[0xff, 0x77, 0x05], "ERR 1399: {answer:?}");
    raw.query("ROLLBACK GLOBAL").await?;

    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(1), "no write was committed");
    let undo: Option<i64> = direct.query_first("SELECT COUNT(*) FROM undo_log").await?;
    assert_eq!(undo, Some(0));
    Ok(())
}
