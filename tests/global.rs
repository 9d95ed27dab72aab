//! Ferrata's global-transaction statements through the proxy, with a real `ferrata-tc`
//! process and real MariaDB servers: START / JOIN / COMMIT / ROLLBACK / LEAVE / SHOW GLOBAL
//! TRANSACTION, the refusal of statements the proxy cannot protect (yet), the errors clients see,
//! phase 2 run by the proxy (undo records deleted, the anti-hanging marker) and coordinator
//! failover.

use anyhow::Result;
use ferrata_proxy::config::{Coordinator as TcSettings, Secret};
use ferrata_rpc::pb;
use ferrata_tests::coordinator::Coordinator;
use ferrata_tests::ferrata_testkit::{APP_PASSWORD, APP_USER, MariaDb};
use ferrata_tests::process::ProxyProcess;
use ferrata_tests::{Proxy, server_error, test_config, until};
use mysql_async::prelude::*;

const TC: &str = env!("CARGO_BIN_EXE_ferrata-tc-for-tests");
const PROXY: &str = env!("CARGO_BIN_EXE_ferrata-proxy-for-tests");

/// A server, a coordinator and a proxy that knows both.
struct Env {
    proxy: Proxy,
    tc: Coordinator,
    db: MariaDb,
}

async fn proxy_for(db: &MariaDb, endpoints: Vec<String>) -> Result<Proxy> {
    let mut config = test_config(db.addr());
    config.coordinator = Some(TcSettings {
        lock_wait_ms: 2_000,
        rm_id: Some("test-proxy".into()),
        ..TcSettings::new(endpoints)
    });
    config.service.user = APP_USER.into();
    config.service.password = Some(Secret(APP_PASSWORD.into()));
    Proxy::start_with(config).await
}

impl Env {
    async fn start() -> Result<Env> {
        let db = MariaDb::start().await?;
        let tc = Coordinator::start(TC)?;
        let proxy = proxy_for(&db, vec![tc.endpoint()]).await?;
        Ok(Env { proxy, tc, db })
    }

    fn resource(&self) -> String {
        format!("{}/test", self.db.addr())
    }
}

async fn start(conn: &mut mysql_async::Conn) -> Result<String> {
    let xid: Option<String> = conn
        .query_first("START GLOBAL TRANSACTION TIMEOUT 30000 NAME 'test'")
        .await?;
    Ok(xid.expect("one row"))
}

async fn show(conn: &mut mysql_async::Conn) -> Result<(Option<String>, Option<String>)> {
    Ok(conn.query_first("SHOW GLOBAL TRANSACTION").await?.expect("one row"))
}

/// Polls until `check` holds; for outcomes with no event to await (the asynchronous phase 2).
#[tokio::test]
async fn start_show_commit_and_the_coordinator_agree() -> Result<()> {
    let env = Env::start().await?;
    let mut conn = env.proxy.conn().await?;
    assert_eq!(show(&mut conn).await?, (None, None), "no transaction before START");

    let xid = start(&mut conn).await?;
    assert_eq!(show(&mut conn).await?, (Some(xid.clone()), Some("Begin".into())));
    let v = env.tc.get(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(
        (v["status"].as_str(), v["name"].as_str()),
        (Some("Begin"), Some("test")),
        "{v}"
    );

    let e = conn.query_drop("START GLOBAL TRANSACTION").await.unwrap_err();
    let (code, state, message) = server_error(&e)?;
    assert_eq!((code, state.as_str()), (1399, "XAE07"));
    assert!(message.contains(&xid), "{message}");

    conn.query_drop("commit global").await?;
    assert_eq!(
        show(&mut conn).await?,
        (None, None),
        "COMMIT GLOBAL unbinds the session"
    );
    assert_eq!(env.tc.status(&xid).await?, "Committed");
    Ok(())
}

#[tokio::test]
async fn join_binds_a_second_session_and_leave_unbinds() -> Result<()> {
    let env = Env::start().await?;
    let mut first = env.proxy.conn().await?;
    let mut second = env.proxy.conn().await?;
    let xid = start(&mut first).await?;

    let e = second
        .query_drop("JOIN GLOBAL TRANSACTION '1-999999'")
        .await
        .unwrap_err();
    assert_eq!(server_error(&e)?.0, 1397, "an unknown XID is XAER_NOTA");
    second.query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'")).await?;
    assert_eq!(show(&mut second).await?.0.as_deref(), Some(xid.as_str()));
    second.query_drop("LEAVE GLOBAL TRANSACTION").await?;
    assert_eq!(show(&mut second).await?, (None, None));

    // Committed from the first session, naming the XID; the second can no longer join.
    first.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    let e = second
        .query_drop(format!("JOIN GLOBAL TRANSACTION '{xid}'"))
        .await
        .unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1399, "{message}");
    assert!(message.contains("Committed"), "{message}");
    Ok(())
}

#[tokio::test]
async fn writes_the_proxy_cannot_protect_are_refused_and_not_run() -> Result<()> {
    let env = Env::start().await?;
    let mut direct = env.db.conn().await?;
    direct.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT)").await?;
    direct.query_drop("INSERT INTO t VALUES (1, 10)").await?;
    let mut conn = env.proxy.conn().await?;
    let xid = start(&mut conn).await?;

    for sql in [
        "INSERT INTO t SELECT 1, 12",
        "UPDATE t SET v = 13; CALL nothing()",
        "CREATE TABLE u (id INT PRIMARY KEY)",
        "CALL nothing()",
    ] {
        let e = conn.query_drop(sql).await.unwrap_err();
        let (code, state, message) = server_error(&e)?;
        assert_eq!((code, state.as_str()), (1235, "42000"), "{sql}: {message}");
        assert!(message.contains(&xid), "{message}");
    }
    // Prepared statements are refused at execution when the proxy cannot image them.
    let stmt = conn.prep("UPDATE t SET v = ? WHERE id = ?").await?;
    let copy = conn.prep("INSERT INTO t SELECT ?, ?").await?;
    let e = conn.exec_drop(&copy, (1, 14)).await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1235);
    // A locking read of rows no other global transaction holds runs at once.
    let v: Option<i32> = conn.query_first("SELECT v FROM t WHERE id = 1 FOR UPDATE").await?;
    assert_eq!(v, Some(10));

    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(rows, [(1, 10)], "nothing refused reached the server");

    // Outside the global transaction the same statements run.
    conn.query_drop("LEAVE GLOBAL TRANSACTION").await?;
    conn.query_drop("UPDATE t SET v = 11 WHERE id = 1").await?;
    conn.exec_drop(&stmt, (15, 1)).await?;
    // An XID hint binds one statement, which is then protected like any other.
    conn.query_drop(format!("UPDATE /*+ XID('{xid}') */ t SET v = 16 WHERE id = 1"))
        .await?;
    let v: Option<i32> = direct.query_first("SELECT v FROM t WHERE id = 1").await?;
    assert_eq!(v, Some(16));
    conn.query_drop(format!("REPLACE /*+ XID('{xid}') */ INTO t VALUES (3, 30)"))
        .await?;
    // In a local transaction, a hinted write leaves a pending branch: a string that would
    // commit it behind the proxy's back is refused, hint or not.
    conn.query_drop("BEGIN").await?;
    conn.query_drop(format!("UPDATE /*+ XID('{xid}') */ t SET v = 17 WHERE id = 1"))
        .await?;
    let e = conn.query_drop("COMMIT; SELECT 1").await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1235);
    conn.query_drop("ROLLBACK").await?;
    conn.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await?;
    let rows: Vec<(i32, i32)> = direct.query("SELECT id, v FROM t ORDER BY id").await?;
    assert_eq!(
        rows,
        [(1, 15)],
        "the hinted update and REPLACE were rolled back with the global transaction"
    );
    Ok(())
}

#[tokio::test]
async fn commit_global_refuses_and_rollback_global_ends_an_open_local_transaction() -> Result<()> {
    let env = Env::start().await?;
    let mut conn = env.proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("BEGIN").await?;
    let e = conn.query_drop("COMMIT GLOBAL").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1399, "{message}");
    assert!(message.contains("local transaction"), "{message}");
    assert_eq!(show(&mut conn).await?.0.as_deref(), Some(xid.as_str()), "still bound");

    conn.query_drop("ROLLBACK GLOBAL").await?;
    let open: Option<i32> = conn.query_first("SELECT @@in_transaction").await?;
    assert_eq!(open, Some(0), "the local transaction was rolled back first");
    assert_eq!(show(&mut conn).await?, (None, None));
    assert_eq!(env.tc.status(&xid).await?, "Rollbacked");
    Ok(())
}

#[tokio::test]
async fn clear_errors_without_a_coordinator_and_for_bad_syntax() -> Result<()> {
    let db = MariaDb::start().await?;
    let plain = Proxy::start(db.addr()).await?;
    let mut conn = plain.conn().await?;
    let e = conn.query_drop("START GLOBAL TRANSACTION").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1235);
    assert!(message.contains("--tc"), "{message}");

    // A coordinator that is not there (port 1, which no test binds): a clear error, and the
    // session stays usable.
    let proxy = proxy_for(&db, vec!["127.0.0.1:1".to_owned()]).await?;
    let mut conn = proxy.conn().await?;
    let e = conn.query_drop("START GLOBAL TRANSACTION").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1105);
    assert!(
        message.contains("cannot reach the transaction coordinator"),
        "{message}"
    );
    let one: Option<i32> = conn.query_first("SELECT 1").await?;
    assert_eq!(one, Some(1));

    let e = conn.query_drop("START GLOBAL TRANSACTION TIMEOUT").await.unwrap_err();
    let (code, _, message) = server_error(&e)?;
    assert_eq!(code, 1064);
    assert!(message.contains("START GLOBAL TRANSACTION [TIMEOUT"), "{message}");
    let e = conn.query_drop("COMMIT GLOBAL").await.unwrap_err();
    assert_eq!(server_error(&e)?.0, 1397, "nothing to commit is XAER_NOTA");
    Ok(())
}

#[tokio::test]
async fn a_second_coordinator_node_takes_over() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    // A node that refuses connections: port 1, which no test binds (a free port dropped
    // here could be taken by another test's server before the proxy tries it).
    let dead = "127.0.0.1:1".to_owned();
    let proxy = proxy_for(&db, vec![dead, tc.endpoint()]).await?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    assert_eq!(tc.status(&xid).await?, "Begin");
    Ok(())
}

/// A branch registered for the proxy's resource, as a later AT-mode commit would.
async fn register(tc: &Coordinator, xid: &str, resource: &str, id: &[u8]) -> Result<u64> {
    let mut c = tc.client().await?;
    let request = pb::BranchRegisterRequest {
        xid: xid.into(),
        resource_id: resource.into(),
        locks: vec![pb::TableLocks {
            schema: "test".into(),
            table: "t".into(),
            rows: vec![pb::PrimaryKey {
                values: vec![id.to_vec()],
            }],
        }],
        application_data: Vec::new(),
        lock_wait_ms: 1000,
        ..Default::default()
    };
    Ok(c.rm.branch_register(request).await?.into_inner().branch_id)
}

#[tokio::test]
async fn phase_two_runs_on_the_proxy() -> Result<()> {
    let env = Env::start().await?;
    let mut direct = env.db.conn().await?;
    let mut conn = env.proxy.conn().await?;

    // Rollback of a branch whose local transaction never committed: no undo record, so the
    // proxy writes the anti-hanging marker, and a late phase-1 insert of that record fails.
    let xid = start(&mut conn).await?;
    let branch = register(&env.tc, &xid, &env.resource(), b"1").await?;
    conn.query_drop("ROLLBACK GLOBAL").await?;
    assert_eq!(env.tc.status(&xid).await?, "Rollbacked");
    let status: Option<i32> = direct
        .exec_first(
            "SELECT log_status FROM undo_log WHERE xid = ? AND branch_id = ?",
            (&xid, branch),
        )
        .await?;
    assert_eq!(status, Some(1), "the GlobalFinished marker");
    let late = direct
        .exec_drop(
            "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
             VALUES (?, ?, 'ferrata:1', 'x', 0, NOW(6), NOW(6))",
            (branch, &xid),
        )
        .await
        .unwrap_err();
    assert_eq!(
        server_error(&late)?.0,
        1062,
        "the late phase-1 commit fails on the unique key"
    );

    // Commit: the branch's undo record is deleted by the proxy.
    let xid = start(&mut conn).await?;
    let branch = register(&env.tc, &xid, &env.resource(), b"2").await?;
    direct
        .exec_drop(
            "INSERT INTO undo_log (branch_id, xid, context, rollback_info, log_status, log_created, log_modified) \
             VALUES (?, ?, 'ferrata:1', 'x', 0, NOW(6), NOW(6))",
            (branch, &xid),
        )
        .await?;
    conn.query_drop("COMMIT GLOBAL").await?;
    until("the undo record to be deleted", || {
        let db = &env.db;
        let xid = xid.clone();
        async move {
            let mut c = db.conn().await?;
            let n: Option<i64> = c
                .exec_first("SELECT COUNT(*) FROM undo_log WHERE xid = ?", (xid,))
                .await?;
            Ok(n == Some(0))
        }
    })
    .await?;
    until("the transaction to be committed", || async {
        Ok(env.tc.status(&xid).await? == "Committed")
    })
    .await?;
    Ok(())
}

/// A proxy process in front of `db` with a one-row table `t`, a coordinator, and a session
/// in a global transaction that updated the row (so the coordinator stores the transaction).
async fn bound_with_a_branch(
    db: &MariaDb,
    tc: &Coordinator,
    coordinator_toml: &str,
) -> Result<(ProxyProcess, mysql_async::Conn, String)> {
    db.conn()
        .await?
        .query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT); INSERT INTO t VALUES (1, 1)")
        .await?;
    let proxy = ProxyProcess::start_with(PROXY, db.addr(), &tc.endpoint(), coordinator_toml, "")?;
    let mut conn = proxy.conn().await?;
    let xid = start(&mut conn).await?;
    conn.query_drop("UPDATE t SET v = 2 WHERE id = 1").await?;
    Ok((proxy, conn, xid))
}

#[tokio::test]
async fn commit_global_asks_again_while_the_coordinator_restarts() -> Result<()> {
    let db = MariaDb::start().await?;
    let mut tc = Coordinator::start(TC)?;
    let (proxy, mut conn, xid) = bound_with_a_branch(&db, &tc, "outcome_wait_ms = 60000").await?;
    tc.kill9()?;
    let commit = tokio::spawn(async move {
        let result = conn.query_drop("COMMIT GLOBAL").await;
        (result, conn)
    });
    until("the proxy asks the coordinator again", async || {
        Ok(proxy
            .metric("ferrata_proxy_decision_retries_total{call=\"commit\"}")
            .await?
            > 0.0)
    })
    .await?;
    tc.restart()?;
    let (result, mut conn) = commit.await?;
    result?;
    assert_eq!(show(&mut conn).await?, (None, None), "committed, so unbound");
    until("the branch committed", async || {
        Ok(tc.status(&xid).await? == "Committed")
    })
    .await?;
    let v: Option<i32> = db.conn().await?.query_first("SELECT v FROM t").await?;
    assert_eq!(v, Some(2));
    Ok(())
}

#[tokio::test]
async fn an_unanswered_commit_global_is_an_unknown_outcome_that_can_be_learned() -> Result<()> {
    let db = MariaDb::start().await?;
    let tc = Coordinator::start(TC)?;
    let (proxy, mut conn, xid) = bound_with_a_branch(&db, &tc, "outcome_wait_ms = 300").await?;
    // Paused, the coordinator receives the request and answers nothing: as when its answer
    // is lost after the commit was carried out.
    tc.pause()?;
    let e = conn.query_drop("COMMIT GLOBAL").await.unwrap_err();
    let (code, state, message) = server_error(&e)?;
    assert_eq!((code, state.as_str()), (1180, "08007"), "{message}");
    assert!(
        message.contains(&xid) && message.contains("unknown") && !message.contains("nothing was changed"),
        "{message}"
    );
    assert_eq!(
        proxy
            .metric("ferrata_proxy_unknown_outcomes_total{call=\"commit\"}")
            .await?,
        1.0
    );
    // Resumed, it carries out the request it received. The session is still bound, so the
    // outcome can be learned there.
    tc.resume()?;
    until(
        "the request carried out",
        async || Ok(tc.status(&xid).await? != "Begin"),
    )
    .await?;
    let (bound, _) = show(&mut conn).await?;
    assert_eq!(bound.as_deref(), Some(xid.as_str()));
    // Asking again answers the first request's outcome, without doing anything twice.
    conn.query_drop(format!("COMMIT GLOBAL '{xid}'")).await?;
    assert_eq!(show(&mut conn).await?, (None, None));
    let e = conn.query_drop(format!("ROLLBACK GLOBAL '{xid}'")).await.unwrap_err();
    assert_eq!(
        server_error(&e)?.0,
        1399,
        "a committed transaction cannot be rolled back"
    );
    let v: Option<i32> = db.conn().await?.query_first("SELECT v FROM t").await?;
    assert_eq!(v, Some(2));
    Ok(())
}
