//! Adopting the namespace of a node that is down (several serving nodes), so that its
//! transactions finish without it, and handing it back once it is up again.
//!
//! Every node watches the cluster's nodes (`nodes/<n>`, under each node's lease, and
//! `namespaces/<n>`, kept: `store::etcd`). For each namespace whose node is not up, it
//! campaigns for that namespace's area as it does for its own; the one that wins loads it and
//! runs a coordinator for it, as a restarted node `n` would: same ids, its locks synced with
//! the lock leader, its open transactions driven to their end, their calls served here
//! (`namespaces.rs` routes them). Once node `n` is up again (its campaign for its own
//! namespace writes `nodes/<n>` before it waits), the adopter stops that coordinator, letting
//! the calls it took on finish, and hands the lease back; node `n` then owns its namespace
//! and loads it.
//!
//! A node adopts nothing during its first lease TTL, so that nodes started together do not
//! adopt each other's namespaces before each has said it is up. An adopter also hands a
//! namespace back when its `namespaces/<n>` key is deleted (node `n` retired).
//!
//! Invariant: the adopted coordinator writes under the adopter's epoch of the namespace, so
//! after a hand-back (or a lost lease) etcd refuses anything it still tries to write; and an
//! adopter's campaign succeeds only while `nodes/<n>` does not exist (`store::etcd`), so it
//! never takes a namespace from a node that said it is up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::at::remote::Leadership;
use crate::calls::Caller;
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::namespaces::Namespaces;
use crate::standby::{NodeDescription, campaign};
use crate::store::Store;
use crate::store::etcd::{ClusterNodes, EtcdStore};
use crate::store::journal::Journal;

/// How long a node waits before adopting a namespace again after adopting it failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One node's adoptions: what it needs to run a coordinator for another node's namespace.
pub struct Adoption {
    pub config: Config,
    pub me: NodeDescription,
    /// Where the cluster's lock leader is, for the adopted coordinators' locks.
    pub leadership: Leadership,
    /// Where adopted coordinators are served, beside the node's own.
    pub namespaces: Arc<Namespaces>,
}

impl Adoption {
    /// Adopts namespaces of nodes that are down and hands them back when they are up, until
    /// `stop`; then hands back every one it holds.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let settings = this.config.etcd.clone();
        let observer = tokio::task::spawn_blocking(move || EtcdStore::observe_nodes(&settings)).await??;
        let (seen, mut view) = watch::channel(ClusterNodes::default());
        let watcher = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                observer.watch_nodes(&stop, &mut |nodes| {
                    seen.send_if_modified(|now| {
                        let changed = now != nodes;
                        if changed {
                            now.clone_from(nodes);
                        }
                        changed
                    });
                });
            })
        };
        // Nodes started together each say they are up within their first campaign.
        tokio::select! {
            () = tokio::time::sleep(this.config.etcd.lease_ttl()) => {}
            () = stop.cancelled() => {}
        }
        let own = this.config.node_id;
        // The namespaces being adopted or served, each stopped by its token, and which
        // namespace each task serves.
        let mut adopting: HashMap<u16, CancellationToken> = HashMap::new();
        let mut serving: HashMap<Id, u16> = HashMap::new();
        let mut tasks = JoinSet::new();
        while !stop.is_cancelled() {
            {
                let nodes = view.borrow_and_update();
                for (n, hand_back) in &adopting {
                    if nodes.up.contains_key(n) || !nodes.namespaces.contains(n) {
                        hand_back.cancel();
                    }
                }
                for &n in &nodes.namespaces {
                    if n != own && !nodes.up.contains_key(&n) && !adopting.contains_key(&n) {
                        let hand_back = stop.child_token();
                        adopting.insert(n, hand_back.clone());
                        let task = tasks.spawn(Arc::clone(&this).adopt(n, hand_back));
                        serving.insert(task.id(), n);
                    }
                }
            }
            tokio::select! {
                changed = view.changed() => if changed.is_err() { break },
                Some(ended) = tasks.join_next_with_id() => {
                    let (id, result) = match ended {
                        Ok((id, result)) => (id, result),
                        Err(panicked) => (panicked.id(), Err(anyhow::anyhow!("the task panicked: {panicked}"))),
                    };
                    let n = serving.remove(&id).expect("every task is listed");
                    adopting.remove(&n);
                    // Its coordinator is no longer served here, whatever ended it.
                    this.namespaces.hand_back(n);
                    if let Err(e) = result {
                        tracing::error!(namespace = n, error = %format!("{e:#}"), "serving the adopted namespace failed; adopting it again if its node is still down");
                    }
                }
                () = stop.cancelled() => break,
            }
        }
        while tasks.join_next().await.is_some() {}
        watcher.await?;
        Ok(())
    }

    /// Adopts namespace `n` once its owner's lease has gone, and serves it until
    /// `hand_back`; a failure is answered after a pause, so that adopting again is not a
    /// busy loop.
    async fn adopt(self: Arc<Self>, n: u16, hand_back: CancellationToken) -> anyhow::Result<()> {
        let result = async {
            let settings = self.config.etcd.clone();
            let store = Arc::new(tokio::task::spawn_blocking(move || EtcdStore::adopt_namespace(&settings, n)).await??);
            let result = self.serve(n, &store, &hand_back).await;
            // Revoked off the runtime, so that node `n` need not wait for the lease to run out.
            let _ = tokio::task::spawn_blocking(move || drop(store)).await;
            result
        }
        .await;
        if result.is_err() {
            tokio::select! {
                () = tokio::time::sleep(RETRY_AFTER) => {}
                () = hand_back.cancelled() => {}
            }
        }
        result
    }

    /// Campaigns for namespace `n` and serves it once won, until `hand_back`, or until its
    /// lease or its store fails.
    async fn serve(&self, n: u16, store: &Arc<EtcdStore>, hand_back: &CancellationToken) -> anyhow::Result<()> {
        let met = move |owner: Option<NodeDescription>, epoch| {
            tracing::debug!(
                namespace = n,
                ?owner,
                epoch,
                "waiting to adopt a namespace another node owns"
            );
        };
        let Some(epoch) = campaign(store, &self.me, hand_back, met).await? else {
            return Ok(());
        };
        tracing::warn!(
            namespace = n,
            epoch,
            "node {n} is down: this node adopts its namespace and finishes its transactions"
        );
        let snapshot = {
            let store = Arc::clone(store);
            tokio::task::spawn_blocking(move || store.load()).await??
        };
        let journal = Journal::start(Arc::clone(store) as Arc<dyn Store>);
        let result = self.run_coordinator(n, snapshot, &journal, store, hand_back).await;
        // Everything acknowledged is durable; this writes what was still queued (it blocks
        // on etcd).
        tokio::task::spawn_blocking(move || journal.shutdown()).await?;
        result
    }

    /// Runs the coordinator of namespace `n` on `journal` until `hand_back` or a failure.
    async fn run_coordinator(
        &self,
        n: u16,
        snapshot: crate::store::Snapshot,
        journal: &Journal,
        store: &EtcdStore,
        hand_back: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut config = self.config.clone();
        // It serves as node `n` would: its XIDs, its ids, its lock stream.
        config.node_id = n;
        let caller = Caller::new(&config.calls)?;
        let transactions = snapshot.globals.len();
        let coordinator = Coordinator::recover(
            config,
            journal.clone(),
            snapshot,
            caller,
            Some(self.leadership.clone()),
            Some(self.namespaces.own()),
        )
        .await?;
        coordinator.start_background();
        if hand_back.is_cancelled() {
            // Node `n` came back while this one loaded: it was never served here.
            coordinator.stop_now();
            coordinator.metrics.forget_transactions();
            return Ok(());
        }
        self.namespaces.adopt(n, Arc::clone(&coordinator));
        let adopted = metrics::gauge!("ferrata_tc_adopted", "namespace" => n.to_string());
        adopted.set(1.0);
        metrics::counter!("ferrata_tc_adoptions_total").increment(1);
        tracing::info!(namespace = n, transactions, "serving the adopted namespace");
        let (lost, failed) = (store.lost(), journal.failure_signal());
        let result = tokio::select! {
            () = hand_back.cancelled() => Ok(()),
            () = lost.cancelled() => Err(anyhow::anyhow!("lost the adopted namespace of node {n} (its etcd lease ran out)")),
            () = failed.cancelled() => Err(anyhow::anyhow!(
                "the etcd store of node {n}'s adopted namespace failed ({})", journal.failed().unwrap_or_default()
            )),
        };
        self.namespaces.hand_back(n);
        adopted.set(0.0);
        match &result {
            Ok(()) => {
                tracing::info!(namespace = n, "handing the adopted namespace back");
                let timeout = self.config.shutdown_timeout();
                if tokio::time::timeout(timeout, coordinator.shutdown()).await.is_err() {
                    coordinator.stop_now();
                }
            }
            Err(_) => coordinator.stop_now(),
        }
        // Node `n` (or the next adopter) counts them from now on.
        coordinator.metrics.forget_transactions();
        result
    }
}
