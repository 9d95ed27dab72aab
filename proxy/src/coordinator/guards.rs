//! The proxy's view of the coordinator's guarded tables: the tables that may hold global
//! row locks right now, kept current by the Attach stream (`pb::GuardUpdate`), and how long
//! that view may be trusted.
//!
//! The no-dirty-writes check (`isolation/dirty_writes.rs`) reads it on every write made
//! outside a global transaction, and XA mode on every write in its branches: a write to a table that is not guarded, seen by a trusted
//! view that did not change while the write ran, needs no row-level check. Why that is sound
//! is in ARCHITECTURE.md ("No dirty writes").
//!
//! - **Guarded** tables are named by database and table, case-insensitively and whatever
//!   server their resource id names: a wider match only costs a check, a narrower one could
//!   miss a lock. Each name keeps the resources that guard it, so that one resource's release
//!   leaves another's guard standing.
//! - **Trust** lasts from an answered heartbeat until its send time plus the coordinator's
//!   lease; the coordinator grants a first lock in a table only after this proxy acknowledged
//!   the guard, or after its stream ended and that lease ran out.
//! - **Epoch** grows whenever a table is added or the stream is lost: a write that saw the
//!   same epoch before and after it ran (and trust throughout) ran under the same view.
//! - **Unchecked writes** in flight (`unchecked.rs`) hold back the acknowledgement of an
//!   update that guards one of their tables, and are interrupted before the trust they
//!   started under ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrata_rpc::client::{AckWhen, GuardSink};
use ferrata_rpc::pb;
use parking_lot::RwLock;

use super::database_of;
use super::unchecked::{TableName, UncheckedWrites};

pub struct TableGuards {
    /// Guarded tables, each with the resource ids that guard it.
    tables: RwLock<HashMap<TableName, HashSet<String>>>,
    epoch: AtomicU64,
    /// Nanoseconds after `base` until which the view may be trusted; 0: not trusted.
    trusted_until: AtomicU64,
    /// The coordinator's lease, in nanoseconds (from the last answered heartbeat).
    lease: AtomicU64,
    base: Instant,
    pub unchecked: Arc<UncheckedWrites>,
}

/// The view's epoch at one moment, to compare with a later one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation(u64);

fn name(table: &pb::GuardedTable) -> Option<TableName> {
    let database = if table.schema.is_empty() {
        database_of(&table.resource_id)?
    } else {
        table.schema.clone()
    };
    Some((database.to_lowercase(), table.table.to_lowercase()))
}

impl Default for TableGuards {
    fn default() -> Self {
        TableGuards {
            tables: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            trusted_until: AtomicU64::new(0),
            lease: AtomicU64::new(0),
            base: Instant::now(),
            unchecked: Arc::new(UncheckedWrites::default()),
        }
    }
}

impl TableGuards {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub fn observe(&self) -> Observation {
        Observation(self.epoch.load(Ordering::SeqCst))
    }

    pub fn trusted(&self) -> bool {
        self.now() < self.trusted_until.load(Ordering::SeqCst)
    }

    /// Trusted, and no table guarded at all: no write needs a closer look.
    pub fn quiet(&self) -> bool {
        self.trusted() && self.tables.read().is_empty()
    }

    /// Whether writes to `database.table` need the row-level check (always, when the view
    /// is not trusted).
    pub fn guarded(&self, database: &str, table: &str) -> bool {
        !self.trusted() || self.shows(database, table)
    }

    /// Whether a trusted view shows `database.table` guarded already.
    pub fn shows(&self, database: &str, table: &str) -> bool {
        self.trusted()
            && self
                .tables
                .read()
                .contains_key(&(database.to_lowercase(), table.to_lowercase()))
    }

    /// Nothing was added and trust held since `seen`.
    pub fn unchanged_since(&self, seen: Observation) -> bool {
        self.observe() == seen && self.trusted()
    }

    /// (now, trusted until, the margin before it at which unchecked writes are interrupted),
    /// in nanoseconds on this view's clock: a quarter of the lease, time for the interruption
    /// to land before the coordinator can act on the lease running out.
    pub fn trust_clock(&self) -> (u64, u64, u64) {
        (
            self.now(),
            self.trusted_until.load(Ordering::SeqCst),
            self.lease.load(Ordering::SeqCst) / 4,
        )
    }

    /// Guarded tables, sorted (for logs and tests).
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tables.read().keys().map(|(d, t)| format!("{d}.{t}")).collect();
        names.sort();
        names
    }
}

impl GuardSink for TableGuards {
    fn update(&self, update: &pb::GuardUpdate) -> AckWhen {
        let added: Vec<TableName> = update.guard.iter().filter_map(name).collect();
        let mut tables = self.tables.write();
        if update.full {
            tables.clear();
        }
        for t in &update.release {
            if let Some(n) = name(t)
                && let Some(resources) = tables.get_mut(&n)
            {
                resources.remove(&t.resource_id);
                if resources.is_empty() {
                    tables.remove(&n);
                }
            }
        }
        for t in &update.guard {
            if let Some(n) = name(t) {
                tables.entry(n).or_default().insert(t.resource_id.clone());
            }
        }
        // Bumped while the set is still locked: a reader that sees the new epoch sees the
        // new set.
        if update.full || !update.guard.is_empty() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        drop(tables);
        tracing::debug!(seq = update.seq, guarded = ?self.list(), "guarded tables updated");
        // Taken after the tables were applied: a write that registers later sees them.
        Box::pin(self.unchecked.fence(&added))
    }

    fn confirmed(&self, sent: Instant, lease: Duration) {
        let until = (sent + lease).saturating_duration_since(self.base);
        self.lease.store(lease.as_nanos() as u64, Ordering::SeqCst);
        self.trusted_until.fetch_max(until.as_nanos() as u64, Ordering::SeqCst);
        self.unchecked.trust_changed();
    }

    fn lost(&self) {
        // The running writes keep the trust they started under as their deadline.
        self.unchecked
            .stream_lost(|| self.trusted_until.swap(0, Ordering::SeqCst));
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(db: &str, t: &str) -> pb::GuardedTable {
        pb::GuardedTable {
            resource_id: format!("db1:3306/{db}"),
            schema: db.into(),
            table: t.into(),
        }
    }

    #[test]
    fn trust_comes_from_answered_heartbeats_and_ends_with_the_stream() {
        let g = TableGuards::default();
        assert!(!g.trusted() && !g.quiet() && g.guarded("shop", "orders"));
        g.confirmed(Instant::now(), Duration::from_secs(60));
        assert!(g.quiet() && !g.guarded("shop", "orders"));
        let seen = g.observe();
        g.lost();
        assert!(!g.trusted() && !g.unchanged_since(seen));
        // A lease that already ran out gives no trust.
        g.confirmed(Instant::now() - Duration::from_secs(2), Duration::from_secs(1));
        assert!(!g.trusted());
    }

    #[tokio::test]
    async fn updates_guard_release_and_replace() {
        let g = TableGuards::default();
        g.confirmed(Instant::now(), Duration::from_secs(60));
        let seen = g.observe();
        g.update(&pb::GuardUpdate {
            seq: 1,
            full: false,
            guard: vec![table("Shop", "Orders")],
            release: vec![],
        })
        .await;
        assert!(!g.unchanged_since(seen), "an added table moves the epoch");
        assert!(g.guarded("shop", "orders") && g.guarded("SHOP", "ORDERS"));
        assert!(!g.guarded("shop", "items") && !g.quiet());
        let seen = g.observe();
        g.update(&pb::GuardUpdate {
            seq: 2,
            full: false,
            guard: vec![],
            // As guarded: the coordinator releases what it guarded, resource id and all.
            release: vec![table("Shop", "Orders")],
        })
        .await;
        assert!(g.unchanged_since(seen), "a release needs no second look");
        assert!(g.quiet());
        g.update(&pb::GuardUpdate {
            seq: 3,
            full: true,
            guard: vec![table("a", "b")],
            release: vec![],
        })
        .await;
        assert_eq!(g.list(), vec!["a.b".to_owned()]);
    }

    /// Two servers guard a table of the same name: one's release leaves the other's guard.
    #[tokio::test]
    async fn a_name_stays_guarded_while_any_resource_guards_it() {
        let g = TableGuards::default();
        g.confirmed(Instant::now(), Duration::from_secs(60));
        let on = |server: &str| pb::GuardedTable {
            resource_id: format!("{server}/shop"),
            ..table("shop", "orders")
        };
        g.update(&pb::GuardUpdate {
            seq: 1,
            full: false,
            guard: vec![on("db1:3306"), on("db2:3306")],
            release: vec![],
        })
        .await;
        assert!(g.shows("shop", "orders"));
        g.update(&pb::GuardUpdate {
            seq: 2,
            full: false,
            guard: vec![],
            release: vec![on("db2:3306")],
        })
        .await;
        assert!(g.shows("shop", "orders"), "db1 still guards it");
        g.update(&pb::GuardUpdate {
            seq: 3,
            full: false,
            guard: vec![],
            release: vec![on("db1:3306")],
        })
        .await;
        assert!(!g.shows("shop", "orders"));
    }
}
