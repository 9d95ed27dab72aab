//! A dirty rollback to resolve, for the workbench's tests (API, command line, console): a
//! MariaDB with table `t` (id, note VARCHAR, amount DECIMAL) behind a proxy process and a
//! coordinator process, and a global transaction that updated every row and whose rollback
//! found some rows changed directly.

use anyhow::Result;
use mysql_async::prelude::*;

use crate::coordinator::Coordinator;
use crate::ferrata_testkit::MariaDb;
use crate::process::ProxyProcess;
use crate::{server_error, start_global};

/// The servers: `t` holds (1, 'a', 1.00), (2, 'b', 2.00), (3, 'c', 3.00).
pub async fn servers(tc_binary: &str, proxy_binary: &str) -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    servers_secured(tc_binary, proxy_binary, None).await
}

/// [`servers`], with `root_token` as the coordinator's root token (the proxy uses it too).
pub async fn servers_secured(
    tc_binary: &str,
    proxy_binary: &str,
    root_token: Option<&str>,
) -> Result<(MariaDb, Coordinator, ProxyProcess)> {
    let db = MariaDb::start().await?;
    let (tc, coordinator_toml) = match root_token {
        Some(token) => (
            Coordinator::start_secured(tc_binary, token)?,
            format!("lock_wait_ms = 500\ntoken = \"{token}\""),
        ),
        None => (Coordinator::start(tc_binary)?, "lock_wait_ms = 500".to_owned()),
    };
    let proxy = ProxyProcess::start_with(proxy_binary, db.addr(), &tc.endpoint(), &coordinator_toml, "")?;
    db.conn()
        .await?
        .query_drop(
            "CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(20), amount DECIMAL(10,2));
             INSERT INTO t VALUES (1, 'a', 1.00), (2, 'b', 2.00), (3, 'c', 3.00)",
        )
        .await?;
    Ok((db, tc, proxy))
}

/// A global transaction that appended `!` to every note and added 1 to every amount, the
/// rows `dirty` then given the note `x<id>` directly, and its rollback refused: it is
/// RollbackFailed. Returns its XID and the failed branch.
pub async fn rollback(db: &MariaDb, proxy: &ProxyProcess, tc: &Coordinator, dirty: &[i32]) -> Result<(String, u64)> {
    let mut conn = proxy.conn().await?;
    let xid = start_global(&mut conn).await?;
    conn.query_drop("UPDATE t SET note = CONCAT(note, '!'), amount = amount + 1")
        .await?;
    let mut direct = db.conn().await?;
    for id in dirty {
        direct
            .exec_drop("UPDATE t SET note = CONCAT('x', id) WHERE id = ?", (id,))
            .await?;
    }
    let e = conn.query_drop("ROLLBACK GLOBAL").await.unwrap_err();
    anyhow::ensure!(server_error(&e)?.0 == 1401, "the rollback was refused as dirty: {e}");
    let t = tc.get(&format!("/v1/transactions/{xid}")).await?;
    anyhow::ensure!(t["status"] == "RollbackFailed", "{t}");
    let branch = t["failure"]["branch_id"].as_u64().expect("the failed branch");
    Ok((xid, branch))
}

/// `t` as it is: (id, note, amount as text).
pub async fn table(db: &MariaDb) -> Result<Vec<(i32, String, String)>> {
    Ok(db
        .conn()
        .await?
        .query("SELECT id, note, CAST(amount AS CHAR) FROM t ORDER BY id")
        .await?)
}

/// The `ferrata_audit` rows: (action_id, action, actor, reason, detail); none before the
/// first repair made the table.
pub async fn audit_rows(db: &MariaDb) -> Result<Vec<(String, String, String, String, String)>> {
    let rows = db
        .conn()
        .await?
        .query("SELECT action_id, action, actor, reason, detail FROM ferrata_audit ORDER BY id")
        .await;
    match rows {
        Err(mysql_async::Error::Server(e)) if e.code == 1146 => Ok(Vec::new()),
        other => Ok(other?),
    }
}
