//! The quickstart demo: starts a throw-away MariaDB, puts ferrata-proxy in front of it, and
//! runs a few statements through the proxy, printing what comes back.
//!
//! Later issues grow this into a distributed transaction across two databases.

use anyhow::{Context, Result};
use ferrata_proxy::{Config, Server};
use ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb};
use mysql_async::prelude::*;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<()> {
    println!("starting a throw-away MariaDB ...");
    let db = MariaDb::start()
        .await
        .context("starting MariaDB (is mariadb-server installed?)")?;
    println!("  MariaDB listens on {}", db.addr());

    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        backend: db.addr().to_string(),
        admin_listen: Some("127.0.0.1:0".parse()?),
        ..Config::default()
    };
    let server = Server::bind(config).await?;
    let proxy_addr = server.local_addr();
    let admin_addr = server.admin_addr().context("admin listener")?;
    let stop = CancellationToken::new();
    let proxy = tokio::spawn(server.run(stop.clone()));
    println!("  ferrata-proxy listens on {proxy_addr} (metrics on http://{admin_addr}/metrics)");

    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(proxy_addr.ip().to_string())
        .tcp_port(proxy_addr.port())
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some("test"));
    let mut conn = mysql_async::Conn::new(opts)
        .await
        .context("connecting through the proxy")?;
    conn.query_drop("CREATE TABLE account (id INT PRIMARY KEY, owner VARCHAR(40), balance DECIMAL(12,2))")
        .await?;
    conn.exec_drop(
        "INSERT INTO account VALUES (?, ?, ?), (?, ?, ?)",
        (1, "alice", "100.00", 2, "bob", "50.00"),
    )
    .await?;
    conn.query_drop("UPDATE account SET balance = balance - 30 WHERE id = 1")
        .await?;
    conn.query_drop("UPDATE account SET balance = balance + 30 WHERE id = 2")
        .await?;
    let rows: Vec<(i32, String, String)> = conn
        .query("SELECT id, owner, CAST(balance AS CHAR) FROM account ORDER BY id")
        .await?;
    let version: String = conn.query_first("SELECT VERSION()").await?.context("no version")?;
    println!("\nthrough the proxy, server {version}:");
    for (id, owner, balance) in rows {
        println!("  account {id}: {owner:<6} {balance:>8}");
    }
    conn.disconnect().await?;

    stop.cancel();
    proxy.await??;
    println!("\ndemo finished: the proxy relayed every statement; the server is removed on exit.");
    Ok(())
}
