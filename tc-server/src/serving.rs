//! A node of several serving ones (`[etcd] mode = "serving"`, step 2 of HA). Each node owns
//! its own namespace of XIDs in etcd (`ns/<node id>/`) under a lease and epoch of its own,
//! and serves the transactions it began: `server.rs` runs that as it runs an active node,
//! with the coordinator's locks at the cluster's lock leader (`at/remote.rs`). Beside it,
//! every node campaigns to be that leader (etcd's `lock/`); [`Campaign`] owns the campaign:
//!
//! * While another node leads, its gRPC address (from the description in the leader key)
//!   is where this node's coordinator sends its lock calls.
//! * Once this node wins, it rebuilds the cluster's locks from every namespace's open
//!   transactions, read at one revision, on an `At` of its own whose guards are confirmed
//!   by the resource managers attached here; then it serves them (`lock_leader/`) and its
//!   own coordinator streams its calls to it as any node's does.
//! * When its lease runs out it stops leading at once, and the node stops (`server.rs`),
//!   as an active node does.
//!
//! Invariant: the rebuild reads the namespaces after this node's leader key was created, so
//! a registration its rows were granted for by an older leader is either in what it read,
//! or refused by the fence on the leader key (`Mutation::LockFence`).

use std::sync::Arc;

use anyhow::Context;
use ferrata_rpc::client::ClientConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::at::At;
use crate::at::remote::Leadership;
use crate::config::Config;
use crate::lock_leader::{LeaderSlot, LockLeader};
use crate::metrics::Metrics;
use crate::rm::RmRegistry;
use crate::standby::{NodeDescription, campaign};
use crate::store::etcd::EtcdStore;

/// One node's campaign to lead the cluster's locks, and its lead once it wins.
pub struct Campaign {
    /// The lock leader's area of the store: owning it is leading.
    store: Arc<EtcdStore>,
    pub me: NodeDescription,
    pub config: Config,
    /// Where the node's gRPC server finds the leader it runs.
    pub slot: Arc<LeaderSlot>,
    told: Told,
}

/// What the campaign tells the node's coordinator (`Leadership` is the other end).
struct Told {
    address: watch::Sender<Option<ClientConfig>>,
    here: watch::Sender<Option<Arc<At>>>,
}

impl Campaign {
    /// A campaign for `store`, and what this node's coordinator learns from it.
    pub fn new(
        store: Arc<EtcdStore>,
        me: NodeDescription,
        config: Config,
        slot: Arc<LeaderSlot>,
    ) -> (Campaign, Leadership) {
        let (address, address_rx) = watch::channel(None);
        let (here, here_rx) = watch::channel(None);
        let campaign = Campaign {
            store,
            me,
            config,
            slot,
            told: Told { address, here },
        };
        let leadership = Leadership {
            address: address_rx,
            here: here_rx,
        };
        (campaign, leadership)
    }

    /// Campaigns until `stop`, and leads once it wins, its guards confirmed by `rms` (the
    /// resource managers attached to this node); `Err` if it cannot campaign, or when it led
    /// and lost its lease (the node must stop).
    pub async fn run(self, rms: Arc<RmRegistry>, stop: CancellationToken) -> anyhow::Result<()> {
        let result = async {
            let (config, address) = (self.config.clone(), self.told.address.clone());
            let met = move |leader: Option<NodeDescription>, epoch| {
                let endpoint = leader.as_ref().map(|l| peer(&config, &l.rpc));
                // Met again at every look while it leads: said when it changes.
                if address.send_if_modified(|now| replace(now, endpoint)) {
                    tracing::info!(?leader, epoch, "another node leads the cluster's locks");
                }
            };
            let Some(epoch) = campaign(&self.store, &self.me, &stop, met).await? else {
                return Ok(());
            };
            self.lead(epoch as u64, rms, &stop).await
        }
        .await;
        // Revoked as the store is dropped, off the runtime so the revoke is waited for: the
        // next leader need not wait for the lease to run out.
        let Campaign { store, .. } = self;
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
        result
    }

    /// Rebuilds the cluster's locks, serves them until `stop` or until the lease runs out.
    async fn lead(&self, epoch: u64, rms: Arc<RmRegistry>, stop: &CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            epoch,
            "this node leads the cluster's locks; rebuilding them from every namespace"
        );
        let metrics = Metrics::new();
        // Not a fresh store: resource managers may trust the previous leader's guard set.
        let at = Arc::new(At::new(&self.config, rms, false, &metrics));
        let open = {
            let store = Arc::clone(&self.store);
            tokio::task::spawn_blocking(move || store.load_namespaces()).await??
        };
        for (record, branches) in &open {
            at.restore_txn(record, branches)?;
        }
        at.count_held(&metrics);
        let leading = CancellationToken::new();
        let leader = Arc::new(LockLeader::new(Arc::clone(&at), epoch, &self.config, leading.clone()));
        tokio::spawn(Arc::clone(&at.guards).release_loop(leading.clone()));
        self.slot.set(Some(leader));
        self.told.here.send_replace(Some(Arc::clone(&at)));
        self.told.address.send_replace(Some(peer(&self.config, &self.me.rpc)));
        tracing::info!(
            epoch,
            transactions = open.len(),
            rows = at.locks.held_count(),
            "serving the cluster's locks"
        );
        let lost = self.store.lost();
        let result = tokio::select! {
            () = lost.cancelled() => Err(anyhow::anyhow!(
                "lost the lead of the cluster's locks (its etcd lease ran out); restart this node to campaign again"
            )),
            () = stop.cancelled() => Ok(()),
        };
        // Nothing more is applied; streams end, and their nodes follow the next leader.
        leading.cancel();
        self.slot.set(None);
        self.told.here.send_replace(None);
        self.told.address.send_replace(None);
        result.context("leading the cluster's locks")
    }
}

/// Sets `now` to `new`; whether that changed it (the same leader again is no change).
fn replace(now: &mut Option<ClientConfig>, new: Option<ClientConfig>) -> bool {
    let same = match (&*now, &new) {
        (Some(a), Some(b)) => a.endpoint == b.endpoint,
        (None, None) => true,
        _ => false,
    };
    *now = new;
    !same
}

/// How a node reaches another's lock stream at `rpc` (`host:port`): with the cluster's root
/// token, and TLS as this node serves it, trusting `etcd.peer_ca` (else its own certificate).
fn peer(config: &Config, rpc: &str) -> ClientConfig {
    let tls_ca = config
        .tls
        .as_ref()
        .map(|tls| config.etcd.peer_ca.clone().unwrap_or_else(|| tls.cert.clone()));
    ClientConfig {
        endpoint: format!("{}://{rpc}", if tls_ca.is_some() { "https" } else { "http" }),
        token: config.token.as_ref().map(|t| t.0.clone()),
        tls_ca,
        max_message_bytes: Some(config.max_message_bytes()),
    }
}
