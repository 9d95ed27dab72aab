//! Table guards through the real binary: the complete set on attach, an update confirmed by
//! every attached resource manager before the first lock in a new table, a resource manager
//! that does not acknowledge (a raw stream) holding registrations up until it does or its
//! stream ends and its lease runs out, release after the linger, answered heartbeats, and
//! restored tables after a restart.

mod support;

use std::time::Duration;

use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, pb};
use support::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

type Result<T = ()> = anyhow::Result<T>;

use pb::GlobalStatus as G;

/// A resource manager on a raw Attach stream that sends numbered heartbeats (so it stays
/// attached and its lease is renewed) but acknowledges guard updates only when told to.
struct RawRm {
    tx: mpsc::Sender<pb::RmMessage>,
    welcome: pb::Welcome,
    updates: mpsc::UnboundedReceiver<pb::GuardUpdate>,
    echoes: mpsc::UnboundedReceiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RawRm {
    async fn attach(c: &TcClient, rm_id: &str, beat: Duration) -> Result<RawRm> {
        let mut stream = raw_attach(c, hello(rm_id, &["db1"])).await?;
        let welcome = match stream.next().await? {
            Some(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Welcome(w)),
            }) => w,
            other => anyhow::bail!("expected Welcome, got {other:?}"),
        };
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let (echoes_tx, echoes) = mpsc::unbounded_channel();
        let RawStream { tx, mut inbound } = stream;
        let reader = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                match message.kind {
                    Some(pb::tc_message::Kind::Guards(u)) => {
                        let _ = updates_tx.send(u);
                    }
                    Some(pb::tc_message::Kind::Heartbeat(h)) if h.echo > 0 => {
                        let _ = echoes_tx.send(h.echo);
                    }
                    _ => {}
                }
            }
        });
        let beats = tokio::spawn({
            let tx = tx.clone();
            async move {
                let mut tick = tokio::time::interval(beat);
                for n in 1.. {
                    tick.tick().await;
                    if tx.send(numbered_heartbeat(n)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(RawRm {
            tx,
            welcome,
            updates,
            echoes,
            tasks: vec![reader, beats],
        })
    }

    async fn next_update(&mut self) -> Result<pb::GuardUpdate> {
        tokio::time::timeout(EVENT, self.updates.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))
    }

    async fn ack(&self, seq: u64) -> Result<()> {
        self.tx.send(guard_ack(seq)).await?;
        Ok(())
    }
}

impl Drop for RawRm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn metrics_text(tc: &Tc) -> Result<String> {
    let r = tc.http().get("/metrics").await?;
    anyhow::ensure!(r.status == 200, "{r:?}");
    Ok(r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_is_guarded_before_its_first_lock_and_released_after_the_linger() -> Result {
    let linger = Duration::from_millis(300);
    let tc = Tc::with_config(&format!("[transactions]\nguard_linger_ms = {}\n", linger.as_millis())).await?;
    let c = tc.client().await?;
    let rec = Recorder::new();
    let log = GuardLog::new();
    let _rm = TestRm::attach_guarded(&c, "rm-1", &["db1"], &rec, log.clone()).await?;
    let first = log.wait_until("the complete set", |u| !u.is_empty()).await?;
    assert!(first[0].full && first[0].guard.is_empty(), "{first:?}");

    let xid = begin(&c, 0).await?;
    register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;
    // The update was acknowledged (after the sink had it) before the registration returned.
    let updates = log.updates();
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert!(!updates[1].full && updates[1].seq > first[0].seq, "{updates:?}");
    assert_eq!(table_names(&updates[1].guard), ["app.t on db1"]);
    assert!(updates[1].release.is_empty());
    let text = metrics_text(&tc).await?;
    assert_eq!(metric(&text, "ferrata_tc_guarded_tables"), Some(1.0), "{text}");

    // More rows in the same table, by this transaction and another: nothing new is sent.
    register(&c, &xid, "db1", t_rows(&["2"]), 0).await?;
    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", t_rows(&["3"]), 0).await?;
    assert_eq!(log.updates().len(), 2, "{:?}", log.updates());

    // A resource manager attaching now gets the table in its complete set.
    let log2 = GuardLog::new();
    let _rm2 = TestRm::attach_guarded(&c, "rm-2", &["db1"], &rec, log2.clone()).await?;
    let full = log2.wait_until("the complete set", |u| !u.is_empty()).await?;
    assert!(full[0].full, "{full:?}");
    assert_eq!(table_names(&full[0].guard), ["app.t on db1"]);

    // Released once no transaction pins it, after the linger.
    assert_eq!(status_of(&rollback(&c, &xid).await?), G::Rollbacked);
    let last_end = Instant::now();
    commit(&c, &other).await?;
    wait_status(&c, &other, G::Committed).await?;
    let updates = log
        .wait_until("the release", |u| u.iter().any(|u| !u.release.is_empty()))
        .await?;
    assert!(
        last_end.elapsed() >= linger,
        "released {:?} after the last transaction ended",
        last_end.elapsed()
    );
    let release = updates.last().expect("the release");
    assert_eq!(table_names(&release.release), ["app.t on db1"]);
    assert!(release.guard.is_empty() && release.seq > updates[1].seq, "{updates:?}");
    log2.wait_until("the release on the other stream", |u| {
        u.iter().any(|u| u.seq == release.seq && !u.release.is_empty())
    })
    .await?;
    let text = metrics_text(&tc).await?;
    assert_eq!(metric(&text, "ferrata_tc_guarded_tables"), Some(0.0), "{text}");

    // Guarded again by the next transaction: a new update.
    let again = begin(&c, 0).await?;
    register(&c, &again, "db1", t_rows(&["1"]), 0).await?;
    let updates = log.updates();
    let last = updates.last().expect("updates");
    assert!(last.seq > release.seq, "{updates:?}");
    assert_eq!(table_names(&last.guard), ["app.t on db1"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_heartbeats_are_answered_with_their_echo() -> Result {
    let tc = Tc::with_config("[phase2]\nheartbeat_interval_ms = 200\n").await?;
    let c = tc.client().await?;
    let mut raw = raw_attach(&c, hello("rm-raw", &["db1"])).await?;
    match raw.next().await? {
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Welcome(w)),
        }) => assert_eq!((w.heartbeat_interval_ms, w.guard_lease_ms), (200, 600)),
        other => panic!("expected Welcome, got {other:?}"),
    }
    // The complete set comes next, even when it is empty.
    match raw.next().await? {
        Some(pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Guards(u)),
        }) => assert!(u.full && u.guard.is_empty() && u.release.is_empty(), "{u:?}"),
        other => panic!("expected the complete guard set, got {other:?}"),
    }
    raw.tx.send(numbered_heartbeat(7)).await?;
    // The coordinator's own heartbeats (echo 0) may come in between.
    loop {
        match raw.next().await? {
            Some(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Heartbeat(h)),
            }) if h.echo == 0 => assert_eq!(h.seq, 0),
            Some(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Heartbeat(h)),
            }) => {
                assert_eq!((h.seq, h.echo), (0, 7));
                break;
            }
            other => panic!("expected the answer to heartbeat 7, got {other:?}"),
        }
    }
    // An acknowledgement of an update never sent breaks the protocol.
    raw.tx.send(guard_ack(99)).await?;
    let ended = loop {
        match raw.next().await {
            Ok(Some(pb::TcMessage {
                kind: Some(pb::tc_message::Kind::Heartbeat(_)),
            })) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status,
        }
    };
    assert_code(&ended, ErrorCode::RmProtocol);

    // The client hands answered heartbeats to its guard sink.
    let log = GuardLog::new();
    let _rm = TestRm::attach_guarded(&c, "rm-1", &["db1"], &Recorder::new(), log.clone()).await?;
    log.wait_answered(2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_manager_that_does_not_acknowledge_holds_up_the_first_lock() -> Result {
    // A lease of 300 ms.
    let tc = Tc::with_config("[phase2]\nheartbeat_interval_ms = 100\n").await?;
    let c = tc.client().await?;
    let mut raw = RawRm::attach(&c, "rm-raw", Duration::from_millis(50)).await?;
    assert_eq!(raw.welcome.guard_lease_ms, 300);
    let full = raw.next_update().await?;
    assert!(full.full, "{full:?}");
    // A well-behaved one is attached too.
    let log = GuardLog::new();
    let _rm = TestRm::attach_guarded(&c, "rm-good", &["db1"], &Recorder::new(), log.clone()).await?;

    let xid = begin(&c, 0).await?;
    let started = Instant::now();
    let e = register(&c, &xid, "db1", t_rows(&["1"]), 1000).await.unwrap_err();
    let waited = started.elapsed();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert!(
        e.message().contains("rm-raw") && !e.message().contains("rm-good") && e.message().contains("app.t on db1"),
        "{e:?}"
    );
    assert!(waited >= Duration::from_millis(1000), "failed after {waited:?}");
    let update = raw.next_update().await?;
    assert_eq!(table_names(&update.guard), ["app.t on db1"]);
    let text = metrics_text(&tc).await?;
    assert_eq!(metric(&text, "ferrata_tc_guard_timeouts_total"), Some(1.0), "{text}");
    tc.wait_log(|l| l.contains("guard not confirmed in time") && l.contains("rm-raw"))
        .await?;

    // Once it acknowledges, the table's first lock is granted.
    let retry = tokio::spawn({
        let c = c.clone();
        let xid = xid.clone();
        async move { register(&c, &xid, "db1", t_rows(&["1"]), 20_000).await }
    });
    raw.ack(update.seq).await?;
    tokio::time::timeout(EVENT, retry)
        .await??
        .map_err(anyhow::Error::from)?;

    // A new table, and the stream ends without acknowledging: granted once its lease ran out.
    let blocked = tokio::spawn({
        let c = c.clone();
        let xid = xid.clone();
        async move { register(&c, &xid, "db1", rows("app", "u", &["1"]), 20_000).await }
    });
    let update = raw.next_update().await?;
    assert_eq!(table_names(&update.guard), ["app.u on db1"]);
    assert!(!blocked.is_finished(), "granted without rm-raw's acknowledgement");
    // Its heartbeats were answered: it could trust its set for a lease after the last one.
    let echo = tokio::time::timeout(EVENT, raw.echoes.recv()).await?;
    assert!(echo.is_some_and(|n| n >= 1), "{echo:?}");
    drop(raw);
    tokio::time::timeout(EVENT, blocked)
        .await??
        .map_err(anyhow::Error::from)?;
    tc.wait_log(|l| l.contains("resource manager detached") && l.contains("rm-raw"))
        .await?;
    // The well-behaved one saw both tables.
    let updates = log.updates();
    let guarded: Vec<String> = updates.iter().flat_map(|u| table_names(&u.guard)).collect();
    assert_eq!(guarded, ["app.t on db1", "app.u on db1"], "{updates:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_tables_stay_guarded_across_a_restart() -> Result {
    // A lease of 1.5 s.
    let mut tc = Tc::with_config("[phase2]\nheartbeat_interval_ms = 500\n").await?;
    let c = tc.client().await?;
    let xid = begin(&c, 600_000).await?;
    register(&c, &xid, "db1", t_rows(&["1"]), 0).await?;

    let restarted = Instant::now();
    tc.kill9()?;
    tc.restart().await?;
    let c = tc.client().await?;
    // Resource managers may still trust the previous instance's set: a new table is guarded
    // only a lease after the start, even with nobody attached.
    let other = begin(&c, 0).await?;
    register(&c, &other, "db1", rows("app", "u", &["1"]), 0).await?;
    assert!(
        restarted.elapsed() >= Duration::from_millis(1500),
        "a new table was guarded {:?} after the restart",
        restarted.elapsed()
    );

    // The restored table is in the complete set, and confirmed: a resource manager that
    // never acknowledges does not hold up more rows in it, only a new table.
    let mut raw = RawRm::attach(&c, "rm-raw", Duration::from_millis(200)).await?;
    let full = raw.next_update().await?;
    assert!(full.full, "{full:?}");
    assert_eq!(table_names(&full.guard), ["app.t on db1", "app.u on db1"]);
    register(&c, &other, "db1", t_rows(&["2"]), 0).await?;
    let e = register(&c, &other, "db1", rows("app", "v", &["1"]), 0)
        .await
        .unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert!(e.message().contains("rm-raw"), "{e:?}");
    drop(raw);
    Ok(())
}
