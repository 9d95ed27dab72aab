//! Calls made on a resource manager's Attach stream (`pb::Call`), against the real binary:
//! they mean what their unary twins mean (answers, refusals with their codes and holders,
//! waiting in the lock queue without holding up the stream), the stream's token is checked
//! for every call, a call whose stream ends before its answer has an unknown outcome (and is
//! cancelled) while later calls go as unary calls, and a stopping coordinator answers the
//! calls it took on.

mod support;

use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, holder_of, pb};
use support::*;

type Result<T = ()> = anyhow::Result<T>;

async fn stream_calls(tc: &Tc) -> Result<f64> {
    let text = tc.http().get("/metrics").await?.body;
    Ok(metric(&text, "ferrata_tc_stream_calls_total").unwrap_or(0.0))
}

/// Registers row `pk` of `app.t` on db1 for `xid` in the background.
fn register_bg(
    c: &TcClient,
    xid: &str,
    pk: &str,
    lock_wait_ms: u64,
) -> tokio::task::JoinHandle<std::result::Result<u64, tonic::Status>> {
    let (c, xid, pk) = (c.clone(), xid.to_owned(), pk.to_owned());
    tokio::spawn(async move { register(&c, &xid, "db1", t_rows(&[&pk]), lock_wait_ms).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_the_stream_mean_what_their_unary_twins_mean() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let http = tc.http();
    let rec = Recorder::new();
    let c = tc.client().await?;
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let s = c.clone().with_stream(rm.calls());
    let before = stream_calls(&tc).await?;

    let t1 = begin(&s, 0).await?;
    let t2 = begin(&s, 0).await?;
    let b1 = register(&s, &t1, "db1", t_rows(&["1"]), 0).await?;

    // Refusals carry their code and the holder, as on a unary call.
    let e = register(&s, &t2, "db1", t_rows(&["1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(holder_of(&e).as_deref(), Some(t1.as_str()));
    let q = lock_query(&s, "", "db1", t_rows(&["1"]), 0).await?;
    assert!(!q.lockable, "{q:?}");
    assert_eq!(q.holders.first().map(|h| h.xid.as_str()), Some(t1.as_str()), "{q:?}");

    // A call waiting in the lock queue holds up nothing else on the stream: the holder's
    // commit goes on the same stream and lets it in.
    let waiting = register_bg(&s, &t2, "1", 15_000);
    wait_queue(&http, "1", &t1, &[&t2]).await?;
    let committed = commit(&s, &t1).await?;
    assert_eq!(
        status_of(&committed),
        pb::GlobalStatus::AsyncCommitting,
        "{committed:?}"
    );
    let b2 = tokio::time::timeout(EVENT, waiting).await???;
    rec.wait_branch(pb::Phase2Action::Commit, b1).await?;

    let e = report_number(&s, &t2, b2, 99).await.unwrap_err();
    assert_code(&e, ErrorCode::InvalidArgument);
    report_failed(&s, &t2, b2).await?;
    let rolled_back = rollback(&s, &t2).await?;
    assert_eq!(status_of(&rolled_back), pb::GlobalStatus::Rollbacked, "{rolled_back:?}");

    // Every call above went on the stream: 2 begins, 3 registrations, a query, a commit,
    // 2 reports, a rollback.
    assert_eq!(stream_calls(&tc).await? - before, 10.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_token_is_checked_for_every_call() -> Result {
    let tc = Tc::start(TcOptions {
        token: Some("root-secret-for-stream-calls".into()),
        ..TcOptions::default()
    })
    .await?;
    let secret = create_token(&tc, "edge-proxy", "proxy").await?;
    let mut config = tc.client_config();
    config.token = Some(secret);
    let c = TcClient::connect(&config).await?;
    let rec = Recorder::new();
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &rec).await?;
    let s = c.clone().with_stream(rm.calls());
    let xid = begin(&s, 0).await?;
    register(&s, &xid, "db1", t_rows(&["1"]), 0).await?;

    let r = tc
        .http()
        .request(
            "DELETE",
            "/v1/tokens/edge-proxy",
            Some(r#"{"reason": "proxy retired"}"#),
        )
        .await?;
    assert_eq!(r.status, 200, "{r:?}");
    // The stream stays open, but what is sent on it now is refused.
    let e = s
        .clone()
        .global_begin(pb::GlobalBeginRequest::default())
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::Unauthenticated);
    let e = register(&s, &xid, "db1", t_rows(&["2"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::Unauthenticated);
    Ok(())
}

/// A call on a resource manager's stream, waiting in the queue of a row another
/// transaction (T1) holds.
struct Waiting {
    rm: TestRm,
    /// A client whose calls go on `rm`'s stream.
    streamed: TcClient,
    t1: String,
    call: tokio::task::JoinHandle<std::result::Result<u64, tonic::Status>>,
}

async fn waiting_on_the_stream(tc: &Tc) -> Result<Waiting> {
    let c = tc.client().await?;
    let rm = TestRm::attach(&c, "rm-db1", &["db1"], &Recorder::new()).await?;
    let streamed = c.clone().with_stream(rm.calls());
    let t1 = begin(&c, 0).await?;
    let t2 = begin(&c, 0).await?;
    register(&c, &t1, "db1", t_rows(&["1"]), 0).await?;
    let call = register_bg(&streamed, &t2, "1", 15_000);
    wait_queue(&tc.http(), "1", &t1, &[&t2]).await?;
    Ok(Waiting { rm, streamed, t1, call })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_stream_ends_before_its_answer_has_an_unknown_outcome() -> Result {
    let tc = Tc::with_config(FAST_CONFIG).await?;
    let Waiting {
        mut rm,
        streamed,
        t1,
        call,
    } = waiting_on_the_stream(&tc).await?;

    rm.crash();
    let e = tokio::time::timeout(EVENT, call).await??.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(ErrorCode::of(&e), None, "not a refusal: {e:?}");
    assert!(e.message().contains("unknown"), "{e:?}");

    // The coordinator cancels a call whose stream ended, as a unary call whose connection
    // broke: T2 leaves the row's queue.
    wait_queue(&tc.http(), "1", &t1, &[]).await?;

    // With its stream gone, the client makes its calls as unary calls.
    let before = stream_calls(&tc).await?;
    let t3 = begin(&streamed, 0).await?;
    register(&streamed, &t3, "db1", t_rows(&["2"]), 0).await?;
    assert_eq!(stream_calls(&tc).await?, before, "not sent on the ended stream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_coordinator_answers_the_calls_it_took_on() -> Result {
    let mut tc = Tc::with_config(FAST_CONFIG).await?;
    let waiting = waiting_on_the_stream(&tc).await?;

    tc.sigterm(EVENT).await?;
    // Refused by the stopping coordinator, not lost with its stream: the caller knows the
    // branch was not registered.
    let e = tokio::time::timeout(EVENT, waiting.call).await??.unwrap_err();
    assert_code(&e, ErrorCode::ShuttingDown);
    Ok(())
}
