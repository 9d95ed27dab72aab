//! The XA branches this proxy's sessions hold on their backend connections, active or
//! prepared. MariaDB lets no other connection finish a prepared branch while the one that
//! prepared it is open, so phase 2 for a held branch goes to its session, which runs it on
//! that connection between the client's commands; a branch not held here is finished from a
//! service connection (`phase2.rs`).

use std::collections::HashMap;

use ferrata_rpc::pb;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::coordinator::unchecked::TableName;

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
    /// The tables its statements wrote, as (database, table), lowercased.
    tables: Vec<TableName>,
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
                tables: Vec::new(),
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

    /// Notes tables a held branch wrote.
    pub fn wrote(&self, branch_id: u64, tables: &[TableName]) {
        if let Some(h) = self.branches.lock().get_mut(&branch_id) {
            for (db, table) in tables {
                let t = (db.to_lowercase(), table.to_lowercase());
                if !h.tables.contains(&t) {
                    h.tables.push(t);
                }
            }
        }
    }

    /// The held branches that wrote a table a DDL statement names (by name, as a word of its
    /// text), as `(xid, branch id, database.table)`: the statement waits for their row locks
    /// until their phase 2.
    pub fn named_by(&self, ddl: &str) -> Vec<(String, u64, String)> {
        let text = ddl.to_lowercase();
        let is_word = |word: &str| {
            text.match_indices(word).any(|(at, _)| {
                let before = text[..at].chars().next_back();
                let after = text[at + word.len()..].chars().next();
                let part = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
                !part(before) && !part(after)
            })
        };
        let branches = self.branches.lock();
        let mut named = Vec::new();
        for (id, h) in branches.iter() {
            for (db, table) in &h.tables {
                if is_word(table) {
                    named.push((h.xid.clone(), *id, format!("{db}.{table}")));
                }
            }
        }
        named
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_names_the_tables_held_branches_wrote() {
        let held = Held::default();
        let _inbox = held.hold("1-7", 3, "db:3306/shop", 42);
        held.wrote(3, &[("Shop".into(), "Orders".into()), ("shop".into(), "orders".into())]);
        let named = held.named_by("ALTER TABLE `orders` ADD COLUMN note TEXT");
        assert_eq!(
            named,
            vec![("1-7".to_owned(), 3, "shop.orders".to_owned())],
            "once, lowercased"
        );
        assert!(
            held.named_by("ALTER TABLE orders_archive ADD c INT").is_empty(),
            "a word, not a prefix"
        );
        assert!(held.named_by("DROP TABLE items").is_empty());
        held.release(3);
        assert!(held.named_by("ALTER TABLE orders ADD c INT").is_empty(), "released");
    }
}
