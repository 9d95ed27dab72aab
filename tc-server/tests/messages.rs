//! Messages at the coordinator, against the real binary and a real HTTP service: added to a
//! transaction and delivered (signed, with DTM's query parameters, after their delay) once
//! it commits, dropped when it rolls back; sent on their own; retried on their policy's
//! schedule, honouring Retry-After, dead-lettered when it ends or the receiver answers 410,
//! and replayed by an operator; delivered after a coordinator restart; bad ones refused;
//! 2-phase messages settled by their check; a receiver asking where a message stands.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

use ferrata_rpc::pb::GlobalStatus as G;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Begins a global transaction over HTTP; its XID.
async fn begin_http(tc: &Tc) -> Result<String> {
    let r = tc.http().post("/v1/transactions", Some("{}")).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["xid"].as_str().unwrap_or_default().to_owned())
}

async fn add(tc: &Tc, xid: &str, message: Value) -> Result<Resp> {
    tc.http()
        .post(&format!("/v1/transactions/{xid}/messages"), Some(&message.to_string()))
        .await
}

/// Sends `message` on its own; its XID.
async fn send(tc: &Tc, message: Value) -> Result<String> {
    let r = tc.http().post("/v1/messages", Some(&message.to_string())).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["xid"].as_str().unwrap_or_default().to_owned())
}

/// The reason of the failed branch of a transaction that waits for an operator.
async fn failure(tc: &Tc, xid: &str) -> Result<String> {
    let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
    Ok(v["failure"]["reason"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_delivered_when_their_transaction_commits_and_dropped_when_it_rolls_back() -> Result {
    let s = Service::start().await?;
    let tc = Tc::with_config(&format!(
        "{FAST_CONFIG}\n[[calls.endpoints]]\nprefix = \"{}/ok/\"\nsecret = \"{SECRET}\"\n",
        s.base
    ))
    .await?;
    let c = tc.client().await?;

    let xid = begin_http(&tc).await?;
    let keyed = json!({"target": format!("{}/ok/credit", s.base), "data": {"order": 42}, "key": "order-42"});
    let r = add(&tc, &xid, keyed).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    let later = json!({"target": format!("{}/ok/later", s.base), "name": "later", "delay_ms": 300});
    anyhow::ensure!(add(&tc, &xid, later.clone()).await?.status == 201);
    // A name is taken once per transaction.
    let again = add(&tc, &xid, later).await?;
    again.assert_error(409, "already_exists");
    anyhow::ensure!(s.calls().is_empty(), "nothing is sent before the commit");
    let committed = tokio::time::Instant::now();
    commit(&c, &xid).await?;

    let credit = s.until_called(&format!("/ok/credit?gid={xid}&trans_type=msg&")).await?;
    anyhow::ensure!(
        credit.header("webhook-id") == "order-42" && credit.body == r#"{"order":42}"# && credit.method == "POST",
        "{credit:?}"
    );
    anyhow::ensure!(
        credit.header("webhook-signature").starts_with("v1,"),
        "signed: {credit:?}"
    );
    anyhow::ensure!(credit.uri.ends_with("&op=action"), "{credit:?}");
    let later = s.until_called(&format!("/ok/later?gid={xid}&")).await?;
    anyhow::ensure!(later.header("webhook-id") == format!("{xid}.later.action"), "{later:?}");
    anyhow::ensure!(
        later.at >= committed + Duration::from_millis(300),
        "delivered after its delay"
    );
    wait_status(&c, &xid, G::Committed).await?;
    anyhow::ensure!(s.story(&xid, &["op"]).len() == 2, "each once: {:?}", s.calls());

    // Rolled back: dropped, never sent.
    let xid = begin_http(&tc).await?;
    add(&tc, &xid, json!({"target": format!("{}/ok/dropped", s.base)})).await?;
    rollback(&c, &xid).await?;
    wait_status(&c, &xid, G::Rollbacked).await?;

    // On its own.
    let alone = send(
        &tc,
        json!({"target": format!("{}/ok/alone", s.base), "data": "plain text"}),
    )
    .await?;
    let call = s.until_called(&format!("/ok/alone?gid={alone}&")).await?;
    anyhow::ensure!(call.body == "plain text", "{call:?}");
    wait_status(&c, &alone, G::Committed).await?;
    anyhow::ensure!(
        s.story(&xid, &["op"]).is_empty(),
        "the rolled-back message was never sent"
    );
    let text = tc.http().get("/metrics").await?.body;
    anyhow::ensure!(
        metric(&text, r#"ferrata_tc_messages_total{result="delivered"}"#) == Some(3.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_on_schedule_then_dead_lettered_and_replayed() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    // Attempts at 0, 100 and 300 ms after the commit, then the schedule has ended.
    let sent = tokio::time::Instant::now();
    let xid = send(
        &tc,
        json!({"target": format!("{}/down/hook", s.base), "policy": "100ms,200ms"}),
    )
    .await?;
    wait_status(&c, &xid, G::CommitFailed).await?;
    let attempts: Vec<_> = s
        .calls()
        .into_iter()
        .filter(|c| c.uri.starts_with("/down/hook"))
        .collect();
    anyhow::ensure!(attempts.len() == 3, "{attempts:?}");
    anyhow::ensure!(
        attempts[1].at >= sent + Duration::from_millis(100) && attempts[2].at >= sent + Duration::from_millis(300),
        "on schedule: {attempts:?}"
    );
    let why = failure(&tc, &xid).await?;
    anyhow::ensure!(why.contains("dead-lettered") && why.contains("HTTP 503"), "{why}");
    let text = tc.http().get("/metrics").await?.body;
    anyhow::ensure!(
        metric(&text, r#"ferrata_tc_messages_total{result="dead_lettered"}"#) == Some(1.0),
        "{text}"
    );

    // An operator replays it once the receiver is back: a new schedule from then on.
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = tc
        .http()
        .post(
            &format!("/v1/transactions/{xid}/retry"),
            Some(r#"{"reason": "the receiver is back"}"#),
        )
        .await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    wait_status(&c, &xid, G::Committed).await?;
    anyhow::ensure!(s.story(&xid, &["op"]).len() == 4, "{:?}", s.calls());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_ends_delivery_at_once_and_retry_after_is_honoured() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;

    let gone = send(
        &tc,
        json!({"target": format!("{}/gone/hook", s.base), "policy": "100ms,100ms"}),
    )
    .await?;
    wait_status(&c, &gone, G::CommitFailed).await?;
    anyhow::ensure!(s.story(&gone, &["op"]).len() == 1, "410 is not asked again");
    anyhow::ensure!(failure(&tc, &gone).await?.contains("410"));

    // 429 with Retry-After: 1 is asked again no sooner than a second later, though the
    // schedule's next attempt is due after 100 ms.
    let busy = send(
        &tc,
        json!({"target": format!("{}/busy/hook", s.base), "policy": "100ms,5s"}),
    )
    .await?;
    let first = s.until_called(&format!("/busy/hook?gid={busy}&")).await?;
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&c, &busy, G::Committed).await?;
    let calls: Vec<_> = s
        .calls()
        .into_iter()
        .filter(|c| c.uri.starts_with("/busy/hook"))
        .collect();
    anyhow::ensure!(calls.len() == 2, "{calls:?}");
    anyhow::ensure!(calls[1].at - first.at >= Duration::from_secs(1), "{calls:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_delivered_after_the_coordinator_restarts() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let xid = send(
        &tc,
        json!({"target": format!("{}/down/hook", s.base), "policy": "100ms,100ms,100ms,100ms,10s"}),
    )
    .await?;
    // Delivered before the crash: 02 of a transaction whose 01 keeps failing.
    let delivered = begin_http(&tc).await?;
    add(
        &tc,
        &delivered,
        json!({"target": format!("{}/down/first", s.base), "name": "01", "policy": "100ms,10s"}),
    )
    .await?;
    add(
        &tc,
        &delivered,
        json!({"target": format!("{}/ok/once", s.base), "name": "02"}),
    )
    .await?;
    commit(&tc.client().await?, &delivered).await?;
    s.until_called(&format!("/down/hook?gid={xid}&")).await?;
    // 02's delivery is recorded once it leaves the transaction; a later durable write (a
    // message sent) makes that record durable too (the journal keeps its order).
    eventually("02 recorded as delivered", || async {
        let v = tc.http().get_json(&format!("/v1/transactions/{delivered}")).await?;
        Ok((v["branches"].as_array().map(Vec::len) == Some(1)).then_some(()))
    })
    .await?;
    send(&tc, json!({"target": format!("{}/ok/marker", s.base)})).await?;
    tc.kill9()?;
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    tc.restart().await?;
    let c = tc.client().await?;
    wait_status(&c, &xid, G::Committed).await?;
    wait_status(&c, &delivered, G::Committed).await?;
    anyhow::ensure!(
        s.story(&delivered, &["op"])
            .iter()
            .filter(|c| c.starts_with("/ok/once"))
            .count()
            == 1,
        "a message delivered before the crash is not delivered again: {:?}",
        s.calls()
    );
    Ok(())
}

/// A dead letter waits for the transaction's other messages before the transaction is left
/// to an operator; a coordinator restarted while it waits, then an operator's retry, sends
/// what was left and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_waits_for_the_other_messages_and_survives_a_restart() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    let xid = begin_http(&tc).await?;
    add(
        &tc,
        &xid,
        json!({"target": format!("{}/gone/a", s.base), "name": "gone"}),
    )
    .await?;
    add(
        &tc,
        &xid,
        json!({"target": format!("{}/busy/b", s.base), "name": "busy", "policy": "100ms,10s"}),
    )
    .await?;
    commit(&c, &xid).await?;
    s.until_called(&format!("/gone/a?gid={xid}&")).await?;
    s.until_called(&format!("/busy/b?gid={xid}&")).await?;
    // 410 answered, the other message waits for its Retry-After: not yet CommitFailed.
    eventually("the dead letter recorded", || async {
        let v = tc.http().get_json(&format!("/v1/transactions/{xid}")).await?;
        Ok(v["failure"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("410"))
            .then_some(v))
    })
    .await?;
    anyhow::ensure!(
        status_of(&status(&c, &xid).await?) == G::AsyncCommitting,
        "its other message is still being delivered"
    );
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&c, &xid, G::CommitFailed).await?;
    anyhow::ensure!(
        s.story(&xid, &["op"])
            .iter()
            .filter(|c| c.starts_with("/busy/b"))
            .count()
            == 2
    );

    // Restarted while it waits for an operator (what was not yet on disk is done again: it
    // fails again), the retry sends the dead letter again and nothing that was delivered.
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    wait_status(&c, &xid, G::CommitFailed).await?;
    let count = |path: &str| s.story(&xid, &["op"]).iter().filter(|c| c.starts_with(path)).count();
    let (gone, busy) = (count("/gone/a"), count("/busy/b"));
    let r = tc
        .http()
        .post(
            &format!("/v1/transactions/{xid}/retry"),
            Some(r#"{"reason": "try again"}"#),
        )
        .await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    s.until_called_again(&format!("/gone/a?gid={xid}&"), gone).await?;
    wait_status(&c, &xid, G::CommitFailed).await?;
    anyhow::ensure!(
        (count("/gone/a"), count("/busy/b")) == (gone + 1, busy),
        "{:?}",
        s.story(&xid, &["op"])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_refused_and_leave_nothing_behind() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let s = Service::start().await?;
    let ok = format!("{}/ok/hook", s.base);
    for (message, says) in [
        (json!({"target": "ftp://svc/hook"}), "target"),
        (json!({"target": ok, "policy": "weekly"}), "policy"),
        (json!({"target": ok, "policy": "8d"}), "7 days"),
        (json!({"target": "http://nowhere.invalid/hook"}), "does not resolve"),
        (json!({"target": ok, "delay_ms": 700_000_000u64}), "delay_ms"),
        (json!({"target": ok, "headers": {"webhook-id": "x"}}), "header"),
        (json!({"target": ok, "colour": "red"}), "colour"),
        (json!({"target": ok, "name": "a\nb"}), "control characters"),
    ] {
        let r = tc.http().post("/v1/messages", Some(&message.to_string())).await?;
        let body = r.assert_error(400, "invalid_argument");
        anyhow::ensure!(
            body["message"].as_str().unwrap_or("").contains(says),
            "{message}: {body}"
        );
    }
    let list = tc.http().get_json("/v1/transactions").await?;
    anyhow::ensure!(list["transactions"] == json!([]), "nothing kept: {list}");
    anyhow::ensure!(s.calls().is_empty());
    Ok(())
}

/// Prepares a transaction of `messages` with `query_prepared` and `timeout_ms`; its XID.
async fn prepare(tc: &Tc, messages: Value, query_prepared: &str, timeout_ms: u64) -> Result<String> {
    let body = json!({"mode": "msg", "messages": messages, "query_prepared": query_prepared, "timeout_ms": timeout_ms});
    let r = tc.http().post("/v1/transactions", Some(&body.to_string())).await?;
    anyhow::ensure!(r.status == 201, "{r:?}");
    Ok(r.json()["xid"].as_str().unwrap_or_default().to_owned())
}

/// 2-phase messages: prepared whole, sent by the commit; one left unsubmitted past its
/// timeout is settled by its check's answer (yes: sent; no: dropped; no answer: asked again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_messages_go_out_on_commit_or_on_their_check_s_answer() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let s = Service::start().await?;
    let to = |path: &str| json!([{"target": format!("{}/ok/{path}", s.base), "data": {"n": 1}}]);
    let check = |path: &str| format!("{}/{path}", s.base);

    let submitted = prepare(&tc, to("a"), &check("ok/qp"), 60_000).await?;
    anyhow::ensure!(s.calls().is_empty(), "nothing sent while prepared");
    // Its check settles it alone: nothing joins it.
    let join = add(&tc, &submitted, json!({"target": format!("{}/ok/late", s.base)})).await?;
    let body = join.assert_error(400, "invalid_argument");
    anyhow::ensure!(
        body["message"].as_str().unwrap_or("").contains("nothing else joins"),
        "{body}"
    );
    commit(&c, &submitted).await?;
    wait_status(&c, &submitted, G::Committed).await?;
    anyhow::ensure!(s.story(&submitted, &["branch_id", "op"]) == ["/ok/a 01 action"]);

    // Past the timeout: the check is asked (DTM's GET, branch 00, op msg).
    let yes = prepare(&tc, to("b"), &check("ok/qp"), 200).await?;
    wait_status(&c, &yes, G::Committed).await?;
    anyhow::ensure!(
        s.story(&yes, &["trans_type", "branch_id", "op"]) == ["/ok/qp msg 00 msg", "/ok/b msg 01 action"],
        "{:?}",
        s.calls()
    );
    let v = tc.http().get_json(&format!("/v1/transactions/{yes}/events")).await?;
    anyhow::ensure!(v.to_string().contains(r#""by":"check""#), "decided by its check: {v}");

    let no = prepare(&tc, to("c"), &check("no/qp"), 200).await?;
    wait_status(&c, &no, G::TimeoutRollbacked).await?;
    anyhow::ensure!(s.story(&no, &["op"]) == ["/no/qp msg"], "dropped: {:?}", s.calls());

    let unsure = prepare(&tc, to("d"), &check("down/qp"), 200).await?;
    eventually("the check asked again", || async {
        Ok((s.story(&unsure, &["op"]).len() >= 2).then_some(()))
    })
    .await?;
    anyhow::ensure!(tc.http().get_json(&format!("/v1/transactions/{unsure}")).await?["status"] == "Begin");
    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&c, &unsure, G::Committed).await?;
    anyhow::ensure!(s.story(&unsure, &["op"]).last().map(String::as_str) == Some("/ok/d action"));
    Ok(())
}

/// A receiver asks where a message stands, with no token, signing its question with its
/// endpoint's secret (or with a token): prepared, pending, dead-lettered, delivered, dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_asks_where_its_message_stands() -> Result {
    let s = Service::start().await?;
    let tc = Tc::start(TcOptions {
        token: Some("root-secret-for-the-messages-test".into()),
        ..TcOptions::config(&format!(
            "{FAST_CONFIG}\n[[calls.endpoints]]\nprefix = \"{}\"\nsecret = \"{SECRET}\"\n",
            s.base
        ))
    })
    .await?;
    let c = tc.client().await?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    // The receiver's question, signed with `secret` at `at`.
    let ask = |xid: &str, name: &str, secret: &str, at: u64| {
        let id = format!("{xid}.{name}.query");
        let key = ferrata_tc::calls::signature::key(secret);
        let signed = ferrata_tc::calls::signature::headers(&id, at, Some(&key), b"");
        let http = tc.http().with_token(None).with_headers(&signed);
        let path = format!("/v1/notifications/{xid}/{name}");
        async move { http.get(&path).await }
    };
    let status = |xid: String, name: &'static str| {
        let ask = &ask;
        async move {
            let r = ask(&xid, name, SECRET, now()).await?;
            anyhow::ensure!(r.status == 200, "{r:?}");
            Ok::<_, anyhow::Error>(r.json()["status"].as_str().unwrap_or_default().to_owned())
        }
    };

    // 01 is dead-lettered within 200 ms; 02's receiver holds its delivery until released.
    let body = json!({"mode": "msg", "timeout_ms": 60_000, "messages": [
        {"target": format!("{}/down/hook", s.base), "policy": "100ms,100ms"},
        {"target": format!("{}/slow/later", s.base), "request_timeout_ms": 60_000},
    ]});
    let r = tc.http().post("/v1/transactions", Some(&body.to_string())).await?;
    let xid = r.json()["xid"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(status(xid.clone(), "01").await? == "prepared");
    commit(&c, &xid).await?;
    eventually("01 dead-lettered", || async {
        Ok((status(xid.clone(), "01").await? == "dead_lettered").then_some(()))
    })
    .await?;
    anyhow::ensure!(status(xid.clone(), "02").await? == "pending");
    s.release();
    wait_status(&c, &xid, G::CommitFailed).await?;
    anyhow::ensure!(status(xid.clone(), "02").await? == "delivered");
    let r = ask(&xid, "01", SECRET, now()).await?;
    anyhow::ensure!(
        r.json()["status"] == "dead_lettered" && r.json()["reason"].as_str().is_some_and(|w| w.contains("503")),
        "{r:?}"
    );
    // Refused: another secret, a stale timestamp, another message's id, no signature.
    for r in [
        ask(&xid, "01", "whsec_b3RoZXIgc2VjcmV0", now()).await?,
        ask(&xid, "01", SECRET, now() - 600).await?,
    ] {
        r.assert_error(401, "unauthenticated");
    }
    // A question well signed for message 02 is not one about 01.
    let for_02 = ferrata_tc::calls::signature::headers(
        &format!("{xid}.02.query"),
        now(),
        Some(&ferrata_tc::calls::signature::key(SECRET)),
        b"",
    );
    let other = tc
        .http()
        .with_token(None)
        .with_headers(&for_02)
        .get(&format!("/v1/notifications/{xid}/01"))
        .await?;
    other.assert_error(401, "unauthenticated");
    // An unknown transaction is answered as a bad signature.
    ask("9-999", "01", SECRET, now())
        .await?
        .assert_error(401, "unauthenticated");
    let bare = tc
        .http()
        .with_token(None)
        .get(&format!("/v1/notifications/{xid}/01"))
        .await?;
    bare.assert_error(401, "unauthenticated");
    // With a token that may read.
    let r = tc.http().get(&format!("/v1/notifications/{xid}/01")).await?;
    anyhow::ensure!(r.status == 200 && r.json()["status"] == "dead_lettered", "{r:?}");

    s.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = tc
        .http()
        .post(&format!("/v1/transactions/{xid}/retry"), Some(r#"{"reason": "back"}"#))
        .await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    wait_status(&c, &xid, G::Committed).await?;
    anyhow::ensure!(status(xid.clone(), "01").await? == "delivered");

    let dropped = begin_http(&tc).await?;
    add(
        &tc,
        &dropped,
        json!({"target": format!("{}/ok/hook", s.base), "name": "n"}),
    )
    .await?;
    rollback(&c, &dropped).await?;
    wait_status(&c, &dropped, G::Rollbacked).await?;
    anyhow::ensure!(status(dropped.clone(), "n").await? == "dropped");
    let r = tc.http().get("/v1/notifications/9-999/01").await?;
    r.assert_error(404, "global_not_found");
    Ok(())
}

/// A receiver that answers something that is not HTTP has not taken the message: each such
/// answer is a failed attempt, and the schedule's end dead-letters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_garbage_has_not_taken_the_message() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let c = tc.client().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&attempts);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"200 OK thanks\r\n\r\n{\"dtm_result\":\"SUCCESS\"}")
                .await;
        }
    });
    let xid = send(&tc, json!({"target": format!("http://{addr}/hook"), "policy": "50ms"})).await?;
    wait_status(&c, &xid, G::CommitFailed).await?;
    anyhow::ensure!(
        attempts.load(std::sync::atomic::Ordering::SeqCst) == 2,
        "two attempts, both failed"
    );
    let why = failure(&tc, &xid).await?;
    anyhow::ensure!(why.contains("dead-lettered"), "{why}");
    Ok(())
}
