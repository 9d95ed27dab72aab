//! The DTM-compatible API (`/api/dtmsvr/`): DTM's own Python SDK, `dtmcli` from PyPI (in the
//! virtualenv `scripts/setup-debian.sh` makes), runs a saga, a saga whose second action
//! refuses, a TCC transaction that confirms and one that cancels, and 2-phase messages
//! (submitted, DoAndSubmit, aborted, left prepared) against the real binary,
//! calling a real HTTP service; and the facade's answers to requests DTM's clients make
//! (idempotent submits, unknown gids, malformed bodies, states that refuse). The SDK runs with
//! an application token in its server URL.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

/// The acceptance program and the virtualenv's Python.
fn dtmcli() -> Result<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/dtmcli");
    let python = dir.join("venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run scripts/setup-debian.sh (it makes the virtualenv with dtmcli)",
        python.display()
    );
    Ok((dir.join("acceptance.py"), python))
}

/// The DTM status of `gid`, once it is `want`.
async fn until_status(tc: &Tc, gid: &str, want: &str) -> Result<Value> {
    eventually(&format!("{gid} {want}"), || async {
        let v = tc.http().get_json(&format!("/api/dtmsvr/query?gid={gid}")).await?;
        Ok((v["transaction"]["status"] == want).then_some(v))
    })
    .await
}

/// The paths the service got for `gid`, with their `op`.
fn calls_for(s: &Service, gid: &str) -> Vec<String> {
    s.story(gid, &["op"])
}

/// The calls `calls_for` lists, in any order.
fn set_of(calls: &[&str]) -> BTreeSet<String> {
    calls.iter().map(|c| c.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtms_python_sdk_runs_sagas_tcc_and_messages_unchanged() -> Result {
    let (program, python) = dtmcli()?;
    let tc = Tc::start(TcOptions {
        token: Some("root-Secret-dtm".into()),
        ..TcOptions::config(FAST_CONFIG)
    })
    .await?;
    let s = Service::start().await?;
    // The SDK sends no headers of its own: an application's token goes in the URL, which it
    // sends as HTTP Basic credentials.
    let secret = create_token(&tc, "shop", "application").await?;
    let dtm = format!("http://shop:{secret}@{}/api/dtmsvr", tc.http().addr);
    let out = tokio::process::Command::new(&python)
        .arg(&program)
        .arg(&dtm)
        .arg(&s.base)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let gids: Value = serde_json::from_slice(&out.stdout)?;
    let gid = |name: &str| gids[name].as_str().unwrap_or_default().to_owned();

    until_status(&tc, &gid("saga"), "succeed").await?;
    assert_eq!(
        calls_for(&s, &gid("saga")),
        ["/ok/trans-out action", "/ok/trans-in action"]
    );
    let failed = until_status(&tc, &gid("failing_saga"), "failed").await?;
    assert_eq!(
        calls_for(&s, &gid("failing_saga")),
        [
            "/ok/trans-out action",
            "/no/trans-in action",
            "/ok/trans-in-compensate compensate",
            "/ok/trans-out-compensate compensate"
        ]
    );
    assert!(
        failed["transaction"]["rollback_reason"]
            .as_str()
            .is_some_and(|r| r.contains("trans-in")),
        "{failed}"
    );

    // The tries are the SDK's own calls; the confirms and cancels the coordinator's, with the
    // same gid (a barrier in the service matches them).
    until_status(&tc, &gid("tcc"), "succeed").await?;
    let tcc: BTreeSet<String> = calls_for(&s, &gid("tcc")).into_iter().collect();
    let want = set_of(&[
        "/ok/try-out try",
        "/ok/try-in try",
        "/ok/confirm-out confirm",
        "/ok/confirm-in confirm",
    ]);
    assert_eq!(tcc, want);
    until_status(&tc, &gid("tcc_cancelled"), "failed").await?;
    let cancelled: BTreeSet<String> = calls_for(&s, &gid("tcc_cancelled")).into_iter().collect();
    // Both branches were registered before their tries: both are cancelled (the refused
    // try's cancel is the service's barrier's null compensation).
    let want = set_of(&[
        "/ok/try-out try",
        "/no/try-in try",
        "/ok/cancel-out cancel",
        "/ok/cancel-in cancel",
    ]);
    assert_eq!(cancelled, want);

    // 2-phase messages: submitted at once, through DoAndSubmit, aborted by a refusing local
    // step, and settled by query_prepared once their application left them prepared.
    for name in ["msg", "msg_done", "msg_orphan"] {
        until_status(&tc, &gid(name), "succeed").await?;
        let calls: BTreeSet<String> = calls_for(&s, &gid(name))
            .into_iter()
            .filter(|c| c.ends_with("action"))
            .collect();
        assert_eq!(calls, set_of(&["/ok/msg-out action", "/ok/msg-in action"]), "{name}");
    }
    assert_eq!(
        calls_for(&s, &gid("msg_orphan")).first().map(String::as_str),
        Some("/ok/query-prepared msg"),
        "asked before it was sent"
    );
    until_status(&tc, &gid("msg_aborted"), "failed").await?;
    assert!(
        calls_for(&s, &gid("msg_aborted")).is_empty(),
        "an aborted message is never sent"
    );

    // The facade's transactions are the coordinator's: listed with their gids.
    let all = tc.http().get_json("/api/dtmsvr/all?transType=saga").await?;
    let listed: BTreeSet<String> = all["transactions"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .filter_map(|t| t["gid"].as_str().map(String::from))
        .collect();
    assert_eq!(listed, [gid("saga"), gid("failing_saga")].into());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_answers_as_dtm_clients_expect() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let post = |path: &'static str, body: Value| {
        let http = tc.http();
        async move { http.post(&format!("/api/dtmsvr/{path}"), Some(&body.to_string())).await }
    };
    let saga = |gid: &str| {
        json!({
            "gid": gid, "trans_type": "saga", "custom_data": null, "query_prepared": null,
            "steps": [{"action": format!("{}/down/a", s.base), "compensate": format!("{}/ok/c", s.base)}],
            "payloads": ["{\"amount\":1}"], "wait_result": false, "timeout_to_fail": 0,
            "request_timeout": 8, "retry_interval": 0, "passthrough_headers": [], "branch_headers": {},
            "concurrent": false, "unknown_field": 1,
        })
    };
    // A second submit of the same gid is the same saga.
    for _ in 0..2 {
        let r = post("submit", saga("g-1")).await?;
        assert_eq!(
            (r.status, r.json()["dtm_result"].clone()),
            (200, json!("SUCCESS")),
            "{r:?}"
        );
    }
    let v = tc.http().get_json("/api/dtmsvr/query?gid=g-1").await?;
    assert_eq!(v["transaction"]["status"], "submitted", "{v}");
    assert_eq!(
        v["branches"].as_array().map(Vec::len),
        Some(2),
        "two rows per step: {v}"
    );
    let xid = v["transaction"]["xid"].as_str().unwrap_or_default().to_owned();
    let native = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    assert_eq!(native["name"], "dtm:saga:g-1", "{native}");
    // A saga is not aborted: it rolls back when an action fails.
    let r = post("abort", json!({"gid": "g-1", "trans_type": "saga"})).await?;
    assert_eq!(
        (r.status, r.json()["dtm_result"].clone()),
        (409, json!("FAILURE")),
        "{r:?}"
    );
    // A gid names one transaction, of one type.
    let r = post("prepare", json!({"gid": "g-1", "trans_type": "tcc"})).await?;
    assert_eq!(r.status, 409, "{r:?}");
    // resetNextCronTime calls the stuck action again at once.
    let before = s.calls().len();
    let r = post("resetNextCronTime", json!({"gid": "g-1"})).await?;
    assert_eq!(r.status, 200, "{r:?}");
    eventually("the action called again", || async {
        Ok((s.calls().len() > before).then_some(()))
    })
    .await?;

    // TCC: prepare twice is fine; a branch only while prepared; submit, then submit again.
    for _ in 0..2 {
        let r = post("prepare", json!({"gid": "t-1", "trans_type": "tcc"})).await?;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let branch = json!({"gid": "t-1", "trans_type": "tcc", "branch_id": "01", "status": "prepared",
        "data": "{\"amount\":1}", "confirm": format!("{}/ok/confirm", s.base), "cancel": format!("{}/ok/cancel", s.base)});
    let r = post("registerBranch", branch.clone()).await?;
    assert_eq!(r.status, 200, "{r:?}");
    for _ in 0..2 {
        let r = post("submit", json!({"gid": "t-1", "trans_type": "tcc"})).await?;
        assert_eq!(r.status, 200, "{r:?}");
    }
    until_status(&tc, "t-1", "succeed").await?;
    let r = post("registerTccBranch", branch).await?;
    assert_eq!(
        (r.status, r.json()["dtm_result"].clone()),
        (409, json!("FAILURE")),
        "{r:?}"
    );
    let r = post("abort", json!({"gid": "t-1", "trans_type": "tcc"})).await?;
    assert_eq!(r.status, 409, "a committed transaction is not aborted: {r:?}");

    // Unknown gids, malformed requests, what is not served.
    for (path, body) in [
        ("submit", json!({"gid": "nope", "trans_type": "tcc"})),
        ("abort", json!({"gid": "nope", "trans_type": "tcc"})),
        (
            "registerBranch",
            json!({"gid": "nope", "trans_type": "tcc", "branch_id": "01"}),
        ),
    ] {
        let r = post(path, body).await?;
        assert_eq!(r.status, 404, "{path}: {r:?}");
    }
    let r = tc.http().get("/api/dtmsvr/query?gid=nope").await?;
    assert_eq!(r.status, 404, "{r:?}");
    for (path, body, says) in [
        ("submit", json!({"trans_type": "saga"}), "gid"),
        (
            "submit",
            json!({"gid": "x", "trans_type": "saga", "steps": "no"}),
            "steps",
        ),
        (
            "submit",
            json!({"gid": "x", "trans_type": "saga", "steps": [{"action": "ftp://a"}]}),
            "action",
        ),
        ("submit", json!({"gid": "x", "trans_type": "workflow"}), "workflow"),
        ("submit", json!({"gid": "x", "trans_type": "msg"}), "steps"),
        (
            "prepare",
            json!({"gid": "x", "trans_type": "msg", "steps": [{"action": "topic://orders"}]}),
            "topics",
        ),
        ("prepare", json!({"gid": "x", "trans_type": "xa"}), "MODE XA"),
        (
            "submit",
            json!({"gid": "x", "trans_type": "saga", "timeout_to_fail": "soon", "steps": [{"action": format!("{}/ok/a", s.base)}]}),
            "timeout_to_fail",
        ),
    ] {
        let r = post(path, body.clone()).await?;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(
            r.json()["message"].as_str().unwrap_or("").contains(says),
            "{body}: {r:?}"
        );
    }
    let r = tc.http().post("/api/dtmsvr/submit", Some("not json")).await?;
    assert_eq!(r.status, 400, "{r:?}");
    let r = tc.http().get("/api/dtmsvr/newGid").await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["gid"].as_str().map(str::len), Some(24), "{r:?}");
    Ok(())
}

/// DTM's `wait_result`: the submit answers once the first pass ended. SUCCESS after every
/// action (or confirm) succeeded, FAILURE with the reason after the compensations ran,
/// ONGOING (425) while an action waits to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_result_answers_with_the_first_pass() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let submit = |gid: &str, second: &str| {
        let body = json!({
            "gid": gid, "trans_type": "saga", "wait_result": true,
            "steps": [
                {"action": format!("{}/ok/a1", s.base), "compensate": format!("{}/ok/c1", s.base)},
                {"action": format!("{}/{second}", s.base), "compensate": format!("{}/ok/c2", s.base)},
            ],
            "payloads": ["{}", "{}"],
        });
        let http = tc.http();
        async move { http.post("/api/dtmsvr/submit", Some(&body.to_string())).await }
    };
    let status = |gid: &str| {
        let http = tc.http();
        let path = format!("/api/dtmsvr/query?gid={gid}");
        async move { Ok::<_, anyhow::Error>(http.get_json(&path).await?["transaction"]["status"].clone()) }
    };

    let r = submit("w-ok", "ok/a2").await?;
    assert_eq!(
        (r.status, r.json()["dtm_result"].clone()),
        (200, json!("SUCCESS")),
        "{r:?}"
    );
    assert_eq!(status("w-ok").await?, "succeed");

    let r = submit("w-no", "no/a2").await?;
    assert_eq!(
        (r.status, r.json()["dtm_result"].clone()),
        (409, json!("FAILURE")),
        "{r:?}"
    );
    assert!(
        r.json()["message"].as_str().is_some_and(|m| m.contains("/no/a2")),
        "{r:?}"
    );
    // Answered after the compensations ran, last first.
    assert_eq!(
        calls_for(&s, "w-no"),
        [
            "/ok/a1 action",
            "/no/a2 action",
            "/ok/c2 compensate",
            "/ok/c1 compensate"
        ]
    );
    assert_eq!(status("w-no").await?, "failed");

    let r = submit("w-down", "down/a2").await?;
    assert_eq!(
        (r.status, r.json()["dtm_result"].clone()),
        (425, json!("ONGOING")),
        "{r:?}"
    );
    assert_eq!(status("w-down").await?, "submitted");
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    until_status(&tc, "w-down", "succeed").await?;

    // TCC: the submit answers once every branch confirmed.
    let post = |path: &str, body: Value| {
        let http = tc.http();
        let path = format!("/api/dtmsvr/{path}");
        async move { http.post(&path, Some(&body.to_string())).await }
    };
    post("prepare", json!({"gid": "w-tcc", "trans_type": "tcc"})).await?;
    let branch = json!({"gid": "w-tcc", "trans_type": "tcc", "branch_id": "01", "data": "{}",
        "confirm": format!("{}/ok/confirm", s.base), "cancel": format!("{}/ok/cancel", s.base)});
    assert_eq!(post("registerBranch", branch).await?.status, 200);
    let r = post(
        "submit",
        json!({"gid": "w-tcc", "trans_type": "tcc", "wait_result": true}),
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(status("w-tcc").await?, "succeed");
    assert_eq!(calls_for(&s, "w-tcc"), ["/ok/confirm confirm"]);
    Ok(())
}
