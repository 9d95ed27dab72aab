//! Multi-table UPDATE (join and comma forms) and DELETE (`DELETE t1, t2 FROM ...`, `DELETE
//! FROM ... USING ...`) inside global transactions, through a real proxy process with a real
//! coordinator and MariaDB: images per table, committed, rolled back exactly (also through
//! prepared statements), and a dirty rollback refused.

use anyhow::Result;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::MariaDb;
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::start_global as start;
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

async fn setup() -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let proxy = ProxyProcess::start(PROXY, db.addr(), &tc.endpoint(), 5_000)?;
    let mut c = db.conn().await?;
    c.query_drop("CREATE TABLE orders (id INT PRIMARY KEY, customer INT NOT NULL, total INT NOT NULL, state VARCHAR(10) NOT NULL)")
        .await?;
    c.query_drop("CREATE TABLE order_line (order_id INT, n INT, qty INT NOT NULL, PRIMARY KEY (order_id, n))")
        .await?;
    c.query_drop("INSERT INTO orders VALUES (1, 7, 30, 'new'), (2, 7, 5, 'new'), (3, 8, 9, 'new')")
        .await?;
    c.query_drop("INSERT INTO order_line VALUES (1, 1, 10), (1, 2, 20), (2, 1, 5), (3, 1, 9)")
        .await?;
    Ok((db, tc, proxy))
}

async fn snapshot(db: &MariaDb) -> Result<(Vec<(i32, i32, i32, String)>, Vec<(i32, i32, i32)>)> {
    let mut c = db.conn().await?;
    Ok((
        c.query("SELECT id, customer, total, state FROM orders ORDER BY id")
            .await?,
        c.query("SELECT order_id, n, qty FROM order_line ORDER BY order_id, n")
            .await?,
    ))
}

async fn change_everything(c: &mut mysql_async::Conn) -> Result<()> {
    // Join form, both tables written, an alias, an unqualified column placed by metadata.
    c.query_drop(
        "UPDATE orders AS o JOIN order_line l ON l.order_id = o.id SET o.state = 'packed', qty = qty + 1 WHERE o.customer = 7",
    )
    .await?;
    // Comma form (the SQL parser does not read it; the proxy does), prepared.
    c.exec_drop(
        "UPDATE orders, order_line SET orders.total = orders.total + order_line.qty WHERE order_line.order_id = orders.id AND orders.id = ?",
        (3,),
    )
    .await?;
    c.query_drop("BEGIN").await?;
    c.query_drop("DELETE o, l FROM orders o JOIN order_line l ON l.order_id = o.id WHERE o.id = 2")
        .await?;
    c.query_drop("DELETE FROM order_line USING order_line JOIN orders ON orders.id = order_line.order_id WHERE orders.customer = 8")
        .await?;
    c.query_drop("COMMIT").await?;
    Ok(())
}

#[tokio::test]
async fn multi_table_writes_commit_and_roll_back_exactly() -> Result<()> {
    let (db, tc, proxy) = setup().await?;
    let original = snapshot(&db).await?;
    let mut c = proxy.conn().await?;
    let xid = start(&mut c).await?;
    change_everything(&mut c).await?;
    let changed = (
        vec![(1, 7, 30, "packed".to_owned()), (3, 8, 18, "new".to_owned())],
        vec![(1, 1, 11), (1, 2, 21)],
    );
    assert_eq!(snapshot(&db).await?, changed, "phase 1 did what the statements say");
    c.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(tc.status(&xid).await?, "Rollbacked");
    assert_eq!(snapshot(&db).await?, original, "both tables as they were");

    let xid = start(&mut c).await?;
    change_everything(&mut c).await?;
    c.query_drop("COMMIT GLOBAL").await?;
    assert_eq!(snapshot(&db).await?, changed);
    ferrata_tests::until("the commit to finish", async || {
        Ok(tc.status(&xid).await? == "Committed")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_joined_row_changed_meanwhile_is_a_dirty_rollback() -> Result<()> {
    let (db, tc, proxy) = setup().await?;
    let mut c = proxy.conn().await?;
    let xid = start(&mut c).await?;
    c.query_drop("UPDATE orders o JOIN order_line l ON l.order_id = o.id SET l.qty = 0 WHERE o.id = 1")
        .await?;
    db.conn()
        .await?
        .query_drop("UPDATE order_line SET qty = 99 WHERE order_id = 1 AND n = 2")
        .await?;
    let changed = snapshot(&db).await?;
    assert!(c.query_drop("ROLLBACK GLOBAL").await.is_err(), "the rollback stops");
    assert_eq!(tc.status(&xid).await?, "RollbackFailed");
    assert_eq!(snapshot(&db).await?, changed, "nothing was overwritten");
    Ok(())
}
