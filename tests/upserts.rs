//! The INSERTs that meet rows already there, inside global transactions, through a real
//! proxy process with a real coordinator and MariaDB: INSERT ... ON DUPLICATE KEY UPDATE
//! (VALUES(col) and row-alias forms), INSERT IGNORE, INSERT ... SET and REPLACE, as text and
//! as prepared statements; committed, rolled back exactly, a dirty rollback refused, and two
//! global transactions racing on the same keys.

use std::time::Duration;

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::start_global as start;
use ferrata_tests::until;
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

async fn setup(lock_wait_ms: u64) -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), lock_wait_ms)?;
    let mut c = db.conn().await?;
    c.query_drop(
        "CREATE TABLE item (id INT AUTO_INCREMENT PRIMARY KEY, sku VARCHAR(10) NOT NULL UNIQUE, qty INT NOT NULL)",
    )
    .await?;
    c.query_drop("INSERT INTO item VALUES (1, 'a', 1), (2, 'b', 2)").await?;
    Ok((db, tc, proxy))
}

async fn rows(db: &MariaDb) -> Result<Vec<(i64, String, i64)>> {
    Ok(db
        .conn()
        .await?
        .query("SELECT id, sku, qty FROM item ORDER BY id")
        .await?)
}

/// Every form once, some in a local transaction and some in autocommit.
async fn upsert_everything(c: &mut mysql_async::Conn) -> Result<()> {
    c.query_drop("BEGIN").await?;
    // 'a' is updated through its unique key; 'c' is inserted with a generated id.
    c.query_drop(
        "INSERT INTO item (sku, qty) VALUES ('a', 10), ('c', 3) ON DUPLICATE KEY UPDATE qty = qty + VALUES(qty)",
    )
    .await?;
    // Row 2 is there: skipped. Row 10 is new.
    c.query_drop("INSERT IGNORE INTO item (id, sku, qty) VALUES (2, 'zz', 9), (10, 'd', 4)")
        .await?;
    c.query_drop("COMMIT").await?;
    // 'b' collides on its unique key: row 2 is deleted and row 20 inserted.
    c.query_drop("REPLACE INTO item (id, sku, qty) VALUES (20, 'b', 7)")
        .await?;
    c.query_drop("INSERT INTO item SET id = 30, sku = 'e', qty = 5").await?;
    // Prepared, with bound values.
    c.exec_drop(
        "INSERT INTO item (sku, qty) VALUES (?, ?) ON DUPLICATE KEY UPDATE qty = ?",
        ("c", 0, 99),
    )
    .await?;
    c.exec_drop("REPLACE INTO item SET id = ?, sku = ?, qty = ?", (10, "d", 40))
        .await?;
    Ok(())
}

fn after_everything() -> Vec<(i64, String, i64)> {
    vec![
        (1, "a".into(), 11),
        (3, "c".into(), 99),
        (10, "d".into(), 40),
        (20, "b".into(), 7),
        (30, "e".into(), 5),
    ]
}

#[tokio::test]
async fn upserts_roll_back_exactly() -> Result<()> {
    let (db, tc, proxy) = setup(5_000).await?;
    let original = rows(&db).await?;
    let mut c = proxy.conn().await?;
    let xid = start(&mut c).await?;
    upsert_everything(&mut c).await?;
    assert_eq!(
        rows(&db).await?,
        after_everything(),
        "phase 1 did what the statements say"
    );
    c.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    assert_eq!(rows(&db).await?, original, "every row as it was");
    Ok(())
}

#[tokio::test]
async fn upserts_commit() -> Result<()> {
    let (db, tc, proxy) = setup(5_000).await?;
    let mut c = proxy.conn().await?;
    let xid = start(&mut c).await?;
    upsert_everything(&mut c).await?;
    c.query_drop("COMMIT GLOBAL").await?;
    assert_eq!(rows(&db).await?, after_everything());
    until("the commit to finish", async || {
        Ok(tc.status(&xid).await? == "Committed")
    })
    .await?;
    let undo: Option<i64> = db
        .conn()
        .await?
        .query_first("SELECT COUNT(*) FROM undo_log WHERE log_status = 0")
        .await?;
    assert_eq!(undo, Some(0));
    Ok(())
}

#[tokio::test]
async fn a_row_changed_meanwhile_is_a_dirty_rollback_for_every_form() -> Result<()> {
    let (db, tc, proxy) = setup(5_000).await?;
    let mut c = proxy.conn().await?;
    // Each form, then a change behind the proxy's back to a row it wrote.
    for (sql, behind) in [
        (
            "REPLACE INTO item (id, sku, qty) VALUES (20, 'b', 7)",
            "UPDATE item SET qty = 8 WHERE id = 20",
        ),
        (
            "INSERT INTO item (sku, qty) VALUES ('a', 5) ON DUPLICATE KEY UPDATE qty = qty + 5",
            "UPDATE item SET qty = 0 WHERE sku = 'a'",
        ),
        (
            "INSERT IGNORE INTO item (id, sku, qty) VALUES (40, 'f', 1)",
            "UPDATE item SET qty = 2 WHERE id = 40",
        ),
        (
            "INSERT INTO item SET id = 50, sku = 'g', qty = 1",
            "UPDATE item SET qty = 3 WHERE id = 50",
        ),
    ] {
        let xid = start(&mut c).await?;
        c.query_drop(sql).await?;
        db.conn().await?.query_drop(behind).await?;
        let changed = rows(&db).await?;
        assert!(
            c.query_drop("ROLLBACK GLOBAL").await.is_err(),
            "{sql}: the rollback stops"
        );
        assert_eq!(tc.status(&xid).await?, "RollbackFailed", "{sql}");
        assert_eq!(rows(&db).await?, changed, "{sql}: nothing was overwritten");
        // The DBA resolves it; its rows are released for the next form.
        let (status, body) = ferrata_tests::http_post(
            tc.http,
            &format!("/v1/transactions/{xid}/resolve"),
            r#"{"reason": "the test repaired the rows"}"#,
        )
        .await?;
        assert_eq!(status, 200, "{body}");
    }
    Ok(())
}

#[tokio::test]
async fn two_global_transactions_racing_on_the_same_keys() -> Result<()> {
    let (db, _tc, proxy) = setup(20_000).await?;
    let mut first = proxy.conn().await?;
    start(&mut first).await?;
    first
        .query_drop("INSERT INTO item (sku, qty) VALUES ('a', 10), ('x', 1) ON DUPLICATE KEY UPDATE qty = qty + 10")
        .await?;
    let opts = proxy.opts();
    let mut second = tokio::spawn(async move {
        let mut c = mysql_async::Conn::new(opts).await?;
        start(&mut c).await?;
        c.query_drop("INSERT INTO item (sku, qty) VALUES ('a', 100), ('x', 5) ON DUPLICATE KEY UPDATE qty = qty + 100")
            .await?;
        c.query_drop("COMMIT GLOBAL").await?;
        anyhow::Ok(())
    });
    // The second one's rows are the first one's: it waits for them in the coordinator.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second)
            .await
            .is_err(),
        "the second upsert waits for the first global transaction"
    );
    first.query_drop("COMMIT GLOBAL").await?;
    second.await??;
    let qty: Vec<(String, i64)> = db
        .conn()
        .await?
        .query("SELECT sku, qty FROM item WHERE sku IN ('a', 'x') ORDER BY sku")
        .await?;
    assert_eq!(qty, [("a".to_owned(), 111), ("x".to_owned(), 101)]);
    Ok(())
}

#[tokio::test]
async fn parameters_sent_as_long_data_are_imaged() -> Result<()> {
    use ferrata_tests::com;
    use ferrata_tests::ferrata_testkit::raw::{RawConn, flags::DEFAULT};
    use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER};
    use ferrata_tests::{command, execute_payload, raw_prepare};

    let (db, tc, proxy) = setup(5_000).await?;
    let original = rows(&db).await?;
    let mut raw = RawConn::connect(proxy.addr, APP_USER, APP_PASSWORD, Some("test"), DEFAULT).await?;
    let started = raw.query("START GLOBAL TRANSACTION TIMEOUT 60000").await?;
    assert_ne!(started[0].payload[0], 0xff, "START GLOBAL TRANSACTION: {started:?}");
    let send_long = async |raw: &mut RawConn, id: u32, param: u16, data: &[u8]| {
        let mut body = id.to_le_bytes().to_vec();
        body.extend_from_slice(&param.to_le_bytes());
        body.extend_from_slice(data);
        // COM_STMT_SEND_LONG_DATA has no response.
        raw.send_command(&command(com::STMT_SEND_LONG_DATA, &body)).await
    };
    let ok =
        |packets: &[ferrata_tests::ferrata_testkit::raw::Packet]| packets.last().map(|p| p.payload[0]) == Some(0x00);
    // The upsert's unique key comes as long data, in two pieces.
    let (_, upsert) = raw_prepare(
        &mut raw,
        "INSERT INTO item (sku, qty) VALUES (?, ?) ON DUPLICATE KEY UPDATE qty = qty + 100",
    )
    .await?;
    send_long(&mut raw, upsert, 0, b"n").await?;
    send_long(&mut raw, upsert, 0, b"ew").await?;
    raw.send_command(&execute_payload(
        upsert,
        0,
        &[(0xfc, None), (0x03, Some(5i32.to_le_bytes().to_vec()))],
    ))
    .await?;
    let response = raw.read_response().await?;
    assert!(ok(&response), "{response:?}");
    // An UPDATE whose filter value comes as long data.
    let (_, update) = raw_prepare(&mut raw, "UPDATE item SET qty = ? WHERE sku = ?").await?;
    send_long(&mut raw, update, 1, b"a").await?;
    raw.send_command(&execute_payload(
        update,
        0,
        &[(0x03, Some(42i32.to_le_bytes().to_vec())), (0xfc, None)],
    ))
    .await?;
    let response = raw.read_response().await?;
    assert!(ok(&response), "{response:?}");
    let now: Vec<(String, i64)> = db.conn().await?.query("SELECT sku, qty FROM item ORDER BY id").await?;
    assert_eq!(now, [("a".to_owned(), 42), ("b".to_owned(), 2), ("new".to_owned(), 5)]);
    let response = raw.query("ROLLBACK GLOBAL").await?;
    assert!(ok(&response), "{response:?}");
    assert_eq!(rows(&db).await?, original, "both writes undone");
    let listed = tc.get("/v1/transactions?status=RollbackFailed").await?;
    assert_eq!(listed["transactions"].as_array().map(Vec::len), Some(0));
    Ok(())
}
