//! Several coordinator nodes on one etcd store (a throw-away cluster the test starts): one
//! active, the others standing by. A standby says who is active and sends HTTP clients
//! there; it takes over a killed node with nothing acknowledged lost; a paused active node
//! that resumes after a standby took over answers and writes nothing more, and stops. A node
//! that cannot reach etcd waits, and stops at SIGTERM.

mod support;

use ferrata_rpc::{ErrorCode, holder_of, pb};
use ferrata_testkit::etcd::EtcdCluster;
use support::*;

type Result<T = ()> = anyhow::Result<T>;

/// A node on `cluster` with node id `node_id`, serving or standing by.
async fn node(cluster: &EtcdCluster, node_id: u16) -> Result<Tc> {
    let config = format!(
        "{FAST_CONFIG}\n[etcd]\nendpoints = {:?}\nlease_ttl_s = 2\nrequest_timeout_ms = 1000\n",
        cluster.endpoints()
    );
    Tc::start(TcOptions {
        config: Some(config),
        args: vec!["--node-id".into(), node_id.to_string()],
        may_stand_by: true,
        ..TcOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_reach_etcd_waits_for_it_and_stops_at_sigterm() -> Result {
    // "etcd" takes connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let config = format!(
        "{FAST_CONFIG}\n[etcd]\nendpoints = [\"http://{}\"]\nlease_ttl_s = 2\nrequest_timeout_ms = 200\n",
        silent.local_addr()?
    );
    let mut tc = Tc::start(TcOptions {
        config: Some(config),
        started_at: Some("campaigning to own the etcd store"),
        ..TcOptions::default()
    })
    .await?;
    // It tries etcd, and answers meanwhile: not serving.
    let (_held, _) = tokio::time::timeout(EVENT, silent.accept()).await??;
    let r = tc.http().get("/healthz").await?;
    assert_eq!((r.status, r.json()["status"].as_str()), (503, Some("standby")), "{r:?}");
    let status = tc.sigterm(EVENT).await?;
    assert!(status.success(), "{status:?}; its log:\n{}", tc.logs_text());
    Ok(())
}

/// A standby's `/healthz` once its first campaign has read the owner key and it names the
/// active node (it answers 503 `standby` from the start).
async fn standby_health(tc: &Tc) -> Result<serde_json::Value> {
    eventually("the standby to name the active node", || async {
        let r = tc.http().get("/healthz").await?;
        assert_eq!(r.status, 503, "{r:?}");
        let v = r.json();
        assert_eq!(v["status"], "standby", "{v}");
        Ok((!v["active"].is_null()).then_some(v))
    })
    .await
}

fn signal(tc: &Tc, signal: libc::c_int) -> Result {
    let pid = tc.pid().expect("running");
    // SAFETY: kill(2) with the pid of our own child process.
    anyhow::ensure!(unsafe { libc::kill(pid as libc::pid_t, signal) } == 0, "kill failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_active_node_with_nothing_acknowledged_lost() -> Result {
    let cluster = EtcdCluster::start(3).await?;
    let mut first = node(&cluster, 1).await?;
    let mut second = node(&cluster, 2).await?;

    // The standby says who is active once its first campaign has read the owner key, and
    // sends HTTP clients there; it takes no gRPC calls.
    let v = standby_health(&second).await?;
    assert_eq!(v["active"]["node"]["node_id"], 1, "{v}");
    assert_eq!(v["active"]["node"]["http"], format!("http://{}", first.http), "{v}");
    let r = second.http().get("/v1/transactions?limit=5").await?;
    assert_eq!(r.status, 307, "{r:?}");
    let location = format!("location: http://{}/v1/transactions?limit=5", first.http);
    assert!(r.headers.to_ascii_lowercase().contains(&location), "{r:?}");
    let refused = match second.client().await {
        Ok(c) => begin(&c, 0).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a standby takes no gRPC calls");
    let v = first.http().get_json("/healthz").await?;
    assert_eq!(
        (v["status"].as_str(), v["role"].as_str()),
        (Some("serving"), Some("active")),
        "{v}"
    );

    let left = leave_every_state(&first.client().await?).await?;
    first.kill9()?;
    second.wait_serving(EVENT).await?;

    let v = second.http().get_json("/healthz").await?;
    assert_eq!(v["role"], "active", "{v}");
    let metrics = second.http().get("/metrics").await?.body;
    assert_eq!(
        metric(&metrics, r#"ferrata_tc_takeovers_total{area="whole"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"ferrata_tc_active{area="whole"}"#),
        Some(1.0),
        "{metrics}"
    );
    let c = second.client().await?;
    assert!(begin(&c, 0).await?.starts_with("2-"), "the new node's XIDs are its own");
    check_every_state_kept(&c, &second.http(), &left).await?;

    // The killed node, started again as node 1, stands by behind the new active one.
    first.restart().await?;
    let v = standby_health(&first).await?;
    assert_eq!(v["active"]["node"]["node_id"], 2, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_node_writes_nothing_after_a_standby_took_over_and_stops() -> Result {
    let cluster = EtcdCluster::start(1).await?;
    let mut first = node(&cluster, 1).await?;
    let mut second = node(&cluster, 2).await?;
    let c = first.client().await?;
    let held = begin(&c, 600_000).await?;
    register(&c, &held, "db1", t_rows(&["r1"]), 0).await?;
    let late = begin(&c, 600_000).await?;

    // Paused for longer than its lease: the standby takes over meanwhile. A registration
    // sent to the paused node waits in its socket.
    signal(&first, libc::SIGSTOP)?;
    let sent = tokio::spawn({
        let (c, late) = (c.clone(), late.clone());
        async move { register(&c, &late, "db1", t_rows(&["r9"]), 0).await }
    });
    let asked = tokio::spawn({
        let (c, held) = (c.clone(), held.clone());
        async move { lock_query(&c, &held, "db1", t_rows(&["r1", "r2"]), 0).await }
    });
    second.wait_serving(EVENT).await?;
    signal(&first, libc::SIGCONT)?;

    // Resumed, it refuses the registration and the lock query (it no longer knows who holds
    // what) or dies before answering them, and stops.
    let registered = sent.await?;
    assert!(registered.is_err(), "a deposed node acknowledged {registered:?}");
    let answered = asked.await?;
    assert!(answered.is_err(), "a deposed node answered a lock query: {answered:?}");
    let exit = first.wait_exit(EVENT).await?;
    assert!(!exit.success(), "{exit:?}");
    assert!(
        first.logs_text().contains("lost its etcd lease"),
        "{}",
        first.logs_text()
    );

    // Nothing of it reached the store: the new active node never heard of the late branch,
    // and the branch before the pause holds its row.
    let c = second.client().await?;
    let fresh = begin(&c, 0).await?;
    let e = register(&c, &fresh, "db1", t_rows(&["r1"]), 0).await.unwrap_err();
    assert_code(&e, ErrorCode::LockWaitTimeout);
    assert_eq!(holder_of(&e).as_deref(), Some(held.as_str()));
    register(&c, &fresh, "db1", t_rows(&["r9"]), 0).await?;
    let e = status(&c, &late).await.unwrap_err();
    assert_code(&e, ErrorCode::GlobalNotFound);
    assert_eq!(status_of(&status(&c, &held).await?), pb::GlobalStatus::Begin);
    Ok(())
}
