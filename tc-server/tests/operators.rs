//! Tokens, roles and the audit trail against the real binary: what each role may do on both
//! APIs, values hidden from viewers, reasons and versions required of operator actions, the
//! audit chain across kill -9 and its check finding a record changed in the store, and the
//! refusal to listen beyond loopback without a token.

mod support;

use ferrata_rpc::client::{ClientConfig, TcClient};
use ferrata_rpc::{ErrorCode, pb};
use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;

const ROOT: &str = "root-Secret-7d1c";

async fn root_tc() -> Result<Tc> {
    Tc::start(TcOptions {
        token: Some(ROOT.into()),
        ..TcOptions::config(FAST_CONFIG)
    })
    .await
}

fn grpc_as(tc: &Tc, secret: &str) -> ClientConfig {
    ClientConfig {
        token: Some(secret.to_owned()),
        ..tc.client_config()
    }
}

/// A transaction in RollbackFailed whose failed branch's detail holds row values.
async fn dirty_rollback(c: &TcClient, rec: &std::sync::Arc<Recorder>, pk: &str) -> Result<(String, Value)> {
    let xid = begin(c, 0).await?;
    let b = register(c, &xid, "db1", t_rows(&[pk]), 0).await?;
    let detail = json!({"schema": "app", "table": "t", "kind": "update", "rows": [{
        "primary_key": {"id": pk}, "state": "changed",
        "columns": [{"column": "note", "encoding": "text", "before": "old", "after": "new", "current": "x"}]}]});
    rec.script(
        b,
        [Reply::Unretryable {
            reason: "dirty".into(),
            detail_json: detail.to_string(),
        }],
    );
    assert_eq!(status_of(&rollback(c, &xid).await?), G::RollbackFailed);
    Ok((xid, detail))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_is_for_and_nothing_else() -> Result {
    let tc = root_tc().await?;
    let root = tc.http();
    // Creating a token needs a reason, and a name not taken.
    root.post("/v1/tokens", Some(r#"{"name": "v", "role": "viewer"}"#))
        .await?
        .assert_error(400, "reason_required");
    root.post(
        "/v1/tokens",
        Some(r#"{"name": "v", "role": "superuser", "reason": "x"}"#),
    )
    .await?
    .assert_error(400, "invalid_argument");
    let viewer = create_token(&tc, "vera", "viewer").await?;
    let operator = create_token(&tc, "otto", "operator").await?;
    let app = create_token(&tc, "orders-app", "application").await?;
    let proxy = create_token(&tc, "proxy-1", "proxy").await?;
    root.post(
        "/v1/tokens",
        Some(r#"{"name": "otto", "role": "admin", "reason": "again"}"#),
    )
    .await?
    .assert_error(409, "already_exists");
    let listed = root.get_json("/v1/tokens").await?;
    assert!(!listed.to_string().contains(&viewer), "a secret is shown only once");
    let names: Vec<&str> = listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["orders-app", "otto", "proxy-1", "vera"]);

    // The proxy attaches as a resource manager; the application begins and ends
    // transactions, on both APIs, and cannot act as anything else.
    let proxy_client = TcClient::connect(&grpc_as(&tc, &proxy)).await?;
    let rec = Recorder::new();
    let _rm = TestRm::attach(&proxy_client, "rm-db1", &["db1"], &rec).await?;
    let app_client = TcClient::connect(&grpc_as(&tc, &app)).await?;
    let xid = begin(&app_client, 0).await?;
    let e = register(&app_client, &xid, "db1", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::Forbidden);
    let as_app = tc.http().with_token(Some(&app));
    let r = as_app.post("/v1/transactions", Some("{}")).await?;
    assert_eq!(r.status, 201, "{r:?}");
    as_app.get_json(&format!("/v1/transactions/{xid}")).await?;
    as_app.get("/v1/transactions").await?.assert_error(403, "forbidden");
    as_app.get("/v1/locks").await?.assert_error(403, "forbidden");
    let (failed, detail) = dirty_rollback(&proxy_client, &rec, "7").await?;
    let refused = as_app
        .post(
            &format!("/v1/transactions/{failed}/resolve"),
            Some(r#"{"reason": "r"}"#),
        )
        .await?
        .assert_error(403, "forbidden");
    assert!(
        refused["message"].as_str().unwrap_or("").contains("operator or admin"),
        "{refused}"
    );

    // The viewer reads, without the values, and acts on nothing.
    let as_viewer = tc.http().with_token(Some(&viewer));
    let seen = as_viewer.get_json(&format!("/v1/transactions/{failed}")).await?;
    let column = &seen["failure"]["detail"]["rows"][0]["columns"][0];
    assert_eq!(column["column"], "note");
    for image in ["before", "after", "current"] {
        assert_eq!(column[image], json!({"redacted": true}), "{seen}");
    }
    let events = as_viewer.get_json(&format!("/v1/transactions/{failed}/events")).await?;
    assert!(!events.to_string().contains("\"old\""), "{events}");
    for action in ["retry", "resolve"] {
        as_viewer
            .post(
                &format!("/v1/transactions/{failed}/{action}"),
                Some(r#"{"reason": "r"}"#),
            )
            .await?
            .assert_error(403, "forbidden");
    }
    as_viewer.get("/v1/tokens").await?.assert_error(403, "forbidden");
    let me = as_viewer.get_json("/v1/whoami").await?;
    assert_eq!(
        (&me["name"], &me["role"], &me["may"]["act"]),
        (&json!("vera"), &json!("viewer"), &json!(false))
    );

    // The operator sees the values and acts, with a reason, on the version it saw.
    let as_operator = tc.http().with_token(Some(&operator));
    let seen = as_operator.get_json(&format!("/v1/transactions/{failed}")).await?;
    assert_eq!(seen["failure"]["detail"], detail);
    let version = seen["version"].as_u64().expect("version");
    let path = format!("/v1/transactions/{failed}/resolve");
    as_operator
        .post(&path, None)
        .await?
        .assert_error(400, "reason_required");
    let stale = json!({ "reason": "fixed by hand", "expect_version": version - 1 }).to_string();
    let e = as_operator
        .post(&path, Some(&stale))
        .await?
        .assert_error(409, "precondition_failed");
    assert_eq!(e["status"], "RollbackFailed");
    as_operator.get("/v1/tokens").await?.assert_error(403, "forbidden");
    let body = json!({ "reason": "row 7 fixed by hand, ticket 42", "expect_version": version }).to_string();
    let r = as_operator.post(&path, Some(&body)).await?;
    assert_eq!(r.status, 200, "{r:?}");

    // A revoked token is refused at once.
    let r = root
        .request("DELETE", "/v1/tokens/vera", Some(r#"{"reason": "left the team"}"#))
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    as_viewer.get("/v1/whoami").await?.assert_error(401, "unauthenticated");

    // The audit names every action with its actor, role, reason and effect.
    let audit = as_operator.get_json("/v1/audit").await?;
    let records = audit["records"].as_array().expect("records");
    let summary: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or(""),
                r["actor"].as_str().unwrap_or(""),
                r["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("token.create", "root", "root"),
            ("token.create", "root", "root"),
            ("token.create", "root", "root"),
            ("token.create", "root", "root"),
            ("resolve", "otto", "operator"),
            ("token.revoke", "root", "root"),
        ]
    );
    let resolve = &records[4];
    assert_eq!(resolve["xid"], json!(failed));
    assert_eq!(resolve["reason"], "row 7 fixed by hand, ticket 42");
    assert_eq!(resolve["precondition"]["version"], version);
    assert_eq!(resolve["effect"]["failure"]["detail"], detail);
    assert_eq!(resolve["origin"]["client"], "api");
    assert!(
        resolve["origin"]["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:"))
    );
    let verify = as_operator.get_json("/v1/audit/verify").await?;
    assert_eq!(
        (&verify["ok"], &verify["records"]),
        (&json!(true), &json!(6)),
        "{verify}"
    );
    let events = as_operator
        .get_json(&format!("/v1/transactions/{failed}/events"))
        .await?;
    let action = events["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["type"] == "operator_action"))
        .expect("the resolve is in the timeline");
    assert_eq!(
        (&action["actor"], &action["audit_id"]),
        (&json!("otto"), &resolve["id"])
    );

    // Refusals are counted for operators to see.
    let metrics = root.get("/metrics").await?.body;
    assert_eq!(
        metric(
            &metrics,
            "ferrata_tc_operator_actions_total{action=\"resolve\",result=\"forbidden\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "ferrata_tc_operator_actions_total{action=\"resolve\",result=\"precondition_failed\"}"
        ),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_and_tokens_survive_kill9_and_a_changed_record_breaks_the_chain() -> Result {
    let mut tc = root_tc().await?;
    let operator = create_token(&tc, "otto", "operator").await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let mut rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let (failed, _) = dirty_rollback(&c, &rec, "1").await?;
    let as_operator = tc.http().with_token(Some(&operator));
    let r = as_operator
        .post(
            &format!("/v1/transactions/{failed}/retry"),
            Some(r#"{"reason": "repaired"}"#),
        )
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    let before = as_operator.get_json("/v1/audit").await?;
    assert_eq!(before["records"].as_array().map(Vec::len), Some(2));

    rm.crash();
    tc.kill9()?;
    tc.restart().await?;
    let as_operator = tc.http().with_token(Some(&operator));
    assert_eq!(
        as_operator.get_json("/v1/audit").await?,
        before,
        "the token and the trail survived"
    );
    assert_eq!(as_operator.get_json("/v1/audit/verify").await?["ok"], true);

    // Someone with the store file changes the retry's reason.
    tc.kill9()?;
    {
        use ferrata_tc::store::Store;
        let store = ferrata_tc::store::redb::RedbStore::open(tc.data_dir())?;
        let mut records = store.load()?.audit;
        records[1].reason = "nothing happened here".into();
        store.commit(&[ferrata_tc::store::Mutation::AppendAudit(records[1].clone())])?;
    }
    tc.restart().await?;
    let verify = tc.http().get_json("/v1/audit/verify").await?;
    assert_eq!(
        (&verify["ok"], &verify["broken_at"]),
        (&json!(false), &json!(2)),
        "{verify}"
    );
    tc.wait_log(|l| l.contains("the audit trail in the store is broken"))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_it_refuses_to_listen_beyond_loopback() -> Result {
    let out = tokio::process::Command::new(BIN)
        .args(["--http", "0.0.0.0:0", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tempfile::tempdir()?.path())
        .env_remove("FERRATA_TC_TOKEN")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(EVENT, out).await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to serve on 0.0.0.0"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pauses_a_retrying_rollback_across_a_restart_and_resumes_it() -> Result {
    let mut tc = root_tc().await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let xid = begin(&c, 0).await?;
    let b = register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    // Refused until the operator is done.
    rec.script(b, std::iter::repeat_n(Reply::Retryable("resource busy".into()), 1000));
    rollback(&c, &xid).await?;
    wait_status(&c, &xid, G::RollbackRetrying).await?;
    let http = tc.http();
    let path = |action: &str| format!("/v1/transactions/{xid}/{action}");
    http.post(&path("pause"), None)
        .await?
        .assert_error(400, "reason_required");
    let r = http
        .post(&path("pause"), Some(r#"{"reason": "the database is being restored"}"#))
        .await?;
    assert_eq!((r.status, &r.json()["paused"]), (200, &json!(true)), "{r:?}");
    http.post(&path("pause"), Some(r#"{"reason": "again"}"#))
        .await?
        .assert_error(409, "precondition_failed");

    // Still paused after a restart (it is in the timeline).
    let (c, _rec, _rm) = kill9_and_reattach(&mut tc, rm).await?;
    let http = tc.http();
    let t = http.get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(
        (&t["status"], &t["paused"]),
        (&json!("RollbackRetrying"), &json!(true)),
        "{t}"
    );

    let r = http
        .post(&path("resume"), Some(r#"{"reason": "the database is back"}"#))
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    wait_status(&c, &xid, G::Rollbacked).await?;
    let audit = http.get_json(&format!("/v1/audit?xid={xid}")).await?;
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(actions, ["pause", "resume"]);
    // Only a transaction still retrying is paused.
    http.post(&path("pause"), Some(r#"{"reason": "too late"}"#))
        .await?
        .assert_error(409, "global_status_invalid");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_a_loopback_name_is_answered() -> Result {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tc = Tc::with_config(FAST_CONFIG).await?;
    // A page of a name that resolves to this machine (DNS rebinding) is not let in.
    let status_for = |host: &'static str| {
        let addr = tc.http;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(format!("GET /v1/whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            anyhow::Ok(out.split_whitespace().nth(1).unwrap_or("").to_owned())
        }
    };
    assert_eq!(status_for("evil.example:7091").await?, "403");
    assert_eq!(status_for("localhost:7091").await?, "200");
    assert_eq!(tc.http().get_json("/v1/whoami").await?["name"], "local");
    Ok(())
}
