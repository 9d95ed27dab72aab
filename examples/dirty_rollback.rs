//! A dirty rollback, and the commands that resolve it. It starts a throw-away MariaDB, the
//! coordinator and a proxy; a global transaction updates three orders; two of them are then
//! changed directly in the database (as a support tool would), so the rollback cannot
//! restore them without overwriting those changes: it ends in RollbackFailed, overwriting
//! nothing. The example prints what a DBA runs to look at the rows and settle them, and the
//! console's address, then keeps the servers up until Ctrl-C (`--no-wait` ends at once).

mod servers;

use anyhow::{Context, Result};
use ferrata_testkit::MariaDb;
use mysql_async::prelude::*;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<()> {
    let wait = !std::env::args().any(|a| a == "--no-wait");
    let db = MariaDb::start()
        .await
        .context("starting MariaDB (is mariadb-server installed? scripts/setup-debian.sh)")?;
    db.conn()
        .await?
        .query_drop(
            "CREATE TABLE orders (id INT PRIMARY KEY, note VARCHAR(40), total DECIMAL(10,2));
             INSERT INTO orders VALUES (1, 'gift wrap', 10.00), (2, 'leave at door', 20.00), (3, NULL, 30.00)",
        )
        .await?;
    let data = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let (tc_rpc, tc_http, tc_task) = servers::coordinator(data.path(), &stop).await?;
    let (proxy, proxy_task) = servers::proxy(&db, tc_rpc, "orders", &stop).await?;

    // The application: a global transaction through the proxy.
    let mut app = mysql_async::Conn::new(ferrata_testkit::app_opts(proxy)).await?;
    let xid: String = app
        .query_first("START GLOBAL TRANSACTION NAME 'discount'")
        .await?
        .context("an XID")?;
    app.query_drop("UPDATE orders SET total = total * 0.9, note = CONCAT(IFNULL(note, ''), ' (10% off)')")
        .await?;
    // Meanwhile, directly in the database, support edits two of the orders.
    let mut support = db.conn().await?;
    support
        .query_drop("UPDATE orders SET note = 'call before delivery' WHERE id IN (1, 2)")
        .await?;
    let refused = app.query_drop("ROLLBACK GLOBAL").await;
    println!(
        "ROLLBACK GLOBAL {xid}: {}",
        refused.map_or_else(|e| e.to_string(), |_| "rolled back".into())
    );

    let server = format!("http://{tc_http}");
    println!(
        "\nThe rollback overwrote nothing and waits for a DBA. With the servers up, run:\n\n\
         export FERRATA_SERVER={server}\n\
         ferrata dirty list                       # what is waiting\n\
         ferrata dirty show {xid}                 # the rows: before, after, current\n\
         ferrata dirty accept {xid} --row id=1 --reason 'keep the support note on order 1'\n\
         ferrata dirty restore {xid} --row id=2 --reason 'order 2: the discount note wins'\n\
         ferrata txn retry {xid} --reason 'rows settled'   # rolls back order 3 and finishes\n\
         ferrata audit list                       # who did what, and why\n\n\
         (cargo run -p ferrata-cli -- <command> runs it from this checkout.)\n\
         Or open the console: {server}/ui/\n\
         The database keeps its own record: SELECT * FROM test.ferrata_audit;  (port {})",
        db.port()
    );
    if wait {
        println!("\nCtrl-C stops the servers.");
        tokio::signal::ctrl_c().await?;
    }
    drop(app);
    stop.cancel();
    proxy_task.await??;
    tc_task.await??;
    Ok(())
}
