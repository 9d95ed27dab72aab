//! The outbox through the proxy, with real `ferrata-tc` and `ferrata-proxy` processes, a real
//! MariaDB server and a real HTTP service: messages written with plain SQL go out when their
//! local transaction commits (text and prepared statements, explicit and autocommit, and
//! `SEND MESSAGE`), never
//! when it rolls back; bad rows are refused at the INSERT with nothing written; statements
//! that would commit pending messages behind the proxy's back are refused; inside a global
//! transaction they go with its decision; DTM's DoAndSubmitDB runs unchanged through the
//! proxy.

use anyhow::{Result, ensure};
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::{MariaDb, service::Service};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::server_error;
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

struct Env {
    tc: Coordinator,
    db: MariaDb,
    proxy: ProxyProcess,
    service: Service,
}

async fn start() -> Result<Env> {
    start_with("").await
}

/// With `outbox_toml` as the proxy's `[outbox]` settings.
async fn start_with(outbox_toml: &str) -> Result<Env> {
    let tc = Coordinator::start_with(
        TC,
        "[transactions]\ntimeout_check_interval_ms = 20\n[phase2]\nretry_initial_ms = 20\nretry_max_ms = 200\n",
    )?;
    let db = MariaDb::start().await?;
    db.conn()
        .await?
        .query_drop("CREATE TABLE orders (id INT PRIMARY KEY, total INT)")
        .await?;
    let proxy = outbox_proxy(&tc, &db, outbox_toml).await?;
    let service = Service::start().await?;
    Ok(Env { tc, db, proxy, service })
}

/// A proxy in front of `db` with `outbox_toml` as its `[outbox]` settings, trusted by `tc`.
async fn outbox_proxy(tc: &Coordinator, db: &MariaDb, outbox_toml: &str) -> Result<ProxyProcess> {
    let more = format!("\n[outbox]\n{outbox_toml}\n");
    let proxy = ProxyProcess::start_with(PROXY, db.addr(), &tc.endpoint(), "", &more)?;
    proxy.await_trust(&mut proxy.conn().await?).await?;
    Ok(proxy)
}

fn code(e: &mysql_async::Error) -> u16 {
    server_error(e).map(|(c, _, _)| c).unwrap_or(0)
}

/// The xid the outbox row of `target` was handed over under, once it was.
async fn handed(db: &MariaDb, target: &str) -> Result<Option<String>> {
    let mut c = db.conn().await?;
    Ok(
        c.exec_first("SELECT xid FROM ferrata_outbox WHERE target = ?", (target,))
            .await?
            .flatten(),
    )
}

/// The first message of a test, sent and delivered: the proxy has made its tables.
async fn tables_made(env: &Env, app: &mut mysql_async::Conn) -> Result<()> {
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (format!("{}/ok/first", env.service.base),),
    )
    .await?;
    env.service.until_called("/ok/first?").await?;
    Ok(())
}

/// A COMMIT sent, in the background, while the hand-over is held at its barrier row.
type HeldCommit = tokio::task::JoinHandle<(mysql_async::Conn, Result<(), mysql_async::Error>)>;

/// Opens a transaction on `app`, runs `statements` and writes an outbox row for `/ok/<path>`,
/// then sends its COMMIT while a DBA connection (returned) holds the barrier table: the
/// hand-over stops at its barrier row, after the coordinator stored the messages, until the
/// DBA runs UNLOCK TABLES.
async fn held_commit(
    env: &Env,
    mut app: mysql_async::Conn,
    statements: &[&str],
    path: &str,
) -> Result<(mysql_async::Conn, HeldCommit)> {
    let mut dba = env.db.conn().await?;
    dba.query_drop("LOCK TABLES dtm_barrier.barrier WRITE").await?;
    app.query_drop("BEGIN").await?;
    for statement in statements {
        app.query_drop(*statement).await?;
    }
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (format!("{}/ok/{path}", env.service.base),),
    )
    .await?;
    let commit = tokio::spawn(async move {
        let done = app.query_drop("COMMIT").await;
        (app, done)
    });
    Ok((dba, commit))
}

/// The XID of the outbox's prepared messages, once the coordinator stored them.
async fn prepared_by_the_outbox(tc: &Coordinator) -> Result<String> {
    ferrata_tests::eventually(
        "the messages stored, prepared",
        std::time::Duration::from_secs(30),
        async || {
            let list = tc.get("/v1/transactions?status=Begin").await?;
            Ok(list["transactions"]
                .as_array()
                .and_then(|l| l.iter().find(|t| t["name"] == "outbox"))
                .and_then(|t| t["xid"].as_str().map(str::to_owned)))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_out_exactly_when_their_local_transaction_commits() -> Result<()> {
    let env = start().await?;
    let url = |path: &str| format!("{}/ok/{path}", env.service.base);
    let mut app = env.proxy.conn().await?;

    // Committed with the business change: sent, with its payload, policy and key.
    app.query_drop("BEGIN").await?;
    app.query_drop("INSERT INTO orders VALUES (1, 30)").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload, msg_key) VALUES (?, ?, ?)",
        (url("credit"), r#"{"order": 1}"#, "order-1"),
    )
    .await?;
    ensure!(env.service.calls().is_empty(), "nothing before the commit");
    app.query_drop("COMMIT").await?;
    let call = env.service.until_called("/ok/credit?").await?;
    ensure!(
        call.body == r#"{"order": 1}"# && call.header("webhook-id") == "order-1",
        "{call:?}"
    );
    let xid = handed(&env.db, &url("credit")).await?.unwrap_or_default();
    ferrata_tests::until("the messages' transaction to commit", async || {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    // Its row is marked delivered, for DBAs to see.
    ferrata_tests::until("the row marked delivered", async || {
        let mut c = env.db.conn().await?;
        let n: Option<i64> = c
            .query_first("SELECT COUNT(*) FROM ferrata_outbox WHERE delivered_at IS NOT NULL")
            .await?;
        Ok(n == Some(1))
    })
    .await?;

    // Rolled back: never sent.
    app.query_drop("BEGIN").await?;
    app.query_drop(format!(
        "INSERT INTO ferrata_outbox (target, payload) VALUES ('{}', 'x')",
        url("never")
    ))
    .await?;
    app.query_drop("ROLLBACK").await?;

    // Autocommit, text protocol: sent at once.
    app.query_drop(format!(
        "INSERT INTO ferrata_outbox (target, payload, policy) VALUES ('{}', 'y', 'wechat')",
        url("alone")
    ))
    .await?;
    env.service.until_called("/ok/alone?").await?;
    // SEND MESSAGE: the same row, written by the proxy.
    app.query_drop(format!(
        "SEND MESSAGE TO '{}' PAYLOAD '{{\"x\": 1}}' KEY 'k-9' POLICY 'alipay' DELAY 0",
        url("sent")
    ))
    .await?;
    let sent = env.service.until_called("/ok/sent?").await?;
    ensure!(
        sent.body == r#"{"x": 1}"# && sent.header("webhook-id") == "k-9",
        "{sent:?}"
    );
    let bad = app
        .query_drop(format!(
            "SEND MESSAGE TO '{}' PAYLOAD 'p' POLICY 'sometimes'",
            url("bad")
        ))
        .await
        .expect_err("refused");
    ensure!(code(&bad) == 4025, "{bad}");
    ensure!(
        env.service.calls_to("/ok/never").is_empty(),
        "a rolled-back message is never sent"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_refused_at_the_insert_and_the_transaction_goes_on() -> Result<()> {
    let env = start().await?;
    let ok = format!("{}/ok/later", env.service.base);
    let mut app = env.proxy.conn().await?;
    app.query_drop("BEGIN").await?;
    app.query_drop("INSERT INTO orders VALUES (2, 40)").await?;
    for (target, policy, says) in [("ftp://svc/x", "", "not an http"), (ok.as_str(), "weekly", "weekly")] {
        let e = app
            .exec_drop(
                "INSERT INTO ferrata_outbox (target, payload, policy) VALUES (?, 'p', ?)",
                (target, policy),
            )
            .await
            .expect_err("refused");
        let (c, state, message) = server_error(&e)?;
        ensure!((c, state.as_str()) == (4025, "23000") && message.contains(says), "{e}");
    }
    // Implicit commits are refused while a message is pending.
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (ok.as_str(),),
    )
    .await?;
    let ddl = app.query_drop("CREATE TABLE t2 (id INT)").await.expect_err("refused");
    ensure!(code(&ddl) == 1235, "{ddl}");
    app.query_drop("COMMIT").await?;
    env.service.until_called("/ok/later?").await?;
    let rows: Vec<String> = env.db.conn().await?.query("SELECT target FROM ferrata_outbox").await?;
    ensure!(rows == [ok.clone()], "only the good row was written: {rows:?}");
    let total: Option<i64> = env
        .db
        .conn()
        .await?
        .query_first("SELECT total FROM orders WHERE id = 2")
        .await?;
    ensure!(total == Some(40), "the business change committed with it");
    Ok(())
}

/// A proxy killed right after its client's COMMIT: the messages go out all the same, once
/// (whether its own decision reached the coordinator or the coordinator's check of the
/// barrier row, through another proxy, decided); delivered rows are purged after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_their_proxy_and_delivered_rows_are_purged() -> Result<()> {
    let settings = "prepared_timeout_ms = 1000\nkeep_delivered_s = 1\npurge_interval_ms = 100";
    let mut env = start_with(settings).await?;
    let other = outbox_proxy(&env.tc, &env.db, settings).await?;
    let target = format!("{}/ok/survivor", env.service.base);
    let mut app = env.proxy.conn().await?;
    app.query_drop("BEGIN").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (target.as_str(),),
    )
    .await?;
    app.query_drop("COMMIT").await?;
    env.proxy.kill9()?;
    env.service.until_called("/ok/survivor?").await?;
    let xid = handed(&env.db, &target).await?.unwrap_or_default();
    ferrata_tests::until("the messages' transaction to commit", async || {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    let calls = env.service.calls_to("/ok/survivor").len();
    ensure!(calls == 1, "sent once: {calls}");

    // Delivered rows go after keep_delivered_s (the first proxy's purge is gone with it: the
    // other one purges the databases it has used).
    let mut c = other.conn().await?;
    c.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (format!("{}/ok/purged", env.service.base),),
    )
    .await?;
    ferrata_tests::until("delivered rows purged", async || {
        let n: Option<i64> = env
            .db
            .conn()
            .await?
            .query_first("SELECT COUNT(*) FROM ferrata_outbox")
            .await?;
        Ok(n == Some(0))
    })
    .await?;
    Ok(())
}

/// What drivers do that the first tests do not: autocommit off (the INSERT opens the
/// transaction), COMMIT AND CHAIN, a multi-statement string, a change of database while
/// messages are pending, another database's outbox, an INSERT that sets the proxy's own
/// columns, and the client's own XA transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_holds_under_what_drivers_send() -> Result<()> {
    let env = start().await?;
    let url = |path: &str| format!("{}/ok/{path}", env.service.base);
    let mut app = env.proxy.conn().await?;

    // autocommit off: nothing goes until the COMMIT, and a ROLLBACK takes it back.
    app.query_drop("SET autocommit = 0").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (url("off-rolled"),),
    )
    .await?;
    app.query_drop("ROLLBACK").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (url("off-committed"),),
    )
    .await?;
    app.query_drop("COMMIT AND CHAIN").await?;
    env.service.until_called("/ok/off-committed?").await?;
    app.query_drop("COMMIT").await?;
    app.query_drop("SET autocommit = 1").await?;
    ensure!(env.service.calls_to("/ok/off-rolled").is_empty());

    // Refused: a multi-statement string with an outbox write; USE while pending; another
    // database's outbox.
    let both = app
        .query_drop(format!(
            "INSERT INTO ferrata_outbox (target, payload) VALUES ('{}', 'p'); COMMIT",
            url("multi")
        ))
        .await
        .expect_err("refused");
    ensure!(code(&both) == 1235, "{both}");
    app.query_drop("BEGIN").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (url("pending"),),
    )
    .await?;
    let use_db = app.query_drop("USE mysql").await.expect_err("refused");
    ensure!(code(&use_db) == 1235, "{use_db}");
    let other = app
        .query_drop(format!(
            "INSERT INTO mysql.ferrata_outbox (target, payload) VALUES ('{}', 'p')",
            url("other")
        ))
        .await
        .expect_err("refused");
    ensure!(code(&other) == 1235, "{other}");
    // The proxy's own columns are its own.
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload, xid, session) VALUES (?, 'p', 'forged', 1)",
        (url("forged"),),
    )
    .await?;
    app.query_drop("COMMIT").await?;
    env.service.until_called("/ok/pending?").await?;
    env.service.until_called("/ok/forged?").await?;

    // Inside the client's own XA transaction: refused, and the XA transaction goes on.
    app.query_drop("XA START 'own'").await?;
    let in_xa = app
        .exec_drop(
            "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
            (url("xa"),),
        )
        .await
        .expect_err("refused");
    ensure!(code(&in_xa) == 1235, "{in_xa}");
    app.query_drop("XA END 'own'").await?;
    app.query_drop("XA ROLLBACK 'own'").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'p')",
        (url("after-xa"),),
    )
    .await?;
    env.service.until_called("/ok/after-xa?").await?;
    Ok(())
}

/// A proxy that dies during the hand-over, before its client's COMMIT reached the server:
/// the coordinator's check of the barrier row (through another proxy) finds none and drops
/// the messages, and nothing of the transaction committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whose_commit_never_happened_are_dropped_by_the_check() -> Result<()> {
    let settings = "prepared_timeout_ms = 1000";
    let mut env = start_with(settings).await?;
    // Kept running: it answers the coordinator's check.
    let _other = outbox_proxy(&env.tc, &env.db, settings).await?;
    let mut app = env.proxy.conn().await?;
    tables_made(&env, &mut app).await?;
    let (mut dba, commit) = held_commit(&env, app, &["INSERT INTO orders VALUES (3, 50)"], "lost").await?;
    let xid = prepared_by_the_outbox(&env.tc).await?;
    env.proxy.kill9()?;
    dba.query_drop("UNLOCK TABLES").await?;
    ensure!(
        commit.await?.1.is_err(),
        "the client lost its connection before any answer"
    );

    ferrata_tests::until("the check to drop the messages", async || {
        Ok(env.tc.status(&xid).await? == "TimeoutRollbacked")
    })
    .await?;
    let order: Option<i64> = dba.query_first("SELECT total FROM orders WHERE id = 3").await?;
    ensure!(order.is_none(), "nothing of the transaction committed");
    ensure!(
        env.service.calls_to("/ok/lost").is_empty(),
        "its message was never sent"
    );
    Ok(())
}

/// The messages of one global transaction's outbox rows (its branches of mode msg).
async fn joined(tc: &Coordinator, xid: &str) -> Result<usize> {
    let t = tc.get(&format!("/v1/transactions/{xid}")).await?;
    Ok(t["branches"]
        .as_array()
        .map_or(0, |b| b.iter().filter(|b| b["mode"] == "MSG").count()))
}

/// Outbox rows written inside a global transaction go with its decision: delivered when it
/// commits (their barrier rows say their local transactions committed), never when it rolls
/// back (their rows deleted, the AT write undone), never from a local transaction that
/// rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_a_global_transaction_go_with_its_decision() -> Result<()> {
    let env = start().await?;
    let url = |path: &str| format!("{}/ok/{path}", env.service.base);
    let mut app = env.proxy.conn().await?;
    let outbox_rows = async |target: &str| -> Result<i64> {
        let mut c = env.db.conn().await?;
        let n: Option<i64> = c
            .exec_first("SELECT COUNT(*) FROM ferrata_outbox WHERE target = ?", (target,))
            .await?;
        Ok(n.unwrap_or(0))
    };

    // Committed: two local transactions, one rolled back; the messages wait for the global
    // commit, then the committed local transaction's go.
    let xid: String = app.query_first("START GLOBAL TRANSACTION").await?.expect("an xid");
    app.query_drop("BEGIN").await?;
    app.query_drop(format!(
        "INSERT INTO ferrata_outbox (target, payload) VALUES ('{}', 'never')",
        url("local-rollback")
    ))
    .await?;
    app.query_drop("ROLLBACK").await?;
    app.query_drop("BEGIN").await?;
    app.query_drop("INSERT INTO orders VALUES (10, 5)").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload, msg_key) VALUES (?, 'g', 'order-10')",
        (url("global-commit"),),
    )
    .await?;
    app.query_drop(format!("SEND MESSAGE TO '{}' PAYLOAD 's'", url("global-send")))
        .await?;
    app.query_drop("COMMIT").await?;
    ensure!(joined(&env.tc, &xid).await? == 2, "both messages joined {xid}");
    ensure!(
        handed(&env.db, &url("global-commit")).await?.as_deref() == Some(xid.as_str()),
        "the rows carry the global XID"
    );
    ensure!(env.service.calls().is_empty(), "nothing before the global commit");
    app.query_drop("COMMIT GLOBAL").await?;
    let call = env.service.until_called("/ok/global-commit?").await?;
    ensure!(call.body == "g" && call.header("webhook-id") == "order-10", "{call:?}");
    env.service.until_called("/ok/global-send?").await?;
    ferrata_tests::until("the global transaction to finish", async || {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    ferrata_tests::until("the rows marked delivered", async || {
        let mut c = env.db.conn().await?;
        let n: Option<i64> = c
            .exec_first(
                "SELECT COUNT(*) FROM ferrata_outbox WHERE xid = ? AND delivered_at IS NOT NULL",
                (&xid,),
            )
            .await?;
        Ok(n == Some(2))
    })
    .await?;

    // Rolled back: the local transaction committed, yet nothing goes, the rows are deleted
    // and the order is undone. Autocommit this time.
    let xid: String = app.query_first("START GLOBAL TRANSACTION").await?.expect("an xid");
    app.query_drop("INSERT INTO orders VALUES (11, 5)").await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'r')",
        (url("global-rollback"),),
    )
    .await?;
    ensure!(joined(&env.tc, &xid).await? == 1, "the message joined {xid}");
    ensure!(outbox_rows(&url("global-rollback")).await? == 1, "its row committed");
    app.query_drop("ROLLBACK GLOBAL").await?;
    ensure!(env.tc.status(&xid).await? == "Rollbacked", "rolled back");
    // Deleted after the rollback, by a proxy the coordinator asks.
    ferrata_tests::until("its row deleted", async || {
        Ok(outbox_rows(&url("global-rollback")).await? == 0)
    })
    .await?;
    let order: Option<i64> = env
        .db
        .conn()
        .await?
        .query_first("SELECT total FROM orders WHERE id = 11")
        .await?;
    ensure!(order.is_none(), "the order undone");

    // A message sent after both shows nothing else came.
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'last')",
        (url("last"),),
    )
    .await?;
    env.service.until_called("/ok/last?").await?;
    ensure!(
        env.service.calls_to("/ok/local-rollback").is_empty() && env.service.calls_to("/ok/global-rollback").is_empty(),
        "{:?}",
        env.service.calls()
    );
    Ok(())
}

/// A message joined to a global transaction whose local transaction never committed (its
/// proxy died during the hand-over): the global commit asks its barrier row, through
/// another proxy, and drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_message_whose_local_commit_never_happened_is_dropped() -> Result<()> {
    let mut env = start().await?;
    let other = outbox_proxy(&env.tc, &env.db, "").await?;
    let mut app = env.proxy.conn().await?;
    tables_made(&env, &mut app).await?;
    let xid: String = app.query_first("START GLOBAL TRANSACTION").await?.expect("an xid");
    let (mut dba, commit) = held_commit(&env, app, &[], "lost").await?;
    ferrata_tests::until("the message joined", async || Ok(joined(&env.tc, &xid).await? == 1)).await?;
    env.proxy.kill9()?;
    dba.query_drop("UNLOCK TABLES").await?;
    ensure!(commit.await?.1.is_err(), "the client lost its connection");

    let mut second = other.conn().await?;
    second.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    ferrata_tests::until("the global transaction to finish", async || {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    let (_, metrics) = ferrata_tests::http_get(env.tc.http, "/metrics").await?;
    ensure!(
        metrics.contains(r#"ferrata_tc_messages_total{result="dropped"} 1"#),
        "counted as dropped: {metrics}"
    );
    ensure!(env.service.calls_to("/ok/lost").is_empty(), "never sent");
    Ok(())
}

/// DTM's DoAndSubmitDB, unchanged (`tests/dtmcli/barrier_db.py`, the SDK's barrier in a
/// MariaDB database reached through the proxy, its query_prepared served by the program):
/// a message submitted after its local transaction, one aborted by its local work, one
/// whose application went away after its local commit (the check says committed: sent) and
/// one that went away before (the check says never: dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtms_do_and_submit_db_runs_through_the_proxy() -> Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dtmcli");
    let python = dir.join("venv/bin/python");
    ensure!(
        python.exists(),
        "{} is missing: run scripts/setup-debian.sh (it makes the virtualenv with dtmcli)",
        python.display()
    );
    let env = start().await?;
    let mut dba = env.db.conn().await?;
    dba.query_drop("CREATE DATABASE dtm_barrier").await?;
    dba.query_drop(
        "CREATE TABLE dtm_barrier.barrier (id BIGINT PRIMARY KEY AUTO_INCREMENT, trans_type VARCHAR(45) DEFAULT '', \
         gid VARCHAR(128) DEFAULT '', branch_id VARCHAR(128) DEFAULT '', op VARCHAR(45) DEFAULT '', \
         barrier_id VARCHAR(45) DEFAULT '', reason VARCHAR(45) DEFAULT '', create_time DATETIME DEFAULT NOW(), \
         update_time DATETIME DEFAULT NOW(), UNIQUE KEY (gid, branch_id, op, barrier_id))",
    )
    .await?;
    let out = tokio::process::Command::new(&python)
        .arg(dir.join("barrier_db.py"))
        .arg(format!("http://{}/api/dtmsvr", env.tc.http))
        .arg(&env.service.base)
        .arg(env.proxy.addr.ip().to_string())
        .arg(env.proxy.addr.port().to_string())
        .arg(ferrata_tests::ferrata_testkit::APP_USER)
        .arg(ferrata_tests::ferrata_testkit::APP_PASSWORD)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "barrier_db.py failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gids: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
    let gid = |name: &str| gids[name].as_str().unwrap_or_default().to_owned();
    let dtm_status = async |gid: &str| -> Result<String> {
        let v = env.tc.get(&format!("/api/dtmsvr/query?gid={gid}")).await?;
        Ok(v["transaction"]["status"].as_str().unwrap_or_default().to_owned())
    };
    for (name, status) in [
        ("db_done", "succeed"),
        ("db_refused", "failed"),
        ("db_orphan", "succeed"),
        ("db_never", "failed"),
    ] {
        ferrata_tests::until(&format!("{name} {status}"), async || {
            Ok(dtm_status(&gid(name)).await? == status)
        })
        .await?;
    }
    let paid = |name: &str| {
        let gid = gid(name);
        env.service
            .calls_to("/ok/order-paid?")
            .iter()
            .filter(|c| c.uri.contains(&format!("gid={gid}&")))
            .count()
    };
    ensure!(
        paid("db_done") == 1 && paid("db_orphan") == 1,
        "the committed ones are delivered once"
    );
    ensure!(paid("db_refused") == 0 && paid("db_never") == 0, "the others never");
    let orders: Vec<i64> = dba.query("SELECT id FROM test.orders ORDER BY id").await?;
    ensure!(orders == [1, 3], "only the committed local work stayed: {orders:?}");
    let reasons: Vec<(String, String)> = dba
        .query("SELECT gid, reason FROM dtm_barrier.barrier WHERE op = 'msg' ORDER BY id")
        .await?;
    ensure!(
        reasons.contains(&(gid("db_never"), "rollback".into())),
        "the check left its row: {reasons:?}"
    );
    Ok(())
}

/// Messages whose local transaction committed but whose proxy's word never reached the
/// coordinator (it was down from the hand-over to after the COMMIT, and the proxy died
/// before it was back): once the coordinator is back and their timeout passed, its check
/// of the barrier row, through another proxy, says committed, and they go out, once; the
/// timeline says the check decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_whose_commit_word_was_lost_go_out_by_the_check() -> Result<()> {
    let settings = "prepared_timeout_ms = 1000";
    let mut env = start_with(settings).await?;
    // Kept running: it answers the coordinator's check.
    let _other = outbox_proxy(&env.tc, &env.db, settings).await?;
    let mut app = env.proxy.conn().await?;
    tables_made(&env, &mut app).await?;
    let (mut dba, commit) = held_commit(&env, app, &["INSERT INTO orders VALUES (4, 40)"], "by-check").await?;
    let xid = prepared_by_the_outbox(&env.tc).await?;
    // Once the proxy has the coordinator's answer (it waits on the barrier row), the
    // coordinator goes down; the COMMIT then succeeds without it.
    ferrata_tests::until("the hand-over at its barrier row", async || {
        let waiting: Option<i64> = dba
            .query_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'INSERT INTO %dtm_barrier%'",
            )
            .await?;
        Ok(waiting == Some(1))
    })
    .await?;
    env.tc.kill9()?;
    dba.query_drop("UNLOCK TABLES").await?;
    let (_app, committed) = commit.await?;
    committed?;
    let order: Option<i64> = dba.query_first("SELECT total FROM orders WHERE id = 4").await?;
    ensure!(order == Some(40), "the local transaction committed");
    // Its proxy dies before the coordinator is back: its word is lost with it.
    env.proxy.kill9()?;

    env.tc.restart()?;
    env.service.until_called("/ok/by-check?").await?;
    ferrata_tests::until("the messages' transaction to commit", async || {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    let events = env.tc.get(&format!("/v1/transactions/{xid}/events")).await?;
    ensure!(
        events["events"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["type"] == "decided" && e["by"] == "check")),
        "decided by the check: {events}"
    );
    let sent = env.service.calls_to("/ok/by-check").len();
    ensure!(sent == 1, "sent once: {sent}");
    Ok(())
}

/// A deadlock ends the client's transaction with an ERR, which carries no status: an outbox
/// INSERT right after it, in autocommit mode, is still its own transaction, handed over and
/// sent (not committed behind the proxy's back by a savepoint that opened nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_insert_after_a_deadlock_is_sent() -> Result<()> {
    let env = start().await?;
    let mut dba = env.db.conn().await?;
    dba.query_drop("INSERT INTO orders VALUES (1, 1), (2, 2)").await?;
    let app = env.proxy.conn().await?;
    let (mut app, e) =
        ferrata_tests::deadlock_victim(app, &env.db, "orders", "total", "UPDATE orders SET total = 11%").await?;
    ensure!(code(&e) == 1213, "{e}");

    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'after')",
        (format!("{}/ok/after-deadlock", env.service.base),),
    )
    .await?;
    env.service.until_called("/ok/after-deadlock?").await?;
    Ok(())
}

/// Outbox rows of a session bound in MODE XA go with the global decision too: written in
/// its XA branch, or (autocommit, before the connection holds a prepared branch) in a local
/// transaction of the outbox's own. Once the branch is prepared the connection takes nothing
/// until the decision, outbox writes included (said in the outbox's terms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_an_xa_bound_session_go_with_the_global_decision() -> Result<()> {
    let env = start().await?;
    let url = |path: &str| format!("{}/ok/{path}", env.service.base);
    let mut app = env.proxy.conn().await?;
    for (n, decision) in [(1, "COMMIT GLOBAL"), (2, "ROLLBACK GLOBAL")] {
        let xid: String = app
            .query_first("START GLOBAL TRANSACTION MODE XA")
            .await?
            .expect("an xid");
        app.exec_drop(
            "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'autocommit')",
            (url(&format!("xa-{n}-own")),),
        )
        .await?;
        app.query_drop("BEGIN").await?;
        app.query_drop(format!("INSERT INTO orders VALUES ({n}, 1)")).await?;
        app.exec_drop(
            "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'in the branch')",
            (url(&format!("xa-{n}-branch")),),
        )
        .await?;
        app.query_drop("COMMIT").await?;
        let held = app
            .query_drop(format!(
                "INSERT INTO ferrata_outbox (target, payload) VALUES ('{}', 'held')",
                url("xa-held")
            ))
            .await
            .expect_err("refused while the branch is held");
        ensure!(
            code(&held) == 1235 && held.to_string().contains("XA transaction takes no outbox write now"),
            "{held}"
        );
        ensure!(joined(&env.tc, &xid).await? == 2, "both joined {xid}");
        app.query_drop(decision).await?;
        if n == 1 {
            env.service.until_called("/ok/xa-1-own?").await?;
            env.service.until_called("/ok/xa-1-branch?").await?;
        }
        ferrata_tests::until("the global transaction to finish", async || {
            Ok(matches!(
                env.tc.status(&xid).await?.as_str(),
                "Committed" | "Rollbacked"
            ))
        })
        .await?;
    }
    ferrata_tests::until("the rolled-back transaction's rows deleted", async || {
        let rows: Vec<String> = env
            .db
            .conn()
            .await?
            .query("SELECT target FROM ferrata_outbox WHERE target LIKE '%xa-2%'")
            .await?;
        Ok(rows.is_empty())
    })
    .await?;
    app.exec_drop(
        "INSERT INTO ferrata_outbox (target, payload) VALUES (?, 'last')",
        (url("xa-last"),),
    )
    .await?;
    env.service.until_called("/ok/xa-last?").await?;
    ensure!(
        env.service.calls_to("/ok/xa-2").is_empty() && env.service.calls_to("/ok/xa-held").is_empty(),
        "nothing of the rolled-back one, nothing refused"
    );
    Ok(())
}

/// With no proxy in front of its database, a joined message's barrier row cannot be asked:
/// its commit waits on the coordinator's backoff (not the message's delivery schedule, which
/// would dead-letter it unsent) and goes once a proxy is back. A global rollback of another
/// such message does not wait for a proxy to delete its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_messages_wait_for_their_barrier_and_never_hold_a_rollback() -> Result<()> {
    let mut env = start().await?;
    let url = |path: &str| format!("{}/ok/{path}", env.service.base);
    let mut app = env.proxy.conn().await?;
    let mut joined_xid = async |path: &str| -> Result<String> {
        let xid: String = app.query_first("START GLOBAL TRANSACTION").await?.expect("an xid");
        // One attempt after the first: a schedule of 50 ms.
        app.exec_drop(
            "INSERT INTO ferrata_outbox (target, payload, policy) VALUES (?, 'p', '50ms')",
            (url(path),),
        )
        .await?;
        app.query_drop("LEAVE GLOBAL TRANSACTION").await?;
        Ok(xid)
    };
    let committed = joined_xid("waited").await?;
    let rolled_back = joined_xid("dropped").await?;
    env.proxy.kill9()?;

    let (status, body) = env
        .tc
        .post(
            &format!("/v1/transactions/{rolled_back}/rollback"),
            &serde_json::json!({}),
        )
        .await?;
    ensure!(status == 200, "{status} {body}");
    ensure!(
        env.tc.status(&rolled_back).await? == "Rollbacked",
        "not held by its row"
    );

    let (status, body) = env
        .tc
        .post(&format!("/v1/transactions/{committed}/commit"), &serde_json::json!({}))
        .await?;
    ensure!(status == 200, "{status} {body}");
    // More unanswered checks than the message's schedule has attempts.
    ferrata_tests::until("three unanswered checks", async || {
        let events = env.tc.get(&format!("/v1/transactions/{committed}/events")).await?;
        // Retries of one branch are one event, counting its attempts.
        let unanswered = events["events"].as_array().into_iter().flatten().any(|e| {
            e["result"] == "retry"
                && e["reason"].as_str().is_some_and(|r| r.contains("barrier row"))
                && e["attempts"].as_u64() >= Some(3)
        });
        Ok(unanswered)
    })
    .await?;
    ensure!(
        env.tc.status(&committed).await? == "AsyncCommitting",
        "not dead-lettered"
    );
    let _back = outbox_proxy(&env.tc, &env.db, "").await?;
    env.service.until_called("/ok/waited?").await?;
    ferrata_tests::until("the commit to finish", async || {
        Ok(env.tc.status(&committed).await? == "Committed")
    })
    .await?;
    ensure!(
        env.service.calls_to("/ok/dropped").is_empty(),
        "the rolled-back one never went"
    );
    Ok(())
}
