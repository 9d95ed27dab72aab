//! `BEGIN BRANCH`, the barrier of TCC and saga handlers through the proxy, against a real
//! MariaDB server: a try or action runs once, a repeat is skipped, a compensation whose try
//! never ran does nothing and keeps the late try out, and the barrier's rows commit or roll
//! back with the handler's own work, in DTM's table layout; and the same rows settle prepared
//! messages a proxy is asked to check.

use anyhow::{Result, ensure};
use ferrata_tests::{Setup, server_error};
use mysql_async::prelude::*;

/// Opens the handler's transaction; its `outcome`.
async fn begin_branch(conn: &mut mysql_async::Conn, gid: &str, branch: &str, op: &str) -> Result<String> {
    let outcome: Option<String> = conn
        .query_first(format!("BEGIN BRANCH '{gid}' '{branch}' '{op}'"))
        .await?;
    outcome.ok_or_else(|| anyhow::anyhow!("BEGIN BRANCH answered no row"))
}

/// A handler: its work (one credit row) runs only when the barrier says so.
async fn handle(conn: &mut mysql_async::Conn, gid: &str, branch: &str, op: &str) -> Result<String> {
    let outcome = begin_branch(conn, gid, branch, op).await?;
    if outcome == "run" {
        conn.query_drop(format!("INSERT INTO work (gid, op) VALUES ('{gid}', '{op}')"))
            .await?;
        conn.query_drop("COMMIT").await?;
    }
    Ok(outcome)
}

async fn work(db: &ferrata_tests::ferrata_testkit::MariaDb, gid: &str) -> Result<Vec<String>> {
    let mut c = db.conn().await?;
    Ok(c.exec("SELECT op FROM work WHERE gid = ? ORDER BY id", (gid,)).await?)
}

#[tokio::test]
async fn a_handler_runs_each_operation_once_and_never_after_its_compensation() -> Result<()> {
    let s = Setup::start().await?;
    s.db.conn()
        .await?
        .query_drop("CREATE TABLE work (id INT AUTO_INCREMENT PRIMARY KEY, gid VARCHAR(64), op VARCHAR(16))")
        .await?;
    let mut c = s.proxy.conn().await?;

    // Try, confirm; each again: repeats.
    ensure!(handle(&mut c, "g1", "01", "try").await? == "run");
    ensure!(handle(&mut c, "g1", "01", "try").await? == "duplicate");
    ensure!(handle(&mut c, "g1", "01", "confirm").await? == "run");
    ensure!(handle(&mut c, "g1", "01", "confirm").await? == "duplicate");
    ensure!(work(&s.db, "g1").await? == ["try", "confirm"]);

    // A cancel before its try: nothing to undo, and the late try is kept out.
    ensure!(handle(&mut c, "g2", "01", "cancel").await? == "null_compensation");
    ensure!(handle(&mut c, "g2", "01", "try").await? == "hanging");
    ensure!(handle(&mut c, "g2", "01", "cancel").await? == "duplicate");
    ensure!(work(&s.db, "g2").await?.is_empty());

    // A try, then its cancel: the cancel runs.
    ensure!(handle(&mut c, "g3", "01", "try").await? == "run");
    ensure!(handle(&mut c, "g3", "01", "cancel").await? == "run");
    ensure!(work(&s.db, "g3").await? == ["try", "cancel"]);

    // Saga: an action, its compensation; a compensation of an action that never ran.
    ensure!(handle(&mut c, "g4", "01", "action").await? == "run");
    ensure!(handle(&mut c, "g4", "01", "compensate").await? == "run");
    ensure!(handle(&mut c, "g4", "02", "compensate").await? == "null_compensation");
    ensure!(handle(&mut c, "g4", "02", "action").await? == "hanging");

    // A handler that fails and rolls back takes its barrier row with it: the retry runs.
    ensure!(begin_branch(&mut c, "g5", "01", "try").await? == "run");
    c.query_drop("ROLLBACK").await?;
    ensure!(handle(&mut c, "g5", "01", "try").await? == "run");
    ensure!(work(&s.db, "g5").await? == ["try"]);

    // DTM's rows: the origin written by the compensation that came first, with its reason.
    let rows: Vec<(String, String, String, String, String)> = s
        .db
        .conn()
        .await?
        .query("SELECT trans_type, branch_id, op, barrier_id, reason FROM dtm_barrier.barrier WHERE gid = 'g2' ORDER BY id")
        .await?;
    let expected = [
        ("tcc", "01", "try", "01", "cancel"),
        ("tcc", "01", "cancel", "01", "cancel"),
    ]
    .map(|(a, b, c, d, e)| (a.into(), b.into(), c.into(), d.into(), e.into()));
    ensure!(rows == expected, "{rows:?}");
    Ok(())
}

/// A cancel arriving while its try's transaction is still open waits for it on the barrier's
/// unique key, then runs as the compensation of a try that ran (DTM's "change, not check").
#[tokio::test]
async fn a_cancel_waits_for_its_try_in_flight() -> Result<()> {
    let s = Setup::start().await?;
    let mut try_conn = s.proxy.conn().await?;
    ensure!(begin_branch(&mut try_conn, "g6", "01", "try").await? == "run");
    let mut cancel_conn = s.proxy.conn().await?;
    let cancel = tokio::spawn(async move { begin_branch(&mut cancel_conn, "g6", "01", "cancel").await });
    ferrata_tests::a_lock_wait(&s.db).await?;
    try_conn.query_drop("COMMIT").await?;
    ensure!(cancel.await?? == "run", "the try committed: its cancel undoes it");
    Ok(())
}

/// A handler's user that may only read and write a barrier table a DBA created needs no
/// other privilege; values with quotes and backslashes are kept exactly, whatever the
/// session's sql_mode.
#[tokio::test]
async fn a_least_privileged_handler_keeps_its_values_exactly() -> Result<()> {
    let s = Setup::start().await?;
    let mut admin = s.db.conn().await?;
    admin.query_drop("CREATE DATABASE dtm_barrier").await?;
    admin
        .query_drop(
            "CREATE TABLE dtm_barrier.barrier (id BIGINT PRIMARY KEY AUTO_INCREMENT, trans_type VARCHAR(45) DEFAULT '', \
             gid VARCHAR(128) DEFAULT '', branch_id VARCHAR(128) DEFAULT '', op VARCHAR(45) DEFAULT '', \
             barrier_id VARCHAR(45) DEFAULT '', reason VARCHAR(45) DEFAULT '', create_time DATETIME DEFAULT NOW(), \
             update_time DATETIME DEFAULT NOW(), UNIQUE KEY (gid, branch_id, op, barrier_id))",
        )
        .await?;
    admin
        .query_drop("CREATE USER 'handler'@'%' IDENTIFIED BY 'handler-pw'")
        .await?;
    admin
        .query_drop("GRANT SELECT, INSERT ON dtm_barrier.barrier TO 'handler'@'%'")
        .await?;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(s.proxy.addr.ip().to_string())
        .tcp_port(s.proxy.addr.port())
        .user(Some("handler"))
        .pass(Some("handler-pw"));
    let mut c = mysql_async::Conn::new(opts).await?;
    // A quote doubled and a backslash escaped, as MariaDB reads them by default, then with
    // NO_BACKSLASH_ESCAPES, where a backslash is itself.
    ensure!(begin_branch(&mut c, r"it''s \\ ok", "01", "try").await? == "run");
    c.query_drop("COMMIT").await?;
    c.query_drop("SET sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES,ANSI_QUOTES')")
        .await?;
    ensure!(begin_branch(&mut c, r"it''s \ ok", "01", "try").await? == "duplicate");
    let gids: Vec<String> = admin.query("SELECT gid FROM dtm_barrier.barrier").await?;
    ensure!(gids == [r"it's \ ok"], "{gids:?}");
    Ok(())
}

#[tokio::test]
async fn a_barrier_is_refused_where_it_cannot_open_the_handler_s_transaction() -> Result<()> {
    let s = Setup::start().await?;
    let mut c = s.proxy.conn().await?;
    let code = |e: mysql_async::Error| server_error(&e).map(|(c, _, _)| c).unwrap_or(0);
    c.query_drop("BEGIN").await?;
    let e = c.query_drop("BEGIN BRANCH 'g' '01' 'try'").await.unwrap_err();
    ensure!(code(e) == 1399, "a transaction is open");
    c.query_drop("ROLLBACK").await?;
    let e = c.query_drop("BEGIN BRANCH 'g' '01'").await.unwrap_err();
    ensure!(code(e) == 1064, "no op");
    let e = c
        .query_drop(format!("BEGIN BRANCH '{}' '01' 'try'", "g".repeat(129)))
        .await
        .unwrap_err();
    ensure!(code(e) == 1406, "a gid longer than DTM's column");
    // Outside those, the connection is as before.
    let one: Option<i64> = c.query_first("SELECT 1").await?;
    ensure!(one == Some(1));
    Ok(())
}

/// Prepared messages (the outbox's, 2-phase) left past their timeout by an application that
/// went away are settled by a proxy in front of their database, from their barrier row: its
/// local transaction committed (sent), rolled back or never came (dropped, and a late one
/// fails on the row the check left), or is still open (the check waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_messages_are_settled_by_their_barrier_row() -> Result<()> {
    use ferrata_rpc::pb;
    use ferrata_tests::coordinator::Coordinator;
    use ferrata_tests::ferrata_testkit::{MariaDb, service::Service};
    use ferrata_tests::process::ProxyProcess;

    let tc = Coordinator::start_with(
        env!("CARGO_BIN_EXE_ferrata-tc-for-tests"),
        "[transactions]\ntimeout_check_interval_ms = 20\n[phase2]\nretry_initial_ms = 20\nretry_max_ms = 200\n",
    )?;
    let db = MariaDb::start().await?;
    let proxy = ProxyProcess::start_with(
        env!("CARGO_BIN_EXE_ferrata-proxy-for-tests"),
        db.addr(),
        &tc.endpoint(),
        "",
        "",
    )?;
    proxy.await_trust(&mut proxy.conn().await?).await?;
    let service = Service::start().await?;
    // The barrier table, as the outbox (or DTM's SDK) makes it.
    let mut c = proxy.conn().await?;
    ensure!(begin_branch(&mut c, "setup", "01", "try").await? == "run");
    c.query_drop("ROLLBACK").await?;

    let mut client = tc.client().await?;
    let mut prepare = async |path: &str| -> Result<String> {
        let request = pb::MessagesPrepareRequest {
            timeout_ms: 300,
            resource_id: format!("{}/test", db.addr()),
            messages: vec![pb::Message {
                target: format!("{}/ok/{path}", service.base),
                data: r#"{"n": 1}"#.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        Ok(client.tm.messages_prepare(request).await?.into_inner().xid)
    };
    let barrier_row = |xid: &str| {
        format!(
            "INSERT INTO dtm_barrier.barrier (trans_type, gid, branch_id, op, barrier_id, reason) \
             VALUES ('msg', '{xid}', '00', 'msg', '01', 'msg')"
        )
    };
    let until_status = async |xid: &str, want: &str| {
        ferrata_tests::until(&format!("{xid} {want}"), async || Ok(tc.status(xid).await? == want)).await
    };

    // Committed with its barrier row: sent.
    let committed = prepare("committed").await?;
    let mut app = db.conn().await?;
    app.query_drop("BEGIN").await?;
    app.query_drop(barrier_row(&committed)).await?;
    app.query_drop("COMMIT").await?;
    until_status(&committed, "Committed").await?;
    ensure!(service.story(&committed, &["op"]) == ["/ok/committed action"]);

    // Never committed: dropped, and its late commit fails on the check's row.
    let gone = prepare("gone").await?;
    until_status(&gone, "TimeoutRollbacked").await?;
    let late = app.query_drop(barrier_row(&gone)).await;
    ensure!(
        late.as_ref()
            .err()
            .and_then(|e| server_error(e).ok())
            .map(|(code, _, _)| code)
            == Some(1062),
        "{late:?}"
    );
    ensure!(service.story(&gone, &["op"]).is_empty());

    // Still open when the check comes: it waits, then follows the commit.
    let open = prepare("open").await?;
    app.query_drop("BEGIN").await?;
    app.query_drop(barrier_row(&open)).await?;
    ferrata_tests::a_lock_wait(&db).await?;
    ensure!(tc.status(&open).await? == "Begin");
    app.query_drop("COMMIT").await?;
    until_status(&open, "Committed").await?;
    ensure!(service.story(&open, &["op"]) == ["/ok/open action"]);
    Ok(())
}
