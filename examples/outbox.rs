//! Sending messages with a transaction: the outbox in ferrata-proxy.
//!
//! It starts a throw-away MariaDB server (the shop's database), `ferrata-tc`, one
//! `ferrata-proxy` in front of the server, and a small HTTP receiver (the billing service).
//! The shop writes each message as a row of `ferrata_outbox` in the same local transaction
//! as its order, with nothing but its MySQL driver; the coordinator delivers it once that
//! transaction committed, and never if it rolled back. Inside a global transaction a message
//! waits for the global decision. The receiver shows what every receiver must do: answer 2xx
//! once it has taken the message, and drop repeats by their `webhook-id`.

mod servers;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::http::{HeaderMap, StatusCode};
use ferrata_testkit::MariaDb;
use mysql_async::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The billing service: takes each message once (by its `webhook-id`, the same on every
/// attempt) and passes its body on.
async fn receiver(taken: mpsc::UnboundedSender<String>) -> Result<String> {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
        let (seen, taken) = (Arc::clone(&seen), taken.clone());
        async move {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            // A repeat (the coordinator did not see our last answer) is answered, not redone.
            if seen.lock().unwrap().insert(id.clone()) {
                let _ = taken.send(format!("{id}: {body}"));
            }
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

#[tokio::main]
async fn main() -> Result<()> {
    println!("starting a throw-away MariaDB server, ferrata-tc, a proxy and a receiver ...");
    let shop = MariaDb::start()
        .await
        .context("starting MariaDB (is mariadb-server installed?)")?;
    shop.conn()
        .await?
        .query_drop("CREATE TABLE orders (id INT PRIMARY KEY, total DECIMAL(12,2) NOT NULL)")
        .await?;
    let data = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let (tc_rpc, _, tc_task) = servers::coordinator(data.path(), &stop).await?;
    let (proxy_addr, proxy_task) = servers::proxy(&shop, tc_rpc, "shop", &stop).await?;
    let (tx, mut taken) = mpsc::unbounded_channel();
    let billing = receiver(tx).await?;
    let target = format!("{billing}/credit");
    let mut app = mysql_async::Conn::new(ferrata_testkit::app_opts(proxy_addr)).await?;
    let mut next = async || taken.recv().await.context("the receiver stopped");

    println!("\n1. an order and its message in one local transaction, committed");
    app.query_drop("BEGIN").await?;
    app.query_drop("INSERT INTO orders VALUES (1, 30.00)").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload, msg_key, policy) VALUES (?, ?, ?, ?)",
        (&target, r#"{"order": 1, "total": "30.00"}"#, "order-1", "wechat"),
    )
    .await?;
    app.query_drop("COMMIT").await?;
    println!("   billing took   {}", next().await?);

    println!("\n2. the same with SEND MESSAGE, rolled back: nothing is sent");
    app.query_drop("BEGIN").await?;
    app.query_drop("INSERT INTO orders VALUES (2, 12.00)").await?;
    app.query_drop(format!(
        "SEND MESSAGE TO '{target}' PAYLOAD '{{\"order\": 2}}' KEY 'order-2'"
    ))
    .await?;
    app.query_drop("ROLLBACK").await?;

    println!("\n3. inside a global transaction: the message waits for the global decision");
    let xid: String = app
        .query_first("START GLOBAL TRANSACTION NAME 'checkout'")
        .await?
        .context("an XID")?;
    app.query_drop("INSERT INTO orders VALUES (3, 8.50)").await?;
    app.query_drop(format!(
        "SEND MESSAGE TO '{target}' PAYLOAD '{{\"order\": 3}}' KEY 'order-3'"
    ))
    .await?;
    println!("   written in {xid}; COMMIT GLOBAL ...");
    app.query_drop("COMMIT GLOBAL").await?;
    println!("   billing took   {}", next().await?);

    println!("\n4. what a DBA sees: SELECT id, msg_key, xid, delivered_at FROM ferrata_outbox");
    // The coordinator marks a row once its message is delivered: wait for both.
    let rows: Vec<(u64, String, Option<String>, Option<String>)> = loop {
        let rows: Vec<(u64, String, Option<String>, Option<String>)> = app
            .query("SELECT id, msg_key, xid, CAST(delivered_at AS CHAR) FROM ferrata_outbox ORDER BY id")
            .await?;
        if rows.iter().all(|r| r.3.is_some()) {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for (id, key, xid, delivered) in rows {
        println!(
            "   {id:>2}  {key:<8} {:<6} delivered {}",
            xid.unwrap_or_default(),
            delivered.unwrap_or_default()
        );
    }

    drop(app);
    stop.cancel();
    proxy_task.await??;
    tc_task.await??;
    println!(
        "\ndemo finished: two messages delivered once each, the rolled-back order's never; the server is removed on exit."
    );
    Ok(())
}
