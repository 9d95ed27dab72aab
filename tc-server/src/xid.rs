//! Ids: transaction and branch ids, and the printable XID.
//!
//! An id is a u64 whose top 16 bits are the node id and whose low 48 bits count up. Ids are
//! leased in blocks: the store records a ceiling before any id below it is handed out, so a
//! restarted coordinator continues above everything it ever issued and never reuses an XID
//! (a late phase-1 request for an old transaction must not land in a new one). The XID is
//! `<node>-<sequence>`, printable and far below 128 bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::store::journal::Journal;
use crate::store::{Mutation, StoreError};

const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Ids per lease; a new lease is taken when half of the current one is used.
const LEASE: u64 = 1 << 20;

/// The node id an id carries.
pub fn node_of(id: u64) -> u16 {
    (id >> SEQ_BITS) as u16
}

pub fn format_xid(id: u64) -> String {
    format!("{}-{}", id >> SEQ_BITS, id & SEQ_MASK)
}

/// The id inside a printable XID, if it is one.
pub fn parse_xid(xid: &str) -> Option<u64> {
    let (node, seq) = xid.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(node) || !digits(seq) {
        return None;
    }
    let node: u16 = node.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    (seq <= SEQ_MASK).then_some((u64::from(node) << SEQ_BITS) | seq)
}

/// Hands out ids below the durable ceiling.
pub struct Ids {
    /// The first id this instance issues: every one below was issued before it started.
    first: u64,
    next: AtomicU64,
    /// Every id below this is covered by a durable lease.
    ceiling: AtomicU64,
    leasing: AtomicBool,
    leased: Notify,
    journal: Journal,
}

impl Ids {
    /// Starts above `stored_ceiling` (the ceiling read from the store), taking a first lease
    /// durably before returning.
    pub async fn start(node_id: u16, stored_ceiling: u64, journal: Journal) -> Result<Arc<Ids>, StoreError> {
        let base = u64::from(node_id) << SEQ_BITS;
        let first = stored_ceiling.max(base + 1);
        if first & !SEQ_MASK != base {
            return Err(StoreError(format!(
                "the stored id ceiling {stored_ceiling} does not belong to node {node_id}"
            )));
        }
        let ceiling = first + LEASE;
        journal.submit(vec![Mutation::SetIdCeiling(ceiling)]).await?;
        Ok(Arc::new(Ids {
            first,
            next: AtomicU64::new(first),
            ceiling: AtomicU64::new(ceiling),
            leasing: AtomicBool::new(false),
            leased: Notify::new(),
            journal,
        }))
    }

    /// The first id this instance issues.
    pub fn first(&self) -> u64 {
        self.first
    }

    pub async fn next(self: &Arc<Self>) -> Result<u64, StoreError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        loop {
            let ceiling = self.ceiling.load(Ordering::Acquire);
            if id + LEASE / 2 >= ceiling {
                self.renew(ceiling);
            }
            if id < ceiling {
                return Ok(id);
            }
            // Only when ids run faster than a lease is written; wait for it.
            let leased = self.leased.notified();
            if id < self.ceiling.load(Ordering::Acquire) {
                return Ok(id);
            }
            if let Some(e) = self.journal.failed() {
                return Err(StoreError(e));
            }
            leased.await;
        }
    }

    fn renew(self: &Arc<Self>, ceiling: u64) {
        if self.leasing.swap(true, Ordering::AcqRel) {
            return;
        }
        let new = ceiling + LEASE;
        let write = self.journal.submit(vec![Mutation::SetIdCeiling(new)]);
        let ids = Arc::clone(self);
        tokio::spawn(async move {
            match write.await {
                Ok(()) => ids.ceiling.store(new, Ordering::Release),
                Err(e) => tracing::error!(error = %e, "cannot lease more ids"),
            }
            ids.leasing.store(false, Ordering::Release);
            ids.leased.notify_waiters();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_round_trip() {
        let id = (7u64 << SEQ_BITS) | 12345;
        assert_eq!(format_xid(id), "7-12345");
        assert_eq!(parse_xid("7-12345"), Some(id));
        for bad in [
            "",
            "7",
            "-1",
            "7-",
            "a-1",
            "7-1-2",
            "70000-1",
            "1-281474976710656",
            " 7-1",
            "7-+1",
        ] {
            assert_eq!(parse_xid(bad), None, "{bad:?}");
        }
        assert!(format_xid(u64::MAX).len() <= 128);
    }
}
