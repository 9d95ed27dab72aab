//! TCC branches at the coordinator, against the real binary and a real HTTP service: registered
//! over HTTP before the application calls their try, confirmed (commit) or cancelled
//! (rollback) by the coordinator with DTM's query parameters and signed headers, retried until
//! they succeed (a refusal also counted as a broken contract), and re-sent after the
//! coordinator is killed while a call keeps failing; a service that does not answer holds up
//! nothing else; one nobody ends times out and cancels.

mod support;

use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use ferrata_rpc::pb::GlobalStatus as G;

/// Begins a global transaction over HTTP; its XID.
async fn begin_http(tc: &Tc) -> Result<String> {
    let r = tc
        .http()
        .post("/v1/transactions", Some(r#"{"timeout_ms": 60000}"#))
        .await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["xid"].as_str().unwrap_or_default().to_owned())
}

async fn register_tcc(tc: &Tc, xid: &str, body: Value) -> Result<Resp> {
    tc.http()
        .post(&format!("/v1/transactions/{xid}/branches"), Some(&body.to_string()))
        .await
}

fn branch(s: &Service, name: &str, confirm: &str, cancel: &str) -> Value {
    json!({
        "mode": "tcc",
        "branch_id": name,
        "confirm": format!("{}/{confirm}", s.base),
        "cancel": format!("{}/{cancel}", s.base),
        "data": {"amount": 30},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_confirms_or_cancels_every_tcc_branch() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    let xid = begin_http(&tc).await?;
    for name in ["01", "02"] {
        let r = register_tcc(&tc, &xid, branch(&s, name, "ok/confirm", "ok/cancel")).await?;
        anyhow::ensure!(r.status == 201, "{r:?}");
    }
    // A branch id is the application's name for the branch: once per transaction.
    let again = register_tcc(&tc, &xid, branch(&s, "01", "ok/confirm", "ok/cancel")).await?;
    anyhow::ensure!(
        again.status == 409 && again.json()["code"] == "already_exists",
        "{again:?}"
    );
    commit(&c, &xid).await?;
    wait_status(&c, &xid, G::Committed).await?;
    let calls = s.calls();
    anyhow::ensure!(calls.len() == 2, "{calls:?}");
    for name in ["01", "02"] {
        let call = s
            .until_called(&format!(
                "/ok/confirm?gid={xid}&trans_type=tcc&branch_id={name}&op=confirm"
            ))
            .await?;
        anyhow::ensure!(call.header("webhook-id") == format!("{xid}.{name}.confirm"), "{call:?}");
        anyhow::ensure!(call.body == r#"{"amount":30}"#, "{call:?}");
        anyhow::ensure!(call.method == "POST", "{call:?}");
    }

    // No data: a GET; the branch's own headers go along (not the ones the coordinator sets).
    let xid = begin_http(&tc).await?;
    let mut plain = branch(&s, "01", "ok/plain", "ok/cancel");
    plain["data"] = Value::Null;
    plain["headers"] = json!({"x-tenant": "t1"});
    register_tcc(&tc, &xid, plain.clone()).await?;
    commit(&c, &xid).await?;
    let call = s.until_called("/ok/plain").await?;
    anyhow::ensure!(
        call.body.is_empty() && call.method == "GET" && call.header("x-tenant") == "t1",
        "{call:?}"
    );
    let open = begin_http(&tc).await?;
    plain["headers"] = json!({"Host": "elsewhere"});
    let r = register_tcc(&tc, &open, plain).await?;
    anyhow::ensure!(r.status == 400, "{r:?}");

    let xid = begin_http(&tc).await?;
    register_tcc(&tc, &xid, branch(&s, "01", "ok/confirm", "ok/cancel")).await?;
    rollback(&c, &xid).await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    s.until_called(&format!("/ok/cancel?gid={xid}&trans_type=tcc&branch_id=01&op=cancel"))
        .await?;

    // Only a transaction in Begin takes branches; a bad branch is refused whole.
    let late = register_tcc(&tc, &xid, branch(&s, "02", "ok/confirm", "ok/cancel")).await?;
    anyhow::ensure!(late.status == 404 || late.status == 409, "{late:?}");
    let open = begin_http(&tc).await?;
    // Not a URL; a host that resolves nowhere (RFC 2606's .invalid).
    for (cancel, says) in [
        ("svc/cancel", "not a URL"),
        ("http://nowhere.invalid/cancel", "does not resolve"),
    ] {
        let mut bad = branch(&s, "01", "ok/confirm", "ok/cancel");
        bad["cancel"] = json!(cancel);
        let r = register_tcc(&tc, &open, bad).await?;
        let body = r.assert_error(400, "invalid_argument");
        anyhow::ensure!(body["message"].as_str().unwrap_or("").contains(says), "{body}");
    }
    let view = tc.http().get_json(&format!("/v1/transactions/{open}")).await?;
    anyhow::ensure!(view["branches"] == json!([]), "nothing registered: {view}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_confirm_is_retried_through_a_coordinator_restart() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    let xid = begin_http(&tc).await?;
    register_tcc(&tc, &xid, branch(&s, "01", "down/confirm", "ok/cancel")).await?;
    commit(&c, &xid).await?;
    s.until_called("/down/confirm").await?;
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    let before = s.calls().len();
    eventually("the confirm re-sent after the restart", || async {
        Ok((s.calls().len() > before).then_some(()))
    })
    .await?;
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&c, &xid, G::Committed).await?;

    // A confirm that refuses breaks its contract: retried all the same, and counted.
    let xid = begin_http(&tc).await?;
    register_tcc(&tc, &xid, branch(&s, "01", "no/confirm", "ok/cancel")).await?;
    commit(&c, &xid).await?;
    eventually("a broken contract counted", || async {
        let text = tc.http().get("/metrics").await?.body;
        Ok(metric(
            &text,
            "ferrata_tc_contract_broken_total{trans_type=\"tcc\",op=\"confirm\"}",
        )
        .filter(|n| *n >= 2.0))
    })
    .await?;
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    anyhow::ensure!(v["status"] == "AsyncCommitting", "{v}");
    Ok(())
}

/// Registering a branch is an application's action: a viewer's token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_may_not_register_branches() -> Result {
    let tc = Tc::start(TcOptions {
        token: Some("root-secret-for-the-tcc-test".into()),
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;
    let s = Service::start().await?;
    let xid = begin_http(&tc).await?;
    let body = json!({"name": "v", "role": "viewer", "reason": "a viewer for the test"}).to_string();
    let r = tc.http().post("/v1/tokens", Some(&body)).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    let viewer = r.json()["secret"].as_str().unwrap_or_default().to_owned();
    let body = branch(&s, "01", "ok/confirm", "ok/cancel").to_string();
    let r = tc
        .http()
        .with_token(Some(&viewer))
        .post(&format!("/v1/transactions/{xid}/branches"), Some(&body))
        .await?;
    r.assert_error(403, "forbidden");
    let r = register_tcc(&tc, &xid, branch(&s, "01", "ok/confirm", "ok/cancel")).await?;
    anyhow::ensure!(r.status == 201, "the root token may: {r:?}");
    Ok(())
}

/// A service that does not answer, and one that is not there, hold up nothing else: while
/// a confirm is held for up to a minute, another transaction's branch is confirmed and a
/// saga runs; a confirm ends at its branch's `request_timeout_ms` and is sent again (the
/// same `webhook-id`); one refused a connection is sent again; once each service answers,
/// its transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_hangs_or_is_gone_holds_up_nothing_else() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    // Nothing listens on `port` yet.
    let port = ferrata_testkit::free_port()?;
    let gone = begin_http(&tc).await?;
    let away = json!({"mode": "tcc", "branch_id": "01",
        "confirm": format!("http://127.0.0.1:{port}/ok/confirm"), "cancel": format!("http://127.0.0.1:{port}/ok/cancel")});
    register_tcc(&tc, &gone, away).await?;
    commit(&c, &gone).await?;

    // A confirm held for as long as its time limit allows (a minute).
    let hung = begin_http(&tc).await?;
    let mut held = branch(&s, "01", "slow/held", "ok/cancel");
    held["request_timeout_ms"] = json!(60_000);
    register_tcc(&tc, &hung, held).await?;
    commit(&c, &hung).await?;
    let held = format!("/slow/held?gid={hung}&");
    s.until_called(&held).await?;

    let other = begin_http(&tc).await?;
    register_tcc(&tc, &other, branch(&s, "01", "ok/confirm", "ok/cancel")).await?;
    commit(&c, &other).await?;
    wait_status(&c, &other, G::Committed).await?;
    let saga = json!({"mode": "saga", "steps": [{"action": format!("{}/ok/a1", s.base)}]});
    let r = tc.http().post("/v1/transactions", Some(&saga.to_string())).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    let saga = r.json()["xid"].as_str().unwrap_or_default().to_owned();
    wait_status(&c, &saga, G::Committed).await?;
    let calls_to = |prefix: &str| {
        s.calls()
            .into_iter()
            .filter(|call| call.uri.starts_with(prefix))
            .count()
    };
    anyhow::ensure!(
        calls_to(&held) == 1,
        "all that while the held confirm was still in flight"
    );

    // A confirm with a short time limit ends there and is sent again, as the same message.
    let stuck = begin_http(&tc).await?;
    let mut slow = branch(&s, "01", "slow/confirm", "ok/cancel");
    slow["request_timeout_ms"] = json!(200);
    register_tcc(&tc, &stuck, slow).await?;
    commit(&c, &stuck).await?;
    let confirm = format!("/slow/confirm?gid={stuck}&");
    let attempts = eventually("the stuck confirm sent again", || async {
        let calls: Vec<_> = s
            .calls()
            .into_iter()
            .filter(|call| call.uri.starts_with(&confirm))
            .collect();
        Ok((calls.len() >= 2).then_some(calls))
    })
    .await?;
    anyhow::ensure!(
        attempts
            .iter()
            .all(|call| call.header("webhook-id") == format!("{stuck}.01.confirm")),
        "{attempts:?}"
    );
    for xid in [&hung, &stuck] {
        anyhow::ensure!(
            status_of(&status(&c, xid).await?) == G::AsyncCommitting,
            "still committing"
        );
    }
    s.release();
    wait_status(&c, &hung, G::Committed).await?;
    wait_status(&c, &stuck, G::Committed).await?;

    anyhow::ensure!(
        status_of(&status(&c, &gone).await?) == G::AsyncCommitting,
        "still committing"
    );
    let back = Service::start_on(port).await?;
    wait_status(&c, &gone, G::Committed).await?;
    anyhow::ensure!(
        back.story(&gone, &["op"]) == ["/ok/confirm confirm"],
        "{:?}",
        back.calls()
    );
    Ok(())
}

/// A TCC transaction nobody ends times out: every registered branch is cancelled, over the
/// native API (`timeout_ms`) and DTM's (`timeout_to_fail`, in seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_tcc_transaction_times_out_and_cancels() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    let r = tc
        .http()
        .post("/v1/transactions", Some(r#"{"mode": "tcc", "timeout_ms": 200}"#))
        .await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    let xid = r.json()["xid"].as_str().unwrap_or_default().to_owned();
    for name in ["01", "02"] {
        register_tcc(&tc, &xid, branch(&s, name, "ok/confirm", "ok/cancel")).await?;
    }
    wait_status(&c, &xid, G::TimeoutRollbacked).await?;
    let mut story = s.story(&xid, &["branch_id", "op"]);
    story.sort();
    anyhow::ensure!(story == ["/ok/cancel 01 cancel", "/ok/cancel 02 cancel"], "{story:?}");

    let post = |path: &str, body: Value| {
        let http = tc.http();
        let path = format!("/api/dtmsvr/{path}");
        async move { http.post(&path, Some(&body.to_string())).await }
    };
    let r = post(
        "prepare",
        json!({"gid": "late", "trans_type": "tcc", "timeout_to_fail": 1}),
    )
    .await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    let body = json!({"gid": "late", "trans_type": "tcc", "branch_id": "01", "data": "{}",
        "confirm": format!("{}/ok/confirm", s.base), "cancel": format!("{}/ok/cancel", s.base)});
    anyhow::ensure!(post("registerBranch", body).await?.status == 200);
    let failed = eventually("the DTM transaction to time out", || async {
        let v = tc.http().get_json("/api/dtmsvr/query?gid=late").await?;
        Ok((v["transaction"]["status"] == "failed").then_some(v))
    })
    .await?;
    anyhow::ensure!(failed["transaction"]["rollback_reason"] == "timeout", "{failed}");
    anyhow::ensure!(s.story("late", &["op"]) == ["/ok/cancel cancel"]);
    // Too late to submit.
    let r = post("submit", json!({"gid": "late", "trans_type": "tcc"})).await?;
    anyhow::ensure!(r.status == 409, "{r:?}");
    Ok(())
}
