//! Sagas at the coordinator, against the real binary and a real HTTP service: submitted whole
//! over HTTP, their actions called in order (or concurrently, after the steps their orders
//! name) with DTM's query parameters, committed when every action succeeded, and rolled back
//! when one refuses, runs out of retries or outlives the saga's timeout: the steps whose
//! actions may have run are compensated, last first, the refusing one included. A coordinator
//! killed while an action or a compensation keeps failing calls it again after its restart.

mod support;

use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use ferrata_rpc::pb::GlobalStatus as G;

/// A step whose action and compensation are `<base>/<action>` and `<base>/<compensate>`.
fn step(s: &Service, action: &str, compensate: &str) -> Value {
    json!({
        "action": format!("{}/{action}", s.base),
        "compensate": format!("{}/{compensate}", s.base),
        "data": {"amount": 30},
    })
}

/// Submits a saga; its XID.
async fn submit(tc: &Tc, saga: Value) -> Result<String> {
    let r = tc.http().post("/v1/transactions", Some(&saga.to_string())).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["xid"].as_str().unwrap_or_default().to_owned())
}

/// The calls the service got for `xid`, as `<path> <branch_id> <op>`, in arrival order.
fn story(s: &Service, xid: &str) -> Vec<String> {
    for call in s.story(xid, &["trans_type"]) {
        assert!(call.ends_with(" saga"), "{call}");
    }
    s.story(xid, &["branch_id", "op"])
}

/// The first `action` event of `xid`'s timeline with `result`, and the whole timeline.
async fn action_event(tc: &Tc, xid: &str, result: &str) -> Result<(Value, Value)> {
    let events = tc.http().get_json(&format!("/v1/transactions/{xid}/events")).await?;
    let found = events["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["type"] == "action" && e["result"] == result))
        .cloned()
        .unwrap_or_default();
    Ok((found, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_saga_runs_its_actions_in_order_and_commits() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    let xid = submit(
        &tc,
        json!({"mode": "saga", "name": "order", "steps": [
            step(&s, "ok/a1", "ok/c1"), step(&s, "ok/a2", "ok/c2"), step(&s, "ok/a3", "ok/c3"),
        ]}),
    )
    .await?;
    wait_status(&c, &xid, G::Committed).await?;
    assert_eq!(
        story(&s, &xid),
        ["/ok/a1 01 action", "/ok/a2 02 action", "/ok/a3 03 action"]
    );
    let call = s.until_called("/ok/a2").await?;
    assert_eq!(
        (call.header("webhook-id"), call.body.as_str(), call.method.as_str()),
        (&*format!("{xid}.02.action"), r#"{"amount":30}"#, "POST")
    );

    // Its timeline tells each action and who decided.
    let events = tc.http().get_json(&format!("/v1/transactions/{xid}/events")).await?;
    let kinds: Vec<String> = events["events"]
        .as_array()
        .unwrap_or(&vec![])
        .iter()
        .map(|e| match e["type"].as_str() {
            Some("action") => format!(
                "action {} {}",
                e["step"].as_str().unwrap_or(""),
                e["result"].as_str().unwrap_or("")
            ),
            Some("decided") => format!(
                "decided {} {}",
                e["decision"].as_str().unwrap_or(""),
                e["by"].as_str().unwrap_or("")
            ),
            other => other.unwrap_or("").to_owned(),
        })
        .filter(|k| k.starts_with("action") || k.starts_with("decided"))
        .collect();
    assert_eq!(
        kinds,
        [
            "action 01 done",
            "action 02 done",
            "action 03 done",
            "decided commit saga"
        ]
    );

    // An application cannot commit a saga: its actions decide.
    let open = submit(&tc, json!({"mode": "saga", "steps": [step(&s, "down/a1", "ok/c1")]})).await?;
    let r = tc.http().post(&format!("/v1/transactions/{open}/commit"), None).await?;
    r.assert_error(400, "invalid_argument");
    // Nothing else joins a saga.
    let tcc = json!({"mode": "tcc", "branch_id": "01", "confirm": format!("{}/ok/x", s.base), "cancel": format!("{}/ok/y", s.base)});
    let r = tc
        .http()
        .post(&format!("/v1/transactions/{open}/branches"), Some(&tcc.to_string()))
        .await?;
    let body = r.assert_error(400, "invalid_argument");
    assert!(body["message"].as_str().unwrap_or("").contains("saga"), "{body}");
    // Stored as called before its first call.
    s.until_called(&format!("/down/a1?gid={open}&")).await?;
    let v = tc.http().get_json(&format!("/v1/transactions/{open}")).await?;
    assert_eq!(v["status"], "Begin", "{v}");
    assert_eq!(v["branches"][0]["mode"], "SAGA", "{v}");
    assert_eq!(v["branches"][0]["status"], "ActionCalled", "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_action_compensates_the_steps_that_ran_last_first() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    let xid = submit(
        &tc,
        json!({"mode": "saga", "steps": [
            step(&s, "ok/a1", "ok/c1"), step(&s, "ok/a2", "ok/c2"),
            step(&s, "no/a3", "ok/c3"), step(&s, "ok/a4", "ok/c4"),
        ]}),
    )
    .await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    assert_eq!(
        story(&s, &xid),
        [
            "/ok/a1 01 action",
            "/ok/a2 02 action",
            "/no/a3 03 action",
            // The refusing step is compensated too (its barrier makes that a no-op if it did
            // nothing); step 4 never ran and is not.
            "/ok/c3 03 compensate",
            "/ok/c2 02 compensate",
            "/ok/c1 01 compensate",
        ]
    );
    let (failed, events) = action_event(&tc, &xid, "failed").await?;
    assert_eq!(failed["step"], "03", "{events}");
    assert!(failed["reason"].as_str().unwrap_or("").contains("409"), "{failed}");
    assert!(
        events["events"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["type"] == "decided" && e["decision"] == "rollback" && e["by"] == "saga")),
        "{events}"
    );

    // A step without a compensation has nothing to undo.
    let xid = submit(
        &tc,
        json!({"mode": "saga", "steps": [
            {"action": format!("{}/ok/a1", s.base)}, step(&s, "no/a2", "ok/c2"),
        ]}),
    )
    .await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    assert_eq!(
        story(&s, &xid),
        ["/ok/a1 01 action", "/no/a2 02 action", "/ok/c2 02 compensate"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_saga_calls_independent_steps_together_and_keeps_its_orders() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    // Steps 0 and 1 answer only when both are in; step 2 waits for both, step 3 for 2.
    let xid = submit(
        &tc,
        json!({"mode": "saga", "concurrent": true, "orders": {"2": [0, 1], "3": [2]}, "steps": [
            step(&s, "pair/a1", "ok/c1"), step(&s, "pair/a2", "ok/c2"),
            step(&s, "ok/a3", "ok/c3"), step(&s, "no/a4", "ok/c4"),
        ]}),
    )
    .await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    let story = story(&s, &xid);
    let mut first_two = story[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, ["/pair/a1 01 action", "/pair/a2 02 action"], "{story:?}");
    assert_eq!(
        story[2..5],
        ["/ok/a3 03 action", "/no/a4 04 action", "/ok/c4 04 compensate"],
        "{story:?}"
    );
    assert_eq!(story[5], "/ok/c3 03 compensate", "{story:?}");
    let mut last_two = story[6..].to_vec();
    last_two.sort();
    assert_eq!(last_two, ["/ok/c1 01 compensate", "/ok/c2 02 compensate"], "{story:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_limit_and_timeout_roll_a_stuck_saga_back() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    // Two retries, then the saga gives up: the step that was called is compensated (it may
    // have run), then the one before it.
    let xid = submit(
        &tc,
        json!({"mode": "saga", "retry_limit": 2, "retry_interval_ms": 10, "steps": [
            step(&s, "ok/a1", "ok/c1"), step(&s, "down/a2", "ok/c2"),
        ]}),
    )
    .await?;
    wait_status(&c, &xid, G::Rollbacked).await?;
    assert_eq!(
        story(&s, &xid),
        [
            "/ok/a1 01 action",
            "/down/a2 02 action",
            "/down/a2 02 action",
            "/down/a2 02 action",
            "/ok/c2 02 compensate",
            "/ok/c1 01 compensate",
        ]
    );
    let (retried, v) = action_event(&tc, &xid, "retry").await?;
    assert_eq!(retried["attempts"], 2, "retries are folded into one event: {v}");

    // Without a retry limit a step is asked again until the saga's timeout.
    let xid = submit(
        &tc,
        json!({"mode": "saga", "timeout_ms": 300, "retry_interval_ms": 10, "steps": [step(&s, "down/b1", "ok/d1")]}),
    )
    .await?;
    wait_status(&c, &xid, G::TimeoutRollbacked).await?;
    let story = story(&s, &xid);
    assert!(story.len() >= 3, "{story:?}");
    assert_eq!(
        story.last().map(String::as_str),
        Some("/ok/d1 01 compensate"),
        "{story:?}"
    );
    Ok(())
}

/// An application's rollback of a saga whose action keeps failing answers once the
/// compensations ran (not when the saga's actions stop), and no action is called after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_rollback_of_a_running_saga_answers_after_its_compensations() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let xid = submit(
        &tc,
        json!({"mode": "saga", "retry_interval_ms": 10, "steps": [
            step(&s, "ok/a1", "ok/c1"), step(&s, "down/a2", "ok/c2"),
        ]}),
    )
    .await?;
    eventually("the failing action retried", || async {
        Ok((story(&s, &xid).len() >= 3).then_some(()))
    })
    .await?;
    let r = tc
        .http()
        .post(&format!("/v1/transactions/{xid}/rollback"), None)
        .await?;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("Rollbacked")),
        "{r:?}"
    );
    let story = story(&s, &xid);
    assert_eq!(
        story[story.len() - 2..],
        ["/ok/c2 02 compensate", "/ok/c1 01 compensate"],
        "{story:?}"
    );
    assert!(
        story[..story.len() - 2].iter().all(|c| c.ends_with("action")),
        "{story:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_saga_calls_again_what_it_did_not_store() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    // Forward: step 1 done, step 2 failing when the coordinator dies.
    let forward = submit(
        &tc,
        json!({"mode": "saga", "steps": [step(&s, "ok/a1", "ok/c1"), step(&s, "down/a2", "ok/c2")]}),
    )
    .await?;
    s.until_called(&format!("/down/a2?gid={forward}&")).await?;
    // Backward: step 2 refused, step 1's compensation failing when the coordinator dies.
    let backward = submit(
        &tc,
        json!({"mode": "saga", "steps": [step(&s, "ok/b1", "down/d1"), step(&s, "no/b2", "ok/d2")]}),
    )
    .await?;
    s.until_called(&format!("/down/d1?gid={backward}&")).await?;
    tc.kill9()?;
    let before = s.calls().len();
    tc.restart().await?;
    let c = tc.client().await?;
    eventually("both calls re-sent after the restart", || async {
        let again = s.calls()[before..]
            .iter()
            .filter(|call| call.uri.starts_with("/down/a2") || call.uri.starts_with("/down/d1"))
            .count();
        Ok((again >= 2).then_some(()))
    })
    .await?;
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&c, &forward, G::Committed).await?;
    wait_status(&c, &backward, G::Rollbacked).await?;
    // Step 1's success was stored before step 2 was called: it is not called again.
    let forward_story = story(&s, &forward);
    assert_eq!(
        forward_story.iter().filter(|c| c.starts_with("/ok/a1")).count(),
        1,
        "{forward_story:?}"
    );
    assert_eq!(forward_story.last().map(String::as_str), Some("/down/a2 02 action"));
    assert!(
        !forward_story.iter().any(|c| c.ends_with("compensate")),
        "{forward_story:?}"
    );
    // Step 2's compensation ran before step 1's; its success is written without waiting
    // for the disk (a compensation may be repeated: it is idempotent), so the restart may
    // call it again, never after step 1's compensation succeeded.
    let backward_story = story(&s, &backward);
    let compensations: Vec<&str> = backward_story[2..].iter().map(String::as_str).collect();
    assert_eq!(compensations[..2], ["/ok/d2 02 compensate", "/down/d1 01 compensate"]);
    assert!(
        compensations
            .iter()
            .all(|c| ["/ok/d2 02 compensate", "/down/d1 01 compensate"].contains(c)),
        "{backward_story:?}"
    );
    assert_eq!(
        backward_story.last().map(String::as_str),
        Some("/down/d1 01 compensate")
    );
    // The same message id on every attempt, before and after the restart.
    let ids: std::collections::BTreeSet<String> = s
        .calls()
        .into_iter()
        .filter(|call| call.uri.starts_with("/down/a2"))
        .map(|call| call.header("webhook-id").to_owned())
        .collect();
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), [format!("{forward}.02.action")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sagas_are_refused_whole() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let ok = step(&s, "ok/a", "ok/c");
    for (saga, says) in [
        (json!({"mode": "saga", "steps": []}), "1 to"),
        (
            json!({"mode": "saga", "steps": [{"action": "ftp://svc/a"}]}),
            "step 0 action",
        ),
        (
            json!({"mode": "saga", "steps": [{"compensate": "http://svc/c"}]}),
            "action",
        ),
        (
            json!({"mode": "saga", "concurrent": true, "orders": {"0": [1], "1": [0]}, "steps": [ok.clone(), ok.clone()]}),
            "cycle",
        ),
        (
            json!({"mode": "saga", "orders": {"1": [0]}, "steps": [ok.clone(), ok.clone()]}),
            "concurrent",
        ),
        (json!({"mode": "at", "steps": [ok.clone()]}), "belong to a saga"),
        (json!({"mode": "tcc", "retry_limit": 3}), "belong to a saga"),
        (
            json!({"mode": "saga", "steps": [ok.clone(), {"action": "http://nowhere.invalid/a"}]}),
            "does not resolve",
        ),
        (
            json!({"mode": "saga", "name": "n".repeat(257), "steps": [ok.clone()]}),
            "257 bytes",
        ),
        (json!({"mode": "sagas", "steps": [ok.clone()]}), "not one of"),
        (
            json!({"mode": "saga", "steps": [{"action": format!("{}/ok/a", s.base), "headers": {"Host": "x"}}]}),
            "header",
        ),
    ] {
        let r = tc.http().post("/v1/transactions", Some(&saga.to_string())).await?;
        let body = r.assert_error(400, "invalid_argument");
        assert!(body["message"].as_str().unwrap_or("").contains(says), "{saga}: {body}");
    }
    assert!(s.calls().is_empty(), "nothing of a refused saga is called");
    let list = tc.http().get_json("/v1/transactions").await?;
    assert_eq!(
        list["transactions"],
        json!([]),
        "nothing of a refused saga is kept: {list}"
    );
    Ok(())
}
