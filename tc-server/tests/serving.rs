//! Several serving nodes on one etcd store (`[etcd] mode = "serving"`): each node serves the
//! transactions it began, and one elected node holds every node's locks. A row held through
//! one node makes a request through another wait in the same queue; when the lock leader is
//! killed another node leads, rebuilt from every namespace, and a node restarted with its old
//! identity serves its namespace again and follows the new leader. A node that stays down has
//! its namespace adopted by another, which finishes its transactions and hands it back.

mod support;

use std::sync::Arc;

use ferrata_rpc::client::TcClient;
use ferrata_rpc::{ErrorCode, pb};
use ferrata_testkit::etcd::EtcdCluster;
use serde_json::Value;
use support::*;

type Result<T = ()> = anyhow::Result<T>;

const TOKEN: &str = "serving-cluster-root-token";

/// A serving node on `cluster` with node id `node_id`.
async fn node(cluster: &EtcdCluster, node_id: u16) -> Result<Tc> {
    let config = format!(
        "{FAST_CONFIG}\n[etcd]\nmode = \"serving\"\nendpoints = {:?}\nlease_ttl_s = 2\nrequest_timeout_ms = 1000\n",
        cluster.endpoints()
    );
    Tc::start(TcOptions {
        config: Some(config),
        token: Some(TOKEN.into()),
        args: vec!["--node-id".into(), node_id.to_string()],
        ..TcOptions::default()
    })
    .await
}

/// The node's `/healthz` once it knows where the lock leader is.
async fn health(tc: &Tc) -> Result<Value> {
    eventually("the node to know the lock leader", || async {
        let v = tc.http().get_json("/healthz").await?;
        Ok((!v["lock_leader"]["endpoint"].is_null()).then_some(v))
    })
    .await
}

/// Waits until `tc` leads the cluster's locks and serves them.
async fn wait_leading(tc: &Tc) -> Result {
    eventually("the node to lead the cluster's locks", || async {
        let v = tc.http().get_json("/healthz").await?;
        Ok(
            (v["lock_leader"]["this_node"] == true && v["lock_leader"]["endpoint"] == format!("http://{}", tc.rpc))
                .then_some(()),
        )
    })
    .await
}

/// The rows the leader `tc` lists: (key's first value, holder, waiters).
async fn held_rows(tc: &Tc) -> Result<Vec<(String, String, Vec<String>)>> {
    let v = tc.http().get_json("/v1/locks").await?;
    let rows = v["locks"].as_array().cloned().unwrap_or_default();
    Ok(rows
        .iter()
        .map(|r| {
            let waiters = r["waiters"].as_array().into_iter().flatten();
            (
                r["key"]["pk"][0].as_str().unwrap_or_default().to_owned(),
                r["holder"].as_str().unwrap_or_default().to_owned(),
                waiters.filter_map(|w| w.as_str().map(str::to_owned)).collect(),
            )
        })
        .collect())
}

/// A resource manager attached through `c` to a node whose Welcome says it serves
/// `namespaces` (attached again until it does: the node adopts or hands back meanwhile).
async fn attach_serving(c: &TcClient, id: &str, recorder: &Arc<Recorder>, namespaces: &[u16]) -> Result<TestRm> {
    eventually(&format!("a node serving namespaces {namespaces:?}"), || async {
        let rm = TestRm::attach(c, id, &["db"], recorder).await?;
        Ok((rm.serving().as_deref() == Some(namespaces)).then_some(rm))
    })
    .await
}

/// Commits `xid`, which must succeed (phase 2 may go on after the answer).
async fn committed(c: &ferrata_rpc::client::TcClient, xid: &str) -> Result {
    let o = commit(c, xid).await?;
    let s = status_of(&o);
    anyhow::ensure!(
        matches!(s, pb::GlobalStatus::Committed | pb::GlobalStatus::AsyncCommitting),
        "{xid}: {o:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_lock_leader_which_another_replaces_rebuilt_from_every_namespace() -> Result {
    let cluster = EtcdCluster::start(1).await?;
    let mut first = node(&cluster, 1).await?;
    wait_leading(&first).await?;
    let second = node(&cluster, 2).await?;
    let v = health(&second).await?;
    assert_eq!(v["role"], "serving", "{v}");
    assert_eq!(v["lock_leader"]["this_node"], false, "{v}");
    assert_eq!(v["lock_leader"]["endpoint"], format!("http://{}", first.rpc), "{v}");

    let (c1, c2) = (first.client().await?, second.client().await?);
    let (rec1, rec2) = (Recorder::new(), Recorder::new());
    let _rm1 = TestRm::attach(&c1, "rm-1", &["db"], &rec1).await?;
    let mut rm2 = TestRm::attach(&c2, "rm-2", &["db"], &rec2).await?;
    // A resource manager's stream that ends leaves the node (which runs no guards: its locks
    // are the leader's).
    let mut gone = TestRm::attach(&c2, "rm-gone", &["db"], &Recorder::new()).await?;
    gone.crash();
    eventually("the ended stream to leave node 2", || async {
        let v = second.http().get_json("/healthz").await?;
        Ok((v["resource_managers"] == 1).then_some(()))
    })
    .await?;

    // Each node issues XIDs of its own namespace.
    let t1 = begin(&c1, 60_000).await?;
    let t2 = begin(&c2, 60_000).await?;
    assert!(t1.starts_with("1-") && t2.starts_with("2-"), "{t1} {t2}");
    // A node serves only its own: it sends the caller to the other.
    let wrong = status(&c2, &t1).await.unwrap_err();
    assert_code(&wrong, ErrorCode::WrongNode);
    assert!(wrong.message().contains("send its calls to node 1"), "{wrong:?}");

    // t1 holds row 1 through node 1; t2 asks for it through node 2 and waits in the same
    // queue, at the leader.
    let b1 = register(&c1, &t1, "db", t_rows(&["1"]), 0).await?;
    let waiting = tokio::spawn({
        let (c2, t2) = (c2.clone(), t2.clone());
        async move { register(&c2, &t2, "db", t_rows(&["1", "2"]), 30_000).await }
    });
    eventually("t2 to wait for row 1 behind t1", || async {
        let rows = held_rows(&first).await?;
        Ok(rows.contains(&("1".into(), t1.clone(), vec![t2.clone()])).then_some(()))
    })
    .await?;
    // Node 2 holds no locks: it says so, and where they are.
    let r = second.http().get("/v1/locks").await?;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (503, Some("lock_authority_unavailable")),
        "{r:?}"
    );

    // Committing t1 through node 1 hands row 1 to t2.
    committed(&c1, &t1).await?;
    rec1.wait_branch(pb::Phase2Action::Commit, b1).await?;
    let b2 = waiting.await??;
    assert!(b2 > 0);

    // The leader is killed. Node 2 leads once its lease runs out, its locks rebuilt from
    // every namespace: t2 (node 2's) holds rows 1 and 2 again.
    first.kill9()?;
    wait_leading(&second).await?;
    // Its resource managers' streams end, to attach again for the leader's guard set (and
    // again once node 2 adopts node 1's namespace, which it does meanwhile).
    let ended = rm2.closed().await.unwrap_err();
    assert!(format!("{ended:#}").contains("attach again"), "{ended:#}");
    let _rm2 = attach_serving(&c2, "rm-2", &rec2, &[2, 1]).await?;
    let mut rows = held_rows(&second).await?;
    rows.sort();
    assert_eq!(
        rows,
        vec![("1".into(), t2.clone(), vec![]), ("2".into(), t2.clone(), vec![])],
        "the rebuilt locks"
    );
    let t3 = begin(&c2, 60_000).await?;
    let refused = register(&c2, &t3, "db", t_rows(&["2"]), 0).await.unwrap_err();
    assert_code(&refused, ErrorCode::LockWaitTimeout);

    // Node 1 comes back with its identity: it serves its namespace again (t1 stays
    // committed) and its requests wait at the new leader.
    first.restart().await?;
    let v = health(&first).await?;
    // Node 2 handed node 1's namespace back.
    let _rm2 = attach_serving(&c2, "rm-2", &rec2, &[2]).await?;
    assert_eq!(v["lock_leader"]["endpoint"], format!("http://{}", second.rpc), "{v}");
    let c1 = first.client().await?;
    let _rm1 = TestRm::attach(&c1, "rm-1", &["db"], &rec1).await?;
    wait_status(&c1, &t1, pb::GlobalStatus::Committed).await?;
    let t4 = begin(&c1, 60_000).await?;
    assert!(t4.starts_with("1-"), "{t4}");
    let waiting = tokio::spawn({
        let (c1, t4) = (c1.clone(), t4.clone());
        async move { register(&c1, &t4, "db", t_rows(&["2"]), 30_000).await }
    });
    eventually("t4 to wait for row 2 behind t2", || async {
        let rows = held_rows(&second).await?;
        Ok(rows.contains(&("2".into(), t2.clone(), vec![t4.clone()])).then_some(()))
    })
    .await?;
    committed(&c2, &t2).await?;
    rec2.wait_branch(pb::Phase2Action::Commit, b2).await?;
    waiting.await??;
    committed(&c1, &t4).await?;
    assert_eq!(status_of(&rollback(&c2, &t3).await?), pb::GlobalStatus::Rollbacked);
    eventually("every row to be free", || async {
        Ok(held_rows(&second).await?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

/// The node's value of `series` in `/metrics`.
async fn metric_of(tc: &Tc, series: &str) -> Result<Option<f64>> {
    let text = tc.http().get("/metrics").await?.body;
    Ok(metric(&text, series))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_namespace_is_adopted_its_transactions_finish_and_it_is_handed_back() -> Result {
    let cluster = EtcdCluster::start(1).await?;
    let first = node(&cluster, 1).await?;
    wait_leading(&first).await?;
    let mut second = node(&cluster, 2).await?;
    health(&second).await?;
    let (c1, c2) = (first.client().await?, second.client().await?);
    let (rec1, rec2) = (Recorder::new(), Recorder::new());
    let mut rm1 = TestRm::attach(&c1, "rm-1", &["db"], &rec1).await?;
    let mut rm2 = TestRm::attach(&c2, "rm-2", &["db"], &rec2).await?;
    assert_eq!((rm1.serving(), rm2.serving()), (Some(vec![1]), Some(vec![2])));

    // Node 2 began two transactions holding rows: one its application will commit, one
    // that will run out of time. Then it dies and stays down.
    let kept = begin(&c2, 60_000).await?;
    let kept_branch = register(&c2, &kept, "db", t_rows(&["5"]), 0).await?;
    let expiring = begin(&c2, 4_000).await?;
    let expiring_branch = register(&c2, &expiring, "db", t_rows(&["6"]), 0).await?;
    rm2.crash();
    second.kill9()?;

    // Node 1 adopts node 2's namespace once node 2's lease has run out; its streams end so
    // that resource managers learn it serves both.
    let ended = rm1.closed().await.unwrap_err();
    assert!(format!("{ended:#}").contains("attach again"), "{ended:#}");
    let _rm1 = attach_serving(&c1, "rm-1", &rec1, &[1, 2]).await?;
    assert_eq!(
        metric_of(&first, r#"ferrata_tc_adopted{namespace="2"}"#).await?,
        Some(1.0)
    );

    // Node 2's transactions are served by node 1 now, over gRPC and HTTP, for node 1's
    // tokens.
    let viewer = create_token(&first, "viewer-1", "viewer").await?;
    let shown = first.http().with_token(Some(&viewer));
    let shown = shown.get_json(&format!("/v1/transactions/{kept}")).await?;
    assert_eq!(shown["status"], "Begin", "{shown}");
    committed(&c1, &kept).await?;
    rec1.wait_branch(pb::Phase2Action::Commit, kept_branch).await?;
    wait_status(&c1, &kept, pb::GlobalStatus::Committed).await?;
    // The other one runs out of time at node 1 and is rolled back there.
    rec1.wait_branch(pb::Phase2Action::Rollback, expiring_branch).await?;
    wait_status(&c1, &expiring, pb::GlobalStatus::TimeoutRollbacked).await?;
    eventually("node 2's rows to be free", || async {
        Ok(held_rows(&first).await?.is_empty().then_some(()))
    })
    .await?;
    // Node 1 begins its own transactions as before.
    assert!(begin(&c1, 60_000).await?.starts_with("1-"));

    // Node 2 comes back: node 1 hands its namespace back, and node 2 serves it again.
    second.restart().await?;
    health(&second).await?;
    let c2 = second.client().await?;
    wait_status(&c2, &kept, pb::GlobalStatus::Committed).await?;
    wait_status(&c2, &expiring, pb::GlobalStatus::TimeoutRollbacked).await?;
    let rm2 = TestRm::attach(&c2, "rm-2", &["db"], &rec2).await?;
    assert_eq!(rm2.serving(), Some(vec![2]));
    eventually("node 1 to hand node 2's namespace back", || async {
        let handed = metric_of(&first, r#"ferrata_tc_adopted{namespace="2"}"#).await? == Some(0.0);
        Ok(handed.then_some(()))
    })
    .await?;
    assert_code(&status(&c1, &kept).await.unwrap_err(), ErrorCode::WrongNode);
    let t = begin(&c2, 60_000).await?;
    assert!(t.starts_with("2-"), "{t}");
    Ok(())
}
