//! The XA branches this proxy's sessions hold on their backend connections, active or
//! prepared. MariaDB lets no other connection finish a prepared branch while the one that
//! prepared it is open, so phase 2 for a held branch goes to its session, which runs it on
//! that connection between the client's commands; a branch not held here is finished from a
//! service connection (`phase2.rs`).

use std::collections::HashMap;

use ferrata_rpc::pb;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

/// A phase-2 command for a held branch, and where its outcome goes.
pub struct Request {
    pub commit: bool,
    pub reply: oneshot::Sender<pb::BranchOutcome>,
}

struct Holder {
    xid: String,
    resource: String,
    /// The holding session's backend connection (its identity in messages).
    connection_id: u32,
    inbox: mpsc::Sender<Request>,
}

/// Held branches by branch id (branch ids are unique across global transactions).
#[derive(Default)]
pub struct Held {
    branches: Mutex<HashMap<u64, Holder>>,
}

impl Held {
    /// Records that the session on `connection_id` holds the branch; returns where its
    /// phase-2 commands will arrive.
    pub fn hold(&self, xid: &str, branch_id: u64, resource: &str, connection_id: u32) -> mpsc::Receiver<Request> {
        let (inbox, requests) = mpsc::channel(4);
        self.branches.lock().insert(
            branch_id,
            Holder {
                xid: xid.to_owned(),
                resource: resource.to_owned(),
                connection_id,
                inbox,
            },
        );
        metrics::gauge!("ferrata_proxy_xa_branches_held").increment(1.0);
        requests
    }

    pub fn release(&self, branch_id: u64) {
        if self.branches.lock().remove(&branch_id).is_some() {
            metrics::gauge!("ferrata_proxy_xa_branches_held").decrement(1.0);
        }
    }

    /// Where to send phase 2 for the branch, if a session here holds it.
    pub fn inbox(&self, xid: &str, branch_id: u64) -> Option<mpsc::Sender<Request>> {
        let branches = self.branches.lock();
        let h = branches.get(&branch_id)?;
        (h.xid == xid).then(|| h.inbox.clone())
    }

    /// Whether a session here holds a branch on this backend connection (the phase-2 path
    /// must not end a connection a live session uses).
    pub fn holds_connection(&self, connection_id: u32) -> bool {
        self.branches.lock().values().any(|h| h.connection_id == connection_id)
    }

    /// The backend connection of another session here that holds a branch of `xid` on
    /// `resource`, if one does.
    pub fn other_on(&self, xid: &str, resource: &str, connection_id: u32) -> Option<u32> {
        self.branches
            .lock()
            .values()
            .find(|h| h.xid == xid && h.resource == resource && h.connection_id != connection_id)
            .map(|h| h.connection_id)
    }
}
