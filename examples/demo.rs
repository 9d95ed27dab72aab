//! The quickstart demo: a money transfer across two databases as one global transaction.
//!
//! It starts two throw-away MariaDB servers (bank A holds alice's account, bank B holds
//! bob's), the transaction coordinator `ferrata-tc`, and one `ferrata-proxy` in front of each
//! server. The app below uses nothing but its ordinary MySQL driver and SQL: it begins a
//! global transaction on A, joins it on B, updates both accounts, and commits or rolls back
//! both at once. Copy `transfer` as a how-to.

mod servers;

use anyhow::{Context, Result};
use ferrata_testkit::MariaDb;
use mysql_async::prelude::*;
use tokio_util::sync::CancellationToken;

/// Phase 1 of a transfer: moves `amount` from alice (bank A) to bob (bank B) inside a new
/// global transaction, and returns its XID. Each UPDATE commits locally at once; the proxies
/// keep undo records so the coordinator can still roll both back.
async fn transfer(bank_a: &mut mysql_async::Conn, bank_b: &mut mysql_async::Conn, amount: u32) -> Result<String> {
    // Each proxy answers these statements itself; the XID ties the two sessions together.
    let xid: String = bank_a
        .query_first("START GLOBAL TRANSACTION TIMEOUT 30000 NAME 'transfer'")
        .await?
        .context("an XID")?;
    bank_a
        .query_drop(format!(
            "UPDATE account SET balance = balance - {amount} WHERE owner = 'alice'"
        ))
        .await?;
    bank_b.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
    bank_b
        .query_drop(format!(
            "UPDATE account SET balance = balance + {amount} WHERE owner = 'bob'"
        ))
        .await?;
    // The joined session leaves; the one that started decides.
    bank_b.query_drop("LEAVE GLOBAL TRANSACTION").await?;
    Ok(xid)
}

async fn balances(a: &MariaDb, b: &MariaDb) -> Result<String> {
    let read = |db: &MariaDb, owner: &'static str| {
        let opts = db.opts();
        async move {
            let mut c = mysql_async::Conn::new(opts).await?;
            let v: Option<String> = c
                .exec_first("SELECT CAST(balance AS CHAR) FROM account WHERE owner = ?", (owner,))
                .await?;
            anyhow::Ok(v.unwrap_or_default())
        }
    };
    Ok(format!(
        "alice (bank A) {:>7}   bob (bank B) {:>7}",
        read(a, "alice").await?,
        read(b, "bob").await?
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    println!("starting two throw-away MariaDB servers, ferrata-tc and two proxies ...");
    let bank_a = MariaDb::start()
        .await
        .context("starting MariaDB (is mariadb-server installed?)")?;
    let bank_b = MariaDb::start().await?;
    for (db, owner, balance) in [(&bank_a, "alice", "100.00"), (&bank_b, "bob", "50.00")] {
        let mut c = db.conn().await?;
        c.query_drop("CREATE TABLE account (owner VARCHAR(40) PRIMARY KEY, balance DECIMAL(12,2) NOT NULL)")
            .await?;
        c.exec_drop("INSERT INTO account VALUES (?, ?)", (owner, balance))
            .await?;
    }

    let data = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let (tc_rpc, tc_http, tc_task) = servers::coordinator(data.path(), &stop).await?;
    println!("  ferrata-tc: gRPC {tc_rpc}, HTTP API http://{tc_http}/v1/transactions");

    let mut proxies = Vec::new();
    let mut conns = Vec::new();
    for (name, db) in [("A", &bank_a), ("B", &bank_b)] {
        let (addr, task) = servers::proxy(db, tc_rpc, name, &stop).await?;
        proxies.push(task);
        println!("  ferrata-proxy for bank {name}: {addr} -> MariaDB {}", db.addr());
        conns.push(
            mysql_async::Conn::new(ferrata_testkit::app_opts(addr))
                .await
                .context("connecting through the proxy")?,
        );
    }
    let (mut a, mut b) = (conns.remove(0), conns.remove(0));

    println!("\nbefore:                    {}", balances(&bank_a, &bank_b).await?);
    for (amount, decision) in [(30, "COMMIT GLOBAL"), (50, "ROLLBACK GLOBAL")] {
        let xid = transfer(&mut a, &mut b, amount).await?;
        println!("\ntransfer {amount} in global transaction {xid}");
        println!("  both updates done:       {}", balances(&bank_a, &bank_b).await?);
        a.query_drop(decision).await?;
        println!("  after {decision:<16}  {}", balances(&bank_a, &bank_b).await?);
    }

    drop((a, b));
    stop.cancel();
    for p in proxies {
        p.await??;
    }
    tc_task.await??;
    println!(
        "\ndemo finished: one transfer committed on both banks, one rolled back on both; the servers are removed on exit."
    );
    Ok(())
}
