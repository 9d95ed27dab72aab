//! Routing of phase-2 commands to resource managers: which connected resource manager serves
//! which resource, sending a command and awaiting its answer, and the list of every attached
//! stream with what `guards.rs` needs to know of it (the guard updates it acknowledged, its
//! latest answered heartbeat). The stream itself (hello, heartbeats) is handled in `grpc.rs`;
//! this module only sees connections come and go.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ferrata_rpc::pb;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

/// One attached resource manager stream.
pub struct RmConnection {
    pub id: u64,
    pub rm_id: String,
    /// Unique to the resource manager's process (`pb::Hello::instance_id`).
    pub instance_id: String,
    pub attached_at: Instant,
    /// Resources announced so far (Hello, then Announce messages).
    resources: Mutex<Vec<String>>,
    outbound: mpsc::Sender<Result<pb::TcMessage, tonic::Status>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<pb::BranchOutcome>>>>,
    /// The highest guard update seq the resource manager acknowledged (GuardAck).
    acked: AtomicU64,
    /// The seq of the complete guard set this stream was sent on attach (updates after it
    /// concern it); `u64::MAX` until that set went out.
    guards_from: AtomicU64,
    /// When the latest numbered heartbeat arrived (the attach time before the first): the
    /// resource manager trusts its guard set at most a lease past it.
    last_answered: Mutex<Instant>,
    detached: AtomicBool,
}

impl RmConnection {
    /// Delivers an answer from the stream to the command waiting for it.
    pub fn answer(&self, results: pb::BranchResults) -> bool {
        match self.pending.lock().remove(&results.request_id) {
            Some(waiter) => {
                let _ = waiter.send(results.outcomes);
                true
            }
            None => false,
        }
    }

    pub async fn send(&self, message: pb::TcMessage) -> bool {
        self.outbound.send(Ok(message)).await.is_ok()
    }

    /// Records a GuardAck: every update up to `seq` was applied.
    pub fn ack(&self, seq: u64) {
        self.acked.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    pub fn set_guards_from(&self, seq: u64) {
        self.guards_from.store(seq, Ordering::Release);
    }

    pub fn guards_from(&self) -> u64 {
        self.guards_from.load(Ordering::Acquire)
    }

    /// A numbered heartbeat arrived at `at` (its answer goes out after this).
    pub fn answered(&self, at: Instant) {
        let mut last = self.last_answered.lock();
        *last = (*last).max(at);
    }

    pub fn last_answered(&self) -> Instant {
        *self.last_answered.lock()
    }

    /// The resources it announced.
    pub fn resources(&self) -> Vec<String> {
        self.resources.lock().clone()
    }

    /// The stream has ended (set before the connection leaves the registry).
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }
}

/// Why a phase-2 command got no answer. All of these are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no resource manager serving {0:?} is connected")]
    NoResourceManager(String),
    #[error("resource manager {rm_id} went away before answering")]
    Disconnected { rm_id: String },
    #[error("resource manager {rm_id} did not answer within {timeout:?}")]
    Timeout { rm_id: String, timeout: Duration },
}

#[derive(Default)]
pub struct RmRegistry {
    by_resource: Mutex<HashMap<String, Vec<Arc<RmConnection>>>>,
    /// Every attached connection, with resources or not, in attach order.
    all: Mutex<Vec<Arc<RmConnection>>>,
    next_connection: AtomicU64,
    next_request: AtomicU64,
    round_robin: AtomicUsize,
    /// Notified whenever a resource manager attaches or announces a resource, so work
    /// waiting for one can go on.
    attached: Notify,
}

impl RmRegistry {
    pub fn attach(
        &self,
        hello: &pb::Hello,
        outbound: mpsc::Sender<Result<pb::TcMessage, tonic::Status>>,
    ) -> Arc<RmConnection> {
        let now = Instant::now();
        let conn = Arc::new(RmConnection {
            id: self.next_connection.fetch_add(1, Ordering::Relaxed),
            rm_id: hello.rm_id.clone(),
            instance_id: hello.instance_id.clone(),
            attached_at: now,
            resources: Mutex::new(Vec::new()),
            outbound,
            pending: Mutex::new(HashMap::new()),
            acked: AtomicU64::new(0),
            guards_from: AtomicU64::new(u64::MAX),
            last_answered: Mutex::new(now),
            detached: AtomicBool::new(false),
        });
        self.all.lock().push(Arc::clone(&conn));
        self.announce(&conn, hello.resource_ids.clone());
        conn
    }

    /// Adds resources a connection serves; work waiting for a resource manager goes on.
    pub fn announce(&self, conn: &Arc<RmConnection>, resources: Vec<String>) {
        let mut map = self.by_resource.lock();
        let mut own = conn.resources.lock();
        for r in resources {
            if own.contains(&r) {
                continue;
            }
            map.entry(r.clone()).or_default().push(Arc::clone(conn));
            own.push(r);
        }
        drop(own);
        drop(map);
        self.attached.notify_waiters();
    }

    /// Removes a connection from routing and fails every command waiting on it.
    pub fn detach(&self, conn: &RmConnection) {
        conn.detached.store(true, Ordering::Release);
        self.all.lock().retain(|c| c.id != conn.id);
        let mut map = self.by_resource.lock();
        for r in conn.resources.lock().iter() {
            if let Some(list) = map.get_mut(r) {
                list.retain(|c| c.id != conn.id);
                if list.is_empty() {
                    map.remove(r);
                }
            }
        }
        drop(map);
        conn.pending.lock().clear();
    }

    pub fn connected(&self) -> usize {
        self.all.lock().len()
    }

    /// Every attached connection.
    pub fn connections(&self) -> Vec<Arc<RmConnection>> {
        self.all.lock().clone()
    }

    /// Resolves at the next attach; create it before checking for a connection, so an
    /// attach in between is not missed.
    pub fn attached(&self) -> tokio::sync::futures::Notified<'_> {
        self.attached.notified()
    }

    pub fn serves(&self, resource: &str) -> bool {
        self.by_resource.lock().contains_key(resource)
    }

    /// A connection serving `resource`: the process `instance` (when named) while it is
    /// attached and serves it, else one in turn.
    fn pick(&self, resource: &str, instance: &str) -> Option<Arc<RmConnection>> {
        let map = self.by_resource.lock();
        let list = map.get(resource)?;
        // The newest: a re-attached process's old stream may not be detached yet.
        if let Some(own) = list.iter().rfind(|c| !instance.is_empty() && c.instance_id == instance) {
            return Some(Arc::clone(own));
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % list.len();
        Some(Arc::clone(&list[i]))
    }

    /// Sends a phase-2 command (or an operator's `repair` of one branch) for branches of one
    /// resource to one resource manager serving it, and returns its answers. Branches that
    /// name the process holding them (XA, `instance_id`) go to it while it is attached: it
    /// finishes them on the connection that prepared them, which nobody else can while it
    /// is open; the caller sends branches of one holder together.
    pub async fn call(
        &self,
        resource: &str,
        action: pb::Phase2Action,
        branches: Vec<pb::BranchRef>,
        repair: Option<pb::Repair>,
        timeout: Duration,
    ) -> Result<Vec<pb::BranchOutcome>, CallError> {
        let instance = branches.first().map_or("", |b| b.instance_id.as_str());
        let conn = self
            .pick(resource, instance)
            .ok_or_else(|| CallError::NoResourceManager(resource.to_owned()))?;
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(request_id, tx);
        let message = pb::TcMessage {
            kind: Some(pb::tc_message::Kind::Command(pb::BranchCommand {
                request_id,
                action: action as i32,
                branches,
                repair,
            })),
        };
        let disconnected = || CallError::Disconnected {
            rm_id: conn.rm_id.clone(),
        };
        if !conn.send(message).await {
            conn.pending.lock().remove(&request_id);
            return Err(disconnected());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcomes)) => Ok(outcomes),
            Ok(Err(_)) => Err(disconnected()),
            Err(_) => {
                conn.pending.lock().remove(&request_id);
                Err(CallError::Timeout {
                    rm_id: conn.rm_id.clone(),
                    timeout,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(rms: &RmRegistry, instance: &str) -> Arc<RmConnection> {
        let (tx, _rx) = mpsc::channel(8);
        let hello = pb::Hello {
            rm_id: format!("rm-{instance}"),
            resource_ids: vec!["db1".into()],
            instance_id: instance.into(),
        };
        rms.attach(&hello, tx)
    }

    /// A branch naming its holder goes to that process's newest stream while it is attached,
    /// to the others in turn once it is gone; one naming none goes to each in turn.
    #[test]
    fn a_holder_s_branches_go_to_it_while_it_is_attached() {
        let rms = RmRegistry::default();
        let old = attach(&rms, "a");
        let other = attach(&rms, "b");
        let newer = attach(&rms, "a");
        for _ in 0..3 {
            assert_eq!(rms.pick("db1", "a").map(|c| c.id), Some(newer.id));
        }
        let anyone: Vec<u64> = (0..3).filter_map(|_| rms.pick("db1", "").map(|c| c.id)).collect();
        assert_eq!(anyone.len(), 3);
        assert!(anyone.windows(2).all(|w| w[0] != w[1]), "in turn: {anyone:?}");
        rms.detach(&newer);
        assert_eq!(rms.pick("db1", "a").map(|c| c.id), Some(old.id));
        rms.detach(&old);
        assert_eq!(rms.pick("db1", "a").map(|c| c.id), Some(other.id));
        assert!(rms.pick("db2", "a").is_none());
    }
}
